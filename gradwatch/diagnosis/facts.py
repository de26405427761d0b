"""The readings of a run that several rules share: the loss at a level (a median over windows, never
one batch), the loss an untrained model has for the objective, whether the loss came down, the
learning rate set, each layer's update ratios, saturated layers, and the facts of the loop's code
that the loss's graph shows. Pure functions of the epoch summaries (summary.py).
"""

from __future__ import annotations

import math
import statistics

from ..summary import EpochSummary, finite
from .thresholds import Thresholds

METRIC_TAGS = {  # the scalar tags under which training loops commonly log these, preferred first
    "train_loss": "train/loss train_loss loss/train Loss/train training_loss train/loss_epoch "
    "train_loss_epoch loss",
    "train_accuracy": "train/accuracy train_acc train/acc accuracy/train Accuracy/train acc",
    "valid_loss": "valid/loss val_loss val/loss validation/loss loss/val Loss/val Loss/valid "
    "eval/loss eval_loss",
    "valid_accuracy": "valid/accuracy val_acc val/acc val/accuracy val_accuracy "
    "validation/accuracy accuracy/val Accuracy/val Accuracy/valid eval/accuracy eval_accuracy",
}
METRIC_TAGS = {key: tuple(tags.split()) for key, tags in METRIC_TAGS.items()}


def _classes(summary: EpochSummary) -> int | None:
    classes = summary.num_classes
    return classes if classes and classes >= 2 else None


def _loss(summary: EpochSummary) -> float | None:
    """The epoch's training loss: as the training loop reported it, else its windows' median."""
    windows = [w["mean"] for w in summary.losses if finite(w["mean"])]
    return summary.metrics.get("train_loss", statistics.median(windows) if windows else None)


def _accuracy(summary: EpochSummary) -> float | None:
    """The validation accuracy, else the training accuracy."""
    return summary.metrics.get("valid_accuracy", summary.metrics.get("train_accuracy"))


def _period(summary: EpochSummary) -> str:
    """What a summary covers, for a message: "the epoch", or "steps 257-512" for a window of steps
    (which stays true once a long first epoch has ended)."""
    if summary.unit == "epoch":
        return "the epoch"
    losses = summary.losses
    start = losses[0].get("first", losses[0]["step"]) if losses else summary.step
    return f"steps {start}-{summary.step}" if start < summary.step else f"step {start}"


# The objectives whose loss is not minimised step by step: a policy gradient's, a GAN's, or one
# the monitor does not know (see watch(objective=...)); their loss rules say nothing
NOT_MINIMISED = ("rl", "gan", "other")
OBJECTIVES = ("classification", "regression", "language_model", "contrastive", *NOT_MINIMISED)


def _judged(history: list[EpochSummary]) -> bool:
    """Whether the run's loss is one to be minimised, which the loss rules judge: not where its
    objective is one of NOT_MINIMISED (given to watch(), or "other" for a loss the graph shows is
    not made by known loss functions alone)."""
    return history[-1].loop.get("objective", "") not in NOT_MINIMISED


CLIPPED_AT = 1e-4  # relative: norms this close to the largest are one norm clipped to


def _clipped_to(readings: list[list]) -> dict:
    """The clipping that the total gradient norms read at the optimizer steps show, where the loop
    did not pass its norms to step(): readings [norm, loss] (the norm the optimizer stepped with,
    the step's loss). clip_grad_norm_ scales a gradient above its threshold to it, so that more
    than half of the readings, two or more, at one norm, the largest, within CLIPPED_AT, with
    losses that differ (other batches or other weights: the same batch at the same weights gives
    the same norm unclipped), are steps clipped to that norm; else {}. The norms before clipping
    are not known then (None)."""
    readings = [(norm, loss) for norm, loss in readings if finite(norm)]
    top = max((norm for norm, _ in readings), default=0.0)
    at = [loss for norm, loss in readings if abs(norm - top) <= CLIPPED_AT * top]
    losses = [loss for loss in at if finite(loss)]
    differ = len(losses) >= 2 and max(losses) - min(losses) > 1e-6 * max(map(abs, losses))
    if top <= 0 or len(at) < 2 or 2 * len(at) <= len(readings) or not differ:
        return {}
    return {"max_norm": top, "steps": len(readings), "clipped_share": len(at) / len(readings),
            "grad_norm_median": None, "grad_norm_p90": None, "read": "total_norms"}  # fmt: skip


