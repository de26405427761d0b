"""TrainingMonitor: everything TensorBoard shows about a model while it trains, from three calls in
a loop.

The monitor is a façade over parts with one job each: the event sink (sink.py; a null sink on ranks
that do not write) and its guard, the hooks (hooks.py), the statistics cadence and the per-step
accumulators of the loss and the clipping norms (steps.py), and what the rules remember
(diagnosis.RunDiagnosis). Its state_dict() is the union of theirs.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch

from .diagnosis import METRIC_TAGS, Finding, RunDiagnosis, Thresholds, saved_findings, story
from .histograms import DEFAULT_BINS, Histogram, compute_histograms
from .hooks import Hooks, is_compiled
from .loop import loop_facts
from .pictures import gradient_flow_image
from .shards import is_sharded
from .sink import EventSink, Guard, NullSink
from .stats import (
    NamedParameters,
    gradient_flow,
    learning_rate,
    named_parameters,
    parameter_statistics,
    parameter_tensors,
)
from .steps import MIN_WINDOW_STEPS, Cadence, ClippingNorms, LossWindows, check_count
from .summary import SUMMARIES, EpochSummary, summarize

# the parts that each own some keys of state_dict() (the sink: where each step axis stands)
STATE_PARTS = ("losses", "clipping", "cadence", "diagnosis", "sink")
STATE_KEYS = {"steps", "skipped_steps", "history", "records", "findings"}  # what a state must hold
MAX_RECORDS = 32  # statistics records an epoch keeps for its summary; beyond, the older ones thin


def is_main_process() -> bool:
    """False only in a torch.distributed process other than rank 0: the one process that prints and
    writes."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0


