"""Watching training from the inside: weight and gradient histograms that are fast and never crash on NaN.

    from monitor import TrainingMonitor

    with TrainingMonitor("Result/my-run") as monitor:
        for epoch in range(epochs):
            ...                                   # train: forward, backward, step
            monitor.log_epoch(epoch, model, {"valid/accuracy": acc})  # histograms and scalars

Histograms are binned with torch on the tensor's own device into a fixed number of
equal-width bins between the finite minimum and maximum, and all tensors of one call
reach the host in a single transfer. Non-finite values are counted (scalar
`nonfinite/<tag>`) and left out of the bins; a tensor with no finite value logs only
that count. Parameters without a gradient are skipped.
"""
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from tensorboardX import SummaryWriter

DEFAULT_BINS = 64  # about 1.1 KB per histogram event, enough to show the shape (the Histograms tab shows ~30)

# On the CPU, branch on min and max (free to read there) and bin with torch.histogram; elsewhere use the
# sync-free masked path. Tests switch this off to check the device path on CPU tensors.
CPU_FAST_PATH = True

# Layout of the per-tensor row of statistics moved to the host in one piece.
_NUM, _NONFINITE, _MIN, _MAX, _SUM, _SUM_SQ, _EDGES = range(7)


@dataclass
class Histogram:
    """A histogram of a tensor's finite values; `bucket_limits` are right edges, `min` the first left edge."""
    num: int
    nonfinite: int
    min: float
    max: float
    sum: float
    sum_squares: float
    bucket_limits: np.ndarray
    bucket_counts: np.ndarray


def _as_flat_float(tensor):
    x = tensor.detach()
    if x.is_sparse:
        x = x.to_dense()
    x = x.reshape(-1)
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return x


def _histogram_row_cpu(x, bins):
    """CPU: reading min and max is free, so the common all-finite tensor skips the masking passes."""
    lo, hi = (v.item() for v in torch.aminmax(x))
    values, nonfinite = x, 0
    if not (math.isfinite(lo) and math.isfinite(hi)):
        values = x[torch.isfinite(x)]
        nonfinite = x.numel() - values.numel()
        if values.numel() == 0:
            return torch.tensor([0, nonfinite, math.inf, -math.inf, 0, 0] + [math.nan] * (bins + 1) + [0] * bins,
                                dtype=torch.float64)
        lo, hi = (v.item() for v in torch.aminmax(values))
    # numpy's range for a constant tensor; histogram() bins exactly by the edges it returns
    counts, edges = torch.histogram(values, bins, range=(lo - 0.5, hi + 0.5) if lo == hi else (lo, hi))
    head = torch.tensor([values.numel(), nonfinite, lo, hi], dtype=torch.float64)
    moments = torch.stack([values.sum(dtype=torch.float64), torch.linalg.vector_norm(values, dtype=torch.float64) ** 2])
    return torch.cat([head, moments, edges.double(), counts.double()])


def _histogram_row_device(x, bins):
    """Any device, without a host synchronisation: masks instead of branches."""
    finite = torch.isfinite(x)
    num = finite.sum()
    lo = torch.where(finite, x, torch.inf).min()
    hi = torch.where(finite, x, -torch.inf).max()
    zeroed = torch.where(finite, x, 0)
    # Equal-width edges from min to max (numpy's choice, including +-0.5 around a constant tensor).
    lo64, hi64 = lo.double(), hi.double()
    same = lo64 == hi64
    start, stop = torch.where(same, lo64 - 0.5, lo64), torch.where(same, hi64 + 0.5, hi64)
    unit = torch.linspace(0, 1, bins + 1, dtype=torch.float64, device=x.device)
    edges = (start + (stop - start) * unit).to(x.dtype)
    edges = torch.cat([start.to(x.dtype).view(1), edges[1:-1].clamp(start.to(x.dtype), stop.to(x.dtype)),
                       stop.to(x.dtype).view(1)])
    # bucket i holds edges[i] <= v < edges[i+1], the last one closed: numpy.histogram's rule.
    index = torch.bucketize(x, edges[1:-1], right=True)
    index = torch.where(finite, index, bins)  # non-finite values go to an extra bucket, dropped below
    counts = torch.bincount(index, minlength=bins + 1)[:bins]
    head = torch.stack([num.double(), (x.numel() - num).double(), lo64, hi64,
                        zeroed.sum(dtype=torch.float64), torch.linalg.vector_norm(zeroed, dtype=torch.float64) ** 2])
    return torch.cat([head, edges.double(), counts.double()])


