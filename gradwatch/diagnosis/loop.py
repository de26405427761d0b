"""The rules that read exact facts of the training loop: what the optimizer holds, what gets a
gradient, the model's mode and whether the gradients are cleared.

Each fact is read at the first steps after watch() and at every statistics reading (loop.py,
graph.py and replicas.py of the package), and these rules run at every reading too (`exact=True`),
so that a run learns of a broken loop at its first steps rather than at the end of an epoch. A fact
is a cause: the statistics it disturbs follow from it. They come first in the order of telling.
"""

from __future__ import annotations

from ..summary import EpochSummary, finite
from .facts import _graph_step, _kept_apart, _loop_start, _period
from .findings import Finding, _found, names, rule
from .thresholds import Thresholds

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
