"""Rules that read a training run the way a practitioner reads its curves and histograms, and the story they tell.

Each rule is a pure function of the epoch summaries so far (oldest first) that returns Findings about the latest
one: the rule, the parameters or layers concerned, the evidence in numbers and a message. A healthy run produces
none. The thresholds are the fields of Thresholds. `record` merges an epoch's findings into the run's: a finding
that lasts is one entry with its first and last epoch, and a finding that follows from an earlier one names it
as its `cause` and leaves the suggestion to it; `story` tells them in the order they began.

An epoch summary is a dict; a rule skips what it cannot see:
    {"epoch": int, "step": int,                    # step: optimizer steps done at the epoch's end
     "layers": {name: {"grad_rms", "grad_zero_share", "weight_norm", "max_abs_weight", "update_ratio",
                       "nonfinite_share": float}},   # medians over the epoch's statistics logs
     "activations": {name: {"kind": "relu" | "sigmoid" | "tanh", "layer": str, "share": float}},
         # the median share of a ReLU's units (channels or features) with no positive output for a whole batch,
         # or of a sigmoid's or tanh's outputs within 1% of their limits; "layer" is the layer that feeds it
     "total_grad_norm_max": float, "total_grad_norm_median": float,
     "losses": [{"step": int, "mean": float, "max": float, "max_step": int, "nonfinite_step": int | None}],
         # the training loss in windows of steps, one per statistics log
     "first_loss": float,                          # the run's first training loss
     "clipping": {"max_norm", "steps", "clipped_share", "grad_norm_median", "grad_norm_p90": float},
         # with gradient clipping: the threshold, the epoch's steps, the share clipped, the norms before clipping
     "metrics": {"train_loss", "train_accuracy", "valid_loss", "valid_accuracy": float},
     "num_classes": int, "lr": float}
"""

from __future__ import annotations

import argparse
import math
import statistics
import textwrap
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace

METRIC_TAGS = {  # the scalar tags under which training loops commonly log these, preferred first
    "train_loss": "train/loss train_loss loss/train Loss/train training_loss train/loss_epoch train_loss_epoch loss",
    "train_accuracy": "train/accuracy train_acc train/acc accuracy/train Accuracy/train acc",
    "valid_loss": "valid/loss val_loss val/loss validation/loss loss/val Loss/val eval/loss eval_loss",
    "valid_accuracy": "valid/accuracy val_acc val/acc val/accuracy val_accuracy validation/accuracy accuracy/val "
    "Accuracy/val eval/accuracy eval_accuracy",
}
METRIC_TAGS = {key: tuple(tags.split()) for key, tags in METRIC_TAGS.items()}


@dataclass
class Thresholds:
    """When each rule fires (README's table says the same)."""

    vanishing_ratio: float = 1e-2  # the first weight layer's gradient RMS is below this fraction of the last one's
    vanishing_floor: float = 1e-7  # or a weight layer's gradient RMS is below this, whatever the others do
    exploding_factor: float = 100.0  # the total gradient norm exceeds this multiple of its median in earlier epochs
    clipped_share: float = 0.5  # mostly_clipped: gradient clipping scaled down more than this share of an epoch's steps
    weight_max_abs: float = 1.0  # weights growing: max |w| above this ...
    weight_growth: float = 2.0  # ... and at least this multiple of its value after the first epoch ...
    weight_window: int = 3  # ... and still growing over this many epochs (the tutorial: 0.3 at first, 0.6 later)
    bias_z: float = 3.5  # an output bias this many robust standard deviations (1.4826 MAD) from the median ...
    bias_min_deviation: float = 1.0  # ... and at least this far from it
    update_slow: float = 1e-6  # not learning: a layer's median update-to-weight ratio ||dw|| / ||w|| is below this
    update_fast: float = 1e-1  # moving too fast: it is above this (about 1e-3 is typical of healthy training)
    initial_loss_factor: float = 3.0  # high_initial_loss: the first training loss is above this multiple of ln C
    diverging_factor: float = 1.5  # diverging: the training loss rises above this multiple of its first value
    dead_share: float = 0.5  # dead_units: this share of a ReLU's units gave no positive output for a whole batch
    saturated_share: float = 0.5  # saturated: this share of a sigmoid's or tanh's outputs within 1% of their limits
    stuck_loss: float = 0.9  # stuck: the training loss stays above this fraction of ln C (C classes) ...
    chance_margin: float = 0.1  # ... and the accuracy within this of chance (1 / C) ...
    stuck_epochs: int = 5  # ... for this many epochs in a row; with the weights moving faster than
    stuck_moving_ratio: float = 1e-4  # this (median update ratio), the data are suspect, not the learning rate
    generalisation_gap: float = 0.3  # no_generalisation: training accuracy this far above chance, validation near it
    overfit_gap: float = 0.05  # overfitting: training accuracy this far above validation accuracy, and further than
    overfit_rise: float = 0.1  # at the best validation loss, which it exceeds now by this fraction
    oscillation_epochs: int = 6  # oscillating: over the last this many epochs the training loss ...
    oscillation_amplitude: float = 0.2  # ... it went up and down by this fraction of its level, without falling

    @classmethod
    def names(cls):
        return [f.name for f in fields(cls)]

    def replace(self, overrides):
        """A copy with {name: value} overrides; unknown names raise ValueError listing the known ones."""
        values = asdict(self)
        for name, value in overrides.items():
            if name not in values:
                raise ValueError(f"unknown threshold '{name}'; known: {', '.join(self.names())}")
            values[name] = type(values[name])(value)
        return Thresholds(**values)