def measurable(parameters: NamedParameters) -> tuple[NamedParameters, list[str]]:
    """The parameters whose values can be measured (floating point, on a device that holds values),
    and the others, named with their dtype: "codes (torch.int8)"."""
    kept = []
    skipped = []
    for name, param in parameters:
        meta = param.device.type == "meta"
        if param.is_floating_point() and not meta:
            kept.append((name, param))
        else:
            skipped.append(f"{name} ({param.dtype}{', on the meta device' if meta else ''})")
    return kept, skipped


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module that holds the parameters under their own names, inside DistributedDataParallel,
    DataParallel or torch.compile wrappers (whose names would otherwise begin with `module.` or
    `_orig_mod.`)."""
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


def _patterns(patterns: Sequence[str], name: str) -> tuple[str, ...]:
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"{name} must be a list of glob patterns such as ['layer4.*'], got {patterns!r}"
        )
    return tuple(patterns)


class HistogramChoice:
    """Which parameters get histograms, in how many buckets, and in which TensorBoard section."""

    def __init__(self, bins: int, include: Sequence[str], exclude: Sequence[str], group_depth: int):
        self.bins = check_count("bins", bins, 1)
        self.include = _patterns(include, "include")
        self.exclude = _patterns(exclude, "exclude")
        self.group_depth = check_count("group_depth", group_depth, 0)

    def wants(self, name: str) -> bool:
        """Whether parameter `name` matches a pattern of `include` and none of `exclude`."""
        included = any(fnmatch.fnmatchcase(name, pattern) for pattern in self.include)
        return included and not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude)

    def compute(self, model: torch.nn.Module | NamedParameters) -> dict[str, Histogram]:
        """The `<name>_data` and `<name>_grad` histograms of the wanted parameters, by tag."""
        wanted = [(name, p) for name, p in named_parameters(model) if self.wants(name)]
        histograms = compute_histograms(parameter_tensors(wanted), self.bins)
        if not self.group_depth:
            return histograms
        return {f"{self._section(tag)}/{tag}": h for tag, h in histograms.items()}

    def _section(self, tag: str) -> str:
        # "layer4.2.conv3.weight_grad": "layer4.2.conv3"
        module = tag.rsplit(".", 1)[0] if "." in tag else tag
        return ".".join(module.split(".")[: self.group_depth])


def _numbers(values: Mapping[str, Any], guard: Guard) -> dict[str, float]:
    """The values that are one number each, as floats; any other is left out with one line from
    `guard` (once per tag), and the rest are kept."""
    kept = {}
    for tag, value in dict(values).items():
        with guard(f"the scalar {tag}"):
            kept[tag] = _number(value)
    return kept


def _number(value: Any) -> float:
    """`value` as one float (a number, or a tensor or array of one element); else ValueError."""
    if not isinstance(value, (str, bytes)):  # float("1.5") would read a string as a number
        with contextlib.suppress(TypeError, ValueError, RuntimeError):
            return float(value)
    what = f"{value!r:.40} ({type(value).__name__})"
    raise ValueError(f"{what} is not one number; left out, the other scalars kept")


def statistics_scalars(stats: Mapping[str, dict]) -> dict[str, float]:
    """A statistics record as scalars: `<key>/<parameter>`, `dead_share/<module>` for a ReLU's,
    `saturated_share/<module>` for a sigmoid's or tanh's; the non-finite values left out (the
    share of them is nonfinite_share). Beside them the extremes over the layers, which the Custom
    Scalars tab charts: `update_ratio/max` and `/min`, `dead_share/max`."""
    scalars = {}
    for name, values in stats.items():
        if name not in ("activations", "loop"):
            scalars.update((f"{key}/{name}", value) for key, value in values.items())
    for name, a in stats["activations"].items():
        scalars[f"{'dead_share' if a['kind'] == 'relu' else 'saturated_share'}/{name}"] = a["share"]
    scalars = {tag: value for tag, value in scalars.items() if math.isfinite(value)}
    for kind, extremes in (("update_ratio", (max, min)), ("dead_share", (max,))):
        values = [v for tag, v in scalars.items() if tag.startswith(f"{kind}/")]
        scalars.update((f"{kind}/{pick.__name__}", pick(values)) for pick in extremes if values)
    return scalars


def window_due(cadence: Cadence, diagnosis: RunDiagnosis, step: int, urgent: list[Finding]) -> bool:
    """Whether a loop without epochs (none summarised yet) is diagnosed at `step`: every
    `diagnose_every` readings and MIN_WINDOW_STEPS steps, and at once when a reading holds an
    urgent finding not found yet."""
    if not cadence.diagnose_every or diagnosis.has_epochs:
        return False
    known = {finding.key for finding in diagnosis.findings}
    if any(finding.key not in known for finding in urgent):
        return True
    since = diagnosis.history[-1].step if diagnosis.history else cadence.epoch_start
    long = step - since >= MIN_WINDOW_STEPS
    return long and diagnosis.readings() >= cadence.diagnose_every


def _metrics(scalars: Mapping[str, float]) -> dict[str, float]:
    """The training and validation loss and accuracy among an epoch's scalars, under METRIC_TAGS."""
    return {
        key: float(scalars[tag])
        for key, tags in METRIC_TAGS.items()
        for tag in tags[::-1]
        if tag in scalars
    }


def output_bias(
    parameters: NamedParameters, classes: list[str], recall: list[float | None] | None
) -> dict[str, Any]:
    """The last bias with one value per class (the output layer's), for the output_bias_skew rule:
    {"name", "values", "classes", "recall"}; {} if there is none."""
    for name, param in reversed(parameters):
        if name.endswith("bias") and param.numel() == len(classes):
            whole = param.full_tensor() if is_sharded(param) else param  # gathered from every rank
            values = whole.detach().float().cpu().tolist()
            return {"name": name, "values": values, "classes": list(classes), "recall": recall}
    return {}