CLIP_SUMMARIES = 4  # the summaries over whose readings _clipping reads a clipping not passed

# A threshold below which clipping read from the norms after it is told: recipes clip at 0.1 to 10
# (0.25 for LSTM language models, 0.5 in RL, 1.0 for transformers), where, without the norms before
# clipping, how much it shrinks the steps is not known; below a hundredth, every step of SGD is a
# hundredth of its rate or less
CLIP_LOW = 0.01


def _clipping(history: list[EpochSummary]) -> dict:
    """The latest summary's clipping: as the loop passed its norms to step(), else as the total
    gradient norms of the readings of the latest CLIP_SUMMARIES summaries show it (_clipped_to),
    where the latest has a reading at that norm and it is below CLIP_LOW; {} without clipping."""
    now = history[-1]
    if now.clipping:
        return now.clipping
    found = _clipped_to(
        [r for s in history[-CLIP_SUMMARIES:] for r in s.loop.get("total_norms", [])]
    )
    top = found.get("max_norm")
    latest = [norm for norm, _ in now.loop.get("total_norms", [])]
    if top and top < CLIP_LOW and any(abs(norm - top) <= CLIPPED_AT * top for norm in latest):
        return found
    return {}


# Optimizers (by their class's name) whose step does not grow with the gradient's scale: each
# divides by a running RMS of the gradient (Adam and its kin, RMSprop, Adagrad) or takes its sign
# (Lion), so that clipping, which scales the gradient, leaves their steps nearly as they were
SCALE_FREE = ("Adam", "Adagrad", "Adadelta", "Adafactor", "RMSprop", "Lion", "Lamb", "LAMB")


def _scale_free(now: EpochSummary) -> bool:
    """Whether the optimizer's steps do not scale with the gradient (SCALE_FREE)."""
    name = now.loop.get("optimizer") or ""
    return any(kind in name for kind in SCALE_FREE)


# How many times the median norm before clipping must exceed the threshold for clipping to be a
# cause of small gradients or steps (where the norms before clipping are known)
CLIP_SHRINK = 10


def _clipped_small(history: list[EpochSummary], finding, t: Thresholds) -> dict | None:
    """A cause of small gradients: clipping scaled more than `clipped_share` of them down to its
    threshold (_clipping), the norms the optimizer then stepped with, and where the norms before
    clipping are known, their median by CLIP_SHRINK or more (a threshold of 0.25 under norms of 0.5
    halves the steps: not why they are a millionth of the weights)."""
    clip = _clipping(history)
    share = clip.get("clipped_share")
    if not finite(share) or share <= t.clipped_share:
        return None
    median = clip.get("grad_norm_median")
    if finite(median) and median < CLIP_SHRINK * clip["max_norm"]:
        return None
    return {"max_norm": clip["max_norm"], "clipped_share": share}


def _clipped_steps(history: list[EpochSummary], finding, t: Thresholds) -> dict | None:
    """A cause of small steps: gradients clipped small (_clipped_small) under an optimizer whose
    step scales with the gradient (not SCALE_FREE)."""
    return None if _scale_free(history[-1]) else _clipped_small(history, finding, t)


def _reached(history: list[EpochSummary], names: list[str], t: Thresholds) -> dict | None:
    """Small steps of the parameters `names` with gradients that reach them: each one's gradient
    RMS at or above `vanishing_floor`, no clipping scaled most of them down, and no weight moved by
    more than `update_fast` of its size at any summary so far (steps that large before, then none,
    tell of units pushed to their limits, not of a rate too low). {"grad_rms": by name}, or None."""
    layers = history[-1].layers
    rms = {name: layers.get(name, {}).get("grad_rms") for name in names}
    reached = all(finite(r) and r >= t.vanishing_floor for r in rms.values())
    clipped = _clipped_steps(history, None, t)
    if _fast_so_far(history, t) or not reached or clipped:
        return None
    return {"grad_rms": rms}


# A weight's gain (its RMS x the square root of its fan-in, graph.largest_gain) from which its
# initialisation, not the learning rate, is named as the cause of a divergence: torch.nn's give 0.3
# to 1.5, a normal draw of standard deviation 1 the square root of the fan-in (4 from 16 inputs)
LARGE_GAIN = 4.0
LARGE_INIT = (
    "initialise the weights as torch.nn does (its layers' defaults, or nn.init.kaiming_normal_ / "
    "xavier_uniform_), or scale them down to about 1 / sqrt(fan-in) in standard deviation, before "
    "changing the learning rate."
)


