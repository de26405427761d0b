"""TrainingMonitor: everything TensorBoard shows about a model while it trains, from three calls in a loop."""

from __future__ import annotations

import fnmatch
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from PIL import Image
from tensorboardX import SummaryWriter
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.summary import histogram_raw

from .diagnosis import METRIC_TAGS, RULES, Finding, Thresholds, nonfinite_values, output_bias_skew, record, story
from .histograms import DEFAULT_BINS, Histogram, compute_histograms, to_host
from .pictures import gradient_flow_image
from .shards import is_sharded, local
from .stats import (
    NamedParameters,
    gradient_flow,
    named_parameters,
    parameter_statistics,
    parameter_tensors,
    summarize_epoch,
)

# The default statistics cadence: every 50 steps, stretched after the first epoch to 16 readings an epoch when
# that is sparser, up to 1,000 steps apart
STATS_EVERY, READINGS_PER_EPOCH, MAX_STATS_EVERY = 50, 16, 1000
STATE_KEYS = {"steps", "skipped_steps", "history", "records", "findings"}
ACTIVATIONS = {torch.nn.ReLU: "relu", torch.nn.ReLU6: "relu", torch.nn.Sigmoid: "sigmoid", torch.nn.Tanh: "tanh"}


def is_main_process() -> bool:
    """False only in a torch.distributed process other than rank 0: the one process that prints and writes."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module that holds the parameters under their own names, inside DistributedDataParallel, DataParallel
    or torch.compile wrappers (whose names would otherwise begin with `module.` or `_orig_mod.`)."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        else:
            return model


def numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The single numbers among logged metrics (floats, ints, one-element tensors), as floats."""
    found = {}
    for tag, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            found[tag] = float(value)
    return found


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
        monitor.step(loss)                           # once per optimizer step, before zero_grad()
        ...
        findings = monitor.epoch_end(epoch, {"valid/accuracy": acc}, classes=names, recall=recall)
        print(monitor.story())                       # at the end: what went wrong, in the order it began

    Every `stats_every` optimizer steps it logs per-layer statistics, the training loss and the activations of
    ReLU, sigmoid and tanh modules (by default every 50 steps; after the first epoch, 16 times an epoch if that
    is sparser, at most 1,000 steps apart, so that on long epochs what they cost is a fixed share of an epoch);
    every `hist_every` steps, histograms; at each epoch's end the tutorial's
    `<name>_data` / `<name>_grad` histograms, the gradient-flow image, the scalars and images it is given, and
    the diagnosis (diagnosis.json, the Text tab, and the findings that began, which it returns). Nothing it does
    can end the training run: a failure inside it is reported once and training goes on.

    Epochs and optimizer steps are two step axes, so each gets its own event folder: a tag keeps one axis,
    and a resumed run purges exactly what it rewrites on each (epochs in `log_dir`, optimizer steps in
    `log_dir/steps`). Under torch.distributed only rank 0 writes. Sharded parameters (DTensor: FSDP2, tensor
    parallel) are measured whole, each rank reading its shards: then every rank must make the same calls.

    `include` and `exclude` are glob patterns over parameter names (`layer4.*`, `*.bias`) that choose which
    parameters get histograms, and `group_depth` puts them in one TensorBoard section per module (see
    log_parameters), so that a model of hundreds of layers stays readable; the statistics and the diagnosis
    always cover every parameter.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike,
        bins: int = DEFAULT_BINS,
        stats_every: int | None = None,
        hist_every: int = 0,
        thresholds: Thresholds | None = None,
        purge_epoch: int | None = None,
        purge_step: int | None = None,
        start_step: int = 0,
        flush_secs: int = 30,
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        group_depth: int = 0,
    ):
        self._auto_stats = stats_every is None  # STATS_EVERY, then set from the first epoch's length
        stats_every = STATS_EVERY if stats_every is None else stats_every
        counts = dict(bins=(bins, 1), stats_every=(stats_every, 0), hist_every=(hist_every, 0))
        counts.update(start_step=(start_step, 0), group_depth=(group_depth, 0))
        for name, (value, low) in counts.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if thresholds is not None and not isinstance(thresholds, Thresholds):
            raise TypeError(f"thresholds must be a gradwatch.Thresholds, got {type(thresholds).__name__}")
        self.log_dir = os.fspath(log_dir)
        self.bins, self.stats_every, self.hist_every = bins, stats_every, hist_every
        self.thresholds = thresholds or Thresholds()
        self.include, self.exclude = _patterns(include, "include"), _patterns(exclude, "exclude")
        self.group_depth = group_depth
        self.steps, self.skipped_steps = start_step, 0
        self._epoch_start = start_step  # the step the first epoch began at, while the default cadence waits on it
        self.model: torch.nn.Module | None = None
        self._parameters: NamedParameters = []
        self._hooks: dict[str, Any] = {}
        self._stepped = False
        self._before_update: dict[str, torch.Tensor] | None = None
        self._records: list[dict] = []  # statistics of the epoch so far
        self._history: list[dict] = []  # one summary per finished epoch
        self._losses: list[tuple[int, torch.Tensor]] = []  # (step, loss) since the last statistics log
        self._windows: list[dict] = []  # the epoch's training loss, one window per statistics log
        self._first_loss: float | None = None
        self._norms: list[tuple[torch.Tensor, float]] = []  # (total norm before clipping, max_norm) since the last log
        self._clip_norms: list[float] = []  # the epoch's finite norms before clipping, and
        self._max_norm: float | None = None  # the latest clipping threshold
        self._activations: list[tuple] = []  # (name, module, kind, the layer feeding it)
        self._activation_values: dict[str, tuple] = {}
        self._hooks_stay = False
        self._optimizer: torch.optim.Optimizer | None = None
        self._failed: set[str] = set()
        self._parameters_logged: int | None = None  # the epoch whose histograms are written
        self.findings = self._load_findings(purge_epoch)
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
            findings = [Finding.from_json(item) for item in json.load(fh) if item["epoch"] < purge_epoch]
        for finding in findings:
            finding.last_epoch = min(finding.last_epoch, purge_epoch - 1)
        return findings

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Nothing the monitor does may end the user's run: a failure is reported once, in one line, its traceback
        goes to <log_dir>/gradwatch-errors.log, and training goes on."""
        try:
            yield
        except Exception as err:
            path = os.path.join(self.log_dir, "gradwatch-errors.log")
            if what not in self._failed:
                self._failed.add(what)
                print(
                    f"gradwatch: {what} failed ({type(err).__name__}: {err}); training goes on; see {path}",
                    file=sys.stderr,
                )
            if self.is_writer:
                with open(path, "a") as fh:
                    traceback.print_exc(file=fh)

    def _writer(self, per_step: bool) -> SummaryWriter:
        if per_step and self._step_writer is None:
            self._step_writer = SummaryWriter(os.path.join(self.log_dir, "steps"), **self._step_writer_options)
        return self._step_writer if per_step else self.writer

    def _log(self, values: list[Summary.Value], step: int, per_step: bool = False) -> None:
        """All values of one log as one event: each event passes tensorboardX's queue on its own, which costs more
        than building it (README: Measured)."""
        if self.is_writer and values:
            self._writer(per_step).file_writer.add_summary(Summary(value=values), step)

    def watch(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, compiled: bool | None = None
    ) -> TrainingMonitor:
        """Attach to `model` as its parameters are now (watch again after changing its layers); with `optimizer`,
        also measure each logged step's update-to-weight ratio and count the steps GradScaler skips. A model
        wrapped by DistributedDataParallel or torch.compile, and an optimizer wrapped by Lightning or Accelerate,
        are watched through what they wrap. `compiled` says whether the model runs through torch.compile where
        watch() cannot see it (a wrapper it is not given); by default, whether `model` holds a compiled module."""
        inner = getattr(optimizer, "optimizer", None)  # Lightning's and Accelerate's wrappers
        optimizer = inner if isinstance(inner, torch.optim.Optimizer) else optimizer
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"watch() needs a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.unwatch()
        # A compiled graph keeps the hooks it was traced with: activation hooks there are placed once, for good.
        found = any(hasattr(m, "_orig_mod") or getattr(m, "_compiled_call_impl", None) for m in model.modules())
        self._hooks_stay = found if compiled is None else compiled
        model = unwrap(model)
        self.model, self._optimizer = model, optimizer
        self._parameters = list(model.named_parameters())
        self._activations, layer = [], None
        for name, module in model.named_modules():
            layer = name if any(True for _ in module.parameters(recurse=False)) else layer
            if type(module) in ACTIVATIONS:
                self._activations.append((name, module, ACTIVATIONS[type(module)], layer or name))
        if optimizer is not None:
            self._hooks["before_step"] = optimizer.register_step_pre_hook(self._before_step)
        if self._hooks_stay:
            self._arm()
        if self._due(self.stats_every, ahead=1):
            self._prepare_statistics()
        return self

    def _arm(self) -> None:
        """Forward hooks that measure the activations of the next training forward pass, removed after the next
        statistics log: they cost nothing on the other steps (but in a compiled model, which measures every step)."""
        if self._hooks_stay and any(key.startswith("activation ") for key in self._hooks):
            return
        for name, module, kind, layer in self._activations:

            def hook(module, inputs, output, name=name, kind=kind, layer=layer):
                if module.training and isinstance(output, torch.Tensor):
                    self._activation_values[name] = (kind, layer, _activation_share(kind, output.detach()))

            self._hooks[f"activation {name}"] = module.register_forward_hook(hook)

    def _disarm(self) -> dict[str, dict]:
        """The activations measured since the hooks were placed, as {name: {"kind", "layer", "share"}}; removes them."""
        for key in [key for key in self._hooks if key.startswith("activation ") and not self._hooks_stay]:
            self._hooks.pop(key).remove()
        values = dict(self._activation_values)
        self._activation_values.clear()  # the same dict: a compiled graph writes into it
        shares = to_host({name: share for name, (_, _, share) in values.items()})
        return {
            name: {"kind": kind, "layer": layer, "share": shares[name]} for name, (kind, layer, _) in values.items()
        }

    def _take_losses(self) -> dict[str, float]:
        """The training losses since the last call as a window of the epoch (one transfer); returns the scalar
        to log, {"loss": their mean}, or {} if none was finite."""
        if not self._losses:
            return {}
        steps, host = [s for s, _ in self._losses], to_host({i: loss for i, (_, loss) in enumerate(self._losses)})
        values, self._losses = [host[i] for i in range(len(steps))], []
        self._first_loss = values[0] if self._first_loss is None else self._first_loss
        finite = [(value, step) for value, step in zip(values, steps) if math.isfinite(value)]
        nonfinite = next((step for value, step in zip(values, steps) if not math.isfinite(value)), None)
        peak, peak_step = max(finite, default=(math.nan, None))
        mean = statistics.fmean(v for v, _ in finite) if finite else math.nan
        window = {"step": steps[-1], "mean": mean, "max": peak, "max_step": peak_step, "nonfinite_step": nonfinite}
        self._windows.append(window)
        return {"loss": mean} if finite else {}

    def _take_clipping(self) -> dict[str, float]:
        """The clipping scalars of the steps since the last call (one transfer): the total gradient norm before
        clipping at the latest step, whether that step was clipped, and the share of the steps that were."""
        if not self._norms:
            return {}
        host = to_host({i: norm for i, (norm, _) in enumerate(self._norms)})
        steps = [(host[i], max_norm) for i, (_, max_norm) in enumerate(self._norms)]
        self._norms, self._max_norm = [], steps[-1][1]
        finite = [(norm, max_norm) for norm, max_norm in steps if math.isfinite(norm)]
        if not finite:
            return {}
        self._clip_norms += [norm for norm, _ in finite]
        clipped = [_clipped(norm, max_norm) for norm, max_norm in finite]
        scalars = {"clip/grad_norm": finite[-1][0], "clip/clipped": float(clipped[-1])}
        return {**scalars, "clip/clipped_share": statistics.fmean(clipped)}

    def _clipping(self) -> dict[str, float]:
        """The epoch's clipping, for the diagnosis: its threshold, steps, the share clipped and the median and 90th
        percentile of the norms before clipping; {} without clipping."""
        norms = self._clip_norms
        if not norms:
            return {}
        share = statistics.fmean(_clipped(norm, self._max_norm) for norm in norms)
        summary = dict(max_norm=self._max_norm, steps=len(norms), clipped_share=share)
        return {
            **summary,
            "grad_norm_median": statistics.median(norms),
            "grad_norm_p90": float(np.percentile(norms, 90)),
        }

    def _log_losses(self) -> None:
        """Take the losses and clipping norms since the last statistics log (an epoch's end, a checkpoint) and log
        them."""
        self._log(_scalar_values({**self._take_losses(), **self._take_clipping()}), self.steps, per_step=True)

    def unwatch(self) -> None:
        """Remove every hook this monitor placed; safe to call twice."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self._before_update = None
        self._activation_values.clear()

    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        """Runs only when the optimizer steps (GradScaler skips the call when it finds inf): notes that it did."""
        self._stepped = True

    def step(
        self,
        loss: torch.Tensor | float | None = None,
        grad_norm: torch.Tensor | float | None = None,
        max_norm: float | None = None,
    ) -> list[Finding]:
        """Call once per optimizer step, after it and before zero_grad(), with the step's training loss if you can:
        it stays on its device until the next statistics log. Returns the step's urgent findings (non-finite
        gradients) when statistics were taken, else an empty list.

        With gradient clipping, pass the total norm that clip_grad_norm_ returned (the norm before clipping) as
        `grad_norm` and its `max_norm`: the monitor logs the norm and whether the step was clipped (scalars clip/*),
        each epoch the share of clipped steps, and the diagnosis reads them.

        With the optimizer watched, a step GradScaler skipped (its scaled gradients overflowed) is counted
        (scalar amp/skipped_steps) and not examined: its gradients are infinite by design."""
        if self.model is None:
            raise RuntimeError("call watch(model) before step()")
        if (grad_norm is None) != (max_norm is None):
            raise ValueError("pass grad_norm and max_norm together: the norm before clipping and the threshold")
        self.steps += 1
        if loss is not None:
            self._losses.append((self.steps, loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(loss)))
        skipped = "before_step" in self._hooks and not self._stepped
        self._stepped = False
        if grad_norm is not None and not skipped:
            norm = grad_norm.full_tensor() if is_sharded(grad_norm) else grad_norm  # replicated: no transfer
            self._norms.append((norm.detach() if isinstance(norm, torch.Tensor) else torch.tensor(norm), max_norm))
        urgent = []
        if skipped or self._due(self.stats_every) or (self.hist_every and self._due(self.hist_every)):  # seldom
            with self._guard("the step's statistics"):
                urgent = self._take_step(skipped)
        if self._due(self.stats_every, ahead=1):
            self._prepare_statistics()
        return urgent

    def _prepare_statistics(self) -> None:
        """Before a step whose statistics are due: hooks for its forward pass, and the weights before its update."""
        self._arm()
        with self._guard("copying the weights for the update ratio"), torch.no_grad():
            self._before_update = {name: local(p).clone() for name, p in self._parameters}

    def _due(self, every: int, ahead: int = 0) -> bool:
        return bool(every) and (self.steps + ahead) % every == 0

    def _take_step(self, skipped: bool) -> list[Finding]:
        if skipped:
            self.skipped_steps += 1
            self._before_update = None
            self._log(_scalar_values({"amp/skipped_steps": self.skipped_steps}), self.steps, per_step=True)
            return []
        if self._due(self.hist_every):
            self.log_parameters(self._parameters, self.steps, per_step=True)
        if not self._due(self.stats_every):
            return []
        stats = parameter_statistics(self._parameters, self._before_update)
        self._before_update = None
        stats["activations"] = self._disarm()
        self._records.append(stats)
        scalars = {**self._take_losses(), **self._take_clipping()}
        scalars.update((f"{key}/{name}", value) for name, values in stats.items() for key, value in values.items())
        for name, a in stats["activations"].items():
            scalars[f"{'dead_share' if a['kind'] == 'relu' else 'saturated_share'}/{name}"] = a["share"]
        finite = {tag: v for tag, v in scalars.items() if isinstance(v, float) and math.isfinite(v)}  # else: share
        self._log(_scalar_values(finite), self.steps, per_step=True)
        epoch = self._history[-1]["epoch"] + 1 if self._history else 0
        return nonfinite_values([{"epoch": epoch, "step": self.steps, "layers": stats}], self.thresholds)

    def log_parameters(
        self, model: torch.nn.Module | NamedParameters, step: int, per_step: bool = False
    ) -> dict[str, Histogram]:
        """Log the `<name>_data` and `<name>_grad` histograms of `model` (a Module, or its named_parameters() as a
        list) at `step`: an epoch, or an optimizer step if per_step. Returns them. With `group_depth` k, each tag
        is prefixed by the first k parts of its module's name, which TensorBoard takes as the tag's section:
        `layer4/layer4.2.conv3.weight_grad` at k = 1."""
        wanted = [(name, p) for name, p in named_parameters(model) if self.wants_histogram(name)]
        histograms = compute_histograms(parameter_tensors(wanted), self.bins)
        if self.group_depth:
            histograms = {f"{self._section(tag)}/{tag}": h for tag, h in histograms.items()}
        self.log_histograms(histograms, step, per_step)
        return histograms

    def _section(self, tag: str) -> str:
        module = tag.rsplit(".", 1)[0] if "." in tag else tag  # "layer4.2.conv3.weight_grad" -> "layer4.2.conv3"
        return ".".join(module.split(".")[: self.group_depth])

    def wants_histogram(self, name: str) -> bool:
        """Whether parameter `name` gets histograms: it matches a pattern of `include` and none of `exclude`."""
        included = any(fnmatch.fnmatchcase(name, pattern) for pattern in self.include)
        return included and not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude)

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
        metrics: Mapping[str, float] = (),
    ) -> list[Finding]:
        """Everything an epoch writes: histograms, `scalars` ({tag: number}), `images` ({tag: PIL image, (H, W, 3)
        uint8 array or matplotlib figure}), the gradient flow and the diagnosis; with `classes` (names) and
        `recall` (per class) the output-layer bias is checked too. `metrics` ({tag: number}) are read by the
        diagnosis like `scalars` but not written: for values another logger writes already. Returns the findings
        not reported before."""
        if self.model is None:
            raise RuntimeError("call watch(model) before epoch_end()")
        if self._parameters_logged != epoch:
            self.log_epoch_parameters(epoch)
        with self._guard("writing the scalars"):
            self._log(_scalar_values(scalars), epoch)
        for tag, image in dict(images).items():
            with self._guard(f"the image {tag}"):
                self._add_image(tag, image, epoch)
        with self._guard("the epoch's statistics"):
            self._log_losses()
            records = self._records or [{**parameter_statistics(self._parameters), "activations": self._disarm()}]
            lr = self._optimizer.param_groups[0]["lr"] if self._optimizer else None
            context = dict(losses=self._windows, first_loss=self._first_loss, lr=lr, clipping=self._clipping())
            context.update(metrics=_metrics({**dict(metrics), **scalars}))
            if context["clipping"]:
                self._log(_scalar_values({"clip/clipped_share": context["clipping"]["clipped_share"]}), epoch)
            self._history.append(summarize_epoch(epoch, self.steps, records, **context, num_classes=len(classes or ())))
        if self._auto_stats and self.steps > self._epoch_start:  # the first epoch's length is known now
            self._auto_stats, self._before_update = False, None
            per_epoch = (self.steps - self._epoch_start) // READINGS_PER_EPOCH
            self.stats_every = min(MAX_STATS_EVERY, max(STATS_EVERY, per_epoch))
            if self._due(self.stats_every, ahead=1):  # the next step is due under the new cadence
                self._prepare_statistics()
        self._records, self._windows, self._clip_norms = [], [], []
        findings = []
        summarised = bool(self._history) and self._history[-1]["epoch"] == epoch  # no summary, no rule
        for rule in RULES if summarised else ():
            with self._guard(f"the {rule.__name__} rule"):
                findings += rule(self._history, self.thresholds)
        if classes is not None and summarised:
            with self._guard("the output_bias_skew rule"):
                bias = _output_bias(self._parameters, len(classes))
                findings += output_bias_skew(self._history[-1], bias, classes, recall, self.thresholds)
        self.findings, begun = record(self.findings, findings, epoch)
        with self._guard("writing the diagnosis"):
            if self.is_writer:
                self.writer.add_text("diagnosis", "\n\n".join(f"- {f}" for f in self.findings) or "No findings.", epoch)
                with open(os.path.join(self.log_dir, "diagnosis.json"), "w") as fh:
                    json.dump([f.to_json() for f in self.findings], fh, indent=2)
        return begun

    def log_epoch_parameters(self, epoch: int) -> None:
        """The part of epoch_end() that reads the gradients: the histograms and the gradient-flow picture. For
        loops that clear the gradients before the epoch ends (Lightning does, before validation): call it after
        the epoch's last optimizer step, and epoch_end() will not log them again."""
        self._parameters_logged = epoch
        with self._guard("the histograms"):
            self.log_parameters(self._parameters, epoch)
        with self._guard("the gradient-flow picture"):
            flow = gradient_flow_image(*gradient_flow(self._parameters), epoch)
            self._add_image("gradient_flow", flow, epoch)
            if self.is_writer:
                flow.save(os.path.join(self.log_dir, "gradient_flow.png"))

    def story(self) -> str:
        """The diagnosis as a story: each problem in the order it began, what followed from it, and what to try."""
        return story(self.findings)

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
        against, the statistics and losses of an unfinished epoch, the findings so far and the step counts. Plain
        Python values, so that it can go into a checkpoint loaded with torch.load(weights_only=True)."""
        self._log_losses()
        state = dict(steps=self.steps, skipped_steps=self.skipped_steps, history=list(self._history))
        state.update(records=list(self._records), windows=list(self._windows), first_loss=self._first_loss)
        state.update(clip_norms=list(self._clip_norms), max_norm=self._max_norm)
        state.update(stats_every=self.stats_every, stats_auto=self._auto_stats, epoch_start=self._epoch_start)
        return {**state, "findings": [f.to_json() for f in self.findings]}

    def load_state_dict(self, state: Mapping[str, Any]) -> TrainingMonitor:
        """Continue from a state_dict() saved with a checkpoint (call before the first step() of the resumed run)."""
        missing = STATE_KEYS - set(state)
        if missing:
            raise ValueError(f"not a TrainingMonitor state: it lacks {', '.join(sorted(missing))}")
        self.steps, self.skipped_steps = state["steps"], state["skipped_steps"]
        self._history, self._records = list(state["history"]), list(state["records"])
        self._windows, self._first_loss = list(state.get("windows", [])), state.get("first_loss")
        self._clip_norms, self._max_norm = list(state.get("clip_norms", [])), state.get("max_norm")
        self.findings = [Finding.from_json(item) for item in state["findings"]]
        if self._auto_stats and "stats_every" in state:  # the default cadence goes on as it was; a given one wins
            self.stats_every, self._auto_stats = state["stats_every"], state["stats_auto"]
            self._epoch_start = state.get("epoch_start", self._epoch_start)
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


def _clipped(norm: float, max_norm: float) -> bool:
    """Whether clip_grad_norm_ scaled the gradients down (it multiplies them by max_norm / (norm + 1e-6))."""
    return norm + 1e-6 > max_norm


def _patterns(patterns: Sequence[str], name: str) -> tuple[str, ...]:
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{name} must be a list of glob patterns such as ['layer4.*'], got {patterns!r}")
    return tuple(patterns)


def _activation_share(kind: str, output: torch.Tensor) -> torch.Tensor:
    """For a ReLU, the share of its units (channels, or features) that gave no positive output for the whole batch;
    for a sigmoid or tanh, the share of its outputs within 1% of their limits."""
    if kind == "relu":
        unit = 1 if output.ndim in (2, 4, 5) else output.ndim - 1
        return (output.amax([d for d in range(output.ndim) if d != unit]) <= 0).float().mean()
    return ((output < 0.01) | (output > 0.99) if kind == "sigmoid" else output.abs() > 0.99).float().mean()


def _metrics(scalars: Mapping[str, float]) -> dict[str, float]:
    """The training and validation loss and accuracy among an epoch's scalars, under the tags of METRIC_TAGS."""
    return {key: float(scalars[tag]) for key, tags in METRIC_TAGS.items() for tag in tags[::-1] if tag in scalars}


def _output_bias(parameters: NamedParameters, num_classes: int) -> tuple[str | None, list[float] | None]:
    """(name, values) of the last bias with one value per class: the output layer's, for the bias-skew rule."""
    for name, param in reversed(parameters):
        if name.endswith("bias") and param.numel() == num_classes:
            whole = param.full_tensor() if is_sharded(param) else param  # gathered from every rank's shard
            return name, whole.detach().float().cpu().tolist()
    return None, None