class TrainingMonitor:
    """Watches a model while it trains and writes what TensorBoard shows about it.

    Three calls in a training loop:

        monitor = TrainingMonitor("Result/run").watch(model, optimizer)
        ...  loss.backward(); optimizer.step()  # scaler.step(optimizer) under AMP: it unscales
        monitor.step(loss)                      # once per optimizer step, before zero_grad()
        ...
        findings = monitor.epoch_end(epoch, {"valid/accuracy": acc}, classes=names, recall=recall)
        print(monitor.story())                  # at the end: what went wrong, and what to try

    Every `stats_every` optimizer steps it logs per-layer statistics, the training loss and the
    activations of ReLU, sigmoid and tanh modules (see steps.Cadence for the default); every
    `hist_every` steps, histograms; at each epoch's end the tutorial's `<name>_data` / `<name>_grad`
    histograms, the gradient-flow image, the scalars and images it is given, and the diagnosis
    (diagnosis.json, the Text tab, and the findings that began, which it returns). Nothing it does
    can end the training run: a failure inside it is reported once and training goes on (`guard`).

    Epochs and optimizer steps are two step axes, each in its own event folder (`log_dir` and
    `log_dir/steps`). A resumed run loads its state_dict() before the first step(), and rewrites on
    each axis exactly what comes after it. Under torch.distributed only rank 0 writes. Sharded
    parameters (DTensor: FSDP2, tensor parallel) are measured whole, each rank reading its shards:
    then every rank must make the same calls.

    `include` and `exclude` are glob patterns over parameter names (`layer4.*`, `*.bias`) that
    choose which parameters get histograms, and `group_depth` puts them in one TensorBoard section
    per module (see log_parameters); the statistics and the diagnosis always cover every parameter.
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
        diagnose_every: int | None = None,
    ):
        self.choice = HistogramChoice(bins, include, exclude, group_depth)
        start_step = check_count("start_step", start_step, 0)
        self.cadence = Cadence(stats_every, hist_every, start_step, diagnose_every)
        self.diagnosis = RunDiagnosis(thresholds)
        self.log_dir = os.fspath(log_dir)
        self.is_writer = is_main_process()
        if self.is_writer:
            self.sink = EventSink(self.log_dir, flush_secs, purge_epoch, purge_step)
        else:
            self.sink = NullSink()
        self.guard = Guard(self.sink, self.log_dir)
        self.hooks = Hooks(self.guard)
        self.losses = LossWindows()
        self.clipping = ClippingNorms()
        path = os.path.join(self.log_dir, "diagnosis.json")
        self.diagnosis.findings = saved_findings(path, purge_epoch)  # where a resume begins again
        self.steps = start_step
        self.skipped_steps = 0
        self.model: torch.nn.Module | None = None
        self._parameters: NamedParameters = []
        self._parameters_logged: int | None = None  # the epoch whose histograms are written

    @property
    def findings(self) -> list[Finding]:
        """The run's findings so far, in the order they began."""
        return self.diagnosis.findings

    @property
    def stats_every(self) -> int:
        """Optimizer steps between two statistics logs (0: once per epoch); see steps.Cadence."""
        return self.cadence.stats_every

    def watch(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        compiled: bool | None = None,
    ) -> TrainingMonitor:
        """Attach to `model` as its parameters are now (watch again after changing its layers); with
        `optimizer`, also measure each logged step's update-to-weight ratio and count the steps
        GradScaler skips. A model wrapped by DistributedDataParallel or torch.compile, and an
        optimizer wrapped by Lightning or Accelerate, are watched through what they wrap. `compiled`
        says whether the model runs through torch.compile where watch() cannot see it (a wrapper it
        is not given); by default, whether `model` holds a compiled module."""
        inner = getattr(optimizer, "optimizer", None)  # Lightning's and Accelerate's wrappers
        optimizer = inner if isinstance(inner, torch.optim.Optimizer) else optimizer
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"watch() needs a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        # A compiled graph keeps the hooks it was traced with: activation hooks there stay for good.
        compiled = is_compiled(model) if compiled is None else compiled
        self.model = unwrap(model)
        self._parameters, skipped = measurable(list(self.model.named_parameters()))
        if skipped and is_main_process():
            line = f"gradwatch: not measured: {', '.join(skipped)}, since statistics and "
            line += f"histograms need floating-point values; the other {len(self._parameters)} "
            print(line + "parameters are", file=sys.stderr)
        self.hooks.attach(self.model, optimizer, compiled)
        if self.cadence.stats_due(self.steps, ahead=1):
            self.hooks.prepare(self._parameters)
        return self

    def unwatch(self) -> None:
        """Remove every hook this monitor placed; safe to call twice."""
        self.hooks.remove()

    def step(
        self,
        loss: torch.Tensor | float | None = None,
        grad_norm: torch.Tensor | float | None = None,
        max_norm: float | None = None,
    ) -> list[Finding]:
        """Call once per optimizer step, after it and before zero_grad(), with the step's training
        loss if you can: it stays on its device until the next statistics log. Returns the step's
        urgent findings (non-finite gradients) when statistics were taken, else an empty list.

        With gradient clipping, pass the total norm that clip_grad_norm_ returned (the norm before
        clipping) as `grad_norm` and its `max_norm`: the monitor logs the norm and whether the step
        was clipped (scalars clip/*), each epoch the share of clipped steps, and the diagnosis reads
        them.

        With the optimizer watched, a step GradScaler skipped (its scaled gradients overflowed) is
        counted (scalar amp/skipped_steps) and not examined: its gradients are infinite by design.
        """
        if self.model is None:
            raise RuntimeError("call watch(model) before step()")
        if (grad_norm is None) != (max_norm is None):
            raise ValueError(
                "pass grad_norm and max_norm together: the norm before clipping and the threshold"
            )
        self.sink.open()
        self.steps += 1
        if loss is not None:
            self.losses.add(self.steps, loss)
        skipped = self.hooks.skipped()
        if grad_norm is not None and not skipped:
            self.clipping.add(grad_norm, max_norm)
        urgent = []
        cadence = self.cadence
        if skipped or cadence.stats_due(self.steps) or cadence.hist_due(self.steps):  # seldom
            with self.guard("the step's statistics"):
                urgent = self._take_statistics(skipped)
        if cadence.stats_due(self.steps, ahead=1):
            self.hooks.prepare(self._parameters)
        return urgent

    def _take_statistics(self, skipped: bool) -> list[Finding]:
        """What a step logs when statistics or histograms are due; returns its urgent findings."""
        if skipped:
            self.skipped_steps += 1
            self.hooks.take_weights()  # of no use: the weights did not change
            self.sink.scalars({"amp/skipped_steps": self.skipped_steps}, self.steps, per_step=True)
            return []
        if self.cadence.hist_due(self.steps):
            self.log_parameters(self._parameters, self.steps, per_step=True)
        if not self.cadence.stats_due(self.steps):
            return []
        stats = parameter_statistics(self._parameters, self.hooks.take_weights())
        stats["activations"] = self.hooks.collect()
        scalars = {**self.losses.take(), **self.clipping.take()}
        stats["loop"] = loop_facts(self.model, self._parameters, self.hooks.optimizer)
        stats["loop"].update(self.hooks.take_loop(), step=self.steps)
        stats["loop"]["loss"] = self.losses.latest(self.steps)
        self.diagnosis.keep(stats, max(MAX_RECORDS, 2 * self.cadence.diagnose_every))
        self.sink.scalars({**scalars, **statistics_scalars(stats)}, self.steps, per_step=True)
        urgent = self.diagnosis.urgent(self.steps, stats, self.losses.windows, self.losses.first)
        if window_due(self.cadence, self.diagnosis, self.steps, urgent):
            self._diagnose(self._summary(self.diagnosis.next_epoch(), "steps"))
        return [f for f in urgent if f.rule == "nonfinite_gradients"]

    def log_parameters(
        self, model: torch.nn.Module | NamedParameters, step: int, per_step: bool = False
    ) -> dict[str, Histogram]:
        """Log the `<name>_data` and `<name>_grad` histograms of `model` (a Module, or its
        named_parameters() as a list) at `step`: an epoch, or an optimizer step if per_step. Returns
        them. With `group_depth` k, each tag is prefixed by the first k parts of its module's name,
        which TensorBoard takes as the tag's section: `layer4/layer4.2.conv3.weight_grad` at k = 1.
        """
        histograms = self.choice.compute(model)
        self.log_histograms(histograms, step, per_step)
        return histograms

    def log_histograms(
        self, histograms: Mapping[str, Histogram], step: int, per_step: bool = False
    ) -> None:
        """Write {tag: Histogram} at `step`, with the count of each tensor's non-finite values as
        `nonfinite/<tag>` where it has some; a tensor without finite values has that count alone."""
        self.sink.histograms(histograms, step, per_step)

    def epoch_end(
        self,
        epoch: int,
        scalars: Mapping[str, float],
        images: Mapping[str, Any] = (),
        classes: list[str] | None = None,
        recall: list[float | None] | None = None,
        metrics: Mapping[str, float] = (),
    ) -> list[Finding]:
        """Everything an epoch writes: histograms, `scalars` ({tag: number}), `images` ({tag: PIL
        image, (H, W, 3) uint8 array or matplotlib figure}), the gradient flow and the diagnosis;
        with `classes` (names) and `recall` (per class) the output-layer bias is checked too.
        `metrics` ({tag: number}) are read by the diagnosis like `scalars` but not written: for
        values another logger writes already. Returns the findings not reported before."""
        if self.model is None:
            raise RuntimeError("call watch(model) before epoch_end()")
        if self._parameters_logged != epoch:
            self.log_epoch_parameters(epoch)
        scalars = _numbers(scalars, self.guard)
        metrics = _numbers(metrics, self.guard)
        with self.guard("writing the scalars"):
            self.sink.scalars(scalars, epoch)
        for tag, image in dict(images).items():
            with self.guard(f"the image {tag}"):
                self.sink.image(tag, image, epoch)
        bias = {}
        with self.guard("the output_bias_skew rule"):
            bias = output_bias(self._parameters, classes, recall) if classes is not None else {}
        summary = None
        with self.guard("the epoch's statistics"):
            metrics = _metrics({**dict(metrics), **scalars})
            summary = self._summary(epoch, "epoch", metrics, len(classes or ()), bias)
        self._restart(epoch_ended=True)
        return self._diagnose(summary) if summary is not None else []

    def _summary(
        self,
        epoch: int,
        unit: str,
        metrics: Mapping[str, float] = (),
        num_classes: int = 0,
        bias: Mapping = (),
    ) -> EpochSummary:
        """The epoch (or the window of steps since the last, unit "steps") that ends now,
        summarised for the rules, after logging its last loss window and, for an epoch, its clipping
        share."""
        self.sink.scalars({**self.losses.take(), **self.clipping.take()}, self.steps, per_step=True)
        history = self.diagnosis.history
        since = history[-1].step if unit == "steps" and history else -1
        records = [r for r in self.diagnosis.records if r.get("loop", {}).get("step", 0) > since]
        if not records:  # statistics once per epoch (stats_every=0), or an epoch without steps
            records = [
                {**parameter_statistics(self._parameters), "activations": self.hooks.collect()}
            ]
        clipping = self.clipping.summary(window=unit == "steps")
        if clipping and unit == "epoch":
            self.sink.scalars({"clip/clipped_share": clipping["clipped_share"]}, epoch)
        losses = [w for w in self.losses.windows if w["step"] > since]
        context = dict(losses=losses, first_loss=self.losses.first, clipping=clipping)
        context.update(metrics=dict(metrics), num_classes=num_classes, output_bias=dict(bias))
        context.update(lr=learning_rate(self.hooks.optimizer), unit=unit)
        return summarize(epoch, self.steps, records, **context)

    def _diagnose(self, summary: EpochSummary) -> list[Finding]:
        """Every rule on the history with `summary` added; the diagnosis written (diagnosis.json,
        the Text tab, the summary for `diagnose`). Returns the findings that began, which a window
        of steps also prints, since a loop without epochs has no epoch_end to return them."""
        windowed = summary.unit == "steps"
        if windowed:
            self._restart(epoch_ended=False)
        begun = self.diagnosis.add(summary, self.guard)
        with self.guard("writing the diagnosis"):
            listed = "\n\n".join(f"- {f}" for f in self.findings)
            step = self.steps if windowed else summary.epoch
            self.sink.text("diagnosis", listed or "No findings.", step, per_step=windowed)
            self.sink.save_json("diagnosis.json", [f.to_json() for f in self.findings])
            thresholds = asdict(self.diagnosis.thresholds)
            self.sink.append_line(
                SUMMARIES, {"summary": summary.to_dict(), "thresholds": thresholds}
            )
        for finding in begun if windowed and self.is_writer else ():
            print(f"gradwatch found {finding}", file=sys.stderr)
        return begun

    def _restart(self, epoch_ended: bool) -> None:
        """The next window of steps counts silent units and clipped steps afresh; the next epoch
        also starts with no records and loss windows (in a loop without epochs they thin out as
        they grow), and after the first one, the default cadence takes its length."""
        self.hooks.end_epoch()
        self.clipping.end_window()
        if not epoch_ended:
            return
        self.diagnosis.records = []
        self.clipping.end_epoch()
        self.losses.end_epoch()
        if self.cadence.epoch_ended(self.steps):
            self.hooks.take_weights()  # prepared for the old cadence
            if self.cadence.stats_due(self.steps, ahead=1):
                self.hooks.prepare(self._parameters)

    def log_epoch_parameters(self, epoch: int) -> None:
        """The part of epoch_end() that reads the gradients: the histograms and the gradient-flow
        picture. For loops that clear the gradients before the epoch ends (Lightning does, before
        validation): call it after the epoch's last optimizer step, and epoch_end() will not log
        them again."""
        self._parameters_logged = epoch
        with self.guard("the histograms"):
            self.log_parameters(self._parameters, epoch)
        with self.guard("the gradient-flow picture"):
            flow = gradient_flow_image(*gradient_flow(self._parameters), epoch)
            self.sink.image("gradient_flow", flow, epoch)
            self.sink.save_image("gradient_flow.png", flow)

    def story(self) -> str:
        """The diagnosis as a story: each problem in the order it began, what followed from it, and
        what to try."""
        return story(self.findings)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to diagnose as if it had never stopped: the epoch summaries the
        rules compare against, the statistics and losses of an unfinished epoch, the findings so
        far, the step counts and the cadence. Plain Python values, so that it can go into a
        checkpoint loaded with torch.load(weights_only=True)."""
        self.sink.scalars({**self.losses.take(), **self.clipping.take()}, self.steps, per_step=True)
        state = {"steps": self.steps, "skipped_steps": self.skipped_steps}
        for part in STATE_PARTS:
            state.update(getattr(self, part).state_dict())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> TrainingMonitor:
        """Continue from a state_dict() saved with a checkpoint; call it before the first step() of
        the resumed run. The step count goes on from the saved one, and each step axis is rewritten
        from just after it: the epoch after the last one written, the step after the saved one."""
        missing = STATE_KEYS - set(state)
        if missing:
            raise ValueError(f"not a TrainingMonitor state: it lacks {', '.join(sorted(missing))}")
        self.steps = state["steps"]
        self.skipped_steps = state["skipped_steps"]
        for part in STATE_PARTS:
            getattr(self, part).load_state_dict(state)
        if self.model is not None and self.cadence.stats_due(self.steps, ahead=1):
            self.hooks.prepare(self._parameters)
        return self

    def log_hparams(
        self, hparams: Mapping[str, Any], metrics: Mapping[str, float], epoch: int
    ) -> None:
        """The run's settings and final metrics in TensorBoard's HParams tab, at the last epoch's
        step (so that a run resumed to train further replaces them)."""
        hparams = {
            k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()
        }
        self.sink.hparams(hparams, metrics, epoch)

    def flush(self) -> None:
        """Write the queued events to disk (before a checkpoint, so that a kill after it loses none
        of the steps it covers); a failure is reported and training goes on."""
        with self.guard("flushing the event files"):
            self.sink.flush()

    def close(self) -> None:
        """Diagnose the last window of steps of a loop without epochs (the readings since the last
        window); remove the hooks and close the event files. Safe to call twice."""
        if self.cadence.diagnose_every and self.diagnosis.readings():
            with self.guard("the last window's diagnosis"):
                self._diagnose(self._summary(self.diagnosis.next_epoch(), "steps"))
        self.unwatch()
        self.sink.close()

    def __enter__(self) -> TrainingMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
