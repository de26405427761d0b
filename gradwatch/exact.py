"""The rules that read exact facts of the training loop: what the optimizer holds and whether its
steps change anything, what gets a gradient, the model's mode, whether the gradients are cleared,
what the loss's own graph shows, and whether the replicas of a data-parallel run agree.

Each fact is read at the first steps after watch() and at every statistics reading (loop.py,
graph.py, replicas.py), and these rules run at every reading too (`exact=True`), so that a run
learns of a broken loop at its first steps rather than at the end of an epoch. A fact is a cause:
the statistics it disturbs follow from it. Where a fact shows a symptom whose cause it cannot prove
(weights that do not change, replicas that drift apart), the finding says what to check, in order.

Imported by diagnosis.py where these rules come in the order of telling: first.
"""

from __future__ import annotations

import statistics

from .diagnosis import (
    RAISE,
    Finding,
    Thresholds,
    _found,
    _graph_step,
    _kept_apart,
    _loop_start,
    _period,
    _problem,
    names,
    rule,
)
from .summary import EpochSummary, finite

SQUASHED_BY = {"softmax": "log-softmax", "sigmoid": "a log-sigmoid"}


def _place(problem: dict) -> str:
    """Where a call the graph shows was made: 'in module `3`, called at train.py:42'."""
    module = problem.get("module")
    line = problem.get("line") or problem.get("loss_line")
    text = f" in module `{module}`" if module else ""
    if line:
        text += f"{',' if module else ''} {'called ' if module else ''}at {line}"
    return text


def _scheduled_low(history: list[EpochSummary]) -> bool:
    """Whether the learning rate is below half the rate set (a warmup's target, the `initial_lr` a
    scheduler records) or half its peak so far: a warmup or an annealed schedule asks for small
    steps, and the steps at the rate set are what the rules about steps judge."""
    loop = history[-1].loop
    rates = [s.loop.get(key) for s in history for key in ("lr_first", "lr_peak", "lr_set")]
    peak = max((r for r in rates if finite(r)), default=None)
    now = loop["lrs"][-1][1] if loop.get("lrs") else None
    return finite(peak) and finite(now) and now < 0.5 * peak


