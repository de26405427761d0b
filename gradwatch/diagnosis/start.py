"""The rules about how the run starts: the loss function against the targets it is given, a learning
rate scheduled to nothing, data sorted by class, and a first loss far above an untrained model's.
"""

from __future__ import annotations

import math

from ..summary import EpochSummary, finite
from .facts import (
    LARGE_INIT,
    _classes,
    _dropout_checks,
    _graph_step,
    _heavy_dropout,
    _judged,
    _large_initialisation,
    _loop_start,
    _peak_lr,
    _problem,
    _too_large,
    _untrained_loss,
)
from .findings import Finding, _found, rule
from .thresholds import Thresholds


@rule(
    "for classes, nn.CrossEntropyLoss on the model's raw scores with the class indices as targets "
    "(not MSE or L1 on one-hot vectors); if this loss is chosen on purpose, ignore this.",
    thresholds=("ce_bound",),
)
def not_cross_entropy(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """The loss's graph shows MSE or L1 between the scores and one-hot targets; or the epoch's
    training loss is below `ce_bound` x (1 - training accuracy) x ln 2: cross-entropy on class
    labels costs at least ln 2 for every wrong answer (its class then has a probability of 1/2 at
    most), so the loss is not cross-entropy (MSE on one-hot targets, most often)."""
    if not _judged(history):  # a loss not minimised by design (RL, GAN, other)
        return []
    now = history[-1]
    one_hot = _problem(now, "one_hot_targets")
    if one_hot:  # the loss's graph shows it: no need to wait for the accuracy
        message = f"the loss is {one_hot['loss']} between the model's scores and one-hot class "
        message += f"labels ({one_hot['classes']} classes, at {one_hot['line']}): a square or "
        message += "absolute loss on class labels learns classes slowly, or not at all."
        return [_found(now, [], {"graph": one_hot}, message, _graph_step(now, history))]
    loss = now.metrics.get("train_loss")
    accuracy = now.metrics.get("train_accuracy")
    if not (finite(loss) and finite(accuracy)) or not 0 <= accuracy <= 1:
        return []
    least = (1 - accuracy) * math.log(2)
    if loss >= t.ce_bound * least:
        return []
    message = f"the training loss is {loss:.3g} at a training accuracy of {accuracy:.1%}, where "
    message += f"cross-entropy on class labels cannot be below {least:.3g} (ln 2 for each wrong "
    message += "answer): the loss is not cross-entropy, and a square loss on one-hot targets "
    message += "learns classes slowly."
    evidence = {"train_loss": loss, "train_accuracy": accuracy, "least_cross_entropy": least}
    return [_found(now, [], evidence, message, step=_loop_start(history))]


@rule(
    "call scheduler.step() once per epoch, after the batch loop, or give a per-batch scheduler its "
    "length in steps (T_max, total_steps).",
    thresholds=("lr_collapse",),
)
def lr_collapsed(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """The learning rate fell below `lr_collapse` of its peak within the first epoch and is still
    there an epoch later: a scheduler meant for epochs, stepped every batch (a loop without epochs
    steps its scheduler by design)."""
    if len(history) < 2 or history[-1].unit == "steps":
        return []
    first = history[0]
    now = history[-1]
    peak = _peak_lr(history[:1])
    if not peak or not finite(first.lr) or not finite(now.lr):
        return []
    limit = t.lr_collapse * peak
    if first.lr >= limit or now.lr >= limit:
        return []
    fell = next((step for step, lr in first.loop.get("lrs", []) if lr < limit), first.step)
    message = f"the learning rate fell from {peak:g} to {first.lr:.2g} within the first epoch "
    message += f"(below {t.lr_collapse:g} of its peak by step {fell}) and is {now.lr:.2g} now: the "
    message += "model barely moves. A scheduler meant for epochs is stepped every batch."
    evidence = {"peak": peak, "after_first_epoch": first.lr, "now": now.lr}
    evidence["threshold"] = t.lr_collapse
    return [_found(now, [], evidence, message, step=fell)]


@rule(
    "shuffle the training data (DataLoader(..., shuffle=True), or a sampler that shuffles).",
    thresholds=("uniform_batch",),
    follows=("not_cross_entropy",),  # a square loss on one-hot labels collapses to one class too
)
def unshuffled(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """At three quarters of the statistics steps so far (four at least) the model gave one top
    class to `uniform_batch` of a batch's rows, and that class changed from batch to batch (three
    classes at least), and at a quarter of those steps (two at least) the loss was below half the
    first one, or an epoch's training accuracy was below half of chance: each batch holds one
    class, the data are not shuffled. A model whose output ignores its input gives one class to
    every row too, but on batches of mixed classes never a low loss, nor an accuracy far below
    chance (the class of the batch before, always wrong)."""
    if not _judged(history):  # a loss not minimised by design (RL, GAN, other)
        return []
    first = history[0].first_loss
    readings = [r for s in history for r in s.loop.get("outputs", []) if r["rows"] >= 8]
    uniform = [r for r in readings if r["mode_share"] >= t.uniform_batch]
    classes = sorted({int(r["mode"]) for r in uniform})
    if len(readings) < 4 or len(uniform) * 4 < len(readings) * 3 or len(classes) < 3:
        return []
    low = 0.5 * first if finite(first) else -math.inf
    right = [r for r in uniform if finite(r["loss"]) and r["loss"] < low]
    chance = 1 / _classes(history[-1]) if _classes(history[-1]) else 0.0
    below = any(
        finite(a) and a < chance / 2 for a in (s.metrics.get("train_accuracy") for s in history)
    )
    if len(right) < max(2, len(uniform) / 4) and not below:
        return []
    shown = ", ".join(map(str, classes[:6])) + (", ..." if len(classes) > 6 else "")
    message = f"at {len(uniform)} of {len(readings)} statistics steps the model gave one class to "
    message += f"the whole batch, and a different one from batch to batch (classes {shown}): each "
    message += "training batch holds one class, the data are not shuffled."
    evidence = {"uniform_readings": len(uniform), "readings": len(readings), "classes": classes}
    return [_found(history[-1], [], evidence, message, step=1)]  # the data's order, from the start


@rule(
    "check that the inputs are normalised and that the initial weights are small (the defaults of "
    "torch.nn, or the tutorial's Net.initialize_weights).",
    thresholds=("initial_loss_factor", "diverging_factor"),
)
def high_initial_loss(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """The first training loss is above `initial_loss_factor` x ln C, the loss of an untrained
    model (C: the classes given, or those of the one cross-entropy the loss's graph shows), or
    above `diverging_factor` x ln C where the loss's graph showed a weight of LARGE_GAIN or more
    before the first step, which is then named. The initial weights or the inputs are named, but
    where the model's dropout is heavy (HEAVY_DROPOUT): then what to check, in order."""
    if not _judged(history):  # a loss not minimised by design (RL, GAN, other)
        return []
    now = history[0]
    expected = _untrained_loss(now)
    first = now.first_loss
    if len(history) > 1 or not expected or not finite(first):
        return []
    large = _large_initialisation(now)  # then a smaller excess tells of it (diverging's factor)
    factor = t.diverging_factor if large else t.initial_loss_factor
    if first <= factor * expected:
        return []
    message = f"the first training loss was {first:.3g}, {first / expected:.2g}x the "
    message += f"{expected:.2f} (ln {round(math.exp(expected))}) of an untrained model"
    evidence = {"first_loss": first, "expected": expected}
    dropout = _heavy_dropout(now)
    if dropout is not None:  # a rival of the weights and inputs: dropout's scaling in training mode
        message += f"; its dropout at {dropout:g} scales the units it keeps in training mode."
        evidence.update(dropout=dropout, cause=None)  # a symptom: no claim on the weights
        return [_found(now, [], evidence, message, step=1, suggestion=_dropout_checks(dropout))]
    if large:  # the loss's graph read the weight's gain before the first step: the cause
        message += f": {_too_large(large)}."
        evidence.update(cause="initialisation", largest_gain=large)
        return [_found(now, [], evidence, message, step=1, suggestion=LARGE_INIT)]
    message += ": the initial weights or the inputs are far too large."
    return [_found(now, [], evidence, message, step=1)]
