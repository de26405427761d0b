"""Histograms of many tensors at once, each computed on its own device.

Per tensor, the minimum, maximum, sum and sum of squares are computed where the tensor lives and
read by the host together (one synchronisation per device); then the values are counted into
buckets on the device and all counts come back in one transfer. NaN and Inf values are counted
and left out of the buckets, which costs a second pass only for the tensors that hold some.

The buckets have one width, the smallest power of two that spans the minimum to the maximum in
`bins - 1` widths, and their inner edges are multiples of it: between bins / 2 and `bins` buckets,
the first starting at the minimum and the last ending at the maximum. Dividing by a power of two is
exact in floating point, so every value is counted in exactly the bucket its logged edges say.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .shards import all_reduce, local, shard_groups

DEFAULT_BINS = 64  # TensorBoard's Histograms tab re-bins to about 30 for display
# values per kernel call: float64 copies of 8 MB stay in a CPU's caches; float32 counts exact
CHUNK = 1 << 20


@dataclass
class Histogram:
    """The finite values of a tensor in buckets, as TensorBoard stores them: `bucket_limits` are
    right edges and the first left edge is `min`. `nonfinite` counts the NaN and Inf values left
    out."""

    num: int
    nonfinite: int
    min: float
    max: float
    sum: float
    sum_squares: float
    bucket_limits: np.ndarray
    bucket_counts: np.ndarray


def bin_layout(lo: float, hi: float, bins: int) -> tuple[float, int, int]:
    """(width, first, count) for values in [lo, hi], lo < hi, and bins >= 2: bucket k holds (first +
    k) * width <= v < (first + k + 1) * width, for k in 0 .. count - 1 (the last one closed at hi).
    """
    mantissa, exponent = math.frexp((hi - lo) / (bins - 1))
    width = math.ldexp(1.0, exponent - 1 if mantissa == 0.5 else exponent)
    while True:  # once, unless hi - lo was rounded; each doubling at least halves the count
        first = math.floor(lo / width)
        count = math.ceil(hi / width) - first
        if count <= bins:
            return width, first, count
        width *= 2


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    x = tensor.detach()
    x = (x.to_dense() if x.is_sparse else x).reshape(-1)
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _moments(x: torch.Tensor) -> torch.Tensor:
    """[min, max, sum, sum of squares] of a flat tensor, as float64 on its device; the sums
    accumulate in float64. An empty tensor's leave the others' unchanged when they are combined:
    [inf, -inf, 0, 0]."""
    if not x.numel():
        return torch.tensor([math.inf, -math.inf, 0.0, 0.0], dtype=torch.float64, device=x.device)
    rows = []
    for chunk in x.split(CHUNK):
        wide = chunk.double()
        rows.append(torch.stack([*torch.aminmax(chunk), wide.sum(), wide.dot(wide)]))
    if len(rows) == 1:
        return rows[0]
    rows = torch.stack(rows)
    return torch.stack([rows[:, 0].min(), rows[:, 1].max(), rows[:, 2].sum(), rows[:, 3].sum()])


def _whole(
    moments: dict[str, torch.Tensor], groups: Mapping[str, tuple]
) -> dict[str, torch.Tensor]:
    """The moments of whole tensors from their shards' (see shards.py); others as they are."""
    if not any(groups.values()):
        return moments
    extremes = all_reduce(
        {name: torch.stack([m[0], -m[1]]) for name, m in moments.items()}, groups, "min"
    )
    sums = all_reduce({name: m[2:] for name, m in moments.items()}, groups, "sum")
    return {
        name: torch.cat([extremes[name][:1], -extremes[name][1:], sums[name]]) for name in moments
    }


def _counts(x: torch.Tensor, width: float, first: int, buckets: int) -> torch.Tensor:
    """Counts of floor(v / width) - first over 0 .. buckets - 1 for the values v of x, on x's
    device."""
    # float32 keeps v / width exact unless 1 / width would overflow large values or underflow small
    # ones
    wide = not 2.0**-100 <= width <= 1
    counts = []
    for chunk in x.split(CHUNK):
        index = (chunk.double() if wide else chunk).mul(1 / width).floor_().sub_(first)
        # bincount: twice histc's speed here, but on a GPU it reads its input's maximum back
        if index.is_cpu:
            counts.append(torch.bincount(index.int(), minlength=buckets))
        else:  # whole numbers in buckets one wide, centred on them: exact
            counts.append(torch.histc(index, buckets, -0.5, buckets - 0.5))
    return counts[0] if len(counts) == 1 else torch.stack(counts).sum(0, dtype=torch.float64)


