"""The rules of a data-parallel run: replicas whose weights drift apart, ranks out of step,
gradients not finite on some ranks only."""

from __future__ import annotations

from ..summary import EpochSummary
from .findings import Finding, _found, names, rule
from .thresholds import Thresholds


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