def threshold_override(text):
    """argparse type for --threshold NAME=VALUE (train.py and diagnose.py): a known name and a number."""
    name, sep, value = text.partition("=")
    if name not in Thresholds.names():
        raise argparse.ArgumentTypeError(f"unknown threshold '{name}'; known: {', '.join(Thresholds.names())}")
    try:
        if not sep:
            raise ValueError
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with a number, got '{text}'") from None


@dataclass
class Finding:
    rule: str
    parameters: list  # the parameters or layers concerned; empty for the whole run
    epoch: int  # the epoch (from 0) at whose end it was first found
    step: int  # the optimizer step at which it began, as near as the evidence tells
    evidence: dict  # the numbers the rule read when it was first found
    message: str
    suggestion: str | None  # what to try; None for a consequence of an earlier finding (see cause)
    last_epoch: int = -1  # the last epoch it held
    cause: str | None = None  # the id of the earlier finding it follows from
    severity: str = "warning"  # or "note": a slow start that ended on its own

    def __post_init__(self):
        self.last_epoch = max(self.last_epoch, self.epoch)

    @property
    def key(self) -> tuple:
        """Findings with the same key say the same thing: a finding that lasts is one entry. One per parameter for
        the rules that look at parameters one by one, one per rule for the others."""
        return (
            (self.rule, *self.parameters[:1]) if self.rule in ("weights_growing", "output_bias_skew") else (self.rule,)
        )

    @property
    def id(self) -> str:
        return ":".join(self.key)

    def to_json(self) -> dict:
        return {"id": self.id, **asdict(self)}

    @classmethod
    def from_json(cls, item: dict) -> Finding:
        """A finding from diagnosis.json or a monitor's state_dict()."""
        return cls(**{key: value for key, value in item.items() if key != "id"})

    def __str__(self):
        after = f" It follows from {self.cause}." if self.cause else ""
        return f"[{self.rule}] {_when(self)}: {self.message}{after}" + (
            f" Try: {self.suggestion}" if self.suggestion else ""
        )


