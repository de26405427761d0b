"""The rules about how far the optimizer moves the weights against their size: not at all
(not_learning) or too far (moving_too_fast), judged only where the loss has not come down.
"""

from __future__ import annotations

from ..summary import EpochSummary, finite
from .facts import (
    LEARNT,
    _clipped_steps,
    _fast,
    _fell,
    _judged,
    _kept_apart,
    _latest_level,
    _peak_lr,
    _reached,
    _starts,
    _update_ratios,
)
from .findings import LOWER, RAISE, Cause, Finding, _found, _never, names, rule
from .thresholds import Thresholds


def _update_finding(now: EpochSummary, found: dict[str, float], threshold: float, comparison: str):
    most = min(found.values()) if comparison == "less" else max(found.values())
    message = f"{names(found)} change by {comparison} than {threshold:g} of their size per step "
    message += f"(median ||dw||/||w||: {most:.2g})."
    return [_found(now, list(found), {"update_ratio": found, "threshold": threshold}, message)]


def _slow_steps(history: list[EpochSummary], finding: Finding, t: Thresholds) -> dict | None:
    """The steps are small with gradients that reach the layers (facts._reached)."""
    return _reached(history, finding.parameters, t)


@rule(
    "",
    causes=(
        Cause(
            "learning_rate",
            _slow_steps,
            "a larger learning rate for these layers (--layer-lr NAME=FACTOR){lr_up}.",
            "the learning rate: steps this small with gradients that reach them",
            RAISE,
        ),
        Cause(
            "gradients",
            _never,
            "",
            "the gradients that reach these layers (the Gradients charts): vanishing ones, or "
            "units at their limits, make the steps small whatever the rate",
        ),
        Cause(
            "weight_decay",
            _never,
            "",
            "the weight decay: decay that matches the gradients holds the weights in place",
        ),
        Cause(
            "clipping",
            _clipped_steps,
            "a gradient clipping threshold far above the one in use (about the 90th percentile of "
            "the norms before clipping, which clip_grad_norm_ returns).",
            "the gradient clipping: a threshold below most steps' norms keeps every step small",
        ),
    ),
    thresholds=("update_slow", "update_fast", "vanishing_floor", "clipped_share"),
    follows=(
        "updates_rounded_away",
        "mostly_clipped",
        "not_updated",
        "not_in_optimizer",
        "no_gradient",
        "lr_collapsed",
        "strong_weight_decay",
        "dead_units",
        "saturated",
        "vanishing_gradients",
        "diverging",
        "high_initial_loss",
    ),
    lr=RAISE,  # where its cause is the learning rate
    instead="check that these layers receive gradients and are in the optimizer.",
    ended="a slow start",
)
def not_learning(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """A weight tensor's median update-to-weight ratio ||dw|| / ||w|| over the epoch is below
    `update_slow`; frozen ones (requires_grad=False) and copies kept apart (a target network) are
    meant not to move, and neither are any once the schedule has brought the learning rate below a
    tenth of its peak, or once a loss to be minimised is down to LEARNT x where it started. A
    symptom: clipping is its cause where it scaled most steps down (facts._clipping); the learning
    rate where the gradients reach the layers and no step was ever large."""
    frozen = set(history[-1].loop.get("frozen", ())) | _kept_apart(history[-1])
    peak = _peak_lr(history)
    if peak and finite(history[-1].lr) and history[-1].lr < 0.1 * peak:
        return []  # the schedule has annealed the learning rate: slow steps are what it asks for
    if _judged(history) and _fell(history, LEARNT):
        return []  # the loss is near nothing: the gradients, and so the steps, are too
    ratios = _update_ratios(history[-1]).items()
    found = {n: r for n, r in ratios if r < t.update_slow and n not in frozen}
    return _update_finding(history[-1], found, t.update_slow, "less") if found else []


def _new_low(history: list[EpochSummary]) -> bool:
    """Whether the loss's latest level is below its latest level at every summary before: it still
    falls."""
    latest = _latest_level(history[-1])
    before = [_latest_level(summary) for summary in history[:-1]]
    before = [level for level in before if finite(level)]
    return finite(latest) and bool(before) and latest < min(before)


def _rose(history: list[EpochSummary], finding: Finding, t: Thresholds) -> dict | None:
    """A loss to be minimised that is now above where it started (the higher start): the steps
    overshoot."""
    starts = _starts(history)
    latest = _latest_level(history[-1])
    if not _judged(history) or not starts or not finite(latest) or latest <= max(starts):
        return None
    return {"started": max(starts), "loss": latest}


@rule(
    "",
    thresholds=("update_fast",),
    follows=(
        "gradients_not_cleared",
        "diverging",
        "exploding_gradients",
        "mostly_clipped",
        "strong_weight_decay",
        "high_initial_loss",
    ),
    causes=(
        Cause(
            "learning_rate",
            _rose,
            "a lower learning rate for these layers (--layer-lr NAME=0.1) or for the whole model.",
            "the learning rate: whether the loss falls at a tenth of it",
            lr=LOWER,
        ),
        Cause(
            "small_weights",
            _never,
            "",
            "weight decay or an initialisation that keeps these "
            "weights near zero (the ratio is to their size)",
        ),
        Cause(
            "data",
            _never,
            "",
            "the labels and inputs: weights that move fast while the loss "
            "does not fall find nothing to learn in them",
        ),
    ),  # fmt: skip
)
def moving_too_fast(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """A weight tensor's median update-to-weight ratio is above `update_fast` (about 1e-3 is typical
    of healthy training), while a loss to be minimised does not fall below FELL x its first level
    and makes no new low (large steps that bring the loss down are learning: weights that start near
    zero move by much of their size), nor in the first summary of such a loss, whose steps are no
    baseline. A symptom: the learning rate is its cause where the loss rose meanwhile."""
    if _judged(history) and (len(history) < 2 or _fell(history) or _new_low(history)):
        return []
    found = _fast(history[-1], t)
    return _update_finding(history[-1], found, t.update_fast, "more") if found else []
