"""Sharded tensors (DTensor: FSDP2's `fully_shard`, tensor parallel), whose values are spread over
processes.

Each process computes its numbers from its own shard, and `all_reduce` combines them into the
numbers of the whole tensor: sums add up, minima and maxima are taken over the shards. Only those
numbers travel, never the values. Every rank must make the same calls in the same order, as with any
collective.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping

import torch

PLAIN = (torch.Tensor, torch.nn.Parameter)  # never sharded: told apart at once (thousands a step)


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether a tensor is a DTensor, whose values are spread over processes."""
    if type(tensor) in PLAIN:
        return False
    return hasattr(tensor, "placements") and hasattr(tensor, "to_local")


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor; any other tensor as it is."""
    return tensor if type(tensor) in PLAIN or not is_sharded(tensor) else tensor.to_local()


def shard_groups(tensor: torch.Tensor) -> tuple:
    """The process groups over which a tensor's values are split: one per mesh dimension it is
    sharded on (a replicated dimension holds copies, which must not be counted twice); () for an
    ordinary tensor. Raises ValueError for a partial placement, whose shards hold summands rather
    than values."""
    if not is_sharded(tensor):
        return ()
    if any(placement.is_partial() for placement in tensor.placements):
        raise ValueError(
            f"a DTensor placed as {tensor.placements} holds partial sums; redistribute it first"
        )
    return tuple(
        tensor.device_mesh.get_group(dim) for dim, p in enumerate(tensor.placements) if p.is_shard()
    )


def all_reduce(
    rows: Mapping[Hashable, torch.Tensor], groups: Mapping[Hashable, tuple], op: str
) -> dict[Hashable, torch.Tensor]:
    """{key: row} with each row combined over its key's process groups by `op` ("sum", "min" or
    "max"); rows without groups stay as they are. Rows that share groups and a device travel in one
    collective."""
    batches: dict[tuple, dict[Hashable, torch.Tensor]] = {}
    for key, row in rows.items():
        if groups.get(key):
            batches.setdefault((groups[key], row.device), {})[key] = row
    reduced = dict(rows)
    for (key_groups, _), batch in batches.items():
        stacked = torch.stack([row.double().reshape(-1) for row in batch.values()])
        width = stacked.shape[1]
        if op != "sum":  # a NaN in any shard makes the result NaN, as it would for the whole tensor
            nan = stacked.isnan().double()
            stacked = torch.cat([stacked, -nan if op == "min" else nan], dim=1)
        for group in key_groups:
            torch.distributed.all_reduce(
                stacked, getattr(torch.distributed.ReduceOp, op.upper()), group=group
            )
        if op != "sum":
            stacked = stacked[:, :width].masked_fill(stacked[:, width:] != 0, math.nan)
        reduced.update((key, row.reshape(batch[key].shape)) for key, row in zip(batch, stacked))
    return reduced