SUGGESTIONS = {  # what to try, per rule; {lr} and {lr_up}: the learning rate a tenth and ten times as large
    "high_initial_loss": "check that the inputs are normalised and that the initial weights are small (the "
    "defaults of torch.nn, or the tutorial's Net.initialize_weights).",
    "diverging": "lower the learning rate at least ten times{lr}; check that the inputs are normalised; clip "
    "gradients (torch.nn.utils.clip_grad_norm_).",
    "nonfinite_gradients": "lower the learning rate{lr}, clip gradients (torch.nn.utils.clip_grad_norm_), check the "
    "data and the loss for invalid values; --stop-on-nonfinite stops at the first one.",
    "exploding_gradients": "lower the learning rate{lr} or clip gradients (torch.nn.utils.clip_grad_norm_).",
    "mostly_clipped": "lower the learning rate, and raise the clipping threshold to about the 90th percentile of the "
    "norms before clipping, so that it catches only the outliers.",
    "dead_units": "a smaller negative bias or a better initialisation (Kaiming's), or LeakyReLU.",
    "saturated": "ReLU instead of sigmoid or tanh in hidden layers, normalisation layers, or smaller initial weights.",
    "vanishing_gradients": "residual connections or normalisation layers, an auxiliary loss near the early layers, or "
    "a larger learning rate for them (--layer-lr NAME=FACTOR).",
    "not_learning": "a larger learning rate for these layers (--layer-lr NAME=FACTOR), less weight decay, or check "
    "that they receive gradients.",
    "moving_too_fast": "a lower learning rate for these layers (--layer-lr NAME=0.1) or for the whole model.",
    "stuck": "a larger learning rate{lr_up}; if that does not help, check that the labels match the images and that "
    "the inputs are normalised.",
    "oscillating": "a lower learning rate{lr} or a larger batch.",
    "weights_growing": "weight decay for this layer (--layer-wd {name}=5e-4), or a lower learning rate.",
    "output_bias_skew": "check that class's share of the training data (rebalance or weight the loss), or "
    "re-initialise the output bias.",
    "no_generalisation": "check that the training labels match the images (a shuffled list?); if they do, more data, "
    "augmentation or weight decay against memorisation.",
    "overfitting": "keep the best validation epoch (best.pt), and weight decay (--weight-decay), augmentation or "
    "more data.",
}
LOWER, RAISE = -1, 1
DIRECTION = {  # what a rule's suggestion does to the learning rate, and what to suggest instead where that
    # would go against the run's history (raising it after the loss diverged, lowering it for a run that is stuck)
    "diverging": (LOWER, SUGGESTIONS["diverging"]),
    "nonfinite_gradients": (LOWER, "check the data and the loss for invalid values, clip gradients."),
    "exploding_gradients": (LOWER, "clip gradients (torch.nn.utils.clip_grad_norm_)."),
    "mostly_clipped": (
        LOWER,
        "raise the clipping threshold to about the 90th percentile of the norms before clipping.",
    ),
    "moving_too_fast": (LOWER, "clip gradients (torch.nn.utils.clip_grad_norm_), or warm the learning rate up."),
    "oscillating": (LOWER, "a larger batch, or clip gradients."),
    "vanishing_gradients": (RAISE, "residual connections or normalisation layers, or an auxiliary loss."),
    "not_learning": (RAISE, "check that these layers receive gradients and are in the optimizer."),
    "stuck": (RAISE, "check that the labels match the images and that the inputs are normalised."),
}
CAUSES = {  # rule: the rules whose earlier findings it can follow from
    "diverging": ("high_initial_loss", "moving_too_fast"),
    "exploding_gradients": ("diverging", "high_initial_loss"),
    "nonfinite_gradients": ("diverging", "exploding_gradients", "high_initial_loss"),
    "mostly_clipped": ("diverging", "exploding_gradients", "high_initial_loss"),
    "dead_units": ("diverging", "exploding_gradients", "high_initial_loss"),
    "saturated": ("diverging", "exploding_gradients", "high_initial_loss"),
    "vanishing_gradients": ("dead_units", "saturated", "diverging", "exploding_gradients", "high_initial_loss"),
    "not_learning": ("dead_units", "saturated", "vanishing_gradients", "diverging", "high_initial_loss"),
    "moving_too_fast": ("diverging", "exploding_gradients", "mostly_clipped", "high_initial_loss"),
    "stuck": ("diverging", "dead_units", "saturated", "vanishing_gradients", "not_learning", "high_initial_loss"),
    "oscillating": ("diverging", "exploding_gradients", "moving_too_fast"),
    "weights_growing": ("diverging", "output_bias_skew"),
    "output_bias_skew": ("diverging", "dead_units", "not_learning", "stuck"),
    "overfitting": ("no_generalisation", "weights_growing"),
}
ORDER = list(SUGGESTIONS)  # findings that began at the same step are told in this order


def names(layers: Iterable[str], shown: int = 4) -> str:
    """Layer names for a sentence: all of a few, the first `shown` and a count of the rest for a large model."""
    layers = list(layers)
    more = len(layers) - shown
    return ", ".join(layers) if more <= 1 else f"{', '.join(layers[:shown])} and {more} more layers"


