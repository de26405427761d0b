"""Watching a loop that is not ours, without editing it: the step's loss is the last one-element tensor that
`.backward()` was called on, and each `optimizer.step()` is a monitor step (a global post-hook of torch.optim). The
model is watched with its optimizer as soon as it exists (`optimizer`, or `watch(optimizer)` where the program makes
it), before the first forward pass, as a user would; else with the first optimizer that steps (a global pre-hook,
too late for what the monitor reads of the first forward pass)."""

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook


class Attached:
    """`with Attached(monitor, model):` around a program's training; `parts` ({name: (model, optimizer)}) for
    programs of several models, each stepped by its own optimizer."""

    def __init__(self, monitor, model=None, optimizer=None, parts=None, objective=None):
        self.monitor = monitor
        self.model = model
        self.objective = objective
        self.loss = None
        self.part_of = {}
        self.handles = []
        if parts:
            models = {name: model for name, (model, _) in parts.items()}
            optimizers = {name: optimizer for name, (_, optimizer) in parts.items()}
            monitor.watch(models, optimizers, objective=objective)
            self.part_of = {id(optimizer): name for name, optimizer in optimizers.items()}
        if optimizer is not None:
            self.watch(optimizer)

    def watch(self, optimizer):
        self.monitor.watch(self.model, optimizer, objective=self.objective)
        self.part_of = {id(optimizer): None}

    def __enter__(self):
        original = torch.Tensor.backward
        attached = self

        def backward(tensor, *args, **kwargs):
            if tensor.numel() == 1:
                attached.loss = tensor
            return original(tensor, *args, **kwargs)

        self.original = original
        torch.Tensor.backward = backward
        self.handles = [register_optimizer_step_pre_hook(self.before), register_optimizer_step_post_hook(self.after)]
        return self

    def __exit__(self, *exc):
        torch.Tensor.backward = self.original
        for handle in self.handles:
            handle.remove()
        self.monitor.close()

    def before(self, optimizer, args, kwargs):
        if not self.part_of and self.model is not None:
            self.watch(optimizer)

    def after(self, optimizer, args, kwargs):
        if id(optimizer) not in self.part_of:
            return  # an optimizer of something else (a target network's copy is not stepped)
        part = self.part_of[id(optimizer)]
        self.monitor.step(self.loss, **({"part": part} if part else {}))
        self.loss = None
