"""TrainingMonitor: everything TensorBoard shows about a model while it trains, from three calls in a loop."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image
from tensorboardX import SummaryWriter
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.summary import histogram_raw

from .diagnosis import Finding, Thresholds, diagnose, nonfinite_values, output_bias_skew
from .histograms import DEFAULT_BINS, Histogram, compute_histograms
from .pictures import gradient_flow_image
from .stats import NamedParameters, gradient_flow, parameter_statistics, parameter_tensors, summarize_epoch

STATE_KEYS = {"steps", "skipped_steps", "history", "records", "findings"}


def is_main_process() -> bool:
    """False only in a torch.distributed process other than rank 0: the one process that prints and writes."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0


def _scalar_values(scalars: Mapping[str, float]) -> list[Summary.Value]:
    return [Summary.Value(tag=tag, simple_value=float(value)) for tag, value in scalars.items()]


def _histogram_value(tag: str, h: Histogram) -> Summary.Value:
    limits, counts = h.bucket_limits.tolist(), h.bucket_counts.tolist()
    return histogram_raw(tag, h.min, h.max, h.num, h.sum, h.sum_squares, limits, counts).value[0]


class TrainingMonitor:
    """Watches a model while it trains and writes what TensorBoard shows about it.

    Three calls in a training loop:

        monitor = TrainingMonitor("Result/run").watch(model, optimizer)
        ...  loss.backward(); optimizer.step()       # (scaler.step(optimizer) under AMP: grads are unscaled)
        monitor.step()                               # once per optimizer step, before zero_grad()
        ...
        findings = monitor.epoch_end(epoch, {"valid/accuracy": acc}, classes=names, recall=recall)

    Every `stats_every` optimizer steps it logs per-layer statistics; every `hist_every` steps, histograms;
    at each epoch's end the tutorial's `<name>_data` / `<name>_grad` histograms, the gradient-flow image,
    the scalars and images it is given, and the diagnosis (diagnosis.json, the Text tab, and the findings
    not reported before, which it returns).

    Epochs and optimizer steps are two step axes, so each gets its own event folder: a tag keeps one axis,
    and a resumed run purges exactly what it rewrites on each (epochs in `log_dir`, optimizer steps in
    `log_dir/steps`). Under torch.distributed only rank 0 writes.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike,
        bins: int = DEFAULT_BINS,
        stats_every: int = 50,
        hist_every: int = 0,
        thresholds: Thresholds | None = None,
        purge_epoch: int | None = None,
        purge_step: int | None = None,
        start_step: int = 0,
        flush_secs: int = 30,
    ):
        counts = dict(
            bins=(bins, 1), stats_every=(stats_every, 0), hist_every=(hist_every, 0), start_step=(start_step, 0)
        )
        for name, (value, low) in counts.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if thresholds is not None and not isinstance(thresholds, Thresholds):
            raise TypeError(f"thresholds must be a gradwatch.Thresholds, got {type(thresholds).__name__}")
        self.log_dir = os.fspath(log_dir)
        self.bins, self.stats_every, self.hist_every = bins, stats_every, hist_every
        self.thresholds = thresholds or Thresholds()
        self.steps, self.skipped_steps = start_step, 0
        self.model: torch.nn.Module | None = None
        self._parameters: NamedParameters = []
        self._hooks: dict[str, Any] = {}
        self._stepped = False
        self._before_update: dict[str, torch.Tensor] | None = None
        self._records: list[dict] = []  # statistics of the epoch so far
        self._history: list[dict] = []  # one summary per finished epoch
        self.findings = self._load_findings(purge_epoch)
        self._reported = {f.key for f in self.findings}
        self.is_writer = is_main_process()
        # Event file names hold the time in whole seconds; a nanosecond suffix keeps a run resumed within the
        # same second from overwriting the file it continues, and sorts it after that file.
        options = dict(flush_secs=flush_secs, filename_suffix=f".{time.time_ns()}")
        self.writer = SummaryWriter(self.log_dir, purge_step=purge_epoch, **options) if self.is_writer else None
        self._step_writer_options = dict(purge_step=purge_step, **options)
        self._step_writer: SummaryWriter | None = None

    def _load_findings(self, purge_epoch: int | None) -> list[Finding]:
        path = os.path.join(self.log_dir, "diagnosis.json")
        if purge_epoch is None or not os.path.isfile(path):
            return []
        with open(path) as fh:
            return [Finding(**item) for item in json.load(fh) if item["epoch"] < purge_epoch]

    def _writer(self, per_step: bool) -> SummaryWriter:
        if per_step and self._step_writer is None:
            self._step_writer = SummaryWriter(os.path.join(self.log_dir, "steps"), **self._step_writer_options)
        return self._step_writer if per_step else self.writer

    def _log(self, values: list[Summary.Value], step: int, per_step: bool = False) -> None:
        """All values of one log as one event: each event passes tensorboardX's queue on its own, which costs more
        than building it (README: Measured)."""
        if self.is_writer and values:
            self._writer(per_step).file_writer.add_summary(Summary(value=values), step)

    def watch(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> TrainingMonitor:
        """Attach to `model` as its parameters are now (watch again after changing its layers); with `optimizer`,
        also measure each logged step's update-to-weight ratio and count the steps GradScaler skips."""
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"watch() needs a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.unwatch()
        self.model = model
        self._parameters = list(model.named_parameters())
        if optimizer is not None:
            self._hooks["before_step"] = optimizer.register_step_pre_hook(self._before_step)
        return self

    def unwatch(self) -> None:
        """Remove every hook this monitor placed; safe to call twice."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self._before_update = None

    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        """Runs only when the optimizer steps (GradScaler skips the call when it finds inf): notes that it did,
        and copies the weights before the update when statistics are due."""
        self._stepped = True
        if self.stats_every and (self.steps + 1) % self.stats_every == 0:
            with torch.no_grad():
                self._before_update = {name: p.clone() for name, p in self._parameters}

    def step(self) -> list[Finding]:
        """Call once per optimizer step, after it and before zero_grad(). Returns the step's urgent findings
        (non-finite gradients) when statistics were taken, else an empty list.

        With the optimizer watched, a step GradScaler skipped (its scaled gradients overflowed) is counted
        (scalar amp/skipped_steps) and not examined: its gradients are infinite by design."""
        if self.model is None:
            raise RuntimeError("call watch(model) before step()")
        self.steps += 1
        if "before_step" in self._hooks:
            stepped, self._stepped = self._stepped, False
            if not stepped:
                self.skipped_steps += 1
                self._before_update = None
                self._log(_scalar_values({"amp/skipped_steps": self.skipped_steps}), self.steps, per_step=True)
                return []
        if self.hist_every and self.steps % self.hist_every == 0:
            self.log_parameters(self._parameters, self.steps, per_step=True)
        if not (self.stats_every and self.steps % self.stats_every == 0):
            return []
        stats = parameter_statistics(self._parameters, self._before_update)
        self._before_update = None
        self._records.append(stats)
        scalars = {f"{key}/{name}": value for name, values in stats.items() for key, value in values.items()}
        finite = {tag: value for tag, value in scalars.items() if math.isfinite(value)}  # else: nonfinite_share
        self._log(_scalar_values(finite), self.steps, per_step=True)
        epoch = self._history[-1]["epoch"] + 1 if self._history else 0
        return nonfinite_values([{"epoch": epoch, "step": self.steps, "layers": stats}], self.thresholds)

    def log_parameters(
        self, model: torch.nn.Module | NamedParameters, step: int, per_step: bool = False
    ) -> dict[str, Histogram]:
        """Log the `<name>_data` and `<name>_grad` histograms of `model` (a Module, or its named_parameters() as a
        list) at `step`: an epoch, or an optimizer step if per_step. Returns them."""
        histograms = compute_histograms(parameter_tensors(model), self.bins)
        self.log_histograms(histograms, step, per_step)
        return histograms

    def log_histograms(self, histograms: Mapping[str, Histogram], step: int, per_step: bool = False) -> None:
        """Write {tag: Histogram} at `step`, with the count of each tensor's non-finite values as `nonfinite/<tag>`
        where it has some; a tensor without finite values has that count alone."""
        nonfinite = {"nonfinite/" + tag: h.nonfinite for tag, h in histograms.items() if h.nonfinite}
        values = [_histogram_value(tag, h) for tag, h in histograms.items() if h.num]
        self._log(values + _scalar_values(nonfinite), step, per_step)

    def epoch_end(
        self,
        epoch: int,
        scalars: Mapping[str, float],
        images: Mapping[str, Any] = (),
        classes: list[str] | None = None,
        recall: list[float | None] | None = None,
    ) -> list[Finding]:
        """Everything an epoch writes: histograms, `scalars` ({tag: number}), `images` ({tag: PIL image, (H, W, 3)
        uint8 array or matplotlib figure}), the gradient flow and the diagnosis; with `classes` (names) and
        `recall` (per class) the output-layer bias is checked too. Returns the findings not reported before."""
        if self.model is None:
            raise RuntimeError("call watch(model) before epoch_end()")
        self.log_parameters(self._parameters, epoch)
        self._log(_scalar_values(scalars), epoch)
        flow = gradient_flow_image(*gradient_flow(self._parameters), epoch)
        for tag, image in {**dict(images), "gradient_flow": flow}.items():
            self._add_image(tag, image, epoch)

        records = self._records or [parameter_statistics(self._parameters)]
        self._records = []
        self._history.append(summarize_epoch(epoch, self.steps, records))
        findings = diagnose(self._history, self.thresholds)
        if classes is not None:
            bias = _output_bias(self._parameters, len(classes))
            findings += output_bias_skew(self._history[-1], bias, classes, recall, self.thresholds)
        self.findings += findings
        if self.is_writer:
            self.writer.add_text("diagnosis", "\n\n".join(f"- {f}" for f in findings) or "No findings.", epoch)
            with open(os.path.join(self.log_dir, "diagnosis.json"), "w") as fh:
                json.dump([f.to_json() for f in self.findings], fh, indent=2)
            flow.save(os.path.join(self.log_dir, "gradient_flow.png"))
        new = [f for f in findings if f.key not in self._reported]
        self._reported.update(f.key for f in new)
        return new

    def _add_image(self, tag: str, image: Any, step: int) -> None:
        if not self.is_writer:
            return
        if hasattr(image, "savefig"):  # a matplotlib figure
            self.writer.add_figure(tag, image, step, close=False)
            return
        array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
        self.writer.add_image(tag, array, step, dataformats="HWC")

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to diagnose as if it had never stopped: the epoch summaries the rules compare
        against, the statistics of an unfinished epoch, the findings so far and the step counts. Plain Python
        values, so that it can go into a checkpoint loaded with torch.load(weights_only=True)."""
        history, records, findings = list(self._history), list(self._records), [f.to_json() for f in self.findings]
        return dict(
            steps=self.steps, skipped_steps=self.skipped_steps, history=history, records=records, findings=findings
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> TrainingMonitor:
        """Continue from a state_dict() saved with a checkpoint (call before the first step() of the resumed run)."""
        missing = STATE_KEYS - set(state)
        if missing:
            raise ValueError(f"not a TrainingMonitor state: it lacks {', '.join(sorted(missing))}")
        self.steps, self.skipped_steps = state["steps"], state["skipped_steps"]
        self._history, self._records = list(state["history"]), list(state["records"])
        self.findings = [Finding(**item) for item in state["findings"]]
        self._reported = {f.key for f in self.findings}
        return self

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float], epoch: int) -> None:
        """The run's settings and final metrics in TensorBoard's HParams tab, at the last epoch's step (so that a
        run resumed to train further replaces them)."""
        if self.is_writer:
            hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
            self.writer.add_hparams(hparams, dict(metrics), name=".", global_step=epoch)

    def flush(self) -> None:
        for writer in (self.writer, self._step_writer):
            if writer is not None:
                writer.flush()

    def close(self) -> None:
        """Remove the hooks and close the event files; safe to call twice."""
        self.unwatch()
        for writer in (self.writer, self._step_writer):
            if writer is not None:
                writer.close()

    def __enter__(self) -> TrainingMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _output_bias(parameters: NamedParameters, num_classes: int) -> tuple[str | None, list[float] | None]:
    """(name, values) of the last bias with one value per class: the output layer's, for the bias-skew rule."""
    for name, param in reversed(parameters):
        if name.endswith("bias") and param.numel() == num_classes:
            return name, param.detach().float().cpu().tolist()
    return None, None