def _finding(
    rule: str, parameters: list, summary: dict, evidence: dict, message: str, step: int | None = None, epoch=None
) -> Finding:
    lr = summary.get("lr")
    fill = {"lr": f" (to {lr / 10:g} or less)" if lr else "", "lr_up": f" (e.g. {lr * 10:g})" if lr else ""}
    suggestion = SUGGESTIONS[rule].format(name=parameters[0] if parameters else "", **fill)
    step = summary["step"] if step is None else step
    first = summary["epoch"] if epoch is None else epoch
    return Finding(rule, parameters, first, step, evidence, message, suggestion, last_epoch=summary["epoch"])


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def vanishing_gradients(history: list[dict], t: Thresholds) -> list[Finding]:
    now = history[-1]
    layers = now.get("layers", {})
    # weight tensors in model order (biases and norms' gains tell less)
    rms = {n: s["grad_rms"] for n, s in layers.items() if n.endswith("weight") and _finite(s.get("grad_rms"))}
    if len(rms) < 2:
        return []
    first, last = list(rms)[0], list(rms)[-1]
    findings = []
    if rms[last] > 0 and rms[first] < t.vanishing_ratio * rms[last]:
        early = [n for n in list(rms)[:-1] if rms[n] < t.vanishing_ratio * rms[last]]
        evidence = {"grad_rms": {n: rms[n] for n in early + [last]}, "ratio_first_to_last": rms[first] / rms[last]}
        smaller = f"{rms[last] / rms[first]:.0f}x smaller than" if rms[first] > 0 else "zero, against"
        message = f"gradients of {names(early)} are {smaller} those of the last layer {last} "
        message += f"(RMS {rms[first]:.2g} against {rms[last]:.2g})."
        findings.append(
            _finding("vanishing_gradients", early, now, {**evidence, "threshold": t.vanishing_ratio}, message)
        )
    done = findings[0].parameters if findings else []
    floor = [n for n in rms if rms[n] < t.vanishing_floor and n not in done]
    if floor:
        evidence = {"grad_rms": {n: rms[n] for n in floor}, "floor": t.vanishing_floor}
        message = f"gradients of {names(floor)} have an RMS below {t.vanishing_floor:g}: these layers barely learn."
        findings.append(_finding("vanishing_gradients", floor, now, evidence, message))
    return findings


def nonfinite_values(history: list[dict], t: Thresholds) -> list[Finding]:
    now = history[-1]
    bad = {n: s["nonfinite_share"] for n, s in now.get("layers", {}).items() if s.get("nonfinite_share", 0) > 0}
    if not bad:
        return []
    message = f"NaN or Inf values in the gradients of {names(sorted(bad))} (up to {max(bad.values()):.1%} of a tensor)."
    return [_finding("nonfinite_gradients", sorted(bad), now, {"nonfinite_share": bad}, message)]


def exploding_gradients(history: list[dict], t: Thresholds) -> list[Finding]:
    now = history[-1]
    before = [h["total_grad_norm_median"] for h in history[:-1] if _finite(h.get("total_grad_norm_median"))]
    peak = now.get("total_grad_norm_max")
    if not before or not _finite(peak):
        return []
    baseline = statistics.median(before)
    if baseline <= 0 or peak < t.exploding_factor * baseline:
        return []
    evidence = {"total_grad_norm_max": peak, "median_before": baseline, "factor": peak / baseline}
    message = f"the total gradient norm reached {peak:.3g}, {peak / baseline:.0f}x its median of {baseline:.3g} in the "
    message += "epochs before."
    return [_finding("exploding_gradients", ["total"], now, {**evidence, "threshold": t.exploding_factor}, message)]


def mostly_clipped(history: list[dict], t: Thresholds) -> list[Finding]:
    now = history[-1]
    clip = now.get("clipping") or {}
    share, lr = clip.get("clipped_share"), now.get("lr")
    if not _finite(share) or share <= t.clipped_share:
        return []
    median, p90 = clip["grad_norm_median"], clip["grad_norm_p90"]
    message = f"gradient clipping at {clip['max_norm']:g} scaled down {share:.0%} of the epoch's {clip['steps']} steps "
    message += f"(norms before clipping: median {median:.3g}, 90th percentile {p90:.3g}). Clipping nearly every step "
    in_effect = lr * clip["max_norm"] / median if lr and median > 0 else None
    message += f"makes the learning rate of {lr:g} about {in_effect:.2g} in effect: " if in_effect else "shrinks it: "
    message += "a learning rate too high for these gradients, hidden by the clipping."
    finding = _finding("mostly_clipped", [], now, {**clip, "threshold": t.clipped_share}, message)
    if in_effect:
        finding.suggestion = (
            f"lower the learning rate to about {in_effect:.2g}, what it is in effect now, and raise the "
        )
        finding.suggestion += f"clipping threshold to about {p90:.3g}, the 90th percentile of the norms, so that "
        finding.suggestion += "clipping catches only the outliers."
    return [finding]


