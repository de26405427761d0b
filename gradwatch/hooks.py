"""Every hook the monitor places on a model and its optimizer, in one place, and removable.

- one optimizer step pre-hook, which notes that the optimizer stepped (GradScaler skips the call
  when it finds inf, so a step without it was skipped);
- forward hooks on the ReLU, sigmoid and tanh modules, placed before the forward pass of a
  statistics step and removed after it (they cost nothing on the other steps), which measure how
  many of the units are dead or saturated; in a compiled model, whose graph keeps the hooks it was
  traced with, they are placed once and for good;
- a forward hook on the model itself, placed the same way, which reads its output (see
  loop.output_facts);
- after a statistics step, a hook on one gradient of a parameter the optimizer holds, which looks,
  at each backward pass until the next optimizer step, whether the gradients were cleared since
  the last one;
- before the first step after watch(), forward pre-hooks on the model and its modules that begin,
  at the first training forward pass, to note where the loss and what fed it are computed, until
  the optimizer step (graph.FirstStep);
- on a model wrapped by DistributedDataParallel, a forward pre-hook on the wrapper and one on the
  model inside it, which count the training forward passes that skip the wrapper (whose gradients
  are then never averaged over the replicas);
- and, beside them, the copy of the weights before a statistics step's update, for the update
  ratio.

Each hook is a `Hook`, which a copy of the model or optimizer (copy.deepcopy for an EMA or
torch.optim.swa_utils.AveragedModel, pickle for torch.save(model) or a DataLoader worker) holds as
`ignore`: the copy neither carries the monitor nor feeds it.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from .graph import FirstStep
from .histograms import to_host
from .loop import held, logits, output_facts
from .shards import is_sharded
from .sink import Guard
from .stats import NamedParameters, WeightsBefore, collector_paused, learning_rate

# what WrapperCalls counts: the optimizer steps so far; since the last reading, the training forward
# passes, those that skipped the DistributedDataParallel wrapper, and the steps all of whose
# forward passes ran under no_sync()
COUNTS = ("optimizer_steps", "forward_passes", "skipped_wrapper", "unsynced_steps")

ACTIVATIONS = {
    torch.nn.ReLU: "relu",
    torch.nn.ReLU6: "relu",
    torch.nn.Sigmoid: "sigmoid",
    torch.nn.Tanh: "tanh",
}


def units_fired(output: torch.Tensor) -> torch.Tensor:
    """For a ReLU's output, whether each of its units (channels, or features) gave a positive
    output for some item of the batch."""
    unit = 1 if output.ndim in (2, 4, 5) else output.ndim - 1
    return output.amax([d for d in range(output.ndim) if d != unit]) > 0


def activation_share(kind: str, output: torch.Tensor) -> torch.Tensor:
    """For a ReLU, the share of its units (channels, or features) that gave no positive output for
    the whole batch; for a sigmoid or tanh, the share of its outputs within 1% of their limits."""
    if kind == "relu":
        return 1 - units_fired(output).float().mean()
    if kind == "sigmoid":
        return ((output < 0.01) | (output > 0.99)).float().mean()
    return (output.abs() > 0.99).float().mean()


def is_compiled(model: torch.nn.Module) -> bool:
    """Whether `model` holds a module compiled by torch.compile or Module.compile()."""
    return any(
        hasattr(m, "_orig_mod") or getattr(m, "_compiled_call_impl", None) for m in model.modules()
    )


def ignore(*args: Any, **kwargs: Any) -> None:
    """What a monitor's hook is in a copy of the module or optimizer it is placed on: nothing."""


def ignored() -> Any:
    return ignore


class Hook:
    """A hook the monitor places. Copied, it is `ignore`: the monitor watches the model it was
    given, not its copies, and its event writer cannot be copied (tensorboardX's queue refuses
    pickling)."""

    def __init__(self, function: Any):
        self.function = function

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    def __reduce__(self) -> tuple:
        return ignored, ()


