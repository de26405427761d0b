"""The rules about the gradients as a whole: non-finite, exploding against their own history,
clipped on most steps, and a weight decay that pulls harder than the gradients push."""

from __future__ import annotations

import statistics

from ..summary import EpochSummary, finite
from .facts import (
    _clipping,
    _judged,
    _loss,
    _period,
    _scale_free,
    _start_loss,
    _trained_ratios,
)
from .findings import LOWER, Cause, Finding, _fast_steps, _found, _never, names, rule
from .thresholds import Thresholds


@rule(
    "lower the learning rate{lr}, clip gradients (torch.nn.utils.clip_grad_norm_), check the data "
    "and the loss for invalid values; --stop-on-nonfinite stops at the first one.",
    follows=("gradients_not_cleared", "diverging", "exploding_gradients", "high_initial_loss"),
    lr=LOWER,
    instead="check the data and the loss for invalid values, clip gradients.",
)
def nonfinite_gradients(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """A logged gradient holds NaN or Inf (steps GradScaler skipped are not counted)."""
    now = history[-1]
    bad = {
        n: s["nonfinite_share"] for n, s in now.layers.items() if s.get("nonfinite_share", 0) > 0
    }
    if not bad:
        return []
    message = f"NaN or Inf values in the gradients of {names(sorted(bad))} (up to "
    message += f"{max(bad.values()):.1%} of a tensor)."
    return [_found(now, sorted(bad), {"nonfinite_share": bad}, message)]


@rule(
    "",
    causes=(
        Cause(
            "learning_rate",
            _fast_steps,
            "a lower learning rate{lr} or clip gradients (torch.nn.utils.clip_grad_norm_).",
            "the learning rate: whether weights move by more than a tenth of their size per step",
            LOWER,
        ),
        Cause(
            "batches",
            _never,
            "",
            "the batches of those steps and the loss's targets: an outlier, or targets whose scale "
            "jumped (a target network copied, returns of a new size); clipping gradients "
            "(torch.nn.utils.clip_grad_norm_) bounds what one batch can do",
        ),
    ),
    thresholds=("exploding_factor", "update_fast"),
    follows=("gradients_not_cleared", "loss_spikes", "diverging", "high_initial_loss"),
    diverged=True,
)
def exploding_gradients(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """The epoch's largest total gradient norm exceeds `exploding_factor` x its median over the
    epochs before. A symptom: the learning rate is its cause where weights moved by more than
    `update_fast` of their size per step at a summary so far; otherwise what to check, in order
    (the rate, then the batches of those steps and the loss's targets)."""
    now = history[-1]
    before = [h.total_grad_norm_median for h in history[:-1] if finite(h.total_grad_norm_median)]
    peak = now.total_grad_norm_max
    if not before or not finite(peak):
        return []
    baseline = statistics.median(before)
    if baseline <= 0 or peak < t.exploding_factor * baseline:
        return []
    evidence = {"total_grad_norm_max": peak, "median_before": baseline, "factor": peak / baseline}
    evidence["threshold"] = t.exploding_factor
    message = f"the total gradient norm reached {peak:.3g}, {peak / baseline:.0f}x its median of "
    message += f"{baseline:.3g} in the {'epochs' if now.unit == 'epoch' else 'steps'} before."
    return [_found(now, ["total"], evidence, message)]


def _falling(history: list[EpochSummary]) -> bool:
    """Whether the epoch's training loss is a new low: below the first loss and every earlier
    epoch's."""
    losses = [_loss(s) for s in history]
    first = history[0].first_loss
    if not finite(losses[-1]):
        return False
    before = [loss for loss in [first, *losses[:-1]] if finite(loss)]
    return bool(before) and losses[-1] < min(before)


@rule(
    "lower the learning rate, and raise the clipping threshold to about the 90th percentile of the "
    "norms before clipping, so that it catches only the outliers.",
    thresholds=("clipped_share", "stuck_moving_ratio"),
    follows=("gradients_not_cleared", "diverging", "exploding_gradients", "high_initial_loss"),
    lr=LOWER,
    instead="raise the clipping threshold to about the 90th percentile of the norms before "
    "clipping.",
)
def mostly_clipped(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """Gradient clipping scaled down more than `clipped_share` of the epoch's steps while the
    training loss made no new low: a learning rate too high, hidden by the clipping (the Deep
    Learning Tuning Playbook's rule); but where the median update ratio of the weights that train
    (not the frozen ones) is below `stuck_moving_ratio` under an optimizer whose step scales with
    the gradient (SGD, not Adam), the clipping threshold itself, which keeps every step too small.
    While the loss falls, clipping most steps is what clipping at 1.0 does early in transformer
    training, and no problem. The clipping is the norms the loop passed to step(), else what the
    total gradient norms read show (facts._clipping)."""
    if not _judged(history):  # a loss not minimised by design (RL, GAN, other)
        return []
    now = history[-1]
    clip = _clipping(history)
    share = clip.get("clipped_share")
    if not finite(share) or share <= t.clipped_share or _falling(history):
        return []
    message = _clipped_message(now, clip) + " Clipping nearly every step "
    evidence = {**clip, "threshold": t.clipped_share}
    ratios = list(_trained_ratios(now).values())
    pace = statistics.median(ratios) if ratios else None
    if finite(pace) and pace < t.stuck_moving_ratio and not _scale_free(now):
        return [_too_low(now, clip, pace, message, evidence)]
    median = clip["grad_norm_median"]
    known = now.lr and clip.get("max_norm") and finite(median) and median > 0
    in_effect = now.lr * clip["max_norm"] / median if known else None
    if in_effect:
        message += f"makes the learning rate of {now.lr:g} about {in_effect:.2g} in effect: "
    else:
        message += "shrinks it: "
    message += "a learning rate too high for these gradients, hidden by the clipping."
    suggestion = None
    if in_effect:
        p90 = clip["grad_norm_p90"]
        suggestion = f"lower the learning rate to about {in_effect:.2g}, what it is in effect "
        suggestion += f"now, and raise the clipping threshold to about {p90:.3g}, the 90th "
        suggestion += "percentile of the norms, so that clipping catches only the outliers."
    return [_found(now, [], evidence, message, suggestion=suggestion)]


def _too_low(now: EpochSummary, clip: dict, pace: float, message: str, evidence: dict) -> Finding:
    """mostly_clipped's finding of a threshold so low that the steps are `pace` of the weights."""
    message += f"at {clip['max_norm']:.3g} keeps the steps at a median {pace:.2g} of the "
    message += "weights' size: too small to learn."
    suggestion = f"raise the clipping threshold far above {clip['max_norm']:.3g}, to about the "
    suggestion += "90th percentile of the norms before clipping (clip_grad_norm_ returns them)."
    evidence.update(update_ratio=pace, cause="clipping")  # no claim on the learning rate
    return _found(now, [], evidence, message, suggestion=suggestion)


def _clipped_message(now: EpochSummary, clip: dict) -> str:
    """How much the clipping `clip` (facts._clipping) scaled down, and the norms before it."""
    at = f" at {clip['max_norm']:.3g}" if clip.get("max_norm") else ""  # unknown in others' logs
    message = f"gradient clipping{at} scaled down {clip['clipped_share']:.0%} of the "
    if not finite(clip["grad_norm_median"]):  # read from the norms after clipping
        message += f"last {clip['steps']} statistics readings (their total gradient norm was the "
        message += "threshold itself; pass clip_grad_norm_'s result to step(grad_norm=..., "
        return message + "max_norm=...) for the norms before clipping)."
    message += f"{clip['steps']} steps of {_period(now)} (norms before clipping: median "
    message += f"{clip['grad_norm_median']:.3g}, 90th percentile {clip['grad_norm_p90']:.3g})."
    return message


def _norm_kind(history: list[EpochSummary]) -> str:
    """Which norm strong_weight_decay reads: "decayed_norm", of the weight matrices the optimizer
    decays, where the first and the latest summaries have it; else "weight_norm", of all weights."""
    read = finite(history[0].loop.get("decayed_norm_first"))
    read = read and finite(history[-1].loop.get("decayed_norm"))
    return "decayed_norm" if read else "weight_norm"


@rule(
    "a weight decay ten to a hundred times smaller (5e-4 is usual with SGD, 0.01 to 0.1 with "
    "AdamW).",
    thresholds=("decay_epochs", "stuck_loss", "decay_shrunk"),
)
def strong_weight_decay(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """The optimizer has weight decay, the norm of the weight matrices it decays (of all weights,
    where those were not read) is below half what it was at the first statistics step, and the
    training loss stayed above `stuck_loss` x an untrained model's (ln C, or the first loss) for
    `decay_epochs` epochs: the decay holds the weights near zero, where the gradients cannot move
    them. Where the loss cannot tell (RL, GAN, other), the norm below `decay_shrunk` of its first
    value for those epochs is the evidence alone."""
    now = history[-1]
    decay = now.loop.get("weight_decay")
    kind = _norm_kind(history)
    start = history[0].loop.get(f"{kind}_first")
    norm = now.loop.get(kind)
    if len(history) < t.decay_epochs or not decay or not finite(start) or not finite(norm):
        return []
    evidence = {"weight_decay": decay, "weight_norms": [start, norm]}
    message = f"with weight decay {decay:g} the weights' norm fell from {start:.3g} to {norm:.3g} "
    if not _judged(history):  # a loss not minimised by design (RL, GAN, other): the norms alone
        norms = [s.loop.get(kind) for s in history[-t.decay_epochs :]]
        shrunk = all(finite(n) and n < t.decay_shrunk * start for n in norms)
        message += f"(below {t.decay_shrunk:g} of it since {_since(history, t)}): the decay holds "
        message += "the weights near zero. Its loss is not one to minimise (RL, GAN, other): it "
        message += "cannot show what that costs."
        return [_found(now, [], evidence, message, 1, _smaller(decay))] if shrunk else []
    untrained, said = _start_loss(history)
    losses = [_loss(s) for s in history[-t.decay_epochs :]]
    if not untrained or norm >= start / 2:
        return []
    if not all(finite(loss) and loss >= t.stuck_loss * untrained for loss in losses):
        return []
    message += f"while the training loss stays near {untrained:.3g} ({said}; {losses[-1]:.3g} "
    message += "now): the decay holds the weights near zero faster than the gradients can move "
    message += "them."
    evidence["train_loss"] = losses[-1]
    return [_found(now, [], evidence, message, 1, _smaller(decay))]  # the decay acts from step 1


def _since(history: list[EpochSummary], t: Thresholds) -> str:
    summary = history[-t.decay_epochs]
    return f"epoch {summary.epoch + 1}" if summary.unit == "epoch" else f"step {summary.step}"


def _smaller(decay: float) -> str:
    return (
        f"a weight decay ten to a hundred times smaller than {decay:g} (5e-4 is usual with SGD, "
        "0.01 to 0.1 with AdamW)."
    )