def weights_growing(history: list[dict], t: Thresholds) -> list[Finding]:
    if len(history) <= t.weight_window:
        return []
    now, start, window_start = history[-1], history[0], history[-1 - t.weight_window]
    findings = []
    for name, s in now.get("layers", {}).items():
        first = start.get("layers", {}).get(name, {}).get("max_abs_weight")
        earlier = window_start.get("layers", {}).get(name, {}).get("max_abs_weight")
        value = s.get("max_abs_weight")
        if not all(map(_finite, (first, earlier, value))) or first <= 0:
            continue
        if value > t.weight_max_abs and value >= t.weight_growth * first and value > earlier:
            evidence = {
                "max_abs_weight": value,
                "after_first_epoch": first,
                f"{t.weight_window}_epochs_before": earlier,
            }
            message = (
                f"{name}: max |w| grew from {first:.3g} after the first epoch to {value:.3g} and is still growing."
            )
            findings.append(
                _finding("weights_growing", [name], now, {**evidence, "weight_norm": s.get("weight_norm")}, message)
            )
    return findings


def update_ratio(history: list[dict], t: Thresholds) -> list[Finding]:
    now = history[-1]
    ratios = {}
    for name, s in now.get("layers", {}).items():
        # weights only: a bias that starts at zero moves by a large fraction of its size early on, harmlessly
        if name.endswith("weight") and _finite(s.get("update_ratio")) and s.get("weight_norm", 0) > 0:
            ratios[name] = s["update_ratio"]
    findings = []
    for rule, threshold, outside, most, comparison in (
        ("not_learning", t.update_slow, lambda r: r < t.update_slow, min, "less"),
        ("moving_too_fast", t.update_fast, lambda r: r > t.update_fast, max, "more"),
    ):
        found = {name: r for name, r in sorted(ratios.items()) if outside(r)}
        if found:
            message = f"{names(found)} change by {comparison} than {threshold:g} of their size per step "
            message += f"(median ||dw||/||w||: {most(found.values()):.2g})."
            findings.append(_finding(rule, list(found), now, {"update_ratio": found, "threshold": threshold}, message))
    return findings


def _classes(summary: dict) -> int | None:
    classes = summary.get("num_classes")
    return classes if classes and classes >= 2 else None


def high_initial_loss(history: list[dict], t: Thresholds) -> list[Finding]:
    now, classes = history[0], _classes(history[0])
    first = now.get("first_loss")
    if len(history) > 1 or not classes or not _finite(first) or first <= t.initial_loss_factor * math.log(classes):
        return []
    expected = math.log(classes)
    message = f"the first training loss was {first:.3g}, {first / expected:.0f}x the {expected:.2f} (ln {classes}) "
    message += "of an untrained model: the initial weights or the inputs are far too large."
    return [_finding("high_initial_loss", [], now, {"first_loss": first, "expected": expected}, message, step=1)]


def diverging(history: list[dict], t: Thresholds) -> list[Finding]:
    now, first = history[-1], history[0].get("first_loss")
    windows = now.get("losses", [])
    limit = t.diverging_factor * first if _finite(first) and first > 0 else math.inf
    high = next((w for w in windows if w["max"] > limit), None)  # NaN compares False
    bad = next((w for w in windows if w.get("nonfinite_step") is not None), None)
    if high is not None:
        peak = max((w for w in windows if _finite(w["max"])), key=lambda w: w["max"])
        when = f"in the first {peak['max_step']} steps" if now["epoch"] == 0 else f"by step {peak['max_step']}"
        message = f"the training loss rose from {first:.3g} to {peak['max']:.3g} {when}: the learning rate is too high."
        evidence = {"first_loss": first, "peak": peak["max"], "peak_step": peak["max_step"]}
        return [
            _finding("diverging", [], now, {**evidence, "threshold": t.diverging_factor}, message, high["max_step"])
        ]
    if bad is not None:
        step = bad["nonfinite_step"]
        message = f"the training loss became NaN or Inf at step {step} without rising first: a batch with invalid "
        message += "values, or an overflow."
        finding = _finding("diverging", [], now, {"nonfinite_step": step}, message, step)
        finding.suggestion = "check the data and the loss for NaN or Inf (--stop-on-nonfinite stops at the first)."
        return [finding]
    return []


