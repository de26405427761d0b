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
import argparse
import math
import statistics
from dataclasses import asdict, dataclass, fields


@dataclass
class Thresholds:
    vanishing_ratio: float = 1e-2
    """Vanishing gradients: the first weight layer's gradient RMS is below this fraction of the last one's."""
    vanishing_floor: float = 1e-7
    """Vanishing gradients: a weight layer's gradient RMS is below this, whatever the others do."""
    exploding_factor: float = 100.0
    """Exploding gradients: the total gradient norm exceeds this multiple of its median over the epochs before."""
    weight_max_abs: float = 1.0
    """Weights growing: max |w| above this ..."""
    weight_growth: float = 2.0
    """... and at least this multiple of its value after the first epoch ..."""
    weight_window: int = 3
    """... and still growing over this many epochs (the tutorial: below 0.3 at first, 0.6 and more later)."""
    bias_z: float = 3.5
    """Output bias skew: a class's bias lies this many robust standard deviations (1.4826 MAD) from the median ..."""
    bias_min_deviation: float = 1.0
    """... and at least this far from it in absolute terms."""
    update_slow: float = 1e-6
    """Not learning: the median update-to-weight ratio ||dw|| / ||w|| of a layer over an epoch is below this."""
    update_fast: float = 1e-1
    """Moving too fast: that ratio is above this (about 1e-3 is typical of healthy training)."""

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


def _weight_layers(layers):
    """Names of the multi-element weight tensors in model order (biases and norms' gains tell less)."""
    return [name for name, s in layers.items() if name.endswith("weight") and "grad_rms" in s]


def _finite(value):
    return value is not None and math.isfinite(value)


def vanishing_gradients(history, t):
    now = history[-1]
    layers = now.get("layers", {})
    names = [n for n in _weight_layers(layers) if _finite(layers[n]["grad_rms"])]
    if len(names) < 2:
        return []
    first, last = names[0], names[-1]
    rms = {n: layers[n]["grad_rms"] for n in names}
    findings = []
    if rms[last] > 0 and rms[first] < t.vanishing_ratio * rms[last]:
        early = [n for n in names[:-1] if rms[n] < t.vanishing_ratio * rms[last]]
        findings.append(Finding(
            "vanishing_gradients", early, now["epoch"], now["step"],
            {"grad_rms": {n: rms[n] for n in early + [last]}, "ratio_first_to_last": rms[first] / rms[last],
             "threshold": t.vanishing_ratio},
            f"gradients of {', '.join(early)} are {rms[last] / rms[first]:.0f}x smaller (RMS {rms[first]:.2g}) than "
            f"those of the last layer {last} (RMS {rms[last]:.2g}).",
            "residual connections or normalisation layers, an auxiliary loss near the early layers, or a larger "
            "learning rate for them (--layer-lr NAME=FACTOR)."))
    floor = [n for n in names if rms[n] < t.vanishing_floor and n not in (findings[0].parameters if findings else [])]
    if floor:
        findings.append(Finding(
            "vanishing_gradients", floor, now["epoch"], now["step"],
            {"grad_rms": {n: rms[n] for n in floor}, "floor": t.vanishing_floor},
            f"gradients of {', '.join(floor)} have an RMS below {t.vanishing_floor:g}: these layers barely learn.",
            "check for saturating activations (sigmoid, tanh) or dead ReLUs; residual connections or a larger "
            "learning rate for these layers (--layer-lr NAME=FACTOR)."))
    return findings


def nonfinite_values(history, t):
    now = history[-1]
    bad = {n: s["nonfinite_share"] for n, s in now.get("layers", {}).items() if s.get("nonfinite_share", 0) > 0}
    if not bad:
        return []
    return [Finding(
        "nonfinite_gradients", sorted(bad), now["epoch"], now["step"], {"nonfinite_share": bad},
        f"NaN or Inf values in the gradients of {', '.join(sorted(bad))} "
        f"(up to {max(bad.values()):.1%} of a tensor).",
        "lower the learning rate, clip gradients (torch.nn.utils.clip_grad_norm_), check the data and the loss "
        "for invalid values; --stop-on-nonfinite stops the run at the first occurrence.")]


