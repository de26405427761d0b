"""Exact facts about the training loop, read on statistics steps: what is in the optimizer, what got
a gradient, whether the model is in training mode, what the learning rate and weight decay are, and
what the model's output looks like. The rules of diagnosis/loop.py read them before any
threshold on a statistic.

Pure functions of the model, its parameters, its optimizer and one output; the hooks that catch the
output and the gradients at the next backward pass are in hooks.py.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from .stats import NamedParameters, learning_rate, rate_set, weight_decay

MAX_ROWS = 1024  # the output rows read at a statistics step (images of a batch, or tokens)


def mode_matters(model: torch.nn.Module) -> bool:
    """Whether `model` behaves differently in training and eval mode: it has dropout (with p > 0)
    or BatchNorm."""
    return any(
        isinstance(m, _BatchNorm) or (isinstance(m, _DropoutNd) and m.p > 0)
        for m in model.modules()
    )


def held(optimizer: torch.optim.Optimizer | None) -> dict[int, float]:
    """{id(parameter): its group's learning rate} of every parameter the optimizer holds."""
    groups = optimizer.param_groups if optimizer is not None else ()
    return {id(p): float(group.get("lr", 0.0)) for group in groups for p in group["params"]}


def decayed_norm(
    stats: dict[str, dict], parameters: NamedParameters, optimizer: torch.optim.Optimizer | None
) -> float | None:
    """The norm of the weight matrices and kernels in optimizer groups with weight decay, from a
    reading's weight norms: what the decay shrinks (recipes leave biases and norms' gains out of
    it, and gains of 1 would hide the rest). None where the optimizer decays none."""
    if optimizer is None:
        return None
    decayed = {id(p) for g in optimizer.param_groups if g.get("weight_decay") for p in g["params"]}
    squares = [
        stats[name]["weight_norm"] ** 2
        for name, p in parameters
        if id(p) in decayed and p.dim() >= 2 and "weight_norm" in stats.get(name, {})
    ]
    return math.sqrt(sum(squares)) if squares else None


def optimizer_facts(
    parameters: NamedParameters, optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    """What the optimizer holds, as plain values: how many tensors, how many of them are frozen
    (requires_grad=False: its steps cannot change them), and the watched parameters in groups whose
    learning rate is 0."""
    if optimizer is None:
        return {}
    rates = held(optimizer)
    tensors = [p for group in optimizer.param_groups for p in group["params"]]
    return {
        "held": len(tensors),
        "held_frozen": sum(not p.requires_grad for p in tensors),
        "zero_lr": [name for name, p in parameters if rates.get(id(p)) == 0],
    }


def loop_facts(
    model: torch.nn.Module, parameters: NamedParameters, optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    """What a statistics step can tell of the loop, as plain values: whether the model is in
    training mode and whether that matters, the trainable parameters (requires_grad) in no optimizer
    group and those without a gradient, the learning rate and the weight decay, and what the
    optimizer holds (optimizer_facts)."""
    trainable = [(name, p) for name, p in parameters if p.requires_grad]
    facts = {
        "training": bool(model.training),
        "mode_matters": mode_matters(model),
        "trainable": len(trainable),
        "frozen": [name for name, p in parameters if not p.requires_grad],
        "no_gradient": [name for name, p in trainable if p.grad is None],
        "not_in_optimizer": [],
        "lr": learning_rate(optimizer),
        "lr_set": rate_set(optimizer),
        "weight_decay": weight_decay(optimizer),
        **optimizer_facts(parameters, optimizer),
    }
    if optimizer is not None:
        rates = held(optimizer)
        facts["not_in_optimizer"] = [name for name, p in trainable if id(p) not in rates]
    return facts


def not_updated(
    stats: dict[str, dict], parameters: NamedParameters, optimizer: torch.optim.Optimizer | None
) -> list[str]:
    """The parameters the optimizer holds at a learning rate above 0 that had a finite gradient
    other than zero and still did not change at all at the optimizer step: its steps do not reach
    them."""
    rates = held(optimizer)
    found = []
    for name, p in parameters:
        values = stats.get(name, {})
        norm = values.get("grad_norm", 0.0)
        still = values.get("unchanged_share") == 1
        if still and rates.get(id(p), 0) > 0 and math.isfinite(norm) and norm > 0:
            found.append(name)
    return found


def _groups(optimizer: torch.optim.Optimizer | None) -> dict[int, dict]:
    """{id(parameter): its parameter group} of every parameter the optimizer holds."""
    groups = optimizer.param_groups if optimizer is not None else ()
    return {id(p): group for group in groups for p in group["params"]}


def typical_step(group: dict, grad_rms: float) -> float:
    """About how far an optimizer step moves a value: the learning rate for optimizers whose steps
    are normalised by the gradient's size (Adam, RMSprop, Adagrad, Adadelta), else the learning
    rate times the gradient, times 1 / (1 - momentum) as momentum builds up."""
    lr = float(group.get("lr", 0.0))
    if any(key in group for key in ("betas", "alpha", "lr_decay", "rho")):
        return lr
    momentum = float(group.get("momentum", 0.0) or 0.0)
    return lr * grad_rms / (1 - momentum) if momentum < 1 else math.inf


def rounded_away(
    stats: dict[str, dict], parameters: NamedParameters, optimizer: torch.optim.Optimizer | None
) -> dict[str, dict]:
    """The parameters the optimizer holds at a learning rate above 0, at least half of whose values
    had a gradient other than zero and did not change at the optimizer step, while a typical step
    (typical_step) is below half the spacing of the parameter's dtype at the size of its values (its
    RMS): rounding took the updates away. {name: {"dtype", "unchanged_share", "grad_zero_share",
    "step", "spacing"}}."""
    groups = _groups(optimizer)
    found = {}
    for name, p in parameters:
        values = stats.get(name, {})
        group = groups.get(id(p))
        unchanged = values.get("unchanged_share")
        zero = values.get("grad_zero_share")
        if not group or not group.get("lr") or unchanged is None or zero is None:
            continue
        if unchanged - zero < 0.5 or not 0 < values.get("grad_norm", 0.0) < math.inf:
            continue
        spacing = values["weight_norm"] / math.sqrt(max(p.numel(), 1)) * torch.finfo(p.dtype).eps
        step = typical_step(group, values["grad_rms"])
        if step < spacing / 2:
            dtype = str(p.dtype).removeprefix("torch.")
            found[name] = {"dtype": dtype, "unchanged_share": unchanged, "grad_zero_share": zero}
            found[name].update(step=step, spacing=spacing)
    return found


def model_facts(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """The model's structure and settings and the optimizer's, as plain values, at watch(): the
    parameter count, trainable and frozen; the dtypes and devices; the modules by kind, with the
    dropout rates and normalisation settings; the optimizer's class and its groups' settings."""
    parameters = list(model.parameters())
    kinds: dict[str, int] = {}
    for module in model.modules():
        kinds[type(module).__name__] = kinds.get(type(module).__name__, 0) + 1
    facts = {
        "class": type(model).__name__,
        "parameters": sum(p.numel() for p in parameters),
        "trainable": sum(p.numel() for p in parameters if p.requires_grad),
        "tensors": len(parameters),
        "dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in parameters}),
        "devices": sorted({str(p.device) for p in parameters}),
        "modules": kinds,
        "dropout": sorted({m.p for m in model.modules() if isinstance(m, _DropoutNd)}),
        "batch_norm": [
            {"name": name, "momentum": m.momentum, "eps": m.eps, "track": m.track_running_stats}
            for name, m in model.named_modules()
            if isinstance(m, _BatchNorm)
        ][:8],
    }
    if optimizer is not None:
        settings = ("lr", "momentum", "weight_decay", "betas", "eps", "nesterov", "maximize")
        facts["optimizer"] = {
            "class": type(optimizer).__name__,
            "groups": [
                {key: _plain(group[key]) for key in settings if key in group}
                | {"tensors": len(group["params"])}
                for group in optimizer.param_groups
            ],
        }
    return facts


def _plain(value: Any) -> Any:
    """A setting as a plain value: a tensor learning rate as a float, a tuple as a list."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else str(value)
    return list(value) if isinstance(value, tuple) else value


def logits(output: Any) -> torch.Tensor | None:
    """The class scores in a model's output: the output itself, its `logits` (Hugging Face), or
    its first element; None if they are not a tensor of at least two columns."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    output = getattr(output, "logits", output)
    if isinstance(output, dict):
        output = output.get("logits")
    ok = isinstance(output, torch.Tensor) and output.ndim >= 2 and output.shape[-1] >= 2
    return output if ok and output.is_floating_point() and output.numel() else None


@torch.no_grad()
def output_facts(scores: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the rules read of one training output (rows of class scores), as 0-dim float tensors
    left on their device: whether every row is a probability distribution (values in [0, 1] summing
    to 1); the band in which cross-entropy on these rows must lie whatever the labels (its mean
    lowest and highest value per row); the mean largest value; and the share of rows whose top
    class is the batch's most common one."""
    rows = scores.detach().flatten(0, -2)[:MAX_ROWS].float()
    inside = ((rows >= -1e-6) & (rows <= 1 + 1e-6)).all()
    sums_to_one = ((rows.sum(-1) - 1).abs() < 1e-3).all()
    top, top_class = rows.max(-1)
    spread = rows.logsumexp(-1)
    modal = top_class.mode().values
    return {
        "probabilities": (inside & sums_to_one).float(),
        "ce_low": (spread - top).mean(),
        "ce_high": (spread - rows.min(-1).values).mean(),
        "max_value": top.mean(),
        "mode": modal.float(),
        "mode_share": (top_class == modal).float().mean(),
        "rows": torch.tensor(float(len(rows)), device=rows.device),
        "columns": torch.tensor(float(rows.shape[-1]), device=rows.device),
    }