class OptimizerSteps:
    """What the optimizer's step pre-hook notes: whether it stepped since the last step() call, and
    in which thread it stepped last."""

    def __init__(self):
        self.ran = False
        self.thread: tuple[int, str] | None = None  # its ident and name (a copy holds no Thread)

    def note(self) -> None:
        self.ran = True
        self.thread = (threading.get_ident(), threading.current_thread().name)

    def check_thread(self, call: str) -> None:
        """Refuse `call` from another thread than the one that stepped last: that thread's backward
        pass writes the gradients without holding the GIL, and reading them meanwhile can crash the
        process."""
        if self.thread is not None and self.thread[0] != threading.get_ident():
            here = threading.current_thread().name
            raise RuntimeError(
                f"gradwatch: {call} was called in thread {here!r} while optimizer.step() runs "
                f"in thread {self.thread[1]!r}; reading the gradients while that thread's "
                f"backward pass writes them can crash the process. Call {call} in the thread "
                "that trains, after optimizer.step() (one monitor per model and thread)."
            )


class Hooks:
    """The monitor's hooks on one model and optimizer; `remove()` takes them all off."""

    def __init__(self, guard: Guard):
        self.guard = guard
        self.handles: dict[str, Any] = {}
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.lr_start: float | None = None
        self.activations: list[tuple] = []  # (name, module, kind, the layer that feeds it)
        # name: (kind, layer, share) measured since they were placed
        self.values: dict[str, tuple] = {}
        # a ReLU's units that gave a positive output at some statistics step of the epoch
        self.fired: dict[str, torch.Tensor] = {}
        self.output: dict[str, torch.Tensor] = {}  # loop.output_facts of the latest training output
        self.cleared: torch.Tensor | None = None  # 1 if the gradients were cleared, 0 if not
        self.stay = False  # placed for good: the model runs compiled
        self.stepped = OptimizerSteps()
        self.before_update: WeightsBefore | None = None
        self.first = FirstStep()
        self.wrapper = WrapperCalls()

    def attach(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        compiled: bool,
        wrapper: torch.nn.Module | None = None,
    ) -> None:
        """Find the activations of `model`, hook `optimizer`; `compiled`: place the activation hooks
        now, for good; `wrapper`: the DistributedDataParallel module around `model`, whose forward
        passes are counted against the model's."""
        self.remove()
        if wrapper is not None:
            self.handles.update(self.wrapper.attach(wrapper, model))
        self.model = model
        self.optimizer = optimizer
        self.lr_start = learning_rate(optimizer)  # before any scheduler step
        self.stay = compiled
        self.activations = []
        layer = None
        for name, module in model.named_modules():
            if any(True for _ in module.parameters(recurse=False)):
                layer = name
            if type(module) in ACTIVATIONS:
                self.activations.append((name, module, ACTIVATIONS[type(module)], layer or name))
        if optimizer is not None:
            stepped = Hook(self._before_step)
            self.handles["before_step"] = optimizer.register_step_pre_hook(stepped)
        if compiled:
            self.arm()

    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self.stepped.note()
        self.wrapper.stepped()
        self.first.end()  # the loss of the first step is computed: CallLog stops

    def skipped(self) -> bool:
        """Whether the optimizer step since the last call was skipped (by GradScaler); False without
        an optimizer to tell."""
        skipped = "before_step" in self.handles and not self.stepped.ran
        self.stepped.ran = False
        self.first.end()  # the first step's calls are noted: never past it, skipped or not
        return skipped

    def arm(self, first: bool = False) -> None:
        """Forward hooks that measure the activations of the next training forward pass; `first`:
        and that read the graph of its loss (graph.FirstStep)."""
        if first and self.model is not None and not self.stay:  # a compiled graph: not its loss
            self._arm_first(self.model)
        if self.stay and any(key.startswith("forward ") for key in self.handles):
            return
        self._drop_forward()  # placed for a step whose statistics were not taken
        for name, module, kind, layer in self.activations:

            def hook(module, inputs, output, name=name, kind=kind, layer=layer):
                if module.training and isinstance(output, torch.Tensor) and output.numel():
                    out = output.detach()
                    found = units_fired(out) if kind == "relu" else activation_share(kind, out)
                    self.values[name] = (kind, layer, found)

            self.handles[f"forward {name}"] = module.register_forward_hook(Hook(hook))
        if self.model is not None:
            output = Hook(self._read_output)
            self.handles["forward output"] = self.model.register_forward_hook(output)

    def _arm_first(self, model: torch.nn.Module) -> None:
        """Forward pre-hooks that begin graph.FirstStep at the first training forward pass: on the
        model, or on the first of its modules the loop calls (a ModuleDict's, whose own forward is
        never called)."""
        self.first.arm()
        begin = Hook(self._begin_first)
        for i, module in enumerate(model.modules()):
            self.handles[f"first {i}"] = module.register_forward_pre_hook(begin)

    def _begin_first(self, module: torch.nn.Module, args: tuple) -> None:
        with self.guard("reading the first step"):  # a forward pre-hook: it must not raise
            self.first.begin(module, args)

    def _read_output(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if module.training and not self.stay:
            self.first.output(output)
        scores = logits(output)
        if not module.training or scores is None:
            return
        if self.stay:  # inside a compiled graph, where a guard would break the graph
            self.output = output_facts(scores)
            return
        with self.guard("reading the model's output"):
            self.output = output_facts(scores)

    def check_clearing(self, parameters: NamedParameters) -> None:
        """After an optimizer step: look, at each backward pass until the next one that reaches the
        last parameter the optimizer holds that has a gradient now, whether its gradient was
        cleared (None or zero) before it. Cleared before one of them is cleared: another model's
        backward pass through this one (a GAN's generator through its discriminator) may come
        first, and gradient accumulation adds to the cleared gradient from the second pass on."""
        self.cleared = None
        self._drop("clearing")
        cleared_by_step = held(self.optimizer) if self.optimizer is not None else None
        graded = (
            p
            for _, p in reversed(parameters)
            if p.grad is not None
            and not p.grad.is_sparse
            and not is_sharded(p)
            and (cleared_by_step is None or id(p) in cleared_by_step)
        )  # a parameter the optimizer does not hold keeps its gradient through zero_grad()
        probe = next(graded, None)
        if probe is None:
            return

        def hook(grad):
            with self.guard("checking that the gradients are cleared"):
                before = probe.grad  # what the backward pass adds to
                if before is None or before.is_sparse:
                    now = torch.ones(())
                else:
                    now = (before == 0).all().float()  # on the device: no synchronisation
                if self.cleared is not None:
                    now = torch.maximum(self.cleared, now.to(self.cleared.device))
                self.cleared = now
            return None

        self.handles["clearing"] = probe.register_hook(Hook(hook))

    def take_loop(self) -> dict[str, Any]:
        """Whether the gradients were cleared before the step's backward pass (None where it could
        not be seen), the learning rate at attach(), and the latest training output's facts as
        floats under "output" (one transfer per device; no "output" where there was none)."""
        self._drop("clearing")
        rows = dict(self.output)
        if self.cleared is not None:
            rows["cleared"] = self.cleared
        self.output = {}
        self.cleared = None
        host = to_host(rows)
        cleared = host.pop("cleared", None)
        found = {"cleared": None if cleared is None else bool(cleared), "lr_start": self.lr_start}
        if host:
            found["output"] = host
        return found

    def _drop(self, key: str) -> None:
        """Remove the hook placed under `key`, if there is one."""
        handle = self.handles.pop(key, None)
        if handle is not None:
            handle.remove()

    def _drop_forward(self) -> None:
        """Remove the forward hooks."""
        for key in [key for key in self.handles if key.startswith("forward ")]:
            self._drop(key)

    def prepare(self, parameters: NamedParameters, first: bool = False) -> None:
        """Before a step whose statistics are due: hooks for its forward pass and its backward pass,
        and a copy of the weights before its update; `first`: the first step after watch(), whose
        loss graph is read too."""
        self.arm(first)
        self.check_clearing(parameters)
        with self.guard("copying the weights for the update ratio"), torch.no_grad():
            with collector_paused():
                self.before_update = WeightsBefore(parameters)

    def take_graph(self, loss: Any, parameters: NamedParameters) -> dict[str, Any]:
        """What the graph of the first step's loss shows (graph.loss_graph); {} if not read."""
        for key in [key for key in self.handles if key.startswith("first ")]:
            self._drop(key)
        return self.first.take(loss, parameters)

    def take_weights(self) -> dict[str, torch.Tensor] | None:
        """The weights copied by prepare(), which are then let go."""
        weights = self.before_update
        self.before_update = None
        return weights

    def collect(self, afresh: bool = False) -> dict[str, dict]:
        """The activations measured since the hooks were placed, as {name: {"kind", "layer",
        "share"}}, and for a ReLU "never_fired", the share of its units silent at every statistics
        step of the epoch so far (one transfer); the hooks are removed, unless placed for good.
        `afresh`: the epoch's silent units are counted from this reading on (the first reading
        after the first steps, which are no baseline: units alive at step 1 may die at once)."""
        if afresh:
            self.fired.clear()
        if not self.stay:
            self._drop_forward()
        values = dict(self.values)
        self.values.clear()  # the same dict: a compiled graph writes into it
        rows = {}
        for name, (kind, _, found) in values.items():
            if kind != "relu":
                rows[name] = found
                continue
            before = self.fired.get(name)
            fired = found | before if before is not None and before.shape == found.shape else found
            self.fired[name] = fired
            rows[name] = 1 - found.float().mean()
            rows[f"{name} never"] = 1 - fired.float().mean()
        shares = to_host(rows)
        collected = {}
        for name, (kind, layer, _) in values.items():
            collected[name] = {"kind": kind, "layer": layer, "share": shares[name]}
            if kind == "relu":
                collected[name]["never_fired"] = shares[f"{name} never"]
        return collected

    def end_epoch(self) -> None:
        """The next epoch counts its silent units afresh."""
        self.fired.clear()

    def remove(self) -> None:
        """Take every hook off; safe to call twice."""
        for handle in self.handles.values():
            handle.remove()
        self.handles.clear()
        self.before_update = None
        self.values.clear()
        self.fired.clear()
        self.output = {}
        self.cleared = None
        self.first.end()


class WrapperCalls:
    """The calls of the loop that the replicas check reads: the optimizer steps, and of a model
    wrapped by DistributedDataParallel, the training forward passes that skip the wrapper (the model
    inside called directly: its gradients are then not averaged over the replicas), and the
    optimizer steps all of whose forward passes ran under no_sync() (their gradients stayed each
    rank's own)."""

    def __init__(self):
        self.inside = 0  # forward passes of the wrapper under way
        self.synced: bool | None = None  # whether a forward pass since the last step synced
        self.counts = dict.fromkeys(COUNTS, 0)

    def attach(self, wrapper: torch.nn.Module, model: torch.nn.Module) -> dict[str, Any]:
        """Hooks on `wrapper` and on `model`, by name."""

        def enter(module, args):
            self.inside += 1
            if module.training:
                syncs = getattr(module, "require_backward_grad_sync", True)
                self.synced = bool(self.synced) or bool(syncs)

        def leave(module, args, output):
            self.inside = max(0, self.inside - 1)

        def called(module, args):
            if module.training:
                self.counts["forward_passes"] += 1
                self.counts["skipped_wrapper"] += self.inside == 0

        return {
            "wrapper enter": wrapper.register_forward_pre_hook(Hook(enter)),
            "wrapper leave": wrapper.register_forward_hook(Hook(leave), always_call=True),
            "wrapped": model.register_forward_pre_hook(Hook(called)),
        }

    def stepped(self) -> None:
        """An optimizer step."""
        self.counts["optimizer_steps"] += 1
        self.counts["unsynced_steps"] += self.synced is False
        self.synced = None

    def take(self) -> dict[str, int]:
        """The counts of COUNTS: the optimizer steps so far, the others since the last call."""
        counts = dict(self.counts)
        self.counts = {**dict.fromkeys(COUNTS, 0), "optimizer_steps": counts["optimizer_steps"]}
        return counts