def dead_units(history: list[dict], t: Thresholds) -> list[Finding]:
    now = history[-1]
    dead = {a["layer"]: a["share"] for a in now.get("activations", {}).values() if a["kind"] == "relu"}
    dead = {layer: share for layer, share in dead.items() if share >= t.dead_share}
    if not dead:
        return []
    parts = ", ".join(f"{share:.0%} of {layer}'s" for layer, share in dead.items())
    message = f"{parts} units gave no positive output for a whole batch: their ReLUs no longer fire (dead units)."
    return [_finding("dead_units", list(dead), now, {"dead_share": dead, "threshold": t.dead_share}, message)]


def saturated(history: list[dict], t: Thresholds) -> list[Finding]:
    now = history[-1]
    found = {a["layer"]: a for a in now.get("activations", {}).values() if a["kind"] in ("sigmoid", "tanh")}
    found = {layer: a for layer, a in found.items() if a["share"] >= t.saturated_share}
    if not found:
        return []
    parts = ", ".join(f"{a['share']:.0%} of {layer}'s {a['kind']}" for layer, a in found.items())
    message = f"{parts} outputs are within 1% of their limits, where their gradient is nearly zero (saturated)."
    evidence = {"saturated_share": {layer: a["share"] for layer, a in found.items()}, "threshold": t.saturated_share}
    return [_finding("saturated", list(found), now, evidence, message)]


def _loss(summary: dict) -> float | None:
    """The epoch's training loss: as the training loop reported it, else the median of its windows."""
    windows = [w["mean"] for w in summary.get("losses", []) if _finite(w["mean"])]
    return summary.get("metrics", {}).get("train_loss", statistics.median(windows) if windows else None)


def stuck(history: list[dict], t: Thresholds) -> list[Finding]:
    classes = _classes(history[-1])
    if not classes or len(history) < t.stuck_epochs:
        return []
    recent, chance, start = history[-t.stuck_epochs :], 1 / classes, math.log(classes)
    for summary in recent:
        metrics = summary.get("metrics", {})
        accuracy = metrics.get("valid_accuracy", metrics.get("train_accuracy"))
        if not (_finite(_loss(summary)) and _finite(accuracy)):
            return []
        if _loss(summary) < t.stuck_loss * start or accuracy > chance + t.chance_margin:
            return []
    now = history[-1]
    accuracy = now["metrics"].get("valid_accuracy", now["metrics"].get("train_accuracy"))
    message = f"since epoch {recent[0]['epoch'] + 1} the training loss stays near {start:.2f} (ln {classes}, an "
    message += f"untrained model's) and the accuracy near chance ({accuracy:.1%}; chance {chance:.1%})"
    ratios = [s["update_ratio"] for n, s in now.get("layers", {}).items() if _finite(s.get("update_ratio"))]
    moving = statistics.median(ratios) if ratios else None  # the weights move: then the data are suspect
    evidence = {"train_loss": _loss(now), "accuracy": accuracy, "since_epoch": recent[0]["epoch"]}
    if moving is None or moving < t.stuck_moving_ratio:
        return [_finding("stuck", [], now, evidence, f"{message}: the model is not learning.")]
    message += f", although the weights move (median ||dw||/||w|| {moving:.2g}): the labels or the inputs say nothing "
    message += "the model can learn."
    finding = _finding("stuck", [], now, {**evidence, "update_ratio": moving, "weights_move": True}, message)
    finding.suggestion = "check that the labels match the images (a shuffled or misaligned list?) and that the inputs "
    finding.suggestion += "vary and are normalised; a larger learning rate will not help."
    return [finding]


def no_generalisation(history: list[dict], t: Thresholds) -> list[Finding]:
    now, classes = history[-1], _classes(history[-1])
    metrics = now.get("metrics", {})
    train, valid = metrics.get("train_accuracy"), metrics.get("valid_accuracy")
    if not classes or not (_finite(train) and _finite(valid)):
        return []
    chance = 1 / classes
    if train < chance + t.generalisation_gap or valid > chance + t.chance_margin:
        return []
    message = f"the training accuracy reached {train:.1%} while the validation accuracy stays near chance "
    message += f"({valid:.1%}; chance {chance:.1%}): what the model learns does not carry over to new images."
    evidence = {"train_accuracy": train, "valid_accuracy": valid, "chance": chance}
    return [_finding("no_generalisation", [], now, evidence, message)]


