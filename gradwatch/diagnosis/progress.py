"""The rules about whether the loss makes progress: stuck where it started, or bouncing without
falling.
"""

from __future__ import annotations

import statistics

from ..summary import EpochSummary, finite
from .facts import (
    LEARNT,
    LEVEL_STEPS,
    _accuracy,
    _classes,
    _dropout_checks,
    _fast_so_far,
    _fell,
    _frozen_checks,
    _heavy_dropout,
    _judged,
    _latest_level,
    _loss,
    _mostly_frozen,
    _near_start,
    _start_loss,
    _untrained,
    _untrained_loss,
)
from .findings import LOWER, RAISE, Finding, _found, names, rule
from .thresholds import Thresholds


@rule(
    "a larger learning rate{lr_up}; if that does not help, check that the labels match the images "
    "and that the inputs are normalised.",
    thresholds=(
        "stuck_loss",
        "chance_margin",
        "stuck_epochs",
        "stuck_steps",
        "stuck_moving_ratio",
        "stuck_data_ratio",
        "update_fast",
    ),
    follows=(
        "updates_rounded_away",
        "not_updated",
        "not_in_optimizer",
        "no_gradient",
        "eval_mode",
        "gradients_not_cleared",
        "softmax_before_loss",
        "lr_collapsed",
        "unshuffled",
        "strong_weight_decay",
        "diverging",
        "dead_units",
        "saturated",
        "vanishing_gradients",
        "not_learning",
        "high_initial_loss",
        "moving_too_fast",
    ),
    lr=RAISE,
    instead="check that the labels match the images and that the inputs are normalised.",
    ended="a slow start",
    at_end=True,
)
def stuck(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """For `stuck_epochs` epochs (in a run that ended in fewer, all of them: _stuck_span) the
    training loss stays above `stuck_loss` x ln C and the accuracy, where reported, within
    `chance_margin` of chance (without classes: above `stuck_loss` x the first loss, for any loss
    function). Told with its suspect by how fast the weights move meanwhile (their median
    update ratio): the learning rate below `stuck_moving_ratio`; the labels and inputs at
    `stuck_data_ratio` or above, a pace at which models learn; neither between the two (what to
    check comes in order), nor where a weight moved faster than `update_fast` meanwhile (the rate
    a rival) or the dropout is heavy, nor in fewer than FEW_STEPS optimizer steps in all (too few
    to tell). A contrastive loss is told only with its weights still: one whose pairs a miner
    picks by the model's own embeddings, harder as it learns, stays flat while the embeddings
    improve."""
    if not _judged(history):  # a loss not minimised by design (RL, GAN, other)
        return []
    now = history[-1]
    start, said = _start_loss(history)
    recent = _stuck_span(history, t)
    if not start or not recent or not all(_near_start(s, start, t) for s in recent):
        return []
    ended = len(recent) < t.stuck_epochs  # a run that ended in fewer epochs (_stuck_span)
    message = _stuck_message(recent, start, said, ended)
    evidence = {"train_loss": _loss(now), "accuracy": _accuracy(now)}
    evidence["since_epoch"] = recent[0].epoch
    if now.step < FEW_STEPS:
        return [_too_few(now, message, evidence)]
    moving = _moving(recent)
    moved = moving is not None and moving >= t.stuck_moving_ratio
    if moved and now.loop.get("objective") == "contrastive":  # a mined loss: flat by design
        return []
    if ended and (moving is None or moved):
        return [_short(now, moving, message, evidence, t)]
    return [_by_pace(now, moving, message, evidence, t, _fast_so_far(recent, t))]


def _stuck_message(recent: list[EpochSummary], start: float, said: str, ended: bool) -> str:
    """What stuck says of the loss (and the accuracy) over the summaries `recent`, held near `start`
    (told as `said`), and where `ended`, that the run ended so."""
    now = recent[-1]
    loss = _loss(now)
    where = "near" if loss <= 1.5 * start else "above"
    since = f"epoch {recent[0].epoch + 1}" if now.unit == "epoch" else f"step {recent[0].step}"
    message = f"since {since} the training loss stays {where} {start:.3g} ({said}; {loss:.3g} now)"
    classes = _classes(now)
    if classes:
        chance = f"({_accuracy(now):.1%}; chance {1 / classes:.1%})"
        message += f" and the accuracy near chance {chance}"
    if ended:
        message += f" until the run's end, after {now.step} optimizer steps"
    return message


def _stuck_span(history: list[EpochSummary], t: Thresholds) -> list[EpochSummary]:
    """The summaries stuck reads: the last `stuck_epochs`; in a run that ended (close()) in fewer,
    all of them, where it took `stuck_steps` optimizer steps or more, an untrained model's loss is
    known (ln C: a first loss is one batch's) and the loss's latest level is still near it (a run
    that began to learn at its end is not stuck); else none."""
    if len(history) >= t.stuck_epochs:
        return history[-t.stuck_epochs :]
    now = history[-1]
    untrained = _untrained_loss(now)
    if not now.loop.get("ended") or now.step < t.stuck_steps or not untrained:
        return []
    latest = _latest_level(now)
    return history if finite(latest) and latest >= t.stuck_loss * untrained else []


def _short(
    now: EpochSummary, moving: float | None, message: str, evidence: dict, t: Thresholds
) -> Finding:
    """stuck's finding in a run that ended in fewer than `stuck_epochs` epochs, its weights moving
    (or their pace not read): a note, since a slow start (a model that leaves ln C later, as small
    CNNs under SGD do after some epochs) is a rival of the data that the run ended too soon to rule
    out; what to check, in order."""
    pace = f"median ||dw||/||w|| {moving:.2g} per step" if moving is not None else "not read"
    message += f", the weights moving ({pace}), in fewer than {t.stuck_epochs} epochs."
    suggestion = "check, in this order: whether the loss leaves it with more steps (a slow start); "
    suggestion += "that the labels match the inputs and that the inputs vary and are normalised."
    evidence.update(update_ratio=moving, cause=None)  # a symptom: no claim on the rate or the data
    finding = _found(now, [], evidence, message, suggestion=suggestion)
    finding.harmless = True  # a note: it cannot tell a slow start apart
    return finding


def _too_few(now: EpochSummary, message: str, evidence: dict) -> Finding:
    """stuck's finding in fewer than FEW_STEPS optimizer steps in all: too few to tell a cause."""
    message += f", in {now.step} optimizer steps in all: too few to tell."
    suggestion = "let it take more steps (more data, or more epochs) before judging the "
    suggestion += "learning rate or the data: a model learns little in so few."
    evidence.update(cause="few_steps", steps=now.step)  # no claim on the learning rate
    return _found(now, [], evidence, message, suggestion=suggestion)


def _by_pace(
    now: EpochSummary,
    moving: float | None,
    message: str,
    evidence: dict,
    t: Thresholds,
    fast: dict[str, float],
) -> Finding:
    """The finding of a stuck run told with its suspect by the weights' pace `moving` (their median
    update ratio, None where none was read); `fast`, the weights that moved faster than
    `update_fast` meanwhile, make the learning rate a rival of the data."""
    if moving is None or moving < t.stuck_moving_ratio:
        return _found(now, [], evidence, f"{message}: the model is not learning.")
    if moving < t.stuck_data_ratio:  # slow steps: the rate and the data are suspects alike
        message += f", the weights moving slowly (median ||dw||/||w|| {moving:.2g} per step)."
        suggestion = "check, in this order: the learning rate (whether the loss moves at ten times "
        suggestion += "it); that the labels match the inputs and that the inputs vary and are "
        suggestion += "normalised."
        evidence.update(update_ratio=moving, cause=None)  # a symptom: no claim on the rate
        return _found(now, [], evidence, message, suggestion=suggestion)
    message += f", although the weights move (median ||dw||/||w|| {moving:.2g})"
    if fast:  # steps this large keep a model from fitting as well as data with nothing to learn
        message += f"; {names(fast)} moved by up to {max(fast.values()):.2g} of its size per step."
        suggestion = "check, in this order: the learning rate (whether the loss falls at a tenth "
        suggestion += "of it); that the labels match the inputs and that the inputs vary and are "
        suggestion += "normalised."
        evidence.update(update_ratio=moving, fast=fast, cause=None)  # a symptom
        return _found(now, [], evidence, message, suggestion=suggestion)
    rival = _rival_of_data(now, moving, message, evidence)
    if rival is not None:
        return rival
    message += ": the labels or the inputs say nothing the model can learn."
    suggestion = "check that the labels match the images (a shuffled or misaligned list?) and that "
    suggestion += "the inputs vary and are normalised; a larger learning rate will not help."
    evidence.update(update_ratio=moving, weights_move=True)
    return _found(now, [], evidence, message, suggestion=suggestion)


def _rival_of_data(
    now: EpochSummary, moving: float, message: str, evidence: dict
) -> Finding | None:
    """stuck's finding where its weights move and a fact of the model rivals the data as the cause,
    a symptom with what to check: heavy dropout (the model in training mode sees few units), or a
    model mostly frozen (the trained layers learn from what the frozen part computes); else None."""
    dropout = _heavy_dropout(now)
    if dropout is not None:
        message += f"; its dropout at {dropout:g} keeps {1 - dropout:.0%} of the units a step."
        evidence.update(update_ratio=moving, dropout=dropout, cause=None)  # a symptom
        return _found(now, [], evidence, message, suggestion=_dropout_checks(dropout))
    frozen = _mostly_frozen(now)
    if frozen is not None:
        message += f"; {frozen} of its parameter tensors are frozen, as many as train or more."
        evidence.update(update_ratio=moving, frozen=frozen, cause=None)  # a symptom
        return _found(now, [], evidence, message, suggestion=_frozen_checks())
    return None


# optimizer steps in all below which a loss that has not moved says nothing yet: 4 levels of it
FEW_STEPS = 4 * LEVEL_STEPS


def _moving(recent: list[EpochSummary]) -> float | None:
    """How fast the weights that train moved (_untrained: not the frozen ones, whose ratio is 0):
    their median update ratio in each of `recent` that read one (an epoch shorter than the
    statistics' cadence may read none), the highest: a schedule that anneals the rate (to 0 at a
    run's end) slows the weights by design, and a rate too small keeps them slow throughout."""
    medians = []
    for summary in recent:
        still = _untrained(summary)
        ratios = [s.get("update_ratio") for n, s in summary.layers.items() if n not in still]
        ratios = [ratio for ratio in ratios if finite(ratio)]
        medians += [statistics.median(ratios)] if ratios else []
    return max(medians, default=None)


@rule(
    "a lower learning rate{lr} or a larger batch.",
    thresholds=("oscillation_epochs", "oscillation_amplitude"),
    follows=(
        "gradients_not_cleared",
        "unshuffled",
        "diverging",
        "exploding_gradients",
        "moving_too_fast",
    ),
    lr=LOWER,
    instead="a larger batch, or clip gradients.",
)
def oscillating(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """Over the last `oscillation_epochs` epochs the training loss turned up and down nearly every
    epoch, by `oscillation_amplitude` of its level, without falling; not once it is down to LEARNT x
    where it started (batches then bounce it around its floor: a converged regression's)."""
    if not _judged(history) or _fell(history, LEARNT):  # not minimised by design (RL, GAN, other)
        return []
    losses = [_loss(s) for s in history[-t.oscillation_epochs :]]
    if len(losses) < t.oscillation_epochs or not all(map(finite, losses)):
        return []
    steps = [b - a for a, b in zip(losses, losses[1:])]
    turns = sum(1 for a, b in zip(steps, steps[1:]) if a * b < 0)
    level = statistics.median(losses)
    swing = statistics.median(abs(d) for d in steps)
    half = len(losses) // 2
    falling = statistics.mean(losses[half:]) < 0.9 * statistics.mean(losses[:half])
    if turns < len(steps) - 2 or swing < t.oscillation_amplitude * level or falling:
        return []
    span = "epochs" if history[-1].unit == "epoch" else "windows of steps"
    message = f"over the last {len(losses)} {span} the training loss went up and down by "
    message += f"{swing:.3g} "
    message += f"(around {level:.3g}) without falling: the steps overshoot."
    evidence = {"train_losses": losses, "swing": swing, "threshold": t.oscillation_amplitude}
    return [_found(history[-1], [], evidence, message)]
