"""Per-parameter statistics of weights and gradients as plain numbers."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .histograms import to_host
from .shards import all_reduce, local, shard_groups

NamedParameters = Sequence[tuple[str, torch.nn.Parameter]]


def named_parameters(model: torch.nn.Module | NamedParameters) -> NamedParameters:
    """A Module's named_parameters() as a list; a list of (name, parameter) pairs as it is."""
    return list(model.named_parameters()) if isinstance(model, torch.nn.Module) else model


def parameter_tensors(model: torch.nn.Module | NamedParameters) -> dict[str, torch.Tensor]:
    """The tutorial's tags: {'<name>_data': weight, '<name>_grad': gradient}; no _grad where there
    is no gradient."""
    tensors = {}
    for name, param in named_parameters(model):
        tensors[name + "_data"] = param
        if param.grad is not None:
            tensors[name + "_grad"] = param.grad
    return tensors


def _norms(tensors: list[torch.Tensor], ord: float) -> list[torch.Tensor]:
    """Norms as 0-dim tensors, one kernel per device and dtype (torch.nn.utils.clip_grad_norm_ uses
    the same foreach call); half precision is widened first so that its norms cannot overflow. An
    empty tensor's is 0."""
    wide = [
        t.float()
        if t.dtype in (torch.float16, torch.bfloat16)
        else t
        if t.numel()
        else t.new_zeros(1)
        for t in tensors
    ]
    if not wide:
        return []
    if ord == math.inf:  # the same values, three times faster than foreach_norm's inf norm on a CPU
        return list(torch._foreach_max(torch._foreach_abs(wide)))
    return list(torch._foreach_norm(wide, ord))


def _to_floats(columns: dict[str, list[torch.Tensor]]) -> dict[str, list[float]]:
    """The same lists of 0-dim tensors as floats, read by the host in one transfer per device."""
    host = to_host(
        {(key, i): value for key, values in columns.items() for i, value in enumerate(values)}
    )
    return {key: [host[key, i] for i in range(len(values))] for key, values in columns.items()}


# How the per-shard values of a sharded tensor make the value of the whole tensor: 2-norms through
# their squares
COMBINE = dict(
    weight_norm="l2", max_abs_weight="max", grad_norm="l2", grad_nonzero="sum", update_norm="l2"
)
COMBINE.update(grad_l1="sum", max_abs_grad="max", nonfinite="sum", update_nonzero="sum")


def _whole(
    columns: dict[str, list[torch.Tensor]], groups: dict[str, list[tuple]]
) -> dict[str, list[torch.Tensor]]:
    """Columns of COMBINE's names, holding per-shard values, made into those of whole tensors: each
    value combined over its tensor's process groups (see shards.py); the values of ordinary tensors
    as they are."""
    keyed = [
        (key, i) for key, values in columns.items() for i in range(len(values)) if groups[key][i]
    ]
    if not keyed:
        return columns
    by_op: dict[str, dict] = {"sum": {}, "max": {}}
    for key, i in keyed:
        value = columns[key][i]
        how = COMBINE[key]
        by_op["max" if how == "max" else "sum"][key, i] = value**2 if how == "l2" else value
    key_groups = {(key, i): groups[key][i] for key, i in keyed}
    whole = {key: list(values) for key, values in columns.items()}
    for op, rows in by_op.items():
        for (key, i), value in all_reduce(rows, key_groups, op).items():
            whole[key][i] = value.sqrt() if COMBINE[key] == "l2" else value
    return whole


def _gradients(graded: NamedParameters) -> list[torch.Tensor]:
    """This process's part of each gradient: a sparse one's values, a sharded one's shard."""
    return [local(g.coalesce().values() if g.is_sparse else g) for _, g in graded]


def _columns(named, graded, moved, previous_weights) -> dict[str, list[float]]:
    """The norms and counts of every weight, gradient and update, of whole tensors, as floats."""
    weights = [local(w) for _, w in named]
    grads = _gradients(graded)
    changes = [local(w) - local(previous_weights[name]) for name, w in moved]
    columns = {
        "weight_norm": _norms(weights, 2),
        "max_abs_weight": _norms(weights, math.inf),
        "grad_norm": _norms(grads, 2),
        "grad_nonzero": [torch.count_nonzero(g) for g in grads],
        "update_norm": _norms(changes, 2),
        "update_nonzero": [torch.count_nonzero(c) for c in changes],
    }
    weight_groups = [shard_groups(w) for _, w in named]
    grad_groups = [shard_groups(g) for _, g in graded]
    groups = dict(weight_norm=weight_groups, max_abs_weight=weight_groups, grad_norm=grad_groups)
    moved_groups = [shard_groups(w) for _, w in moved]
    groups.update(grad_nonzero=grad_groups, update_norm=moved_groups, update_nonzero=moved_groups)
    return _to_floats(_whole(columns, groups))


