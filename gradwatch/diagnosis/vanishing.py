"""vanishing_gradients: a layer's gradients and steps vanish against the last layer of its own way
from the loss; its candidate causes (saturation, steps so large that they pushed units to their
limits, a deep stack without shortcuts, a small output scale, clipping) are checked before one is
named."""

from __future__ import annotations

from ..summary import EpochSummary, finite
from .facts import (
    LEARNT,
    _clipped_small,
    _fast_at_first,
    _fast_so_far,
    _fell,
    _judged,
    _saturated,
    _update_ratios,
)
from .findings import LOWER, Cause, Finding, _found, _never, names, rule
from .thresholds import Thresholds


def _weight_rms(summary: EpochSummary) -> dict[str, float]:
    """Each weight tensor's gradient RMS, in model order (biases and norms' gains tell less), but
    those the loss's graph shows are read by a lookup (an embedding: its gradient is zero at every
    row a batch did not look up, so its RMS says how many rows were, not how deep it lies)."""
    lookups = set(summary.loop.get("graph", {}).get("lookups", []))
    return {
        name: s["grad_rms"]
        for name, s in summary.layers.items()
        if name.endswith("weight") and finite(s.get("grad_rms")) and name not in lookups
    }


def _ends(summary: EpochSummary, rms: dict[str, float]) -> tuple[str, str]:
    """The weight layers a vanishing gradient is measured between: the deepest below the loss and
    the last, by the loss's graph (depths); by model order without it. Of several last layers (the
    heads of an actor and a critic, whose losses have scales of their own), the one of the smallest
    gradient: a head's gradient is not what another head's layers should have."""
    depths = summary.loop.get("graph", {}).get("depths", {})
    known = {name: depths[name] for name in rms if name in depths}
    if len(known) < 2 or min(known.values()) != 0:
        return next(iter(rms)), list(rms)[-1]
    deepest = max(known.values())
    heads = [name for name, depth in known.items() if depth == 0]
    return next(n for n, depth in known.items() if depth == deepest), min(heads, key=rms.get)


def _step_rms(summary: EpochSummary) -> dict[str, float]:
    """Each weight tensor's step per value (the RMS of its update), by name, where it was measured:
    its update ratio x its norm over the square root of its size (grad_norm / grad_rms)."""
    steps = {}
    for name, ratio in _update_ratios(summary).items():
        s = summary.layers[name]
        if finite(s.get("grad_norm")) and finite(s.get("grad_rms")) and s["grad_norm"] > 0:
            steps[name] = ratio * s["weight_norm"] * s["grad_rms"] / s["grad_norm"]
    return steps


def _vanishes(now: EpochSummary, rms: dict, first: str, last: str, t: Thresholds) -> bool:
    """Whether the gradient vanishes from the last layer down to the first: its RMS there is below
    `vanishing_ratio` of the last's, and so are that layer's steps per value where they were
    measured (an optimizer that rescales each step, as Adam does, moves a layer of small gradients
    as far as the others: no harm; steps are compared per value, not to the weights' size, which
    differs from layer to layer: a policy head starts a hundred times smaller than the layers
    below)."""
    if first == last or rms[last] <= 0 or rms[first] >= t.vanishing_ratio * rms[last]:
        return False
    steps = _step_rms(now)
    if first not in steps or last not in steps:
        return True
    return steps[first] < t.vanishing_ratio * steps[last]


DEEP = 6  # weight layers between a layer and the loss, on its shortest way, that make a plain stack


def _feeding(history: list[EpochSummary], t: Thresholds) -> list[str]:
    """The weights of the layers that feed sigmoid or tanh units near their limits in the latest
    summary."""
    return [f"{layer}.weight" for layer in _saturated(history[-1], t)]


def _pushed(history: list[EpochSummary], finding: Finding, t: Thresholds) -> dict | None:
    """The weights that feed saturated units moved by more than `update_fast` of their size in one
    step, at a summary or at a reading of the first steps: steps that large push the units'
    inputs far out, where their gradient vanishes."""
    feeding = _feeding(history, t)
    fast = {n: r for n, r in _fast_so_far(history, t).items() if n in feeding}
    for name, ratio in _fast_at_first(history, feeding, t).items():
        fast[name] = max(ratio, fast.get(name, 0.0))
    return {"update_ratio": fast} if fast else None


def _saturation(history: list[EpochSummary], finding: Finding, t: Thresholds) -> dict | None:
    """Sigmoid or tanh units near their limits in the latest summary (their gradient is nearly 0),
    with no weight moving by more than `update_fast` of its size per step at any summary so far,
    nor the weights that feed those units at the first steps: steps that large push the units
    there whatever the activation (_pushed)."""
    shares = {layer: a["share"] for layer, a in _saturated(history[-1], t).items()}
    pushed = _fast_at_first(history, _feeding(history, t), t) or _fast_so_far(history, t)
    return {"saturated_share": shares} if shares and not pushed else None


