"""What the monitor keeps from one optimizer step to the next: when statistics are due, and the
training loss and gradient norms gathered between two statistics logs.

The losses and norms stay on their device until a log reads them, in one transfer; each log turns
them into a window of the epoch. Each part owns its `state_dict()`: plain Python values, whose keys
are distinct across the parts, so that the monitor's state is their union.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .histograms import to_host
from .shards import is_sharded

# The default statistics cadence: every 50 steps, stretched after the first epoch to 16 readings an
# epoch when that is sparser, up to 1,000 steps apart
STATS_EVERY = 50
READINGS_PER_EPOCH = 16
MAX_STATS_EVERY = 1000
# A loop that calls no epoch_end is diagnosed in windows of this many statistics readings
READINGS_PER_WINDOW = 16
MIN_WINDOW_STEPS = 256  # and of at least this many steps, so that its mean loss is not one batch's
# The first steps after watch() are read whatever the cadence: the first for the loss's graph and
# the loop's facts, the second for whether the gradients were cleared after the first
FIRST_READINGS = 2
# What an epoch keeps, however long it is: loss windows and clipping norms beyond these thin out
MAX_LOSS_WINDOWS = 512
# the most losses held on their device between windows (a window closes early at this many)
MAX_PENDING = MAX_STATS_EVERY
MAX_NORMS = 4096


def check_count(name: str, value: Any, low: int) -> int:
    """`value`, if it is an integer >= `low`; else ValueError naming the argument."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