def _large_initialisation(now: EpochSummary) -> dict | None:
    """The weight of the largest gain before the first step, where it is LARGE_GAIN or more."""
    largest = now.loop.get("graph", {}).get("largest_gain")
    gain = (largest or {}).get("gain")
    return largest if finite(gain) and gain >= LARGE_GAIN else None


# The median gain of the weights before the first step below which they started small: a step of a
# usual size then moves them by a large share of their size, which tells nothing of the rate
SMALL_GAIN = 0.1


def _small_initialisation(now: EpochSummary) -> float | None:
    """The median gain of the weights before the first step (graph._gain_facts), where it is below
    SMALL_GAIN: a rival of a learning rate too high wherever large first update ratios are read."""
    median = now.loop.get("graph", {}).get("median_gain")
    return median if finite(median) and median < SMALL_GAIN else None


def _normalised(now: EpochSummary) -> set[str]:
    """The biases a batch norm in training mode takes out again (the loss's graph's
    normalised_biases): their gradient is zero but for rounding, so that their steps round away and
    leave them as they were, by design."""
    return set(now.loop.get("graph", {}).get("normalised_biases", ()))


def _too_large(large: dict) -> str:
    """How diverging and high_initial_loss name a large initialisation (_large_initialisation)."""
    text = f"the weights started far too large ({large['name']}: {large['gain']:.2g} times the "
    return (
        text + "square root of its fan-in in RMS, where torch.nn's initialisations give 0.3 to 1.5)"
    )


def _first_batch_range(now: EpochSummary) -> tuple[float, float] | None:
    """The lowest and highest value of the first training batch as the loss's graph read it (the
    model's inputs and, where a torch loss function took them, its targets), where every one is
    finite; None where one is not, or where none was read."""
    graph = now.loop.get("graph", {})
    read = [x for x in graph.get("inputs", []) if "min" in x]
    read += [loss["target"] for loss in graph.get("losses", []) if "min" in loss.get("target", {})]
    values = [x[key] for x in read for key in ("min", "max")]
    return (min(values), max(values)) if values and all(map(finite, values)) else None


# A dropout rate from which dropout, not the labels, the inputs or the initialisation, may be why a
# model in training mode does not fit: it keeps a fifth of the units or fewer at each step, and
# scales the survivors by five or more (the rates in use are 0.1 to 0.5)
HEAVY_DROPOUT = 0.8


def _heavy_dropout(now: EpochSummary) -> float | None:
    """The model's highest dropout rate where it is HEAVY_DROPOUT or more (loop.model_facts)."""
    rate = max(now.loop.get("dropout", []), default=0.0)
    return rate if rate >= HEAVY_DROPOUT else None


def _dropout_checks(dropout: float) -> str:
    """What to check, in order, where the model's dropout is heavy (HEAVY_DROPOUT or more)."""
    kept = f"keeps {1 - dropout:.0%} of its units"
    kept += f" and scales them {1 / (1 - dropout):.0f} times" if dropout < 1 else ""
    text = f"check, in this order: the dropout rate ({dropout:g}, where 0.1 to 0.5 is usual: in "
    text += f"training mode a layer {kept}); that the labels match the inputs; that the inputs are "
    return text + "normalised and the initial weights small."


def _untrained(summary: EpochSummary) -> set[str]:
    """The parameters that do not train, whose pace says nothing of the rate: those frozen
    (requires_grad=False) and those no optimizer group holds."""
    return {*summary.loop.get("frozen", ()), *summary.loop.get("not_in_optimizer", ())}


def _mostly_frozen(now: EpochSummary) -> int | None:
    """How many parameter tensors are frozen, where they are as many as those that train or more:
    then what the trained layers learn from is mostly what the frozen part computes."""
    frozen = len(now.loop.get("frozen", ()))
    return frozen if frozen and frozen >= now.loop.get("trainable", 0) else None


def _frozen_checks() -> str:
    """What to check, in order, where most of a stuck model is frozen (_mostly_frozen)."""
    text = "check, in this order: that the frozen layers hold trained weights (loaded before they "
    text += "were frozen) and give features the task needs (unfreeze their last block); that the "
    return text + "labels match the inputs and that the inputs vary and are normalised."