def _deep_stack(history: list[EpochSummary], finding: Finding, t: Thresholds) -> dict | None:
    """A layer DEEP or more weight layers below the loss on its shortest way: no residual
    connection carries its gradient past the others."""
    depths = history[-1].loop.get("graph", {}).get("depths", {})
    deepest = max((depths[n] for n in finding.parameters if n in depths), default=0)
    return {"depth": deepest} if deepest >= DEEP else None


def _clipped_floor(history: list[EpochSummary], finding: Finding, t: Thresholds) -> dict | None:
    """Gradients below `vanishing_floor` read after clipping scaled most of them down to its
    threshold: the clipping made them small (it scales every layer alike, so it is no cause of
    early layers' gradients smaller than the last's)."""
    return _clipped_small(history, finding, t) if "floor" in finding.evidence else None


VANISHING_CAUSES = (
    Cause("saturation", _saturation, "ReLU or GELU instead of sigmoid or tanh in the hidden "
          "layers, or normalisation layers before them.", "saturated sigmoid or tanh units below "
          "the output (diagnosis.json's activations)"),
    Cause("learning_rate", _pushed, "a lower learning rate{lr}.", "the learning rate: steps of "
          "more than a tenth of the weights that feed saturated units push their inputs far out",
          LOWER),
    Cause("depth", _deep_stack, "residual connections or normalisation layers, or an auxiliary "
          "loss near the early layers.", "how many weight layers lie between these and the output "
          "without a residual connection"),
    Cause("small_output", _never, "", "the scale of the layers after them: a small initial gain "
          "(as policy heads use) or weights decayed towards zero shrink every gradient below"),
    Cause("clipping", _clipped_floor, "a gradient clipping threshold far above the one in use "
          "(the 90th percentile of the norms before clipping: clip_grad_norm_ returns them).",
          "the gradient clipping: a threshold below most steps' norms scales every gradient down"),
)  # fmt: skip


@rule(
    "",
    causes=VANISHING_CAUSES,
    thresholds=(
        "vanishing_ratio",
        "vanishing_floor",
        "saturated_share",
        "update_fast",
        "clipped_share",
    ),
    follows=(
        "softmax_before_loss",
        "mostly_clipped",
        "dead_units",
        "saturated",
        "diverging",
        "exploding_gradients",
        "high_initial_loss",
        "strong_weight_decay",  # weights decayed towards zero shrink every gradient below them
    ),
    ended="a slow start",
)
def vanishing_gradients(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """The deepest weight layer's gradient RMS is below `vanishing_ratio` of the last weight
    layer's (depths by the loss's graph; of several output heads, the smallest), or any weight
    layer's is below `vanishing_floor`; embeddings are not compared (_weight_rms), and nothing is
    while a loss to be minimised is down to LEARNT x where it started. A symptom: its causes are
    saturated units (above `saturated_share`, where no step was ever larger than `update_fast` of
    the weights), steps that large in the weights that feed saturated units, a deep stack without
    shortcuts, a small scale of the layers after them, or clipping that scaled most steps down
    (for gradients below the floor)."""
    now = history[-1]
    rms = _weight_rms(now)
    if len(rms) < 2 or _judged(history) and _fell(history, LEARNT):
        return []  # a loss near nothing (a margin every triplet meets) has no gradient to pass on
    first, last = _ends(now, rms)
    findings = []
    if _vanishes(now, rms, first, last, t):
        early = [n for n in rms if n != last and rms[n] < t.vanishing_ratio * rms[last]]
        evidence = {"grad_rms": {n: rms[n] for n in [*early, last]}}
        evidence.update(ratio_first_to_last=rms[first] / rms[last], threshold=t.vanishing_ratio)
        smaller = "zero, against"
        if rms[first] > 0:
            smaller = f"{rms[last] / rms[first]:.0f}x smaller than"
        message = f"gradients of {names(early)} are {smaller} those of the last layer {last} "
        message += f"(RMS {rms[first]:.2g} against {rms[last]:.2g})."
        findings.append(_found(now, early, evidence, message))
    done = findings[0].parameters if findings else []
    floor = [n for n in rms if rms[n] < t.vanishing_floor and n not in done]
    if floor:
        evidence = {"grad_rms": {n: rms[n] for n in floor}, "floor": t.vanishing_floor}
        message = f"gradients of {names(floor)} have an RMS below {t.vanishing_floor:g}: "
        message += "these layers barely learn."
        findings.append(_found(now, floor, evidence, message))
    return findings
