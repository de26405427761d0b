"""Replicas that disagree: under data parallelism each process holds a copy of the model (the
replicas of DistributedDataParallel, or those of a replicate dimension of FSDP2), which the averaged
gradients keep equal. When the gradients are not averaged (the model inside the wrapper called
directly, `no_sync()` left on, the model moved to another dtype or device after it was wrapped,
which loses the wrapper's gradient hooks), or the weights are changed on some ranks only, the
copies drift apart in silence: each rank trains its own model.

At each statistics reading every rank sends, per parameter, the norm of its weights and of its
gradient (those the reading's statistics computed already), its step counts, and whether its loss
was NaN or Inf since the reading before; one all_reduce(MAX) of those numbers and of their negatives
gives every rank the largest and smallest of each over the replicas. Equal replicas give equal
numbers, bit for bit; the numbers travel, never the values.

The collective runs in a gloo group of the monitor's own, and asynchronously: each reading starts
one and reads the ones that have ended, so that it never waits on a rank that is behind, and a rank
that calls step() once too often (which this check finds) cannot pair the monitor's collective with
the wrapper's own and hang the job. The group is made at watch() only where every rank of the job
watches: the ranks meet in the job's store first, and where one does not come within
JOIN_SECONDS, the check is off (one line says so) and nothing waits on it.
"""

from __future__ import annotations

import math
import sys
import time
from datetime import timedelta
from typing import Any

import torch

from .hooks import COUNTS
from .shards import is_sharded
from .stats import NamedParameters

# replicas differ where the largest and smallest of a number over the ranks are further apart than
# this share of its size: equal replicas give bit-equal numbers; this leaves room for reductions
# whose order differs between devices
TOLERANCE = 1e-6
SHOWN = 8  # the parameters a reading names, most different first
NORMS = ("weight_norm", "grad_norm")  # what is compared of each parameter, in this order