def _kept_apart(now: EpochSummary) -> set[str]:
    """Parameters that require gradients but are in no parameter group of the optimizer and get no
    gradient either (the loss does not reach them): a copy kept apart, as a DQN's target network or
    an EMA is, neither trained nor meant to be."""
    unreached = {*now.loop.get("no_gradient", []), *now.loop.get("graph", {}).get("unreached", [])}
    return set(now.loop.get("not_in_optimizer", [])) & unreached


def _loop_start(history: list[EpochSummary]) -> int:
    """The first step of the latest epoch: where a fact about the loop's code holds from."""
    return history[-2].step + 1 if len(history) > 1 else 1


def _problem(now: EpochSummary, kind: str) -> dict | None:
    """The first problem of `kind` the loss's graph shows (graph.py), or None."""
    problems = now.loop.get("graph", {}).get("problems", [])
    return next((p for p in problems if p["kind"] == kind), None)


def _graph_step(now: EpochSummary, history: list[EpochSummary]) -> int:
    """The step at which the loss's graph was read (its facts hold from there)."""
    return now.loop.get("graph", {}).get("step") or _loop_start(history)


LEVEL_STEPS = 8  # the fewest steps a level of the loss is read over: never one batch's loss


def _levels(windows: list[dict]) -> list[dict]:
    """The training loss's level in spans of consecutive windows of LEVEL_STEPS steps or more: the
    median of their medians (a window's mean where an older state holds no median), with the
    span's first and last step and the step of its highest loss."""
    levels = []
    span: list[dict] = []
    for window in windows:
        span.append(window)
        first = span[0].get("first", span[0]["step"])
        if window["step"] - first + 1 < LEVEL_STEPS:
            continue
        values = [w.get("median", w["mean"]) for w in span]
        values = [v for v in values if finite(v)]
        top = max(span, key=lambda w: w["max"] if finite(w["max"]) else -math.inf)
        if values:
            level = statistics.median(values)
            levels.append({"first": first, "step": window["step"], "level": level})
            levels[-1]["peak_step"] = top["max_step"] or window["step"]
        span = []
    return levels


# Losses over classes whose input's second dimension counts them: cross-entropy of scores, and
# nll_loss of log-probabilities (a loss given anything else is told by not_log_probabilities)
CLASS_LOSSES = ("cross_entropy", "nll_loss")


def _untrained_loss(summary: EpochSummary) -> float | None:
    """The loss of an untrained model, where the objective tells it: ln C for a cross-entropy over
    C classes (the classes given, or the class dimension of the one cross-entropy the loss's graph
    is made of)."""
    classes = _classes(summary)
    losses = summary.loop.get("graph", {}).get("losses", [])
    if not classes and len(losses) == 1 and losses[0].get("function") in CLASS_LOSSES:
        shape = losses[0].get("input", {}).get("shape", [])
        classes = shape[1] if len(shape) >= 2 and shape[1] >= 2 else None
    return math.log(classes) if classes else None


def _first_level(history: list[EpochSummary]) -> float | None:
    """The training loss's first level (LEVEL_STEPS steps or more) in the run."""
    for summary in history:
        levels = _levels(summary.losses)
        if levels:
            return levels[0]["level"]
    return None


def _saturated(summary: EpochSummary, t: Thresholds) -> dict[str, dict]:
    """The sigmoid and tanh activations of `summary` with `saturated_share` of their outputs or
    more within 1% of their limits, by layer."""
    squashing = [a for a in summary.activations.values() if a["kind"] in ("sigmoid", "tanh")]
    return {a["layer"]: a for a in squashing if a["share"] >= t.saturated_share}


def _fast(summary: EpochSummary, t: Thresholds) -> dict[str, float]:
    """The weights of `summary` whose median update ratio is above `update_fast`, by name."""
    return {n: r for n, r in _update_ratios(summary).items() if r > t.update_fast}


def _fast_so_far(history: list[EpochSummary], t: Thresholds) -> dict[str, float]:
    """The weights whose median update ratio was above `update_fast` in any summary so far, at
    their fastest, by name: steps that large before a symptom can have caused it."""
    found: dict[str, float] = {}
    for summary in history:
        for name, ratio in _fast(summary, t).items():
            found[name] = max(ratio, found.get(name, 0.0))
    return found


def _fast_at_first(
    history: list[EpochSummary], names: list[str], t: Thresholds
) -> dict[str, float]:
    """Those of the weights `names` whose update ratio was above `update_fast` at a reading of the
    first steps (which the summaries' medians leave out), at their fastest: a rate large enough
    saturates units within the first steps. A rival of causes, not a cause: a small initial gain
    (a policy head's) also gives a first step that large."""
    ratios = _first_ratios(history)
    return {name: r for name, r in ratios.items() if name in names and r > t.update_fast}