def exploding_gradients(history, t):
    now = history[-1]
    before = [h["total_grad_norm_median"] for h in history[:-1] if _finite(h.get("total_grad_norm_median"))]
    peak = now.get("total_grad_norm_max")
    if not before or not _finite(peak):
        return []
    baseline = statistics.median(before)
    if baseline <= 0 or peak < t.exploding_factor * baseline:
        return []
    return [Finding(
        "exploding_gradients", ["total"], now["epoch"], now["step"],
        {"total_grad_norm_max": peak, "median_before": baseline, "factor": peak / baseline,
         "threshold": t.exploding_factor},
        f"the total gradient norm reached {peak:.3g}, {peak / baseline:.0f}x its median of {baseline:.3g} "
        f"in the epochs before.",
        "lower the learning rate or clip gradients (torch.nn.utils.clip_grad_norm_).")]


def weights_growing(history, t):
    if len(history) <= t.weight_window:
        return []
    now, window_start = history[-1], history[-1 - t.weight_window]
    start = history[0]
    findings = []
    for name, s in now.get("layers", {}).items():
        first = start.get("layers", {}).get(name, {}).get("max_abs_weight")
        earlier = window_start.get("layers", {}).get(name, {}).get("max_abs_weight")
        value = s.get("max_abs_weight")
        if not all(map(_finite, (first, earlier, value))) or first <= 0:
            continue
        if value > t.weight_max_abs and value >= t.weight_growth * first and value > earlier:
            findings.append(Finding(
                "weights_growing", [name], now["epoch"], now["step"],
                {"max_abs_weight": value, "after_first_epoch": first, f"{t.weight_window}_epochs_before": earlier,
                 "weight_norm": s.get("weight_norm")},
                f"{name}: max |w| grew from {first:.3g} after the first epoch to {value:.3g} and is still growing.",
                f"weight decay for this layer (--layer-wd {name}=5e-4), or a lower learning rate."))
    return findings


def update_ratio(history, t):
    now = history[-1]
    slow, fast = {}, {}
    for name, s in now.get("layers", {}).items():
        ratio = s.get("update_ratio")
        # weights only: a bias that starts at zero moves by a large fraction of its size early on, harmlessly
        if not name.endswith("weight") or not _finite(ratio) or s.get("weight_norm", 0) <= 0:
            continue
        if ratio < t.update_slow:
            slow[name] = ratio
        elif ratio > t.update_fast:
            fast[name] = ratio
    findings = []
    if slow:
        findings.append(Finding(
            "not_learning", sorted(slow), now["epoch"], now["step"], {"update_ratio": slow, "threshold": t.update_slow},
            f"{', '.join(sorted(slow))} change by less than {t.update_slow:g} of their size per step "
            f"(median ||dw||/||w||: {min(slow.values()):.2g}).",
            "a larger learning rate for these layers (--layer-lr NAME=FACTOR), less weight decay, or check that "
            "they receive gradients."))
    if fast:
        findings.append(Finding(
            "moving_too_fast", sorted(fast), now["epoch"], now["step"], {"update_ratio": fast, "threshold": t.update_fast},
            f"{', '.join(sorted(fast))} change by more than {t.update_fast:g} of their size per step "
            f"(median ||dw||/||w||: {max(fast.values()):.2g}).",
            "a lower learning rate for these layers (--layer-lr NAME=0.1) or for the whole model."))
    return findings


def output_bias_skew(epoch, step, bias_name, bias, classes, recall, t):
    """Classes whose output-layer bias is an outlier among the classes, beside their validation recall."""
    if bias is None or len(bias) < 3:
        return []
    centre = statistics.median(bias)
    spread = 1.4826 * statistics.median(abs(b - centre) for b in bias)
    outliers = {}
    for i, b in enumerate(bias):
        deviation = b - centre
        z = deviation / spread if spread > 0 else (math.copysign(math.inf, deviation) if deviation else 0.0)
        if abs(deviation) >= t.bias_min_deviation and abs(z) >= t.bias_z:
            outliers[i] = (b, z)
    return [Finding(
        "output_bias_skew", [f"{bias_name}[{i}]"], epoch, step,
        {"class": classes[i], "bias": b, "median_bias": centre, "robust_z": z,
         "validation_recall": recall[i] if recall else None},
        f"class '{classes[i]}' has output bias {b:.3g} against a median of {centre:.3g} among the classes"
        + (f"; its validation recall is {recall[i]:.1%}." if recall and recall[i] is not None else "."),
        "check that class's share of the training data (rebalance or weight the loss), "
        "or re-initialise the output bias.") for i, (b, z) in outliers.items()]


RULES = (vanishing_gradients, nonfinite_values, exploding_gradients, weights_growing, update_ratio)


def diagnose(history, thresholds=None):
    """All layer rules on the latest epoch summary of `history` (oldest first)."""
    thresholds = thresholds or Thresholds()
    return [finding for rule in RULES for finding in rule(history, thresholds)]