class Cadence:
    """Which optimizer steps take statistics and histograms. By default statistics every 50 steps;
    after the first epoch, 16 times an epoch if that is sparser, at most 1,000 steps apart (so that
    on long epochs what they cost is a fixed share of an epoch); a `stats_every` given stays. A
    loop without epochs is diagnosed every `diagnose_every` readings (16 by default; 0: only at
    epoch_end)."""

    def __init__(
        self,
        stats_every: int | None,
        hist_every: int,
        start_step: int,
        diagnose_every: int | None = None,
    ):
        every = READINGS_PER_WINDOW if diagnose_every is None else diagnose_every
        self.diagnose_every = check_count("diagnose_every", every, 0)
        self.auto = stats_every is None  # STATS_EVERY until the first epoch's length is known
        self.stats_every = STATS_EVERY if self.auto else check_count("stats_every", stats_every, 0)
        self.hist_every = check_count("hist_every", hist_every, 0)
        self.epoch_start = start_step  # the step the first epoch began at
        self.since_watch: int | None = None  # step() calls since watch()
        self.logged_epoch: int | None = None  # the epoch whose histograms are written

    def watched(self) -> None:
        """watch() was called: the next FIRST_READINGS steps are read."""
        self.since_watch = 0

    def tick(self) -> None:
        """A step() call."""
        if self.since_watch is not None:
            self.since_watch += 1

    def first(self, ahead: int = 0) -> bool:
        """Whether the step (`ahead` steps on) is one of the first FIRST_READINGS after watch()."""
        calls = None if self.since_watch is None else self.since_watch + ahead
        return calls is not None and 1 <= calls <= FIRST_READINGS

    def reads(self, step: int, ahead: int = 0) -> bool:
        """Whether statistics and the loop's facts are read at `step` (`ahead` steps on)."""
        return self.first(ahead) or self.stats_due(step, ahead)

    def stats_due(self, step: int, ahead: int = 0) -> bool:
        """Every `stats_every` steps; with 0 (once per epoch, at epoch_end), every MAX_STATS_EVERY
        steps until an epoch ends, so that a loop without epochs is read and diagnosed too."""
        every = self.stats_every or (MAX_STATS_EVERY if self.logged_epoch is None else 0)
        return bool(every) and (step + ahead) % every == 0

    def hist_due(self, step: int) -> bool:
        return bool(self.hist_every) and step % self.hist_every == 0

    def epoch_ended(self, step: int) -> bool:
        """Take the first epoch's length, ending at `step`; whether the cadence changed."""
        if not self.auto or step <= self.epoch_start:
            return False
        self.auto = False
        per_epoch = (step - self.epoch_start) // READINGS_PER_EPOCH
        self.stats_every = min(MAX_STATS_EVERY, max(STATS_EVERY, per_epoch))
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "stats_every": self.stats_every,
            "stats_auto": self.auto,
            "epoch_start": self.epoch_start,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The default cadence goes on as it was; a cadence given explicitly wins."""
        if self.auto and "stats_every" in state:
            self.stats_every = state["stats_every"]
            self.auto = state["stats_auto"]
            self.epoch_start = state.get("epoch_start", self.epoch_start)


class LossWindows:
    """The training loss of every step, as windows of the epoch: one per statistics log, each with
    its first and last step, mean, maximum, the step of the maximum and the step of the first NaN
    or Inf."""

    def __init__(self):
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, loss) since the last window
        self.windows: list[dict[str, Any]] = []  # the epoch's
        self.first: float | None = None  # the run's first loss
        self.last: tuple[int, float] | None = None  # (step, loss) of the latest step taken

    def add(self, step: int, loss: torch.Tensor | float) -> None:
        loss = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        if loss.dim():  # a loss of shape (1,) is one number too
            loss = loss.reshape(())
        self.pending.append((step, loss))
        if len(self.pending) >= MAX_PENDING:  # statistics seldom: the losses so far make a window
            self.take()

    def latest(self, step: int) -> float | None:
        """The loss of optimizer step `step`, if it was the last one the latest take() read."""
        return self.last[1] if self.last is not None and self.last[0] == step else None

    def take(self) -> dict[str, float]:
        """Close the window of the losses since the last call; returns the scalar to log, {"loss":
        their mean}, or {} if none was finite."""
        if not self.pending:
            return {}
        steps = [step for step, _ in self.pending]
        host = to_host({i: loss for i, (_, loss) in enumerate(self.pending)})
        values = [host[i] for i in range(len(steps))]
        self.pending = []
        self.last = (steps[-1], values[-1])
        if self.first is None:
            self.first = values[0]
        finite = [(value, step) for value, step in zip(values, steps) if math.isfinite(value)]
        nonfinite = next(
            (step for value, step in zip(values, steps) if not math.isfinite(value)), None
        )
        peak, peak_step = max(finite, default=(math.nan, None))
        mean = statistics.fmean(v for v, _ in finite) if finite else math.nan
        median = statistics.median(v for v, _ in finite) if finite else math.nan
        window = {"first": steps[0], "step": steps[-1], "mean": mean, "median": median, "max": peak}
        window["max_step"] = peak_step
        self.windows.append({**window, "nonfinite_step": nonfinite})
        if len(self.windows) > MAX_LOSS_WINDOWS:  # a long epoch: its older half in pairs
            half = MAX_LOSS_WINDOWS // 2
            older = self.windows[:half]
            pairs = [merged(a, b) for a, b in zip(older[::2], older[1::2])]
            self.windows = pairs + older[len(pairs) * 2 :] + self.windows[half:]
        return {"loss": mean} if finite else {}

    def end_epoch(self) -> list[dict[str, Any]]:
        """The epoch's windows; the next epoch starts with none."""
        windows = self.windows
        self.windows = []
        return windows

    def state_dict(self) -> dict[str, Any]:
        return {"windows": list(self.windows), "first_loss": self.first}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.windows = list(state.get("windows", []))
        self.first = state.get("first_loss")


