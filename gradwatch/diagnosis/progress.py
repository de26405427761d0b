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
    _loss,
    _mostly_frozen,
    _near_start,
    _start_loss,
    _untrained,
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
)
def stuck(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """For `stuck_epochs` epochs the training loss stays above `stuck_loss` x ln C and the accuracy
    within `chance_margin` of chance (without classes: above `stuck_loss` x the first loss, for any
    loss function). Told with its suspect by how fast the weights move meanwhile (their median
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
    classes = _classes(now)
    start, said = _start_loss(history)
    recent = history[-t.stuck_epochs :]
    if not start or len(history) < t.stuck_epochs:
        return []
    if not all(_near_start(summary, start, t) for summary in recent):
        return []
    accuracy = _accuracy(now)
    loss = _loss(now)
    where = "near" if loss <= 1.5 * start else "above"
    since = f"epoch {recent[0].epoch + 1}" if now.unit == "epoch" else f"step {recent[0].step}"
    message = f"since {since} the training loss stays {where} {start:.3g} "
    message += f"({said}; {loss:.3g} now)"
    if classes:
        message += f" and the accuracy near chance ({accuracy:.1%}; chance {1 / classes:.1%})"
    evidence = {"train_loss": _loss(now), "accuracy": accuracy, "since_epoch": recent[0].epoch}
    if now.step < FEW_STEPS:
        return [_too_few(now, message, evidence)]
    moving = _moving(recent)
    moved = moving is not None and moving >= t.stuck_moving_ratio
    if moved and now.loop.get("objective") == "contrastive":  # a mined loss: flat by design
        return []
    return [_by_pace(now, moving, message, evidence, t, _fast_so_far(recent, t))]


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
    """The median update ratio of the weights that train (_untrained: not the frozen ones, whose
    ratio is 0) at the latest of `recent` that read one (an epoch shorter than the statistics'
    cadence may read none)."""
    for summary in reversed(recent):
        still = _untrained(summary)
        ratios = [s.get("update_ratio") for n, s in summary.layers.items() if n not in still]
        ratios = [ratio for ratio in ratios if finite(ratio)]
        if ratios:
            return statistics.median(ratios)
    return None


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
