"""The rules that read validation and the classes: weights growing as validation worsens, one
class's output bias far from the others, labels that look noisy, no generalisation, overfitting."""

from __future__ import annotations

import math
import statistics

from ..summary import EpochSummary, finite
from .facts import _classes
from .findings import Finding, _found, rule
from .thresholds import Thresholds


def _worse_on_new_data(history: list[EpochSummary], rise: float) -> bool:
    """Whether the validation loss rose `rise` above its best so far at some epoch, and has made no
    new best since (so that one rise that came back above the best still counts, and a new best
    clears it); True without validation."""
    losses = [s.metrics.get("valid_loss") for s in history]
    if not finite(losses[-1]):
        return True
    best = math.inf
    worse = False
    for loss in filter(finite, losses):
        worse = (worse and loss >= best) or loss > (1 + rise) * best
        best = min(best, loss)
    return worse


def _max_abs_weight(summary: EpochSummary, name: str) -> float | None:
    return summary.layers.get(name, {}).get("max_abs_weight")


def _matrices(summary: EpochSummary) -> dict[str, dict]:
    """The summary's statistics of the weight matrices and kernels: of those the loss's graph found
    at a depth (it lists tensors of two dimensions or more) where it was read, else of the names
    that end in "weight". A bias or a norm's gain starts at 0 or 1 and moves by what the data
    need; recipes leave them out of weight decay."""
    depths = summary.loop.get("graph", {}).get("depths")
    if depths:
        return {name: s for name, s in summary.layers.items() if name in depths}
    return {name: s for name, s in summary.layers.items() if name.endswith("weight")}