def merged(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two consecutive loss windows as one (the mean of their means, as if of equal length)."""
    means = [w["mean"] for w in (a, b) if math.isfinite(w["mean"])]
    medians = [w.get("median", w["mean"]) for w in (a, b)]
    medians = [m for m in medians if math.isfinite(m)]
    peak = max((w for w in (a, b) if math.isfinite(w["max"])), key=lambda w: w["max"], default=b)
    nonfinite = a["nonfinite_step"] if a["nonfinite_step"] is not None else b["nonfinite_step"]
    mean = statistics.fmean(means) if means else math.nan
    return {
        "first": a.get("first", a["step"]),
        "step": b["step"],
        "mean": mean,
        "median": statistics.fmean(medians) if medians else math.nan,
        "max": peak["max"],
        "max_step": peak["max_step"],
        "nonfinite_step": nonfinite,
    }


def sampled(norms: list[float]) -> list[float]:
    """`norms`, or every other one where there are more than MAX_NORMS (a long epoch or window):
    a sample of them all."""
    return norms[1::2] if len(norms) > MAX_NORMS else norms


def clipped(norm: float, max_norm: float) -> bool:
    """Whether clip_grad_norm_ scaled the gradients down (it multiplies them by max_norm / (norm +
    1e-6))."""
    return norm + 1e-6 > max_norm


class ClippingNorms:
    """With gradient clipping: the total gradient norm before clipping of every step, and the
    threshold."""

    def __init__(self):
        self.pending: list[tuple[torch.Tensor, float]] = []  # (norm, max_norm) since the last take
        self.norms: list[float] = []  # the epoch's finite norms
        self.recent: list[float] = []  # those since the last window of steps was diagnosed
        self.max_norm: float | None = None  # the latest threshold

    def add(self, norm: torch.Tensor | float, max_norm: float) -> None:
        if is_sharded(norm):  # a DTensor norm is replicated: full_tensor() moves nothing
            norm = norm.full_tensor()
        norm = norm.detach() if isinstance(norm, torch.Tensor) else torch.tensor(norm)
        self.pending.append((norm, max_norm))

    def take(self) -> dict[str, float]:
        """The clipping scalars of the steps since the last call (one transfer): the norm before
        clipping at the latest step, whether that step was clipped, and the share of the steps that
        were."""
        if not self.pending:
            return {}
        host = to_host({i: norm for i, (norm, _) in enumerate(self.pending)})
        steps = [(host[i], max_norm) for i, (_, max_norm) in enumerate(self.pending)]
        self.pending = []
        self.max_norm = steps[-1][1]
        finite = [(norm, max_norm) for norm, max_norm in steps if math.isfinite(norm)]
        if not finite:
            return {}
        self.norms += [norm for norm, _ in finite]
        self.recent += [norm for norm, _ in finite]
        self.norms = sampled(self.norms)
        self.recent = sampled(self.recent)
        were = [clipped(norm, max_norm) for norm, max_norm in finite]
        scalars = {"clip/grad_norm": finite[-1][0], "clip/clipped": float(were[-1])}
        return {**scalars, "clip/clipped_share": statistics.fmean(were)}

    def summary(self, window: bool = False) -> dict[str, float]:
        """The epoch's clipping (or, with `window`, since the last window), for the diagnosis: the
        threshold, the steps, the share clipped, and the median and 90th percentile of the norms
        before clipping; {} without clipping."""
        norms = self.recent if window else self.norms
        if not norms:
            return {}
        share = statistics.fmean(clipped(norm, self.max_norm) for norm in norms)
        return {
            "max_norm": self.max_norm,
            "steps": len(norms),
            "clipped_share": share,
            "grad_norm_median": statistics.median(norms),
            "grad_norm_p90": float(np.percentile(norms, 90)),
        }

    def end_window(self) -> None:
        self.recent = []

    def end_epoch(self) -> None:
        self.norms = []
        self.recent = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "clip_norms": list(self.norms),
            "clip_recent": list(self.recent),
            "max_norm": self.max_norm,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.norms = list(state.get("clip_norms", []))
        self.recent = list(state.get("clip_recent", []))
        self.max_norm = state.get("max_norm")