def to_host(rows: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, Any]:
    """{key: the row as a float, or a list of floats}: rows of one shape, those of a device moved in
    one transfer."""
    by_device: dict[torch.device, dict[Hashable, torch.Tensor]] = {}
    for name, row in rows.items():
        by_device.setdefault(row.device, {})[name] = row
    host = {}
    for group in by_device.values():
        # note: a CPU-GPU sync point
        host.update(zip(group, torch.stack(list(group.values())).double().tolist()))
    return host


def _finite_moments(
    tensors: Mapping[str, torch.Tensor], flat: dict[str, torch.Tensor], groups: Mapping[str, tuple]
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """The moments of each tensor's finite values (see _moments) and how many there are; `flat`
    keeps only the finite values of the tensors that hold NaN or Inf."""
    moments = to_host(_whole({name: _moments(x) for name, x in flat.items()}, groups))
    finite = {name: t.numel() for name, t in tensors.items()}  # in the whole tensor
    # a NaN or an Inf anywhere makes the sum of squares one: then bin the finite values alone
    refilter = [name for name, (_, _, _, squares) in moments.items() if not math.isfinite(squares)]
    for name in refilter:
        flat[name] = flat[name][torch.isfinite(flat[name])]
    moments.update(to_host(_whole({name: _moments(flat[name]) for name in refilter}, groups)))
    kept = {
        name: torch.tensor(float(flat[name].numel()), dtype=torch.float64, device=flat[name].device)
        for name in refilter
    }
    finite.update((name, int(n)) for name, n in to_host(all_reduce(kept, groups, "sum")).items())
    return moments, finite


def _buckets(
    lo: float, hi: float, num: int, layout: tuple | None, counts: list[float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """(right edges, counts) of a tensor's buckets, from its layout and the counts _counts made."""
    if layout is None:  # one bucket
        return np.array([hi + 0.5 if lo == hi else hi]), np.array([float(num)])
    width, first, count = layout
    bucket_counts = np.array(counts[:count])
    bucket_counts[-1] += counts[count]  # values on a top edge that is a multiple of the width
    limits = (first + np.arange(1, count + 1, dtype=np.float64)) * width
    limits[-1] = hi
    return limits, bucket_counts


def compute_histograms(
    tensors: Mapping[str, torch.Tensor], bins: int = DEFAULT_BINS
) -> dict[str, Histogram]:
    """{name: Histogram} of a {name: tensor} mapping, in its order; empty tensors are left out.
    Pure: nothing is logged. Any float, integer or sparse tensor; a constant tensor gets one bucket
    half a unit wide.

    A sharded tensor (DTensor) gets the histogram of the whole tensor, exactly: its minimum,
    maximum, sums and bucket counts are combined over the processes that hold its shards, so every
    one of them must make this call (with the same names in the same order)."""
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    tensors = {name: t for name, t in tensors.items() if t.numel()}
    groups = {name: shard_groups(t) for name, t in tensors.items()}
    flat = {name: _flat(local(t)) for name, t in tensors.items()}
    moments, finite = _finite_moments(tensors, flat, groups)
    layouts = {
        name: bin_layout(lo, hi, bins)
        for name, (lo, hi, _, _) in moments.items()
        if lo < hi and bins > 1
    }
    counts = {
        name: _counts(flat[name], width, first, bins + 1)
        for name, (width, first, _) in layouts.items()
    }
    counts = to_host(all_reduce(counts, groups, "sum"))
    result = {}
    for name, tensor in tensors.items():
        lo, hi, total, squares = moments[name]
        nonfinite = tensor.numel() - finite[name]
        if not finite[name]:
            nothing = (math.inf, -math.inf, 0.0, 0.0, np.empty(0), np.empty(0))
            result[name] = Histogram(0, nonfinite, *nothing)
            continue
        limits, bucket_counts = _buckets(lo, hi, finite[name], layouts.get(name), counts.get(name))
        result[name] = Histogram(
            finite[name], nonfinite, lo, hi, total, squares, limits, bucket_counts
        )
    return result
