"""The rules about units: ReLUs dead on every batch, and activations saturated (tanh, sigmoid at
their limits), each with its candidate causes."""

from __future__ import annotations

from ..summary import EpochSummary, finite
from .facts import (
    _accuracy,
    _judged,
    _loss,
    _near_start,
    _period,
    _saturated,
    _start_loss,
)
from .findings import LOWER, Cause, Finding, _fast_steps, _found, _never, rule
from .thresholds import Thresholds


def _zero_weights(history: list[EpochSummary], finding: Finding, t: Thresholds) -> dict | None:
    """The weights of the units' layers were all zero before the first step (the loss's graph's
    zero_weights): each of those units computes its bias alone."""
    zero = history[-1].loop.get("graph", {}).get("zero_weights", [])
    found = [name for name in zero if name.removesuffix(".weight") in finding.parameters]
    return {"zero_weights": found} if found else None


def _learns_anyway(history: list[EpochSummary], t: Thresholds) -> str | None:
    """Where the units left learn anyway, what to tell of it: a loss to be minimised that is no
    longer near where it started; None where it is."""
    now = history[-1]
    start, _ = _start_loss(history)
    if not start or not finite(_loss(now)) or _near_start(now, start, t):
        return None
    accuracy = _accuracy(now)
    text = f" The model learns on the units left (training loss {_loss(now):.3g}"
    return text + (f", accuracy {accuracy:.1%})." if finite(accuracy) else ").")


# what a finding about units tells where the loss is not one to minimise
UNJUDGED = " Its loss is not one to minimise (RL, GAN, other): it cannot show what they cost."


FAST_STEPS = Cause(
    "learning_rate",
    _fast_steps,
    "a lower learning rate{lr}.",
    "the learning rate: steps of more than a tenth of the weights push the units' inputs far out",
    LOWER,
)


@rule(
    "",
    causes=(
        FAST_STEPS,
        Cause(
            "initialisation",
            _zero_weights,
            "random initial weights (torch.nn's defaults, or nn.init.kaiming_normal_ before "
            "ReLUs): weights of zero give every unit of a layer the same output and the same "
            "gradient, so that no step tells them apart.",
            "the initialisation and the biases: a negative bias or weights too large for their "
            "fan-in (Kaiming's initialisation fits ReLUs), or LeakyReLU, which never stops",
        ),
    ),
    thresholds=("dead_share", "update_fast"),
    follows=(
        "gradients_not_cleared",
        "strong_weight_decay",
        "unshuffled",
        "diverging",
        "exploding_gradients",
        "high_initial_loss",
    ),
    ended="its units fired again: silent for a while, not dead",
)
def dead_units(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """`dead_share` of a ReLU's units (channels or features) gave no positive output at any
    statistics step of the epoch (in logs read by `diagnose`: for a whole batch). A note while the
    model learns anyway (not near its start, as `stuck` measures it) or its loss cannot tell (RL,
    GAN, other), a warning once it does not. A symptom: the learning rate is its cause where the
    steps were large; the initialisation, where its layer's weights were all zero before the first
    step. Units that fire again in a later epoch were not dead: the finding ends, a note."""
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
    return [_unit_finding(history, list(dead), {"dead_share": dead}, message, t.dead_share, t)]


def _unit_finding(
    history: list[EpochSummary],
    layers: list[str],
    evidence: dict,
    message: str,
    threshold: float,
    t: Thresholds,
) -> Finding:
    """A finding about units at their limits: a note where the model learns anyway or its loss
    cannot tell."""
    judged = _judged(history)
    learns = _learns_anyway(history, t) if judged else None
    message += learns or ("" if judged else UNJUDGED)
    finding = _found(history[-1], layers, {**evidence, "threshold": threshold}, message)
    finding.harmless = learns is not None or not judged
    return finding


@rule(
    "",
    causes=(
        FAST_STEPS,
        Cause(
            "activation",
            _never,
            "",
            "the activation and the inputs' scale: ReLU or GELU do not saturate, normalisation "
            "layers before a sigmoid or tanh keep its inputs small, and so do smaller initial "
            "weights and normalised inputs",
        ),
    ),
    thresholds=("saturated_share", "update_fast"),
    follows=("gradients_not_cleared", "diverging", "exploding_gradients", "high_initial_loss"),
)
def saturated(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """`saturated_share` of a sigmoid's or tanh's outputs are within 1% of their limits. A note
    while the model learns anyway or its loss cannot tell (RL, GAN, other). A symptom: the learning
    rate is its cause where the steps were large (more than `update_fast` of the weights' size)."""
    now = history[-1]
    found = _saturated(now, t)
    if not found:
        return []
    parts = ", ".join(f"{a['share']:.0%} of {layer}'s {a['kind']}" for layer, a in found.items())
    message = f"{parts} outputs are within 1% of their limits, where their gradient is nearly zero "
    message += "(saturated)."
    shares = {layer: a["share"] for layer, a in found.items()}
    evidence = {"saturated_share": shares}
    return [_unit_finding(history, list(found), evidence, message, t.saturated_share, t)]
