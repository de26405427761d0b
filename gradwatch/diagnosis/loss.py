"""The rules about the loss's course: spikes above its level, and a divergence. Levels are medians
over windows of steps; an untrained model's loss is known per objective (facts.py)."""

from __future__ import annotations

import math
import statistics
from typing import Any

from ..summary import JUMP, EpochSummary, finite
from .facts import (
    LARGE_INIT,
    _first_batch_range,
    _first_level,
    _first_pace,
    _judged,
    _large_initialisation,
    _levels,
    _small_initialisation,
    _start_loss,
    _too_large,
    _untrained_loss,
)
from .findings import LOWER, Finding, _found, rule
from .thresholds import Thresholds

# A batch's cross-entropy this many times an untrained model's (ln C) is no chance of sampling: the
# logits have blown up (a batch of a model that learns stays within a few times ln C)
EXPLODED = 10


# A level of the loss this many times both an untrained model's and its own first level: the model
# has become worse than one that guesses (its units dead, its logits wrecked)
WORSE = 1.1


def _exploded(now: EpochSummary, untrained: float | None) -> dict | None:
    """The first window with a batch's loss EXPLODED x an untrained model's (logits blown up)."""
    exploded = [w for w in now.losses if untrained and w["max"] > EXPLODED * untrained]
    return {"peak_step": exploded[0]["max_step"]} if exploded else None


SPIKE_BASELINE = 8  # the loss windows before a spike that give its level


SHOWN = 5  # the spikes a finding's evidence lists


def _spikes(history: list[EpochSummary], t: Thresholds) -> list[dict[str, Any]]:
    """The loss spikes that came back within the latest summary, each told once: [{"after": the
    last step at the loss's level, "start", "peak_step", "peak", "level", "base", "back"}]. See
    loss_spikes for when a window spikes."""
    start, _ = _start_loss(history)
    if not start:
        return []
    recent = history[-4:]
    windows = [(s is recent[-1], w) for s in recent for w in s.losses if finite(w["max"])]
    rise = t.spike_rise * start  # over the highest losses before
    found = []
    spike = None
    for i, (latest, w) in enumerate(windows):
        if spike is None:
            spike = _spike_at([v for _, v in windows[max(0, i - SPIKE_BASELINE) : i]], w, rise, t)
        elif w["max"] >= spike["base"] + rise / 2:  # not back yet: a spike over two windows
            spike["lasted"] = True
            if w["max"] > spike["peak"]:
                spike.update(peak=w["max"], peak_step=w["max_step"])
        else:
            if latest and spike.pop("lasted"):
                found.append({**spike, "back": w["step"]})
            spike = None
    return found


def _spike_at(before: list[dict], window: dict, rise: float, t: Thresholds) -> dict | None:
    """A spike beginning at loss window `window`, after the windows `before` (at least four), or
    None; "lasted" tells whether this window alone tells of more than one hard batch: it rose
    twice as far, or it spans several steps and its mean rose by a quarter of `rise` (one batch
    of many moves the mean little)."""
    if len(before) < 4:
        return None
    base = statistics.median(w["max"] for w in before)
    level = statistics.median(w["mean"] for w in before)
    start = rise / t.spike_rise
    high = window["max"] > max(t.spike_factor * base, base + rise)
    if not high or level >= t.stuck_loss * start:  # only from a level the model had reached
        return None
    several = window.get("first", window["step"]) < window["step"]
    lasted = window["max"] > base + 2 * rise or several and window["mean"] > level + rise / 4
    spike = {"after": before[-1]["step"], "start": window["max_step"], "level": level}
    return {**spike, "peak": window["max"], "peak_step": window["max_step"], "base": base,
            "lasted": lasted}  # fmt: skip


def _moved_first(history: list[EpochSummary], spike: dict) -> dict[str, Any]:
    """The earliest reading from just before `spike` to its end at which layers jumped (see
    summary.EpochSummary.jumps); {} if none did, or none was read then."""
    jumps = [j for s in history[-4:] for j in s.loop.get("jumps", [])]
    jumps = [j for j in jumps if spike["after"] <= j["step"] <= spike["back"]]  # from its update
    return min(jumps, key=lambda j: j["step"], default={})