@rule(
    "compute the loss from the output of the model given to watch(), without .detach(); or watch "
    "the model that the loss trains.",
    exact=True,
    root=True,
)
def loss_misses_model(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """The loss passed to step() reaches none of the watched model's parameters (its graph was read
    whole), and none of them had a gradient at any statistics step: the watched model is not the
    one the loss trains."""
    now = history[-1]
    graph = now.loop.get("graph") or {}
    missing = now.loop.get("no_gradient", [])
    if not graph.get("whole") or graph.get("reached") != 0 or not missing:
        return []
    if len(missing) < now.loop.get("trainable", 0):
        return []
    message = "the loss passed to monitor.step() reaches none of the watched model's parameters, "
    message += "and none of them had a gradient: the loss is computed from another model (or from "
    message += "a detached output)."
    evidence = {"reached": 0, "losses": [loss["function"] for loss in graph.get("losses", [])]}
    return [_found(now, [], evidence, message, _graph_step(now, history))]


@rule(
    "build the optimizer from the parameters meant to train (torch.optim.SGD(p for p in "
    "model.parameters() if p.requires_grad)), after setting requires_grad on them.",
    exact=True,
    root=True,
)
def optimizer_frozen(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """Every tensor the watched optimizer holds is frozen (requires_grad=False): its steps change
    nothing. Frozen tensors among trainable ones are never a problem (a frozen backbone)."""
    now = history[-1]
    held = now.loop.get("held")
    if not held or now.loop.get("held_frozen") != held:
        return []
    message = f"the optimizer holds {held} tensors and every one of them is frozen "
    message += "(requires_grad=False): its steps change nothing"
    trainable = now.loop.get("not_in_optimizer", [])
    if trainable:
        message += f"; the tensors that do require gradients ({names(trainable)}) are not in it"
    evidence = {"held": held, "held_frozen": held, "trainable_not_held": trainable}
    return [_found(now, [], evidence, message + ".", step=_loop_start(history))]


@rule(
    "pass every trainable parameter to the optimizer (torch.optim.SGD(model.parameters(), ...)), "
    "or set requires_grad=False on those meant to stay frozen.",
    follows=("optimizer_frozen", "loss_misses_model"),
    exact=True,
)
def not_in_optimizer(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """Parameters that require gradients are in no parameter group of the watched optimizer: they
    get gradients and never change (not those the loss does not reach either: _kept_apart)."""
    now = history[-1]
    kept = _kept_apart(now)
    left_out = [name for name in now.loop.get("not_in_optimizer", []) if name not in kept]
    if not left_out:
        return []
    message = (
        f"{names(left_out)} require gradients but are in no parameter group of the optimizer: "
    )
    message += "they never change."
    evidence = {"not_in_optimizer": left_out}
    return [_found(now, left_out, evidence, message, step=_loop_start(history))]


@rule(
    "find where the forward pass cuts the graph before these layers (.detach(), torch.no_grad(), "
    ".data, a value rebuilt from .item() or numpy) and remove it; if they are unused, set "
    "requires_grad=False on them.",
    follows=("loss_misses_model",),
    exact=True,
)
def no_gradient(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """Parameters that require gradients had none at any statistics step of the epoch (the optimizer
    had stepped, zero_grad() not yet called), while others had one: the backward pass never reaches
    them (where the loss's graph was read, it shows that it does not). Without any gradient, either
    the loss reaches none of them (its graph says so) or monitor.step() comes after zero_grad().
    Frozen parameters (requires_grad=False) are never a problem, nor a copy kept apart
    (_kept_apart)."""
    now = history[-1]
    every = now.loop.get("no_gradient", [])
    missing = [name for name in every if name not in _kept_apart(now)]
    graph = now.loop.get("graph") or {}
    if not missing:
        return []
    evidence = {"no_gradient": missing, "trainable": now.loop["trainable"]}
    if len(every) == now.loop["trainable"]:
        if graph.get("whole") and graph.get("reached") == 0:
            return []  # loss_misses_model
        message = "no parameter had a gradient when monitor.step() was called."
        suggestion = "call monitor.step() after optimizer.step() and before optimizer.zero_grad()."
        return [_found(now, [], evidence, message, _loop_start(history), suggestion)]
    message = f"{names(missing)} require gradients but got none at any statistics step: the "
    message += "backward pass does not reach them (the graph is cut before them)."
    unreached = [n for n in missing if n in graph.get("unreached", ())]
    if unreached:
        message = message[:-1] + "; the loss's graph does not reach them."
        evidence["unreached"] = unreached
    return [_found(now, missing, evidence, message, step=_loop_start(history))]


@rule(
    "call model.train() at the start of every training epoch: validate() leaves the model in "
    "eval mode.",
    exact=True,
)
def eval_mode(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """The model was in eval mode (model.training False) at most of the epoch's training steps,
    and it has dropout or BatchNorm, which then behave as at inference."""
    now = history[-1]
    loop = now.loop
    if not loop.get("mode_matters") or loop["eval_readings"] * 2 <= loop["readings"]:
        return []
    message = f"the model was in eval mode at {loop['eval_readings']} of {loop['readings']} "
    message += f"statistics steps of {_period(now)}: its dropout and BatchNorm layers train as at "
    message += "inference (no dropout, frozen running statistics)."
    evidence = {"eval_readings": loop["eval_readings"], "readings": loop["readings"]}
    return [_found(now, [], evidence, message, step=_loop_start(history))]


@rule(
    "call optimizer.zero_grad() once per optimizer step: before loss.backward(), or right after "
    "optimizer.step() (with gradient accumulation, after the step that ends the accumulation).",
    exact=True,
    root=True,
)
def gradients_not_cleared(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """At most of the epoch's checks, no backward pass between two optimizer steps found the
    gradients cleared (None or zero) since the first of them: each step adds to the gradients of
    all the steps before. The check reads a parameter the optimizer holds, which its zero_grad()
    clears."""
    now = history[-1]
    loop = now.loop
    found = loop.get("not_cleared", 0)
    if not found or found * 2 < loop["clearing_checks"]:
        return []
    message = f"at {found} of {loop['clearing_checks']} checks no backward pass between two "
    message += "optimizer steps found the gradients cleared: they are never cleared, so every step "
    message += "applies the sum of all gradients so far."
    evidence = {"not_cleared": found, "checks": loop["clearing_checks"]}
    return [_found(now, [], evidence, message, step=_loop_start(history))]


def _in_band(reading: dict) -> bool:
    """Whether the step's loss is what cross-entropy on these output rows can give."""
    loss = reading["loss"]
    margin = 0.02 * reading["ce_high"]
    return finite(loss) and reading["ce_low"] - margin <= loss <= reading["ce_high"] + margin


def _squashed_in_graph(now: EpochSummary, history: list[EpochSummary]) -> list[Finding]:
    """The graph's version of softmax_before_loss: exact, and with the line."""
    problem = _problem(now, "squashed")
    if problem is None:
        return []
    squash = problem["squash"]
    message = f"the loss's graph shows a {squash} applied to the scores{_place(problem)}, before "
    message += f"{problem['loss']}, which applies {SQUASHED_BY[squash]} itself: it learns from "
    message += f"{squash} outputs squashed twice, whose loss cannot fall far and whose gradients "
    message += "vanish as the model grows confident."
    what = "raw scores" if squash == "softmax" else "raw scores (logits)"
    suggestion = f"remove the {squash}{_place(problem)}: {problem['loss']} applies "
    suggestion += (
        f"{SQUASHED_BY[squash]} to {what} itself; apply {squash} only to show probabilities."
    )
    evidence = {key: problem.get(key) for key in ("squash", "loss", "line", "module")}
    return [_found(now, [], evidence, message, _graph_step(now, history), suggestion)]


@rule(
    "remove the softmax at the end of the model: nn.CrossEntropyLoss (F.cross_entropy) applies "
    "log-softmax to raw scores itself; apply softmax only to show probabilities.",
    exact=True,
    root=True,
)
def softmax_before_loss(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """Where the loss's graph was read: a softmax (or sigmoid) between the scores and a loss that
    applies log-softmax (or a log-sigmoid) itself, told with the line. Elsewhere (logs read by
    `diagnose`): at every statistics step of the epoch, and of the run before it back to the first
    that says otherwise (two at least), the model's output rows are probabilities (in [0, 1],
    summing to 1) and the loss is what cross-entropy on those rows gives. It began at the first of
    those steps."""
    now = history[-1]
    if now.loop.get("graph", {}).get("losses"):
        return _squashed_in_graph(now, history)
    if not now.loop.get("outputs"):
        return []
    readings = []  # the latest run of such readings, newest first
    for reading in reversed([r for s in history for r in s.loop.get("outputs", [])]):
        if not (reading["probabilities"] and _in_band(reading)):
            break
        readings.append(reading)
    if len(readings) < 2 or len(readings) < len(now.loop["outputs"]):
        return []
    top = statistics.median(r["max_value"] for r in readings)
    low = statistics.median(r["ce_low"] for r in readings)
    message = "the model's outputs are probabilities (rows in [0, 1] summing to 1; mean top value "
    message += f"{top:.2f}) and the loss is cross-entropy on them, which cannot fall below about "
    message += f"{low:.2f} for such rows: a softmax before a loss that applies its own."
    evidence = {"max_value": top, "loss_floor": low, "readings": len(readings)}
    return [_found(now, [], evidence, message, step=readings[-1]["step"])]


@rule(
    "apply log_softmax to the scores before nll_loss (F.nll_loss(F.log_softmax(scores, dim=1), "
    "labels)), or give F.cross_entropy the raw scores.",
    exact=True,
    root=True,
)
def not_log_probabilities(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """The loss's graph shows nll_loss fed raw scores (a layer's output) or probabilities, not
    log-probabilities: nll_loss only takes the target's value with a minus sign, so it pushes that
    value up without bound and the loss falls below zero."""
    now = history[-1]
    problem = _problem(now, "not_log_probabilities")
    if problem is None:
        return []
    line = f" at {problem['loss_line']}" if problem.get("loss_line") else ""
    message = f"the loss's graph shows nll_loss{line} fed {problem['fed']} (made by "
    message += f"{problem['made_by']}), not log-probabilities: nll_loss only takes minus the "
    message += "target's value, so it pushes that value up without bound."
    suggestion = f"apply log_softmax to the scores before nll_loss{line}, or give F.cross_entropy "
    suggestion += "the raw scores instead."
    evidence = {key: problem.get(key) for key in ("fed", "made_by", "loss_line")}
    return [_found(now, [], evidence, message, _graph_step(now, history), suggestion)]


@rule(
    "give the loss an input and a target of the same shape (output.squeeze(-1), or "
    "target.view_as(output)).",
    exact=True,
    root=True,
)
def loss_broadcast(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """An elementwise loss (mse_loss, l1_loss, binary cross-entropy, ...) was given an input and a
    target of different shapes at the first step, and broadcast them: it compares every output
    with every target."""
    now = history[-1]
    p = _problem(now, "broadcast")
    if p is None:
        return []
    shapes = [tuple(p[key]) for key in ("input_shape", "target_shape", "broadcast_shape")]
    line = f" at {p['line']}" if p.get("line") else ""
    message = f"{p['loss']}{line} was given an input of shape {shapes[0]} and a target of shape "
    message += f"{shapes[1]}, and broadcast them to {shapes[2]}: it compares every output with "
    message += "every target, and the model learns their mean."
    suggestion = f"give {p['loss']}{line} an input and a target of one shape "
    suggestion += "(output.squeeze(-1), or target.view_as(output))."
    evidence = {"input_shape": shapes[0], "target_shape": shapes[1], "broadcast": shapes[2]}
    return [_found(now, [], evidence, message, _graph_step(now, history), suggestion)]


@rule(
    "binary cross-entropy takes targets in [0, 1]: check the labels (class indices of more than "
    "two classes need F.cross_entropy).",
    exact=True,
    root=True,
)
def target_range(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """A binary cross-entropy was given targets outside [0, 1] at the first step: its loss has no
    lower bound there, and the scores are pushed without end."""
    now = history[-1]
    p = _problem(now, "target_range")
    if p is None:
        return []
    line = f" at {p['line']}" if p.get("line") else ""
    message = f"{p['loss']}{line} was given targets from {p['min']:g} to {p['max']:g}, outside "
    message += "[0, 1]: its loss has no lower bound there, and the scores are pushed without end."
    evidence = {"min": p["min"], "max": p["max"], "loss": p["loss"]}
    return [_found(now, [], evidence, message, _graph_step(now, history))]


@rule(
    "a much larger learning rate: a step smaller than half the spacing of the weights' dtype at "
    "their size is lost to rounding (in float32, a step below about 6e-8 of a weight).",
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
    learning rate is below half the rate set or its peak (a warmup, an annealed schedule)."""
    now = history[-1]
    rounded = now.loop.get("rounded", {})
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
    others = [n for n, v in now.layers.items() if n not in rounded and v.get("grad_norm", 0) > 0]
    clipped = _clipped(now, t)
    if clipped:
        message += clipped[0]
        suggestion = clipped[1]
        evidence.update(clipping=dict(now.clipping), cause="clipping")  # no claim on the lr
    elif low:
        suggestion = f"keep the weights in float32 (torch.autocast computes in {low[0]} from "
        suggestion += "float32 weights), or an optimizer that keeps a float32 copy of them."
    elif others:  # a learning rate too low would round the others' steps away too
        message += f" The other {len(others)} parameters with gradients do change."
        suggestion = "compare these parameters' gradients with the others' (the Gradients charts: "
        suggestion += "gradients that vanish before reaching them make their steps too small) "
        suggestion += "before raising the learning rate, which would move the others too."
        evidence.update(weights_move=others, cause=None)  # a symptom: no claim on the lr
    return [_found(now, list(rounded), evidence, message, _loop_start(history), suggestion)]


def _clipped(now: EpochSummary, t: Thresholds) -> tuple[str, str] | None:
    """Where clipping scaled down more than `clipped_share` of the steps: what to add to the
    message, and the suggestion (the steps are small because the clipping makes them so)."""
    clip = now.clipping
    share = clip.get("clipped_share")
    if not clip.get("max_norm") or not finite(share) or share <= t.clipped_share:
        return None
    message = f" Clipping at {clip['max_norm']:g} scaled down {share:.0%} of the steps (norms "
    message += f"before clipping: median {clip['grad_norm_median']:.3g})."
    suggestion = f"raise the clipping threshold to about {clip['grad_norm_p90']:.3g}, the 90th "
    suggestion += f"percentile of the norms before clipping: clipping at {clip['max_norm']:g} "
    suggestion += "makes every step too small to change the weights."
    return message, suggestion


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
    is below half the rate set or its peak (a warmup, an annealed schedule)."""
    now = history[-1]
    still = now.loop.get("not_updated", [])
    if not still or _scheduled_low(history):
        return []
    message = f"{names(still)} had gradients and a learning rate above 0 in the optimizer, and "
    message += f"did not change at all at the optimizer steps read in {_period(now)}."
    return [_found(now, still, {"not_updated": still}, message, step=_loop_start(history))]


def _replica_cause(replicas: dict) -> tuple[str, str | None]:
    """Why the gradients were not averaged, where a check of the loop shows it, and what to do."""
    if replicas.get("skipped_wrapper"):
        why = f"{replicas['skipped_wrapper']:.0f} of {replicas['forward_passes']:.0f} training "
        why += "forward passes called the model inside DistributedDataParallel directly "
        why += "(model.module(x)), which averages nothing"
        fix = "call the DistributedDataParallel module (ddp_model(x)), never ddp_model.module."
        return why, fix
    if replicas.get("unsynced_steps"):
        why = f"{replicas['unsynced_steps']:.0f} optimizer steps ran every forward pass under "
        why += "no_sync(), so that no backward pass averaged the gradients"
        fix = "leave model.no_sync() before the backward pass of the step that ends an "
        fix += "accumulation."
        return why, fix
    if replicas.get("moved"):
        why = "the model was moved to another dtype or device after DistributedDataParallel "
        why += "wrapped it, which loses the wrapper's gradient hooks"
        fix = "move the model (.to(), .half(), .double()) before wrapping it in "
        return why, fix + "DistributedDataParallel."
    return "", None


@rule(
    "check, in this order: that every forward pass calls the DistributedDataParallel module, "
    "not its .module; that no_sync() is left before the step that ends an accumulation; that the "
    "model is moved (.to(), .half()) before it is wrapped; that nothing loads or changes weights "
    "on some ranks only after wrapping; that every rank builds the same optimizer.",
    exact=True,
)
def replicas_differ(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """The replicas of a data-parallel model differ: the sum or sum of squares of a parameter's
    weights or gradient differs between ranks by more than one part in a million. Gradients that
    differ after the backward pass were not averaged; weights that differ while the gradients
    agree were changed outside the averaged step."""
    now = history[-1]
    replicas = now.loop.get("replicas", {})
    first = replicas.get("first")
    if not first:
        return []
    part = "gradients" if first["gradients_differ"] else "weights"
    apart = first["apart"][part]
    most = max(apart.values()) if apart else 0.0
    count = first[f"{part}_differ"]
    message = f"the {part} of {count} parameters differ between the {first['ranks']} replicas "
    message += f"from step {replicas['first_step']} (by up to {most:.2g} of their size: "
    message += f"{names(apart)})"
    agreed = replicas.get("agreed_step")
    message += f"; they agreed at step {agreed}" if agreed is not None else ""
    why, suggestion = _replica_cause(first)
    if part == "gradients":
        message += ": the gradients were not averaged over the replicas, and each trains its own "
        message += f"model{f' ({why})' if why else ''}."
    else:
        message += " while their gradients agree: the weights were changed on some ranks outside "
        message += "the averaged step, or their optimizers differ."
        suggestion = "check that nothing loads or changes the weights on some ranks only after "
        suggestion += "wrapping (load a checkpoint on every rank before wrapping the model), and "
        suggestion += "that every rank builds the same optimizer with the same settings."
    evidence = {"part": part, "apart": apart, "first_step": replicas["first_step"]}
    evidence["agreed_step"] = agreed
    return [_found(now, list(apart), evidence, message, replicas["first_step"], suggestion)]


@rule(
    "call monitor.step() once per optimizer step on every rank, and check that every rank runs "
    "the same number of steps (a DistributedSampler with drop_last, or the Join context).",
    exact=True,
)
def ranks_out_of_step(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """At the same reading of the replicas (the same count of step() calls), the ranks had made
    different numbers of optimizer steps: some rank called monitor.step() more often than its
    optimizer stepped, or less."""
    now = history[-1]
    reading = now.loop.get("replicas", {}).get("out_of_step")
    if not reading:
        return []
    steps = reading["optimizer_steps"]
    message = f"at monitor step {reading['step']} of every rank, the ranks had made from "
    message += f"{steps[0]:.0f} to {steps[1]:.0f} optimizer steps: monitor.step() is not called "
    message += "once per optimizer step on every rank, and the readings of the ranks compare "
    message += "different steps."
    evidence = {"optimizer_steps": steps, "step": reading["step"]}
    return [_found(now, [], evidence, message, step=reading["step"])]


@rule(
    "look at the batches those ranks read at that step (their data shards), and check the loss "
    "for invalid values.",
    exact=True,
)
def nonfinite_on_some_ranks(history: list[EpochSummary], t: Thresholds) -> list[Finding]:
    """The training loss was NaN or Inf on some ranks and not on the others since the reading
    before: those ranks read a batch the others did not."""
    now = history[-1]
    reading = now.loop.get("replicas", {}).get("nonfinite")
    if not reading:
        return []
    ranks = reading["nonfinite_ranks"]
    message = f"the training loss was NaN or Inf on rank{'s' if len(ranks) > 1 else ''} "
    message += f"{', '.join(map(str, ranks))} of {reading['ranks']} and finite on the others, "
    message += f"in the steps up to step {reading['step']}."
    return [_found(now, [], {"ranks": ranks}, message, step=reading["step"])]