def _histogram_row(tensor, bins):
    """Statistics of one tensor as a float64 vector on its device (layout: _NUM.._EDGES, edges, counts)."""
    x = _as_flat_float(tensor)
    return _histogram_row_cpu(x, bins) if x.device.type == "cpu" and CPU_FAST_PATH else _histogram_row_device(x, bins)


def compute_histograms(tensors, bins=DEFAULT_BINS):
    """Histograms of a {name: tensor} mapping; empty tensors are left out. Pure: nothing is logged."""
    if bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins}")
    names = [name for name, t in tensors.items() if t.numel() > 0]
    if not names:
        return {}
    rows = [_histogram_row(tensors[name], bins) for name in names]
    devices = {row.device for row in rows}
    if len(devices) > 1:
        rows = [row.cpu() for row in rows]
    table = torch.stack(rows).cpu().numpy()  # note: the one CPU-GPU sync point of a log
    result = {}
    for name, row in zip(names, table):
        edges = row[_EDGES:_EDGES + bins + 1]
        result[name] = Histogram(num=int(row[_NUM]), nonfinite=int(row[_NONFINITE]),
                                 min=float(row[_MIN]), max=float(row[_MAX]),
                                 sum=float(row[_SUM]), sum_squares=float(row[_SUM_SQ]),
                                 bucket_limits=edges[1:], bucket_counts=row[_EDGES + bins + 1:])
    return result


def parameter_tensors(model):
    """The tutorial's tags: {'<name>_data': weight, '<name>_grad': gradient}; parameters without a gradient skip _grad."""
    tensors = {}
    for name, param in model.named_parameters():
        tensors[name + "_data"] = param
        if param.grad is not None:
            tensors[name + "_grad"] = param.grad
    return tensors


class TrainingMonitor:
    """Owns a run's TensorBoard writers; every event of a training run goes through it.

    Two step axes are kept apart, one writer each, so that each tag keeps one axis and a
    resumed run can purge exactly what it rewrites: epochs in `log_dir`, optimizer steps
    in `log_dir/steps` (created on first use).
    """

    def __init__(self, log_dir, bins=DEFAULT_BINS, purge_epoch=None, purge_step=None, flush_secs=30):
        if not isinstance(bins, int) or bins < 1:
            raise ValueError(f"bins must be a positive integer, got {bins!r}")
        self.log_dir = os.fspath(log_dir)
        self.bins = bins
        self._purge_step = purge_step
        self._flush_secs = flush_secs
        # Event file names hold the time in whole seconds; a nanosecond suffix keeps a run resumed within the
        # same second from overwriting the file it continues, and sorts it after that file.
        self._suffix = f".{time.time_ns()}"
        self.writer = SummaryWriter(self.log_dir, purge_step=purge_epoch, flush_secs=flush_secs,
                                    filename_suffix=self._suffix)
        self._step_writer = None

    @property
    def step_writer(self):
        if self._step_writer is None:
            self._step_writer = SummaryWriter(os.path.join(self.log_dir, "steps"), purge_step=self._purge_step,
                                              flush_secs=self._flush_secs, filename_suffix=self._suffix)
        return self._step_writer

    def log_parameters(self, model, step, per_step=False):
        """Log `<name>_data` and `<name>_grad` histograms at `step` (an epoch, or an optimizer step if per_step)."""
        writer = self.step_writer if per_step else self.writer
        histograms = compute_histograms(parameter_tensors(model), self.bins)
        for tag, h in histograms.items():
            if h.nonfinite:
                writer.add_scalar("nonfinite/" + tag, h.nonfinite, step)
            if h.num:
                writer.add_histogram_raw(tag, h.min, h.max, h.num, h.sum, h.sum_squares,
                                         h.bucket_limits.tolist(), h.bucket_counts.tolist(), step)
        return histograms

    def log_epoch(self, epoch, model, scalars, figures=()):
        """Everything an epoch writes: the parameter histograms, {tag: value} scalars and {tag: Figure} images."""
        self.log_parameters(model, epoch)
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, epoch)
        for tag, figure in dict(figures).items():
            self.writer.add_figure(tag, figure, epoch, close=False)

    def flush(self):
        for writer in (self.writer, self._step_writer):
            if writer is not None:
                writer.flush()

    def close(self):
        for writer in (self.writer, self._step_writer):
            if writer is not None:
                writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