def _spike_message(evidence: dict) -> str:
    count = evidence["count"]
    first = evidence["spikes"][0]
    text = f"the training loss spiked {'once' if count == 1 else f'{count} times'}: "
    text += "the first " if count > 1 else ""
    text += f"at step {first['peak_step']}, from about {first['level']:.3g} to "
    text += f"{first['peak']:.3g}, back by step {first['back']}"
    moved = evidence.get("moved_first")
    if not moved:
        text += " (which layers jumped first is not known: no statistics reading in it could be "
        return text + "compared with an earlier window or epoch; stats_every=1 reads every step)."
    said = {"grad_norm": "gradient norm", "update_ratio": "update ratio"}
    parts = [
        f"{name} ({', '.join(f'{said[k]} x{v:.0f}' for k, v in ratios.items() if v >= JUMP)})"
        for name, ratios in moved["layers"].items()
    ]
    return f"{text}. First to jump, at step {moved['step']}: {'; '.join(parts)}."


@rule(
    "clip gradients (torch.nn.utils.clip_grad_norm_ at 1.0), a lower peak learning rate or a "
    "longer warmup, and look at the batches of those steps; with Adam, a larger eps.",
    thresholds=("spike_factor", "spike_rise", "stuck_loss"),
    follows=("gradients_not_cleared", "unshuffled"),
    lr=LOWER,
    instead="clip gradients, and look at the batches of those steps.",
    retell=_spike_message,
)
def loss_spikes(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """The training loss spiked and came back: a loss window's highest value above `spike_factor`
    x the median of the highest of the 8 windows before, and above it by `spike_rise` x an
    untrained model's loss (ln C, or the first loss), from a level the model had reached (below
    `stuck_loss` x that), for two windows or twice as high, until a window's highest is within half
    that rise again. Told with the layers whose gradient norm or update ratio jumped first (3x their
    median in the summary before, or more), where a statistics reading fell in the spike; repeated
    spikes are one finding with their count."""
    if not _judged(history):  # a loss not minimised by design (RL, GAN, other)
        return []
    spikes = _spikes(history, t)
    if not spikes:
        return []
    evidence = {"count": len(spikes), "spikes": spikes[:SHOWN]}
    evidence["moved_first"] = _moved_first(history, spikes[0])
    message = _spike_message(evidence)
    began = spikes[0]["after"]  # the update of that step is the first that could have caused it
    return [_found(history[-1], [], evidence, message, step=began)]


def _risen(now: EpochSummary, high: dict, start: float, limit: float, t: Thresholds) -> Finding:
    """diverging's finding of a loss that rose to `high` (a level, or a window) above `limit`: the
    learning rate too high, or the initialisation where the graph showed it far too large."""
    peak = max((w for w in now.losses if finite(w["max"])), key=lambda w: w["max"])
    steps = peak["max_step"]
    when = f"in the first {steps} steps" if now.epoch == 0 else f"by step {steps}"
    message = f"the training loss rose from {start:.3g} to {peak['max']:.3g} {when}: "
    evidence = {"first_loss": start, "peak": peak["max"], "peak_step": steps}
    evidence.update(level=high.get("level"), threshold=t.diverging_factor)
    began = [w for w in now.losses if w["max"] > limit and w["step"] >= high.get("first", 0)]
    step = began[0]["max_step"] if began else high["peak_step"]  # when it began
    large = _large_initialisation(now)
    if large is None:
        return _found(now, [], evidence, message + "the learning rate is too high.", step)
    message += f"{_too_large(large)}, and so did the gradients and the steps."
    evidence.update(cause="initialisation", largest_gain=large)  # no claim on the lr
    return _found(now, [], evidence, message, step, suggestion=LARGE_INIT)


@rule(
    "lower the learning rate at least ten times{lr}; check that the inputs are normalised; clip "
    "gradients (torch.nn.utils.clip_grad_norm_).",
    thresholds=("diverging_factor", "update_fast"),
    follows=(
        "gradients_not_cleared",
        "unshuffled",
        "loss_spikes",
        "high_initial_loss",
        "moving_too_fast",
    ),
    lr=LOWER,
    instead="check the data and the loss for invalid values, clip gradients.",
    diverged=True,
)
def diverging(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """The training loss's level (the median of its values over LEVEL_STEPS steps or more, never
    one batch's) rises above `diverging_factor` x where it started (the lower of an untrained
    model's loss, ln C for a cross-entropy over C classes, and its first level) or, with ln C
    known, above WORSE x both ln C and its first level (worse than a model that guesses), or a
    batch's cross-entropy reaches EXPLODED x ln C; or the loss becomes NaN or Inf (then, without
    rising first, it points at the data). A loss already above that limit at the first step, before
    any update, has not risen: then only a level above `diverging_factor` x that first loss is (no
    batch's loss EXPLODED from there). The learning rate is named, but where the loss's graph
    showed a weight of LARGE_GAIN or more before the first step: then its initialisation."""
    now = history[-1]
    judged = _judged(history)  # not: a loss that rises by design, of which only NaN is told
    untrained = _untrained_loss(now) if judged else None
    first = _first_level(history)
    start = min((level for level in (untrained, first) if level is not None), default=None)
    limit = t.diverging_factor * start if judged and finite(start) and start > 0 else math.inf
    if untrained and finite(start):  # worse than an untrained model, and risen from its start
        limit = min(limit, WORSE * max(untrained, first or 0.0))
    before = history[0].first_loss  # before any step: what no learning rate has changed yet
    from_start = judged and finite(before) and before > limit  # as high from the start: no rise
    if from_start:
        start = before
        limit = t.diverging_factor * before
    high = next((span for span in _levels(now.losses) if span["level"] > limit), None)
    high = high or (None if from_start else _exploded(now, untrained))
    if high is not None:
        return [_risen(now, high, start, limit, t)]
    bad = next((w for w in now.losses if w.get("nonfinite_step") is not None), None)
    return [] if bad is None else [_nonfinite(history, bad["nonfinite_step"], t)]


def _nonfinite(history: list[EpochSummary], step: int, t: Thresholds) -> Finding:
    """diverging's finding of a loss that became NaN or Inf at `step` without rising first: the
    forward pass or the loss where it did at the first batch, on finite data (_overflowed); the
    learning rate where the first steps moved most weights by more than `update_fast` of their
    size; else a symptom, a bad batch and an overflow the suspects."""
    now = history[-1]
    batch = _first_batch_range(now)
    before = history[0].first_loss
    if before is not None and not finite(before) and batch is not None:
        return _overflowed(now, step, batch)
    message = f"the training loss became NaN or Inf at step {step} without rising first"
    pace = _first_pace(history)
    evidence: dict[str, Any] = {"nonfinite_step": step}
    if finite(pace) and pace > t.update_fast:  # the steps blew the weights up, not a batch
        message += f", after first steps that moved the median weight by {pace:.0%} of its size"
        evidence["first_pace"] = pace
        small = _small_initialisation(now)
        if small is None:
            message += ": the learning rate is too high."
            return _found(now, [], evidence, message, step)
        message += f", weights that started small (a median gain of {small:.2g}, where torch.nn's "
        message += "initialisations give 0.3 to 1.5; so large a share tells nothing of the rate)"
        evidence["median_gain"] = small
    message += ": a batch with invalid values, or an overflow."
    check = "check the data and the loss for NaN or Inf (--stop-on-nonfinite stops at the first)."
    evidence["cause"] = None  # a symptom: no claim on the rate
    return _found(now, [], evidence, message, step, suggestion=check)


# What to check where the loss was NaN or Inf before any update, on finite data, and no weight
# started far too large
OVERFLOW_CHECK = (
    "check the forward pass and the loss for an overflow or an invalid operation (exp, log, a "
    "division), running the first batch alone (torch.autograd.detect_anomaly names the op)."
)


def _overflowed(now: EpochSummary, step: int, batch: tuple[float, float]) -> Finding:
    """diverging's finding of a loss that was NaN or Inf before any update, on a first batch of
    finite values: the forward pass or the loss overflowed (no learning rate, nor the data, did
    it); the initialisation named where the loss's graph showed a weight of LARGE_GAIN or more."""
    message = f"the training loss became NaN or Inf at step {step}, before any update, on a "
    message += f"first batch of finite values ({batch[0]:.3g} to {batch[1]:.3g}): the forward "
    message += "pass or the loss "
    evidence = {"nonfinite_step": step, "batch_min": batch[0], "batch_max": batch[1]}
    large = _large_initialisation(now)
    if large is None:
        message += "overflowed or took an invalid value (a log of 0, a division by 0)."
        evidence["cause"] = None
        return _found(now, [], evidence, message, step, suggestion=OVERFLOW_CHECK)
    message += f"overflowed: {_too_large(large)}."
    evidence.update(cause="initialisation", largest_gain=large)  # no claim on the lr
    return _found(now, [], evidence, message, step, suggestion=LARGE_INIT)