def data_parallel_group(wrapper: torch.nn.Module | None, parameters: NamedParameters) -> Any:
    """The process group over which the parameters are replicas: a DistributedDataParallel
    wrapper's, or that of a replicate dimension of sharded (DTensor) parameters; None where there
    are none, or one process."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    group = getattr(wrapper, "process_group", None)
    if group is None:
        for _, p in parameters:
            if is_sharded(p):
                dims = [d for d, place in enumerate(p.placements) if place.is_replicate()]
                group = p.device_mesh.get_group(dims[0]) if dims else None
                break
    if group is None or torch.distributed.get_world_size(group) < 2:
        return None
    return group


def moved_after_wrapping(wrapper: torch.nn.Module | None) -> bool | None:
    """Whether a DistributedDataParallel module's parameters changed dtype or device after it was
    built (its gradient buckets keep the old ones, and its gradient hooks are lost); None where
    that cannot be read."""
    try:
        buckets = wrapper.reducer._get_zeros_like_grad_buckets()
        for bucket in buckets:
            buffer = bucket.buffer()
            for p in bucket.parameters():
                if (p.dtype, p.device) != (buffer.dtype, buffer.device):
                    return True
        return False
    except Exception:  # not a DDP module, or a torch whose reducer says nothing of its buckets
        return None


JOIN_SECONDS = 60  # how long watch() waits for every rank to watch too
SETTLE_SECONDS = 30  # how long an epoch's end waits for the readings' collectives to end
MAX_PENDING = 64  # readings whose collective has not ended, before the check gives up
_watches = 0  # the watch() calls of this process that compare replicas: the same on every rank


def joined(seconds: float = JOIN_SECONDS) -> bool:
    """Whether every rank of the job watches too: each counts itself in the job's store and waits
    for the others; the first rank to see all of them, or to give up waiting, decides for all."""
    global _watches
    _watches += 1
    key = f"gradwatch/replicas/{_watches}"
    try:
        store = torch.distributed.distributed_c10d._get_default_store()
        world = torch.distributed.get_world_size()
        store.add(f"{key}/count", 1)
        deadline = time.monotonic() + seconds
        while store.add(f"{key}/count", 0) < world and time.monotonic() < deadline:
            time.sleep(0.01)
        seen = "on" if store.add(f"{key}/count", 0) >= world else "off"
        return store.compare_set(f"{key}/verdict", "", seen) == b"on"
    except Exception:  # a store that cannot say: no check, rather than a wait that may not end
        return False


def channel(group: Any) -> Any:
    """A gloo group of the ranks of `group`, for the monitor's collectives alone; None (the check
    off, said in one line) where not every rank watches, or one cannot be made."""
    why = None
    if not joined():
        why = f"not every rank watched within {JOIN_SECONDS} s (monitor.step() must run on all)"
    else:
        try:
            ranks = torch.distributed.get_process_group_ranks(group)
            return torch.distributed.new_group(
                ranks, backend="gloo", use_local_synchronization=True
            )
        except Exception as err:
            why = f"its process group could not be made ({type(err).__name__}: {err})"
    print(f"gradwatch: the replicas are not compared: {why}", file=sys.stderr)
    return None


class Replicas:
    """Compares the replicas of a data-parallel model over `group` at each reading."""

    def __init__(self, group: Any, wrapper: torch.nn.Module | None):
        self.wrapper = wrapper
        self.channel = channel(group) if group is not None else None
        self.pending: list[tuple] = []  # (work, numbers, step, names and sizes): collectives begun

    def compare(
        self, stats: dict[str, dict], step: int, nonfinite: bool, calls: dict[str, int]
    ) -> None:
        """Begin this reading's collective (take() reads it once it has ended), from its statistics
        (stats.parameter_statistics; a missing gradient's norm is NaN). Every rank of the group
        must make the same readings, as with any collective. `calls`: the loop's calls
        (hooks.WrapperCalls)."""
        if self.channel is None:
            return
        world = torch.distributed.get_world_size(self.channel)
        rank = torch.distributed.get_rank(self.channel)
        names = [name for name in stats if name not in ("total", "activations", "loop")]
        norms = [stats[name].get(key, math.nan) for key in NORMS for name in names]
        values = torch.tensor(norms, dtype=torch.float64)
        values = values.nan_to_num(math.inf, math.inf, -math.inf)  # a NaN differs from any number
        counts = torch.tensor([step] + [calls[key] for key in COUNTS], dtype=torch.float64)
        flags = torch.zeros(world, dtype=torch.float64)
        flags[rank] = float(nonfinite)
        both = torch.cat([values, -values, counts, -counts, flags])
        work = torch.distributed.all_reduce(
            both, torch.distributed.ReduceOp.MAX, group=self.channel, async_op=True
        )
        self.pending.append((work, both, step, names))
        if len(self.pending) > MAX_PENDING:  # a rank far behind, or gone: stop comparing
            print(
                "gradwatch: the replicas are no longer compared: a rank is far behind",
                file=sys.stderr,
            )
            self.channel = None
            self.pending = []

    def take(self, seconds: float = 0.0) -> list[dict[str, Any]]:
        """The facts of the readings whose collectives have ended (waiting up to `seconds` in all),
        oldest first; the others stay pending."""
        found = []
        deadline = time.monotonic() + seconds
        while self.pending:
            work, both, step, names = self.pending[0]
            left = deadline - time.monotonic()
            if not work.is_completed():
                if left <= 0:
                    break
                try:
                    work.wait(timedelta(seconds=left))
                except Exception:  # a rank that never came: the check gives up its wait
                    break
            self.pending.pop(0)
            found.append({**facts(names, both.tolist()), "step": step})
        differ = any(f["gradients_differ"] for f in found)  # the check allocates every bucket
        moved = moved_after_wrapping(self.wrapper) if differ else None
        return [{**f, "moved": moved} for f in found]

    def settle(self) -> list[dict[str, Any]]:
        """At an epoch's end or at close(), where every rank meets: the facts of every reading
        begun, waiting for their collectives (SETTLE_SECONDS at most in all)."""
        return self.take(SETTLE_SECONDS)


def _apart(high: float, low: float, size: float) -> float:
    """How far apart the largest and smallest of a number over the replicas are, as a share of
    `size`; 0 where both are equal (also both infinite: missing on every rank)."""
    if high == low:
        return 0.0
    if not (math.isfinite(high) and math.isfinite(low)):
        return math.inf  # one rank has it, another not
    return abs(high - low) / size if size > 0 else math.inf


def facts(names: list[str], reduced: list[float]) -> dict[str, Any]:
    """The comparison as plain values, from the reduced numbers of a reading (the largest of each,
    then the negated smallest, then the counts and the ranks' flags) and the parameters' names:
    the parameters whose weights and whose gradients differ over the replicas, with how far apart
    (the difference of their norms over the larger), the range of the ranks' optimizer step counts,
    the ranks whose loss was NaN or Inf, and the largest over the ranks of the training forward
    passes, of those that skipped the wrapper and of the optimizer steps made under no_sync()
    alone."""
    n = len(NORMS) * len(names)
    k = 1 + len(COUNTS)
    high = reduced[:n]
    low = [-v for v in reduced[n : 2 * n]]
    counts = dict(zip(("step", *COUNTS), reduced[2 * n : 2 * n + k]))
    lows = dict(zip(("step", *COUNTS), (-v for v in reduced[2 * n + k : 2 * n + 2 * k])))
    flags = reduced[2 * n + 2 * k :]
    apart = {"weights": {}, "gradients": {}}
    for j, (part, name) in enumerate((part, name) for part in apart for name in names):
        far = _apart(high[j], low[j], max(abs(high[j]), abs(low[j])))
        if far > TOLERANCE:
            apart[part][name] = far
    ranks = [r for r, flag in enumerate(flags) if flag > 0]
    shown = {part: dict(sorted(found.items(), key=lambda kv: -kv[1])[:SHOWN])
             for part, found in apart.items()}  # fmt: skip
    return {
        "ranks": len(flags),
        "weights_differ": len(apart["weights"]),
        "gradients_differ": len(apart["gradients"]),
        "apart": shown,
        "optimizer_steps": [lows["optimizer_steps"], counts["optimizer_steps"]],
        "forward_passes": counts["forward_passes"],
        "skipped_wrapper": counts["skipped_wrapper"],
        "unsynced_steps": counts["unsynced_steps"],
        "nonfinite_ranks": ranks if len(ranks) < len(flags) else [],
    }