def overfitting(history: list[dict], t: Thresholds) -> list[Finding]:
    def get(summary, key):
        return summary.get("metrics", {}).get(key)

    seen = [s for s in history if all(_finite(get(s, k)) for k in ("valid_loss", "train_accuracy", "valid_accuracy"))]
    if len(seen) < 2 or seen[-1] is not history[-1]:
        return []
    best, now = min(seen, key=lambda s: get(s, "valid_loss")), seen[-1]
    gap, best_gap = (get(s, "train_accuracy") - get(s, "valid_accuracy") for s in (now, best))
    if (
        get(now, "valid_loss") < (1 + t.overfit_rise) * get(best, "valid_loss")
        or gap < max(best_gap, 0) + t.overfit_gap
    ):
        return []
    message = f"since epoch {best['epoch'] + 1} the validation loss rose from {get(best, 'valid_loss'):.3g} to "
    message += f"{get(now, 'valid_loss'):.3g} and the gap between training and validation accuracy grew from "
    message += f"{best_gap:.1%} to {gap:.1%}: the model fits its training images at the expense of new ones."
    evidence = {"best_epoch": best["epoch"], "valid_loss": get(now, "valid_loss"), "gap": gap, "best_gap": best_gap}
    return [_finding("overfitting", [], now, evidence, message)]


def oscillating(history: list[dict], t: Thresholds) -> list[Finding]:
    losses = [_loss(s) for s in history[-t.oscillation_epochs :]]
    if len(losses) < t.oscillation_epochs or not all(map(_finite, losses)):
        return []
    steps = [b - a for a, b in zip(losses, losses[1:])]
    turns = sum(1 for a, b in zip(steps, steps[1:]) if a * b < 0)
    level, swing = statistics.median(losses), statistics.median(abs(d) for d in steps)
    half = len(losses) // 2
    falling = statistics.mean(losses[half:]) < 0.9 * statistics.mean(losses[:half])
    if turns < len(steps) - 2 or swing < t.oscillation_amplitude * level or falling:
        return []
    message = f"over the last {len(losses)} epochs the training loss went up and down by {swing:.3g} (around "
    message += f"{level:.3g}) without falling: the steps overshoot."
    evidence = {"train_losses": losses, "swing": swing, "threshold": t.oscillation_amplitude}
    return [_finding("oscillating", [], history[-1], evidence, message)]


def output_bias_skew(summary: dict, bias: tuple, classes: list, recall: list | None, t: Thresholds) -> list[Finding]:
    """Classes whose output-layer bias (`bias`: its name and values) is an outlier among the classes, reported with
    their validation recall."""
    bias_name, bias = bias
    if bias is None or len(bias) < 3:
        return []
    centre = statistics.median(bias)
    spread = 1.4826 * statistics.median(abs(b - centre) for b in bias)
    findings = []
    for i, b in enumerate(bias):
        deviation = b - centre
        z = deviation / spread if spread > 0 else (math.copysign(math.inf, deviation) if deviation else 0.0)
        if abs(deviation) < t.bias_min_deviation or abs(z) < t.bias_z:
            continue
        class_recall = recall[i] if recall else None
        evidence = {
            "class": classes[i],
            "bias": b,
            "median_bias": centre,
            "robust_z": z,
            "validation_recall": class_recall,
        }
        message = f"class '{classes[i]}' has output bias {b:.3g} against a median of {centre:.3g} among the classes"
        message += f"; its validation recall is {class_recall:.1%}." if class_recall is not None else "."
        findings.append(_finding("output_bias_skew", [f"{bias_name}[{i}]"], summary, evidence, message))
    return findings


RULES = [high_initial_loss, diverging, exploding_gradients, mostly_clipped, nonfinite_values, dead_units, saturated]
RULES += [vanishing_gradients, update_ratio, stuck, oscillating, weights_growing, no_generalisation, overfitting]


def diagnose(history: list[dict], thresholds: Thresholds | None = None) -> list[Finding]:
    """Every rule on the latest epoch summary of `history` (oldest first). Pure: nothing is logged."""
    thresholds = thresholds or Thresholds()
    return [finding for rule in RULES for finding in rule(history, thresholds)]