def _first_ratios(history: list[EpochSummary]) -> dict[str, float]:
    """Each weight's largest update ratio at the readings of the first steps, over the summaries."""
    found: dict[str, float] = {}
    for summary in history:
        for name, ratio in summary.loop.get("first_update_ratios", {}).items():
            found[name] = max(ratio, found.get(name, 0.0))
    return found


def _first_pace(history: list[EpochSummary]) -> float | None:
    """The median over the weights of their largest update ratio at the readings of the first
    steps; None where none was read. Above `update_fast`, most weights moved by more than a tenth
    of their size in one step: the learning rate (a head of small gain alone is not the median)."""
    found = _first_ratios(history)
    return statistics.median(found.values()) if found else None


def _peak_lr(history: list[EpochSummary]) -> float | None:
    """The highest learning rate of the run so far: the rate set (a scheduler's `initial_lr`, a
    warmup's target), at watch(), at a statistics step, or at an epoch's end."""
    rates = [s.loop.get(key) for s in history for key in ("lr_first", "lr_peak", "lr_set")]
    rates = [r for r in [*rates, *(s.lr for s in history)] if finite(r)]
    return max(rates, default=None)


def _update_ratios(summary: EpochSummary) -> dict[str, float]:
    """The median update-to-weight ratio of each weight tensor, by name: weights only, since a bias
    that starts at zero moves by a large fraction of its size early on, harmlessly."""
    return {
        name: s["update_ratio"]
        for name, s in sorted(summary.layers.items())
        if name.endswith("weight") and finite(s.get("update_ratio")) and s.get("weight_norm", 0) > 0
    }


def _trained_ratios(summary: EpochSummary) -> dict[str, float]:
    """_update_ratios of the weights that train (not _untrained: a frozen weight's ratio is 0, and
    a frozen backbone's would make the median pace of any model 0)."""
    still = _untrained(summary)
    return {name: r for name, r in _update_ratios(summary).items() if name not in still}


FELL = 0.75  # a loss at this share of where it started, or below, has come down: the run learns
LEARNT = 0.01  # and at this share, there is little left to learn


def _latest_level(summary: EpochSummary) -> float | None:
    """The training loss's latest level in `summary`: its last window of LEVEL_STEPS steps or more
    (its median), else its last level, else the epoch's loss."""
    long = LEVEL_STEPS - 1
    windows = [w for w in summary.losses if w["step"] - w.get("first", w["step"]) >= long]
    if windows and finite(windows[-1].get("median")):
        return windows[-1]["median"]
    levels = _levels(summary.losses)
    return levels[-1]["level"] if levels else _loss(summary)


def _starts(history: list[EpochSummary]) -> list[float]:
    """Where the loss started: an untrained model's loss (ln C) and the run's first level, those
    known."""
    known = [_untrained_loss(history[-1]), _first_level(history) or _loss(history[0])]
    return [value for value in known if finite(value)]


def _fell(history: list[EpochSummary], share: float = FELL) -> bool:
    """Whether the loss has come down to `share` x where it started (the lower start) or below."""
    starts = _starts(history)
    latest = _latest_level(history[-1])
    return bool(starts) and finite(latest) and latest <= share * min(starts)


def _start_loss(history: list[EpochSummary]) -> tuple[float | None, str]:
    """What the loss of a model that has learnt nothing is, and how to say it: ln C for C classes
    (given, or the class dimension of the cross-entropy the loss's graph is made of), else the
    run's own first loss (any loss function)."""
    untrained = _untrained_loss(history[-1])
    if untrained:
        return untrained, f"ln {round(math.exp(untrained))}, an untrained model's"
    first = history[0].first_loss
    return (first, "its first value") if finite(first) and first > 0 else (None, "")


def _near_start(summary: EpochSummary, start: float, t: Thresholds) -> bool:
    """Whether the epoch's training loss is still near `start`, and with classes, the accuracy near
    chance."""
    loss = _loss(summary)
    classes = _classes(summary)
    if not finite(loss) or loss < t.stuck_loss * start:
        return False
    if not classes:
        return True
    accuracy = _accuracy(summary)
    return finite(accuracy) and accuracy <= 1 / classes + t.chance_margin
