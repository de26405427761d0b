"""Rules that read per-layer statistics the way the tutorial reads its histograms, and say what to try.

Each rule is a pure function of an epoch's summary (and the summaries before it) that returns
Findings: which rule, which parameters, the evidence in numbers, and a suggestion. A healthy
run produces none. The thresholds are fields of Thresholds, each documented there.

An epoch summary is a dict:
    {"epoch": int, "step": int,                       # step: optimizer steps done at the epoch's end
     "layers": {name: {"grad_rms": float, "weight_norm": float, "max_abs_weight": float,
                       "update_ratio": float, "nonfinite_share": float}},   # medians over the epoch's logs
     "total_grad_norm_max": float,                    # largest total gradient norm logged in the epoch
     "total_grad_norm_median": float}                 # median of the same logs
Missing keys are allowed: a rule skips what it cannot see.
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import asdict, dataclass, fields


@dataclass
class Thresholds:
    """When each rule fires (README's table says the same)."""

    vanishing_ratio: float = 1e-2  # the first weight layer's gradient RMS is below this fraction of the last one's
    vanishing_floor: float = 1e-7  # or a weight layer's gradient RMS is below this, whatever the others do
    exploding_factor: float = 100.0  # the total gradient norm exceeds this multiple of its median in earlier epochs
    weight_max_abs: float = 1.0  # weights growing: max |w| above this ...
    weight_growth: float = 2.0  # ... and at least this multiple of its value after the first epoch ...
    weight_window: int = 3  # ... and still growing over this many epochs (the tutorial: 0.3 at first, 0.6 later)
    bias_z: float = 3.5  # an output bias this many robust standard deviations (1.4826 MAD) from the median ...
    bias_min_deviation: float = 1.0  # ... and at least this far from it
    update_slow: float = 1e-6  # not learning: a layer's median update-to-weight ratio ||dw|| / ||w|| is below this
    update_fast: float = 1e-1  # moving too fast: it is above this (about 1e-3 is typical of healthy training)

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
    parameters: list
    epoch: int
    step: int
    evidence: dict
    message: str
    suggestion: str

    @property
    def key(self):
        """Findings with the same key say the same thing; the console reports each key once."""
        return self.rule, tuple(self.parameters)

    def to_json(self):
        return asdict(self)

    def __str__(self):
        return f"[{self.rule}] epoch {self.epoch + 1}, step {self.step}: {self.message} Try: {self.suggestion}"


SUGGESTIONS = {  # what to try, per rule; {name} is the first parameter concerned
    "vanishing_gradients": "residual connections or normalisation layers, an auxiliary loss near the early layers, "
    "or a larger learning rate for them (--layer-lr NAME=FACTOR); check for saturating activations or dead ReLUs.",
    "nonfinite_gradients": "lower the learning rate, clip gradients (torch.nn.utils.clip_grad_norm_), check the data "
    "and the loss for invalid values; --stop-on-nonfinite stops the run at the first occurrence.",
    "exploding_gradients": "lower the learning rate or clip gradients (torch.nn.utils.clip_grad_norm_).",
    "weights_growing": "weight decay for this layer (--layer-wd {name}=5e-4), or a lower learning rate.",
    "not_learning": "a larger learning rate for these layers (--layer-lr NAME=FACTOR), less weight decay, or check "
    "that they receive gradients.",
    "moving_too_fast": "a lower learning rate for these layers (--layer-lr NAME=0.1) or for the whole model.",
    "output_bias_skew": "check that class's share of the training data (rebalance or weight the loss), or "
    "re-initialise the output bias.",
}


def _finding(rule: str, parameters: list[str], summary: dict, evidence: dict, message: str) -> Finding:
    suggestion = SUGGESTIONS[rule].format(name=parameters[0])
    return Finding(rule, parameters, summary["epoch"], summary["step"], evidence, message, suggestion)


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
        message = f"gradients of {', '.join(early)} are {smaller} those of the last layer {last} "
        message += f"(RMS {rms[first]:.2g} against {rms[last]:.2g})."
        findings.append(
            _finding("vanishing_gradients", early, now, {**evidence, "threshold": t.vanishing_ratio}, message)
        )
    done = findings[0].parameters if findings else []
    floor = [n for n in rms if rms[n] < t.vanishing_floor and n not in done]
    if floor:
        evidence = {"grad_rms": {n: rms[n] for n in floor}, "floor": t.vanishing_floor}
        message = f"gradients of {', '.join(floor)} have an RMS below {t.vanishing_floor:g}: these layers barely learn."
        findings.append(_finding("vanishing_gradients", floor, now, evidence, message))
    return findings


def nonfinite_values(history: list[dict], t: Thresholds) -> list[Finding]:
    now = history[-1]
    bad = {n: s["nonfinite_share"] for n, s in now.get("layers", {}).items() if s.get("nonfinite_share", 0) > 0}
    if not bad:
        return []
    message = (
        f"NaN or Inf values in the gradients of {', '.join(sorted(bad))} (up to {max(bad.values()):.1%} of a tensor)."
    )
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
            message = f"{', '.join(found)} change by {comparison} than {threshold:g} of their size per step "
            message += f"(median ||dw||/||w||: {most(found.values()):.2g})."
            findings.append(_finding(rule, list(found), now, {"update_ratio": found, "threshold": threshold}, message))
    return findings


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


RULES = (vanishing_gradients, nonfinite_values, exploding_gradients, weights_growing, update_ratio)


def diagnose(history: list[dict], thresholds: Thresholds | None = None) -> list[Finding]:
    """All layer rules on the latest epoch summary of `history` (oldest first). Pure: nothing is logged."""
    thresholds = thresholds or Thresholds()
    return [finding for rule in RULES for finding in rule(history, thresholds)]