@rule(
    "weight decay for this layer (--layer-wd {name}=5e-4), or a lower learning rate.",
    thresholds=("weight_max_abs", "weight_growth", "weight_window", "overfit_rise"),
    follows=("gradients_not_cleared", "diverging", "output_bias_skew"),
    per_parameter=True,
    ended="the validation loss made a new best, or the weights stopped growing",
)
def weights_growing(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """A weight matrix's or kernel's max |w| (_matrices) is above `weight_max_abs`, at least
    `weight_growth` times its value after the first epoch, and still higher than `weight_window`
    epochs ago, while the validation loss (if there is one) rose `overfit_rise` above its best and
    has made no new best since: weights that grow while the model does better than ever on new data
    are learning, not overfitting. In a loop without epochs, only with a validation loss: there
    weights grow as a model learns; in one with epochs and no validation loss, a note: nothing
    shows whether the growth costs anything."""
    unseen = not finite(history[-1].metrics.get("valid_loss"))
    if history[-1].unit == "steps" and unseen:
        return []
    if len(history) <= t.weight_window or not _worse_on_new_data(history, t.overfit_rise):
        return []
    now = history[-1]
    findings = []
    for name, s in _matrices(now).items():
        first = _max_abs_weight(history[0], name)
        earlier = _max_abs_weight(history[-1 - t.weight_window], name)
        value = s.get("max_abs_weight")
        if not all(map(finite, (first, earlier, value))) or first <= 0:
            continue
        if value > t.weight_max_abs and value >= t.weight_growth * first and value > earlier:
            evidence = {"max_abs_weight": value, "after_first_epoch": first}
            evidence[f"{t.weight_window}_epochs_before"] = earlier
            evidence["weight_norm"] = s.get("weight_norm")
            after = "the first epoch" if now.unit == "epoch" else f"step {history[0].step}"
            message = f"{name}: max |w| grew from {first:.3g} after {after} to "
            message += f"{value:.3g} and "
            message += "is still growing."
            if unseen:
                message += " No validation loss shows whether that costs anything."
            findings.append(_found(now, [name], evidence, message))
            findings[-1].harmless = unseen
    return findings


def _skewed(bias: list[float], t: Thresholds) -> list[tuple[int, float, float]]:
    """(class index, deviation from the median bias, robust z) of the outlying classes."""
    centre = statistics.median(bias)
    spread = 1.4826 * statistics.median(abs(b - centre) for b in bias)
    found = []
    for i, b in enumerate(bias):
        deviation = b - centre
        if spread > 0:
            z = deviation / spread
        else:  # all but a few biases equal: any deviation is infinitely far out
            z = math.copysign(math.inf, deviation) if deviation else 0.0
        if not (abs(deviation) < t.bias_min_deviation or abs(z) < t.bias_z):
            found.append((i, centre, z))
    return found


@rule(
    "check that class's share of the training data (rebalance or weight the loss), or "
    "re-initialise the output bias.",
    thresholds=("bias_z", "bias_min_deviation"),
    follows=(
        "unshuffled",
        "softmax_before_loss",
        "diverging",
        "dead_units",
        "not_learning",
        "stuck",
    ),
    per_parameter=True,
)
def output_bias_skew(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """A class's output-layer bias lies `bias_z` robust standard deviations (1.4826 MAD) and at
    least `bias_min_deviation` from the median bias, at this epoch and the one before (if any);
    reported with that class's validation recall. With recalls, only where that class's is below
    half the median one: a skew that costs that class nothing is the model's business."""
    now = history[-1]
    bias = now.output_bias
    values = bias.get("values")
    if not values or len(values) < 3:
        return []
    recalls = [r for r in bias.get("recall") or () if finite(r)]
    typical = statistics.median(recalls) if recalls else None
    before = history[-2].output_bias.get("values") if len(history) > 1 else None
    lasting = set()
    if before and len(before) == len(values):
        lasting = {i for i, _, _ in _skewed(before, t)}
    findings = []
    for i, centre, z in _skewed(values, t):
        if len(history) > 1 and i not in lasting:
            continue  # a skew of one epoch is the noise of training
        label = bias["classes"][i]
        recall = bias["recall"][i] if bias["recall"] else None
        if typical is not None and finite(recall) and recall >= typical / 2:
            continue
        evidence = {"class": label, "bias": values[i], "median_bias": centre, "robust_z": z}
        evidence["validation_recall"] = recall
        message = f"class '{label}' has output bias {values[i]:.3g} against a median of "
        message += f"{centre:.3g} among the classes"
        message += f"; its validation recall is {recall:.1%}." if recall is not None else "."
        findings.append(_found(now, [f"{bias['name']}[{i}]"], evidence, message))
    return findings


@rule(
    "check and clean the training labels (a wrong class for some images: a shifted list, two label "
    "sets mixed); label smoothing softens the damage meanwhile.",
    thresholds=("noisy_gap", "noisy_epochs"),
)
def noisy_labels(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """For `noisy_epochs` epochs in a row the training accuracy is `noisy_gap` or more below the
    validation accuracy of the epoch before (the model as the epoch began, so that a training
    accuracy averaged over an epoch of fast learning does not count): the model predicts held-out
    labels better than the training ones, so part of the training labels are wrong."""
    recent = history[-1 - t.noisy_epochs :]
    if len(history) <= t.noisy_epochs:
        return []
    train = [s.metrics.get("train_accuracy") for s in recent]
    valid = [s.metrics.get("valid_accuracy") for s in recent]
    if not all(map(finite, train + valid)):
        return []
    if min(before - now for before, now in zip(valid, train[1:])) < t.noisy_gap:
        return []
    train = train[-1]
    valid = valid[-1]
    message = (
        f"for {t.noisy_epochs} epochs the validation accuracy stays {t.noisy_gap:.0%} or more "
    )
    message += f"above the training accuracy (now {valid:.1%} against {train:.1%}): the model "
    message += "predicts held-out labels better than the training ones, so part of the training "
    message += (
        f"labels are wrong (at least about {1 - train / valid:.0%}, if the validation labels "
    )
    message += "are right)."
    evidence = {"train_accuracy": train, "valid_accuracy": valid, "threshold": t.noisy_gap}
    return [_found(history[-1], [], evidence, message, step=recent[1].step)]


@rule(
    "check that the training labels match the images (a shuffled list?); if they do, more data, "
    "augmentation or weight decay against memorisation.",
    thresholds=("generalisation_gap", "chance_margin"),
)
def no_generalisation(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """The training accuracy is `generalisation_gap` above chance while the validation accuracy
    stays within `chance_margin` of it."""
    now = history[-1]
    classes = _classes(now)
    train = now.metrics.get("train_accuracy")
    valid = now.metrics.get("valid_accuracy")
    if not classes or not (finite(train) and finite(valid)):
        return []
    chance = 1 / classes
    if train < chance + t.generalisation_gap or valid > chance + t.chance_margin:
        return []
    message = f"the training accuracy reached {train:.1%} while the validation accuracy stays near "
    message += f"chance ({valid:.1%}; chance {chance:.1%}): what the model learns does not carry "
    message += "over "
    message += "to new images."
    evidence = {"train_accuracy": train, "valid_accuracy": valid, "chance": chance}
    return [_found(now, [], evidence, message)]


def _gap(summary: EpochSummary) -> float:
    return summary.metrics["train_accuracy"] - summary.metrics["valid_accuracy"]


@rule(
    "keep the best validation epoch (best.pt), and weight decay (--weight-decay), augmentation or "
    "more data.",
    thresholds=("overfit_gap", "overfit_rise", "overfit_epochs"),
    follows=("no_generalisation", "weights_growing"),
    ended="the validation loss came back near its best, so it was noise, not overfitting",
)
def overfitting(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """For `overfit_epochs` epochs in a row the validation loss is `overfit_rise` above its best,
    and the train-valid accuracy gap is now `overfit_gap` and more above what it was then."""
    keys = ("valid_loss", "train_accuracy", "valid_accuracy")
    seen = [s for s in history if all(finite(s.metrics.get(k)) for k in keys)]
    if len(seen) < 2 or seen[-1] is not history[-1]:
        return []
    best = min(seen, key=lambda s: s.metrics["valid_loss"])
    now = seen[-1]
    loss = now.metrics["valid_loss"]
    best_loss = best.metrics["valid_loss"]
    gap = _gap(now)
    best_gap = _gap(best)
    if gap < max(best_gap, 0) + t.overfit_gap:
        return []
    recent = [s.metrics["valid_loss"] for s in seen[-t.overfit_epochs :]]
    if len(recent) < t.overfit_epochs or min(recent) < (1 + t.overfit_rise) * best_loss:
        return []
    message = f"since epoch {best.epoch + 1} the validation loss rose from {best_loss:.3g} to "
    message += f"{loss:.3g} and the gap between training and validation accuracy grew from "
    message += f"{best_gap:.1%} to {gap:.1%}: the model fits its training images at the expense of "
    message += "new ones."
    evidence = {"best_epoch": best.epoch, "valid_loss": loss, "gap": gap, "best_gap": best_gap}
    return [_found(now, [], evidence, message)]
