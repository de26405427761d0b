"""Per-parameter statistics of weights and gradients as plain numbers."""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from .histograms import to_host
from .shards import PLAIN, all_reduce, local, shard_groups

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


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a reading makes its many small objects (a few
    per tensor), then as it was: with thousands of tensors they set off full collections of every
    object the process holds (bench/experts.py: one every few readings, 0.1-0.2 s each with torch's
    330,000 objects). What the reading leaves is freed by reference counting all the same."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


HALF = (torch.float16, torch.bfloat16)


def _norms(tensors: list[torch.Tensor], ord: float) -> list[torch.Tensor]:
    """Norms as 0-dim tensors, one kernel per device and dtype (torch.nn.utils.clip_grad_norm_ uses
    the same foreach call); half precision is widened first so that its norms cannot overflow; ord
    0 counts the values other than zero. An empty tensor's is 0."""
    wide = [t.float() if t.dtype in HALF else t if t.numel() else t.new_zeros(1) for t in tensors]
    if not wide:
        return []
    if ord == 0:
        return [torch.count_nonzero(t) for t in wide]
    if ord == math.inf:  # the same values, three times faster than foreach_norm's inf norm on a CPU
        return list(torch._foreach_max(torch._foreach_abs(wide)))
    return list(torch._foreach_norm(wide, ord))


def _rows(stacked: torch.Tensor, ord: float) -> torch.Tensor:
    """The norm of each row of a (tensors, values) stack (ord 0: the count of values other than
    zero), widened as _norms widens."""
    wide = stacked.float() if stacked.dtype in HALF else stacked
    if ord == math.inf:  # NaN where a row holds one, as abs().max() gives; a third of its time
        return torch.maximum(wide.amax(dim=1), -wide.amin(dim=1))
    if ord == 0:  # a third of count_nonzero's time; exact, a row holding less than 2**24 values
        return torch.nan_to_num(wide, nan=1.0).sign_().abs_().sum(dim=1)
    return torch.linalg.vector_norm(wide, ord, dim=1)


# Tensors of at most SMALL values that share their shape, dtype and device are reduced in stacks of
# up to STACK: a few kernels for a layer's thousands of experts rather than a few per tensor, so
# that a reading costs what its bytes cost, not its count of tensors (bench/experts.py). A larger
# tensor's kernels take long beside their launch: it is reduced alone.
SMALL = 1 << 16
STACK = 128


