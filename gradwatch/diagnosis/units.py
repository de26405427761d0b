"""The rules about units: ReLUs dead on every batch, and activations saturated (tanh, sigmoid at
their limits), each with its candidate causes."""

from __future__ import annotations

from ..summary import EpochSummary, finite
from .facts import _accuracy, _fast, _loss, _near_start, _period, _saturated, _start_loss
from .findings import LOWER, Cause, Finding, _found, rule
from .thresholds import Thresholds


@rule(
    "a smaller negative bias or a better initialisation (Kaiming's), or LeakyReLU.",
    thresholds=("dead_share",),
    follows=(
        "gradients_not_cleared",
        "strong_weight_decay",
        "unshuffled",
        "diverging",
        "exploding_gradients",
        "high_initial_loss",
    ),
)
def dead_units(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """`dead_share` of a ReLU's units (channels or features) gave no positive output at any
    statistics step of the epoch (in logs read by `diagnose`: for a whole batch). A note while the
    model learns anyway (not near its start, as `stuck` measures it), a warning once it does not."""
    now = history[-1]
    # by the layer that feeds them: of two ReLUs after one layer, the later one speaks for it
    dead = {
        a["layer"]: a.get("never_fired", a["share"])
        for a in now.activations.values()
        if a["kind"] == "relu"
    }
    dead = {layer: share for layer, share in dead.items() if share >= t.dead_share}
    if not dead:
        return []
    parts = ", ".join(f"{share:.0%} of {layer}'s" for layer, share in dead.items())
    message = f"{parts} units gave no positive output on any batch read in {_period(now)}: "
    message += "their ReLUs no longer fire (dead units)."
    start, _ = _start_loss(history)
    learns = bool(start) and finite(_loss(now)) and not _near_start(now, start, t)  # no more
    if learns:
        accuracy = _accuracy(now)
        message += f" The model learns on the units left (training loss {_loss(now):.3g}"
        message += f", accuracy {accuracy:.1%})." if finite(accuracy) else ")."
    evidence = {"dead_share": dead, "threshold": t.dead_share}
    finding = _found(now, list(dead), evidence, message)
    finding.harmless = learns
    return [finding]


def _fast_steps(history: list[EpochSummary], finding: Finding, t: Thresholds) -> dict | None:
    """Weights that move by more than `update_fast` of their size per step: steps that large
    push a unit's inputs far out, where sigmoid and tanh flatten."""
    fast = _fast(history[-1], t)
    return {"update_ratio": fast} if fast else None


def _squashing(history: list[EpochSummary], finding: Finding, t: Thresholds) -> dict:
    """Sigmoid and tanh flatten away from 0: the activation is a cause wherever they saturate."""
    return {"activations": finding.parameters}


@rule(
    "",
    causes=(
        Cause(
            "learning_rate",
            _fast_steps,
            "a lower learning rate{lr}.",
            "the learning rate: "
            "steps of more than a tenth of the weights push the units into saturation",
            LOWER,
        ),
        Cause(
            "activation",
            _squashing,
            "ReLU instead of sigmoid or tanh in hidden layers, "
            "normalisation layers, or smaller initial weights.",
            "the activation: ReLU or GELU "
            "do not saturate, and normalisation layers before a sigmoid or tanh keep its inputs "
            "small",
        ),
    ),  # fmt: skip
    thresholds=("saturated_share", "update_fast"),
    follows=("gradients_not_cleared", "diverging", "exploding_gradients", "high_initial_loss"),
)
def saturated(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """`saturated_share` of a sigmoid's or tanh's outputs are within 1% of their limits. A symptom
    of the activation, or of steps too large for it (weights moving by more than `update_fast` of
    their size per step): the activation is named where the steps are not that large."""
    now = history[-1]
    found = _saturated(now, t)
    if not found:
        return []
    parts = ", ".join(f"{a['share']:.0%} of {layer}'s {a['kind']}" for layer, a in found.items())
    message = f"{parts} outputs are within 1% of their limits, where their gradient is nearly zero "
    message += "(saturated)."
    shares = {layer: a["share"] for layer, a in found.items()}
    evidence = {"saturated_share": shares, "threshold": t.saturated_share}
    return [_found(now, list(found), evidence, message)]
