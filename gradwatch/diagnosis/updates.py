"""The rules that read whether the optimizer's steps change the weights: steps rounded away by the
weights' precision, and weights that stay the same though they get gradients (a symptom: what to
check comes in order).
"""

from __future__ import annotations

from ..summary import EpochSummary, finite
from .facts import (
    _clipping,
    _large_initialisation,
    _loop_start,
    _normalised,
    _period,
    _reached,
    _update_ratios,
)
from .findings import RAISE, Finding, _found, names, rule
from .loop import _scheduled_low
from .thresholds import Thresholds


@rule(
    "a much larger learning rate: a step smaller than half the spacing of the weights' dtype at "
    "their size is lost to rounding (in float32, a step below about 6e-8 of a weight).",
    thresholds=(
        "clipped_share",
        "update_slow",
        "update_fast",
        "vanishing_floor",
        "vanishing_ratio",
    ),
    follows=("not_in_optimizer", "optimizer_frozen"),
    lr=RAISE,
    instead="check the learning rate and the gradients' scale: the steps are too small to change "
    "the weights.",
    exact=True,
)
def updates_rounded_away(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """At every reading of the epoch past the first steps (two at least), at least half of a
    parameter's values had a gradient other than zero and did not change at the optimizer step
    (the optimizer holding it at a learning rate above 0), and a typical step of its optimizer
    (the learning rate, times the gradient's RMS for SGD) is below half the spacing of the
    parameter's dtype at the RMS of its values: rounding took the updates away (bfloat16 keeps 8
    bits of mantissa: a step below 0.4% of a weight is lost; float32, 24 bits). Not while the
    learning rate is below half the rate set or its peak (a warmup, an annealed schedule), nor for
    a bias a batch norm takes out again (_normalised). Where other parameters do change, the
    learning rate is named only as _others_change says."""
    now = history[-1]
    normalised = _normalised(now)
    rounded = {n: found for n, found in now.loop.get("rounded", {}).items() if n not in normalised}
    if not rounded or _scheduled_low(history):
        return []
    dtypes = sorted({found["dtype"] for found in rounded.values()})
    shares = [found["unchanged_share"] - found["grad_zero_share"] for found in rounded.values()]
    message = f"{names(rounded)} ({', '.join(dtypes)}): {min(shares):.0%} to {max(shares):.0%} of "
    message += "their values had a gradient other than zero and did not change at the optimizer "
    message += f"step: updates smaller than half the spacing of {' and '.join(dtypes)} numbers at "
    message += "those values are rounded away."
    suggestion = None  # the declaration's: a larger learning rate
    evidence = {"rounded": dict(rounded), "dtypes": dtypes}
    low = [dtype for dtype in dtypes if dtype in ("bfloat16", "float16")]
    apart = normalised | set(rounded)
    others = [n for n, v in now.layers.items() if n not in apart and v.get("grad_norm", 0) > 0]
    clipped = _clipped(history, t)
    if clipped:
        message += clipped[0]
        suggestion = clipped[1]
        evidence.update(clipping=clipped[2], cause="clipping")  # no claim on the lr
    elif low:
        suggestion = f"keep the weights in float32 (torch.autocast computes in {low[0]} from "
        suggestion += "float32 weights), or an optimizer that keeps a float32 copy of them."
    elif others:
        told, suggestion, found = _others_change(history, list(rounded), others, t)
        message += told
        evidence.update(found)
    return [_found(now, list(rounded), evidence, message, _loop_start(history), suggestion)]


def _others_change(
    history: list[EpochSummary], rounded: list[str], others: list[str], t: Thresholds
) -> tuple[str, str | None, dict]:
    """Where other parameters with gradients do change: what to add to the message, the suggestion
    and the evidence. A learning rate too low would round the others' steps away too, so it is
    named only where some of the others move by less than `update_slow` of their size per step as
    well though their gradients are not small (RMS at least `vanishing_ratio` of the largest: the
    rate, not the gradients, keeps them still), the rounded weights' gradients reach them
    (facts._reached) and no weight started far too large (its spacing is large: the
    initialisation, not the rate); else a symptom."""
    now = history[-1]
    message = f" The other {len(others)} parameters with gradients do change"
    ratios = _update_ratios(now)
    rms = {name: now.layers[name].get("grad_rms") for name in ratios}
    ordinary = t.vanishing_ratio * max((r for r in rms.values() if finite(r)), default=0.0)
    slow = {
        name: ratios[name]
        for name in others
        if ratios.get(name, 1.0) < t.update_slow and finite(rms.get(name)) and rms[name] >= ordinary
    }
    reached = _reached(history, [name for name in rounded if name.endswith("weight")], t)
    if slow and reached and not _large_initialisation(now):
        message += f", but {names(slow)} by less than {t.update_slow:g} of their size per step "
        message += "too, and the gradients reach the weights whose steps are rounded away: the "
        message += "learning rate is too low for this optimizer."
        return message, None, {"weights_slow": slow, **reached, "cause": "learning_rate"}
    suggestion = "compare these parameters' gradients with the others' (the Gradients charts: "
    suggestion += "gradients that vanish before reaching them make their steps too small) "
    suggestion += "before raising the learning rate, which would move the others too."
    return message + ".", suggestion, {"weights_move": others, "cause": None}  # a symptom


def _clipped(history: list[EpochSummary], t: Thresholds) -> tuple[str, str, dict] | None:
    """Where clipping scaled down more than `clipped_share` of the steps: what to add to the
    message, the suggestion (the steps are small because the clipping makes them so), and the
    clipping (facts._clipping)."""
    clip = _clipping(history)
    share = clip.get("clipped_share")
    if not clip.get("max_norm") or not finite(share) or share <= t.clipped_share:
        return None
    message = f" Clipping at {clip['max_norm']:g} scaled down {share:.0%} of the steps"
    if not finite(clip["grad_norm_p90"]):  # read from the norms after clipping
        message += " (their total gradient norm was the threshold itself)."
        suggestion = f"raise the clipping threshold far above {clip['max_norm']:g} (to the 90th "
        suggestion += "percentile of the norms before clipping, which clip_grad_norm_ returns): "
        suggestion += "it makes every step too small to change the weights."
        return message, suggestion, clip
    message += f" (norms before clipping: median {clip['grad_norm_median']:.3g})."
    suggestion = f"raise the clipping threshold to about {clip['grad_norm_p90']:.3g}, the 90th "
    suggestion += f"percentile of the norms before clipping: clipping at {clip['max_norm']:g} "
    suggestion += "makes every step too small to change the weights."
    return message, suggestion, clip


@rule(
    "check, in this order: that nothing restores or overwrites these weights after "
    "optimizer.step() (load_state_dict, an EMA copied back, an assignment to .data); that "
    "optimizer.step() runs after loss.backward(); that the optimizer given to watch() is the one "
    "that steps.",
    follows=("not_in_optimizer", "optimizer_frozen", "updates_rounded_away"),
    exact=True,
)
def not_updated(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """Parameters the optimizer holds at a learning rate above 0 had a gradient other than zero and
    did not change at all at the optimizer step, at every statistics reading of the epoch past the
    first steps (two at least; steps GradScaler skipped are not read). Not while the learning rate
    is below half the rate set or its peak (a warmup, an annealed schedule), nor for a bias a
    batch norm takes out again (_normalised)."""
    now = history[-1]
    still = [name for name in now.loop.get("not_updated", []) if name not in _normalised(now)]
    if not still or _scheduled_low(history):
        return []
    message = f"{names(still)} had gradients and a learning rate above 0 in the optimizer, and "
    message += f"did not change at all at the optimizer steps read in {_period(now)}."
    return [_found(now, still, {"not_updated": still}, message, step=_loop_start(history))]