def stacks(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """The indices of `tensors` to reduce together: stacks of plain dense tensors of one shape,
    dtype and device, of at most SMALL values, two or more."""
    alike: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        if type(t) in PLAIN and t.layout == torch.strided and 0 < t.numel() <= SMALL:
            alike.setdefault((t.shape, t.dtype, t.device), []).append(i)
    runs = [ids for ids in alike.values() if len(ids) > 1]
    return [ids[k : k + STACK] for ids in runs for k in range(0, len(ids), STACK)]


class WeightsBefore(Mapping):
    """The weights before an optimizer step, copied for the update ratio: `{name: copy}`, the
    tensors of each stack (see stacks) in one stacked copy, the others one by one."""

    def __init__(self, named: NamedParameters):
        values = [local(p).detach() for _, p in named]
        self.names = [name for name, _ in named]
        groups = [tuple(ids) for ids in stacks([p for _, p in named])]
        self.stacked = {ids: torch.stack([values[i] for i in ids]) for ids in groups}
        self.row = {self.names[i]: (ids, j) for ids in groups for j, i in enumerate(ids)}
        self.alone = {n: v.clone() for n, v in zip(self.names, values) if n not in self.row}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.row:
            ids, j = self.row[name]
            return self.stacked[ids][j]
        return self.alone[name]

    def __contains__(self, name: object) -> bool:
        return name in self.row or name in self.alone

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class _Before:
    """The weights before the step, by index in `names`' order, read when asked (the tensors of a
    stack of WeightsBefore never are: their stacked copy is)."""

    def __init__(self, weights: Mapping[str, torch.Tensor], names: list[str]):
        self.weights = weights
        self.names = names
        self.stacked = weights.stacked if isinstance(weights, WeightsBefore) else {}

    def __getitem__(self, i: int) -> torch.Tensor:
        return local(self.weights[self.names[i]]).detach()

    def stack(self, ids: list[int]) -> torch.Tensor:
        """The copies of tensors `ids` in one (tensors, values) stack."""
        same = self.stacked.get(tuple(ids))
        if same is not None and self.weights.names == self.names:
            return same.flatten(1)
        return torch.stack([self[i] for i in ids]).flatten(1)


class _Scratch:
    """One buffer per dtype and device that every stack of a reading is copied into in turn: fresh
    memory costs a CPU a page fault per 4 kB, which for thousands of small tensors cost more than
    their copy (bench/experts.py: 8,940 faults a reading of 2,050 tensors)."""

    def __init__(self, firsts: list[torch.Tensor], counts: list[int]):
        sizes: dict[tuple, int] = {}
        for t, count in zip(firsts, counts):
            key = (t.dtype, t.device)
            sizes[key] = max(sizes.get(key, 0), count * t.numel())
        self.buffers = {
            key: torch.empty(n, dtype=key[0], device=key[1]) for key, n in sizes.items()
        }

    def stack(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """`tensors` (of one shape, dtype and device) as the rows of a (tensors, values) stack, in
        the buffer: valid until the next stack."""
        first = tensors[0]
        buffer = self.buffers[first.dtype, first.device][: len(tensors) * first.numel()]
        return torch.stack(tensors, out=buffer.view(len(tensors), *first.shape)).flatten(1)


@dataclass
class Column:
    """The values of one statistic over a list of tensors, as they are computed: a 0-dim tensor for
    each tensor reduced alone ({index: value}), and a 1-D tensor for each stack (the indices, the
    values)."""

    alone: dict[int, torch.Tensor]
    stacked: list[tuple[list[int], torch.Tensor]]


def _columns_of(
    tensors: list[torch.Tensor],
    ords: dict[str, float],
    stacked: list[list[int]],
    minus: _Before | None = None,
    minus_ords: Mapping[str, float] | None = None,
) -> dict[str, Column]:
    """{name: Column} of each of `ords`' norms of `tensors` and, with `minus`, of each of
    `minus_ords`' norms of `tensors[i] - minus[i]`; the stacks given reduced together, each copied
    once for both and let go before the next is made (fresh memory costs a CPU a page fault per 4
    kB: holding every stack at once doubled the time of a reading of many small tensors)."""
    alone = sorted(set(range(len(tensors))) - {i for ids in stacked for i in ids})
    singles = [tensors[i] for i in alone]
    columns = {name: Column(dict(zip(alone, _norms(singles, o))), []) for name, o in ords.items()}
    minus_ords = minus_ords or {}
    if minus is not None:
        differences = [tensors[i] - minus[i] for i in alone]
        for name, o in minus_ords.items():
            columns[name] = Column(dict(zip(alone, _norms(differences, o))), [])
        del differences
    scratch = _Scratch([tensors[ids[0]] for ids in stacked], [len(ids) for ids in stacked])
    for ids in stacked:
        rows = scratch.stack([tensors[i] for i in ids])
        for name, o in ords.items():
            columns[name].stacked.append((ids, _rows(rows, o)))
        if minus is not None:
            rows.sub_(minus.stack(ids))  # the copy, no longer read as the weights
            for name, o in minus_ords.items():
                columns[name].stacked.append((ids, _rows(rows, o)))
    return columns


def _to_floats(columns: dict[str, Column], sizes: dict[str, int]) -> dict[str, list[float]]:
    """The same columns as lists of floats (`sizes[name]` of them), read by the host in one
    transfer per device for the tensors reduced alone and one for the stacks."""
    rows = {(name, i): v for name, column in columns.items() for i, v in column.alone.items()}
    floats = {name: [math.nan] * sizes[name] for name in columns}
    for (name, i), value in to_host(rows).items():
        floats[name][i] = value
    by_device: dict[torch.device, list] = {}
    for name, column in columns.items():
        for ids, values in column.stacked:
            by_device.setdefault(values.device, []).append((floats[name], ids, values))
    for pieces in by_device.values():
        flat = iter(torch.cat([values.double() for _, _, values in pieces]).tolist())  # a sync
        for into, ids, _ in pieces:
            for i in ids:
                into[i] = next(flat)
    return floats


# How the per-shard values of a sharded tensor make the value of the whole tensor: 2-norms through
# their squares
COMBINE = dict(
    weight_norm="l2", max_abs_weight="max", grad_norm="l2", grad_nonzero="sum", update_norm="l2"
)
COMBINE.update(grad_l1="sum", max_abs_grad="max", nonfinite="sum", update_nonzero="sum")


def _whole(columns: dict[str, Column], groups: dict[str, list[tuple]]) -> dict[str, Column]:
    """Columns of COMBINE's names, holding per-shard values, made into those of whole tensors: each
    value combined over its tensor's process groups (see shards.py); the values of ordinary tensors
    (and of every stack) as they are."""
    keyed = [(key, i) for key, column in columns.items() for i in column.alone if groups[key][i]]
    if not keyed:
        return columns
    by_op: dict[str, dict] = {"sum": {}, "max": {}}
    for key, i in keyed:
        value = columns[key].alone[i]
        how = COMBINE[key]
        by_op["max" if how == "max" else "sum"][key, i] = value**2 if how == "l2" else value
    key_groups = {(key, i): groups[key][i] for key, i in keyed}
    for op, rows in by_op.items():
        for (key, i), value in all_reduce(rows, key_groups, op).items():
            columns[key].alone[i] = value.sqrt() if COMBINE[key] == "l2" else value
    return columns


def _gradients(graded: NamedParameters) -> list[torch.Tensor]:
    """This process's part of each gradient: a sparse one's values, a sharded one's shard."""
    return [local(g.coalesce().values() if g.is_sparse else g) for _, g in graded]


def _columns(named, graded, moved, previous_weights) -> dict[str, list[float]]:
    """The norms and counts of every weight, gradient and update, of whole tensors, as floats."""
    weights = [p for _, p in named]
    grads = [g for _, g in graded]
    after = [w for _, w in moved]
    before = _Before(previous_weights, [name for name, _ in moved])
    same = len(moved) == len(named)  # the usual: every weight's update (the same order)
    known = isinstance(previous_weights, WeightsBefore) and same
    weight_stacks = [list(ids) for ids in previous_weights.stacked] if known else stacks(weights)
    # detached: a Parameter's torch-function dispatch triples the cost of stacking it
    values = [local(w).detach() for w in weights]
    weight_ords = {"weight_norm": 2, "max_abs_weight": math.inf}
    update_ords = {"update_norm": 2, "update_nonzero": 0}
    if same:  # the updates from the weights' own stacks
        columns = _columns_of(values, weight_ords, weight_stacks, before, update_ords)
    else:
        columns = _columns_of(values, weight_ords, weight_stacks)
        after_values = [local(w).detach() for w in after]
        columns.update(_columns_of(after_values, {}, stacks(after), before, update_ords))
    grad_ords = {"grad_norm": 2, "grad_nonzero": 0}
    columns.update(_columns_of(_gradients(graded), grad_ords, stacks(grads)))
    weight_groups = [shard_groups(w) for w in weights]
    grad_groups = [shard_groups(g) for g in grads]
    groups = dict(weight_norm=weight_groups, max_abs_weight=weight_groups, grad_norm=grad_groups)
    moved_groups = weight_groups if same else [shard_groups(w) for w in after]
    groups.update(grad_nonzero=grad_groups, update_norm=moved_groups, update_nonzero=moved_groups)
    sizes = {key: len(values) for key, values in groups.items()}
    return _to_floats(_whole(columns, groups), sizes)


def _nonfinite_counts(graded: NamedParameters, grad_norms: list[float]) -> dict[int, float]:
    """{index in graded: its count of NaN and Inf values}, counted only where the norm shows there
    are some."""
    bad = [i for i, norm in enumerate(grad_norms) if not math.isfinite(norm)]
    grads = _gradients([graded[i] for i in bad])
    counts = {"nonfinite": Column(dict(enumerate((~torch.isfinite(g)).sum() for g in grads)), [])}
    groups = {"nonfinite": [shard_groups(graded[i][1]) for i in bad]}
    return dict(zip(bad, _to_floats(_whole(counts, groups), {"nonfinite": len(bad)})["nonfinite"]))


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
    present = set(previous_weights)
    moved = [(name, p) for name, p in named if name in present]
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
    grads = [g for _, g in named]
    ords = {"grad_l1": 1, "max_abs_grad": math.inf}
    columns = _columns_of([local(g) for g in grads], ords, stacks(grads))
    groups = [shard_groups(g) for g in grads]
    sizes = {name: len(grads) for name in ords}
    values = _to_floats(_whole(columns, {"grad_l1": groups, "max_abs_grad": groups}), sizes)
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