def record(findings: list[Finding], new: list[Finding], epoch: int) -> tuple[list[Finding], list[Finding]]:
    """The run's findings with epoch `epoch`'s `new` ones merged in, in the order they began, each linked to the
    earlier finding it follows from; and the findings that began this epoch. Pure: the arguments are kept."""
    merged, begun = {f.key: replace(f) for f in findings}, []
    for finding in new:
        if finding.key in merged:
            kept = merged[finding.key]
            kept.last_epoch = max(kept.last_epoch, finding.last_epoch)
            kept.parameters = [*kept.parameters, *(p for p in finding.parameters if p not in kept.parameters)]
        else:
            merged[finding.key] = replace(finding)
            begun.append(merged[finding.key])
    ordered = sorted(merged.values(), key=lambda f: (f.epoch, f.step, ORDER.index(f.rule)))
    _link(ordered, epoch)
    return ordered, begun


def _link(findings: list[Finding], epoch: int) -> None:
    """Causes, severities and suggestions of findings in the order they began: a finding that can follow from an
    earlier one (CAUSES) does, and leaves the suggestion to it; no suggestion goes against the run's history."""
    diverged = any(f.rule in ("diverging", "exploding_gradients") for f in findings)
    direction = 0  # the first problem's, for the learning rate
    for i, finding in enumerate(findings):
        causes = [f for f in findings[:i] if f.rule in CAUSES.get(finding.rule, ()) and _related(f, finding)]
        finding.cause = causes[0].id if causes else None
        slow_start = finding.rule in ("stuck", "not_learning", "vanishing_gradients") and finding.last_epoch < epoch
        finding.severity = "note" if slow_start and not finding.cause else "warning"
        if finding.cause:
            finding.suggestion = None
            continue
        way, instead = (0, None) if finding.evidence.get("weights_move") else DIRECTION.get(finding.rule, (0, None))
        if way and (way == -direction or (way == RAISE and diverged)):
            finding.suggestion = instead
        elif way and not direction:
            direction = way


def _related(cause: Finding, effect: Finding) -> bool:
    """Whether `cause` can explain `effect`: a finding about the whole run explains any; otherwise they must share a
    layer (conv1 explains conv1.weight; fc3.bias[3], one class's output bias, explains fc3.bias)."""

    def layers(finding):
        return {p.split("[")[0].removesuffix(".weight").removesuffix(".bias") for p in finding.parameters}

    return not cause.parameters or not effect.parameters or bool(layers(cause) & layers(effect))


def story(findings: list[Finding], told_in_full: int = 2) -> str:
    """The run's findings told in the order they began, one paragraph per problem: what happened, what followed
    from it (the first `told_in_full` in full, the others by name), and what to try."""
    paragraphs = []
    for root in (f for f in findings if f.cause is None):
        causes, chain = {root.id}, []
        for finding in findings:
            if finding.cause in causes:
                causes.add(finding.id)
                chain.append(finding)
        if root.severity == "note":
            paragraphs.append(
                f"Note, {_when(root)}: {root.message} It ended after epoch {root.last_epoch + 1}: a slow start."
            )
            continue
        text = [f"Problem, {_when(root)}: {root.message}"]
        text += [f"Then, {_when(f)}: {f.message}" for f in chain[:told_in_full]]
        later = {}
        for finding in chain[told_in_full:]:
            later.setdefault(finding.rule, []).append(finding)
        if later:
            also = [
                f"{rule} ({_when(fs[0])}{f', and {len(fs) - 1} more' if len(fs) > 1 else ''})"
                for rule, fs in later.items()
            ]
            text.append(f"Then also: {', '.join(also)}.")
        paragraphs.append(" ".join([*text, f"Try: {root.suggestion}"]))
    return "\n".join(paragraphs) or "No findings."


def indented(story: str, width: int = 116) -> str:
    """A story for the console: each paragraph wrapped to `width`, its first line indented two spaces, the rest four."""
    return "\n".join(textwrap.fill(p, width, initial_indent="  ", subsequent_indent="    ") for p in story.splitlines())


def _when(finding: Finding) -> str:
    epochs = f"epoch {finding.epoch + 1}" + (f"-{finding.last_epoch + 1}" if finding.last_epoch > finding.epoch else "")
    return f"{epochs}, step {finding.step}"