def _nonfinite_counts(graded: NamedParameters, grad_norms: list[float]) -> dict[int, float]:
    """{index in graded: its count of NaN and Inf values}, counted only where the norm shows there
    are some."""
    bad = [i for i, norm in enumerate(grad_norms) if not math.isfinite(norm)]
    grads = _gradients([graded[i] for i in bad])
    counts = {"nonfinite": [(~torch.isfinite(g)).sum() for g in grads]}
    groups = {"nonfinite": [shard_groups(graded[i][1]) for i in bad]}
    return dict(zip(bad, _to_floats(_whole(counts, groups))["nonfinite"]))


@torch.no_grad()
def parameter_statistics(
    model: torch.nn.Module | NamedParameters,
    previous_weights: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, dict[str, float]]:
    """Per-parameter statistics, as floats: {name: {key: value}} with the keys of STAT_KEYS, the
    gradient's only where there is a gradient; update_ratio = ||w - w_before|| / ||w|| for the names
    in `previous_weights` (the weights before the optimizer step); and {"total": {"grad_norm": ...}}
    over all gradients. Pure.

    Sharded parameters (DTensor) get the statistics of the whole tensor, combined over the processes
    that hold its shards: every one of them must make this call."""
    previous_weights = previous_weights or {}
    named = named_parameters(model)
    graded = [(name, p.grad) for name, p in named if p.grad is not None]
    moved = [(name, p) for name, p in named if name in previous_weights]
    values = _columns(named, graded, moved, previous_weights)
    stats = {
        name: {"weight_norm": w, "max_abs_weight": m}
        for (name, _), w, m in zip(named, values["weight_norm"], values["max_abs_weight"])
    }
    nonfinite = _nonfinite_counts(graded, values["grad_norm"])
    sizes = {name: max(p.numel(), 1) for name, p in named}  # a sparse gradient's: of the whole
    for i, (name, _) in enumerate(graded):
        size = sizes[name]
        norm = values["grad_norm"][i]
        stats[name]["grad_norm"] = norm
        stats[name]["grad_rms"] = norm / math.sqrt(size)
        stats[name]["grad_zero_share"] = 1 - values["grad_nonzero"][i] / size
        stats[name]["nonfinite_share"] = nonfinite.get(i, 0.0) / size
    for (name, _), update, nonzero in zip(moved, values["update_norm"], values["update_nonzero"]):
        weight_norm = stats[name]["weight_norm"]
        stats[name]["update_ratio"] = update / weight_norm if weight_norm > 0 else math.nan
        stats[name]["unchanged_share"] = 1 - nonzero / sizes[name]
    if graded:
        stats["total"] = {"grad_norm": math.sqrt(sum(n * n for n in values["grad_norm"]))}
    return stats


@torch.no_grad()
def gradient_flow(
    model: torch.nn.Module | NamedParameters,
) -> tuple[list[str], list[float], list[float]]:
    """(names, mean |grad|, max |grad|) of the weight tensors that have a dense gradient, in model
    order; of whole tensors where they are sharded (every process that holds a shard must make this
    call)."""
    named = [
        (name, p.grad)
        for name, p in named_parameters(model)
        if p.grad is not None and not p.grad.is_sparse and name.endswith("weight")
    ]
    grads = [local(g) for _, g in named]
    groups = [shard_groups(g) for _, g in named]
    columns = {"grad_l1": _norms(grads, 1), "max_abs_grad": _norms(grads, math.inf)}
    values = _to_floats(_whole(columns, {"grad_l1": groups, "max_abs_grad": groups}))
    means = [total / max(g.numel(), 1) for total, (_, g) in zip(values["grad_l1"], named)]
    return [name for name, _ in named], means, values["max_abs_grad"]


def _most_values(optimizer: torch.optim.Optimizer | None, *keys: str) -> float | None:
    """The setting under the first of `keys` a group has, of the parameter groups that hold most of
    the parameter values; None without an optimizer. A group with none of the keys counts as 0."""
    values: dict[float, int] = {}
    for group in optimizer.param_groups if optimizer is not None else ():
        setting = float(next((group[key] for key in keys if key in group), 0.0))
        values[setting] = values.get(setting, 0) + sum(p.numel() for p in group["params"])
    return max(values, key=values.get) if values else None


def learning_rate(optimizer: torch.optim.Optimizer | None) -> float | None:
    """The learning rate most of the optimizer's parameter values train with: the run's own rate,
    also where a few layers have rates of their own (train.py --layer-lr). None without an
    optimizer."""
    return _most_values(optimizer, "lr")


def rate_set(optimizer: torch.optim.Optimizer | None) -> float | None:
    """The learning rate the user set for the groups that hold most of the parameter values: what a
    scheduler scales (the `initial_lr` it records, its warmup's target) where there is one, else
    the group's rate. None without an optimizer."""
    return _most_values(optimizer, "initial_lr", "lr")


def weight_decay(optimizer: torch.optim.Optimizer | None) -> float | None:
    """The weight decay most of the optimizer's parameter values train with (train.py --layer-wd
    aside); None without an optimizer."""
    return _most_values(optimizer, "weight_decay")
