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
from numbers import Real
from typing import Any

import torch

from .diagnosis import (
    METRIC_TAGS,
    OBJECTIVES,
    Finding,
    RunDiagnosis,
    Thresholds,
    indented,
    saved_findings,
    story,
)
from .families import families, folded, folded_flow, joined, report
from .graph import loss_graph
from .histograms import DEFAULT_BINS, Histogram, compute_histograms
from .hooks import Hooks, is_compiled
from .loop import decayed_norm, loop_facts, model_facts, not_updated, rounded_away
from .parts import Parts, checked_parts
from .pictures import gradient_flow_image
from .replicas import Replicas, data_parallel_group
from .shards import is_sharded
from .sink import EventSink, Guard, NullSink
from .states import items_problem, state_problem
from .stats import (
    NamedParameters,
    collector_paused,
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
# the lists of dicts a state holds: the keys their items must hold, and an item like theirs
STATE_LISTS = {
    "history": (("epoch", "step"), EpochSummary(epoch=0, step=0).to_dict()),
    "records": ((), {}),
    "findings": (("rule",), {"rule": "", "message": "", "parameters": []}),
    "windows": (("first", "step", "mean", "max"), {"first": 0, "step": 0, "mean": 0.0, "max": 0.0}),
    "jumps": ((), {}),
}


def own_state(monitor: TrainingMonitor) -> dict[str, Any]:
    """The state of `monitor` (one model's), as state_dict() returns it."""
    state = {"steps": monitor.steps, "skipped_steps": monitor.skipped_steps}
    for part in STATE_PARTS:
        state.update(getattr(monitor, part).state_dict())
    return state


def load_own_state(monitor: TrainingMonitor, state: Mapping[str, Any]) -> None:
    """Load `state` into `monitor`, but for the sink's axes (TrainingMonitor.load_state_dict)."""
    for part in STATE_PARTS[:-1]:  # the sink last
        getattr(monitor, part).load_state_dict(state)
    monitor.steps = state["steps"]
    monitor.skipped_steps = state["skipped_steps"]


MAX_RECORDS = 32  # statistics records an epoch keeps for its summary; beyond, the older ones thin


def told(monitor: TrainingMonitor) -> str:
    """The end-of-run story for a console that a progress bar shares: on a line of its own, named
    as gradwatch's, with where the whole of it is."""
    where = os.path.join(monitor.log_dir, "diagnosis.json")
    return f"\ngradwatch: the diagnosis (in full in {where}):\n{indented(monitor.story())}"


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


def measured(model: torch.nn.Module) -> NamedParameters:
    """The parameters of `model` the monitor measures (see measurable); the others are named in
    one line, by the main process."""
    kept, skipped = measurable(list(model.named_parameters()))
    if skipped and is_main_process():
        line = f"gradwatch: not measured: {', '.join(skipped)}, since statistics and histograms "
        line += f"need floating-point values; the other {len(kept)} parameters are measured."
        print(line, file=sys.stderr)
    return kept


def wrappers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """`model` and the modules inside its DistributedDataParallel, DataParallel or torch.compile
    wrappers, outermost first."""
    found = [model]
    while True:
        if isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        else:
            return found
        found.append(model)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module that holds the parameters under their own names, inside DistributedDataParallel,
    DataParallel or torch.compile wrappers (whose names would otherwise begin with `module.` or
    `_orig_mod.`)."""
    return wrappers(model)[-1]


def ddp_wrapper(model: torch.nn.Module) -> torch.nn.Module | None:
    """The DistributedDataParallel module among `model`'s wrappers, if there is one."""
    ddp = torch.nn.parallel.DistributedDataParallel
    return next((m for m in wrappers(model) if isinstance(m, ddp)), None)


def graph_key(loss: Any) -> tuple | None:
    """What tells a loss of another graph from the one read before: its grad_fn's kind and its
    shape (read without a synchronisation); None for a loss without a graph."""
    node = getattr(loss, "grad_fn", None)
    return None if node is None else (type(node).__name__, tuple(loss.shape))


def numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The single numbers among logged metrics (floats, ints, one-element tensors), as floats."""
    found = {}
    for tag, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            found[tag] = float(value)
    return found


def _checked(model: Any, optimizer: Any, objective: Any) -> torch.optim.Optimizer | None:
    """The optimizer watch() watches (inside Lightning's and Accelerate's wrappers); TypeError or
    ValueError for arguments it cannot watch."""
    inner = getattr(optimizer, "optimizer", None)  # Lightning's and Accelerate's wrappers
    optimizer = inner if isinstance(inner, torch.optim.Optimizer) else optimizer
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"watch() needs a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if objective is not None and objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    return optimizer


def _check_step(model: Any, loss: Any, grad_norm: Any, max_norm: Any) -> None:
    """RuntimeError, TypeError or ValueError for a step() the monitor cannot take, at once."""
    if model is None:
        raise RuntimeError("call watch(model) before step()")
    if (grad_norm is None) != (max_norm is None):
        raise ValueError(
            "pass grad_norm and max_norm together: the norm before clipping and the threshold"
        )
    if isinstance(loss, torch.Tensor):  # at every step: the cheap checks first
        one = loss.numel() == 1 and not loss.is_complex()
    else:
        one = loss is None or isinstance(loss, Real) and not isinstance(loss, bool)  # numpy's too
    if not one:
        what = type(loss).__name__
        if isinstance(loss, torch.Tensor):
            what = f"a tensor of shape {tuple(loss.shape)}; pass loss.mean() for a loss per sample"
        raise TypeError(
            f"step() takes the step's loss as one number (a tensor of one element, or a float), "
            f"got {what}"
        )


def _watched_parts(
    monitor: TrainingMonitor, models: Mapping, optimizers: Any, *watching: Any
) -> Parts:
    """A monitor for each of several named models (parts.py), in the folders `<log_dir>/<part>`;
    `watching` are watch()'s other arguments, the objective one for all or one per part."""
    compiled, replicas, objective = watching
    objectives = objective if isinstance(objective, Mapping) else {}
    monitors = {}
    for part, (model, optimizer) in checked_parts(models, optimizers).items():
        folder = os.path.join(monitor.log_dir, part)
        watched = TrainingMonitor(folder, **part_options(monitor))
        monitors[part] = watched.watch(
            model, optimizer, compiled, replicas, objectives.get(part, objective)
        )
    return Parts(monitors)


def part_options(monitor: TrainingMonitor) -> dict[str, Any]:
    """The options `monitor` was made with, for the monitor of each of its parts."""
    choice = monitor.choice
    cadence = monitor.cadence
    sink = monitor.sink
    purge = getattr(sink, "purge", {False: None, True: None})
    return dict(
        bins=choice.bins,
        include=choice.include,
        exclude=choice.exclude,
        group_depth=choice.group_depth,
        families=choice.families,
        stats_every=None if cadence.auto else cadence.stats_every,
        hist_every=cadence.hist_every,
        diagnose_every=cadence.diagnose_every,
        start_step=cadence.epoch_start,
        thresholds=monitor.diagnosis.thresholds,
        flush_secs=getattr(sink, "flush_secs", 30),
        purge_epoch=purge[False],
        purge_step=purge[True],
    )


def _patterns(patterns: Sequence[str], name: str) -> tuple[str, ...]:
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"{name} must be a list of glob patterns such as ['layer4.*'], got {patterns!r}"
        )
    return tuple(patterns)


class HistogramChoice:
    """Which parameters get histograms, in how many buckets, and in which TensorBoard section."""

    def __init__(
        self,
        bins: int,
        include: Sequence[str],
        exclude: Sequence[str],
        group_depth: int,
        families: bool = True,
    ):
        self.bins = check_count("bins", bins, 1)
        self.include = _patterns(include, "include")
        self.exclude = _patterns(exclude, "exclude")
        self.group_depth = check_count("group_depth", group_depth, 0)
        if not isinstance(families, bool):
            raise TypeError(f"families must be True or False, got {families!r}")
        self.families = families
        self.members: dict[str, list[str]] = {}  # the watched model's families, by name

    def family_members(self, named: NamedParameters) -> dict[str, list[str]]:
        """The families of `named` (families.py) if tensors are summarised by family; sharded
        tensors stay apart."""
        if not self.families:
            return {}
        return families((name, p.shape) for name, p in named if not is_sharded(p))

    def wants(self, name: str) -> bool:
        """Whether parameter `name` matches a pattern of `include` and none of `exclude`."""
        included = any(fnmatch.fnmatchcase(name, pattern) for pattern in self.include)
        return included and not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude)

    def compute(self, model: torch.nn.Module | NamedParameters) -> dict[str, Histogram]:
        """The `<name>_data` and `<name>_grad` histograms of the wanted parameters, by tag; a
        family's members in one (`<family>_data`: families.py)."""
        wanted = [(name, p) for name, p in named_parameters(model) if self.wants(name)]
        tensors = joined(parameter_tensors(wanted), self.family_members(wanted))
        histograms = compute_histograms(tensors, self.bins)
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


def statistics_scalars(
    stats: Mapping[str, dict], members: Mapping[str, list[str]] | None = None
) -> dict[str, float]:
    """A statistics record as scalars: `<key>/<parameter>`, `dead_share/<module>` for a ReLU's,
    `saturated_share/<module>` for a sigmoid's or tanh's; the non-finite values left out (the
    share of them is nonfinite_share). A family's members (`members`: families.py) as one
    `<key>/<family>`, their mean, with `/spread`, `/min` and `/max` beside it. Beside them the
    extremes over every parameter, which the Custom Scalars tab charts: `update_ratio/max` and
    `/min`, `dead_share/max`."""
    by_key: dict[str, dict[str, float]] = {}
    for name, values in stats.items():
        if name not in ("activations", "loop"):
            for key, value in values.items():
                by_key.setdefault(key, {})[name] = value
    for name, a in stats["activations"].items():
        kind = "dead_share" if a["kind"] == "relu" else "saturated_share"
        by_key.setdefault(kind, {})[name] = a["share"]
    by_key = {
        key: {name: value for name, value in values.items() if math.isfinite(value)}
        for key, values in by_key.items()
    }
    scalars = {}
    for key, values in folded(by_key, members or {}).items():
        scalars.update((f"{key}/{name}", v) for name, v in values.items())
    for kind, extremes in (("update_ratio", (max, min)), ("dead_share", (max,))):
        values = list(by_key.get(kind, {}).values())
        scalars.update((f"{kind}/{pick.__name__}", pick(values)) for pick in extremes if values)
    return scalars


def read_graph(
    hooks: Hooks, diagnosis: RunDiagnosis, loss: Any, parameters: NamedParameters, step: int
) -> dict[str, Any]:
    """The facts of the loss's graph where a reading reads it: at the first step (with the calls
    the hooks noted), and again when the loss's kind or shape changes; kept in the diagnosis's
    facts. {} where it is not read."""
    graph = hooks.take_graph(loss, parameters)
    known = diagnosis.facts.get("loss", {})
    if not graph and graph_key(loss) not in (None, tuple(known.get("key", ()))):
        graph = loss_graph(loss, parameters)  # a loss of another kind or shape
    if graph:
        graph.update(step=step, key=list(graph_key(loss) or ()))
        diagnosis.facts["loss"] = graph
    return graph


def settle(records: list[dict], replicas: Replicas) -> None:
    """At an epoch's end or at close(), where every rank meets: the comparisons of the replicas
    begun at earlier readings, waited for, go into the latest record."""
    if records:
        loop = records[-1]["loop"]
        loop["replicas"] = [*loop.get("replicas", ()), *replicas.settle()]


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


def write_diagnosis(
    sink: EventSink | NullSink,
    diagnosis: RunDiagnosis,
    step: int | None,
    per_step: bool,
    lines: list[dict],
) -> None:
    """The diagnosis written: diagnosis.json, the Text tab at `step` (an epoch, or an optimizer
    step if `per_step`; None: not again) and `lines` (a summary, the run's end) appended to the
    file `diagnose` replays, each with the thresholds."""
    if step is not None:
        listed = "\n\n".join(f"- {f}" for f in diagnosis.findings)
        sink.text("diagnosis", listed or "No findings.", step, per_step=per_step)
    findings = [f.to_json() for f in diagnosis.findings]
    sink.save_json("diagnosis.json", {"facts": diagnosis.facts, "findings": findings})
    thresholds = asdict(diagnosis.thresholds)
    for line in lines:
        sink.append_line(SUMMARIES, {**line, "thresholds": thresholds})


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
    `families` summarises each family of tensors (a layer's experts: families.py) in one chart per
    statistic and one histogram, the diagnosis still reading every member; False: every tensor
    apart.
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
        families: bool = True,
    ):
        self.choice = HistogramChoice(bins, include, exclude, group_depth, families)
        start_step = check_count("start_step", start_step, 0)
        self.cadence = Cadence(stats_every, hist_every, start_step, diagnose_every)
        self.diagnosis = RunDiagnosis(thresholds)
        self.log_dir = os.fspath(log_dir)
        if is_main_process():
            self.sink = EventSink(self.log_dir, flush_secs, purge_epoch, purge_step)
        else:
            self.sink = NullSink()
        self.guard = Guard(self.sink, self.log_dir)
        self.hooks = Hooks(self.guard)
        self.losses = LossWindows()
        self.clipping = ClippingNorms()
        path = os.path.join(self.log_dir, "diagnosis.json")
        self.diagnosis.findings = saved_findings(path, purge_epoch)  # where a resume begins again
        self.diagnosis.told = {finding.key for finding in self.diagnosis.findings}
        self.steps = start_step
        self.skipped_steps = 0
        self.model: torch.nn.Module | None = None
        self._parameters: NamedParameters = []
        self.replicas = Replicas(None, None)  # data parallelism: compares the replicas
        self.parts: Parts | None = None  # several models watched: a monitor for each

    @property
    def findings(self) -> list[Finding]:
        """The run's findings so far, in the order they began (with parts, each part's in turn)."""
        return self.parts.findings if self.parts is not None else self.diagnosis.findings

    @property
    def is_writer(self) -> bool:
        """Whether this process writes: rank 0 of a torch.distributed job, or the only process."""
        return self.sink.writes

    @property
    def stats_every(self) -> int:
        """Optimizer steps between two statistics logs (0: once per epoch); see steps.Cadence."""
        return self.cadence.stats_every

    def watch(
        self,
        model: torch.nn.Module | Mapping[str, torch.nn.Module],
        optimizer: torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer] | None = None,
        compiled: bool | None = None,
        replicas: bool = True,
        objective: str | Mapping[str, str] | None = None,
    ) -> TrainingMonitor:
        """Attach to `model` as its parameters are now (watch again after changing its layers); with
        `optimizer`, also measure each logged step's update-to-weight ratio and count the steps
        GradScaler skips. A model wrapped by DistributedDataParallel or torch.compile, and an
        optimizer wrapped by Lightning or Accelerate, are watched through what they wrap. `compiled`
        says whether the model runs through torch.compile where watch() cannot see it; by default,
        whether `model` holds a compiled module. The first two steps after watch() read the loop's
        facts (the first, also the loss's graph). Under data parallelism (a DistributedDataParallel
        `model`, or parameters replicated over a device mesh) every reading compares the replicas,
        a collective: every rank must then watch and step alike; `replicas=False` turns it off.
        Several models, each with its optimizer and loss (a GAN): give them by name, with the same
        names for the optimizers, and name the part at each step(loss, part=...) (parts.py).
        `objective` (diagnosis.OBJECTIVES, or one per part) says what the loss is: the losses of
        "rl", "gan" and "other" are judged by nothing but NaN; by default, a loss the graph shows is
        not made by known loss functions alone (a policy gradient's) is "other"."""
        if isinstance(model, Mapping):
            self.parts = _watched_parts(self, model, optimizer, compiled, replicas, objective)
            return self
        optimizer = _checked(model, optimizer, objective)
        # A compiled graph keeps the hooks it was traced with: activation hooks there stay for good.
        compiled = is_compiled(model) if compiled is None else compiled
        self.model = unwrap(model)
        self._parameters = measured(self.model)
        self.choice.members = self.choice.family_members(self._parameters)
        wrapper = ddp_wrapper(model)
        self.hooks.attach(self.model, optimizer, compiled, wrapper)
        group = data_parallel_group(wrapper, self._parameters) if replicas else None
        self.replicas = Replicas(group, wrapper)
        self.diagnosis.facts["model"] = model_facts(self.model, optimizer)
        self.diagnosis.objective = objective or ""
        self.cadence.watched()
        self.hooks.prepare(self._parameters, first=True)
        return self

    def unwatch(self) -> None:
        """Remove every hook this monitor placed; safe to call twice."""
        self.hooks.remove()
        for monitor in self.parts.monitors.values() if self.parts is not None else ():
            monitor.unwatch()

    def step(
        self,
        loss: torch.Tensor | float | None = None,
        grad_norm: torch.Tensor | float | None = None,
        max_norm: float | None = None,
        part: str | None = None,
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
        With several models watched, `part` names the one whose optimizer stepped.
        """
        if self.parts is not None:
            return self.parts.step(part, loss, grad_norm, max_norm)
        _check_step(self.model, loss, grad_norm, max_norm)
        self.hooks.stepped.check_thread("step()")
        self.sink.open()
        self.steps += 1
        self.cadence.tick()
        if loss is not None:
            self.losses.add(self.steps, loss)
        skipped = self.hooks.skipped()
        if grad_norm is not None and not skipped:
            self.clipping.add(grad_norm, max_norm)
        urgent = []
        cadence = self.cadence
        if skipped or cadence.reads(self.steps) or cadence.hist_due(self.steps):  # seldom
            with self.guard("the step's statistics"), collector_paused():
                urgent = self._take_statistics(skipped, loss)
        if cadence.reads(self.steps, ahead=1):
            self.hooks.prepare(self._parameters)
        return urgent

    def _take_statistics(self, skipped: bool, loss: Any) -> list[Finding]:
        """What a step logs when statistics or histograms are due; returns its urgent findings."""
        reading = self.cadence.reads(self.steps)
        if skipped:
            self.skipped_steps += 1
            self.hooks.take_weights()  # of no use: the weights did not change
            self.sink.scalars({"amp/skipped_steps": self.skipped_steps}, self.steps, per_step=True)
            read_graph(self.hooks, self.diagnosis, loss, self._parameters, self.steps)
            if reading and self.replicas.channel is not None:  # a collective: every rank reads
                # the replicas at the same steps
                stats = parameter_statistics(self._parameters)  # the weights and gradients alone
                self.replicas.compare(stats, self.steps, False, self.hooks.wrapper.take())
            return []
        if self.cadence.hist_due(self.steps):
            self.log_parameters(self._parameters, self.steps, per_step=True)
        if not reading:
            return []
        stats = parameter_statistics(self._parameters, self.hooks.take_weights())
        records = self.diagnosis.records
        after_first = (
            bool(records) and records[-1]["loop"].get("first") and not self.cadence.first()
        )
        stats["activations"] = self.hooks.collect(afresh=after_first)
        scalars = {**self.losses.take(), **self.clipping.take()}
        stats["loop"] = self._loop_facts(stats, loss)
        self.diagnosis.keep(stats, max(MAX_RECORDS, 2 * self.cadence.diagnose_every))
        scalars.update(statistics_scalars(stats, self.choice.members))
        self.sink.scalars(scalars, self.steps, per_step=True)
        urgent = self.diagnosis.urgent(self.steps, stats, self.losses.windows, self.losses.first)
        if window_due(self.cadence, self.diagnosis, self.steps, urgent):
            self._diagnose(self._summary(self.diagnosis.next_epoch(), "steps"))
        return [f for f in urgent if f.rule == "nonfinite_gradients"]

    def _loop_facts(self, stats: dict[str, dict], loss: Any) -> dict[str, Any]:
        """The exact facts of the loop at a reading (loop.py): the model's mode, what the optimizer
        holds and whether its step changed the weights, whether the gradients were cleared, the
        output, the loss's graph (read at the first step, and again when the loss's kind or shape
        changes), and the replicas compared."""
        optimizer = self.hooks.optimizer
        facts = loop_facts(self.model, self._parameters, optimizer)
        facts.update(self.hooks.take_loop(), step=self.steps, first=self.cadence.first())
        facts["loss"] = self.losses.latest(self.steps)
        facts["not_updated"] = not_updated(stats, self._parameters, optimizer)
        facts["rounded"] = rounded_away(stats, self._parameters, optimizer)
        facts["decayed_norm"] = decayed_norm(stats, self._parameters, optimizer)
        facts["graph"] = read_graph(self.hooks, self.diagnosis, loss, self._parameters, self.steps)
        window = self.losses.windows[-1] if self.losses.windows else {}
        nonfinite = window.get("step") == self.steps and window["nonfinite_step"] is not None
        self.replicas.compare(stats, self.steps, nonfinite, self.hooks.wrapper.take())
        facts["replicas"] = self.replicas.take()  # those of earlier readings, ended meanwhile
        return facts

    def log_parameters(
        self, model: torch.nn.Module | NamedParameters, step: int, per_step: bool = False
    ) -> dict[str, Histogram]:
        """Log the `<name>_data` and `<name>_grad` histograms of `model` (a Module, or its
        named_parameters() as a list) at `step`: an epoch, or an optimizer step if per_step. Returns
        them. With `group_depth` k, each tag is prefixed by the first k parts of its module's name,
        which TensorBoard takes as the tag's section: `layer4/layer4.2.conv3.weight_grad` at k = 1.
        """
        histograms = self.choice.compute(model)
        self.sink.histograms(histograms, step, per_step)
        return histograms

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
        `metrics` ({tag: number}) are read like `scalars` but not written (another logger writes
        them). Returns the findings not returned before. With several models watched, each part
        reads the scalars tagged `<part>/<tag>` as `<tag>`."""
        if self.model is None and self.parts is None:
            raise RuntimeError("call watch(model) before epoch_end()")
        self.hooks.stepped.check_thread("epoch_end()")
        if self.cadence.logged_epoch != epoch:
            with collector_paused():
                self.log_epoch_parameters(epoch)
        scalars = _numbers(scalars, self.guard)
        metrics = _numbers(metrics, self.guard)
        with self.guard("writing the scalars"):
            self.sink.scalars(scalars, epoch)
        for tag, image in dict(images).items():
            with self.guard(f"the image {tag}"):
                self.sink.image(tag, image, epoch)
        summary = None
        if self.parts is not None:
            self.parts.epoch_end(epoch, {**dict(metrics), **scalars}, classes, recall)
        else:
            with self.guard("the epoch's statistics"), collector_paused():
                metrics = _metrics({**dict(metrics), **scalars})
                summary = self._summary(epoch, "epoch", metrics, classes, recall)
            self._restart(epoch_ended=True)
        self._diagnose(summary, epoch)
        return self.diagnosis.untold()  # also what windows of steps found during the epoch

    def _summary(
        self,
        epoch: int,
        unit: str,
        metrics: Mapping[str, float] = (),
        classes: list[str] | None = None,
        recall: list[float | None] | None = None,
    ) -> EpochSummary:
        """The epoch (or the window of steps since the last, unit "steps") that ends now,
        summarised for the rules, after logging its last loss window and, for an epoch, its clipping
        share; with `classes` (and `recall`), the output layer's bias for output_bias_skew."""
        bias = {}
        with self.guard("the output_bias_skew rule"):
            bias = output_bias(self._parameters, classes, recall) if classes is not None else {}
        self.sink.scalars({**self.losses.take(), **self.clipping.take()}, self.steps, per_step=True)
        history = self.diagnosis.history
        since = history[-1].step if unit == "steps" and history else -1
        records = [r for r in self.diagnosis.records if r.get("loop", {}).get("step", 0) > since]
        if unit == "epoch":
            settle(records, self.replicas)
        if not records:  # statistics once per epoch (stats_every=0), or an epoch without steps
            records.append(
                {**parameter_statistics(self._parameters), "activations": self.hooks.collect()}
            )
        clipping = self.clipping.summary(window=unit == "steps")
        if clipping and unit == "epoch":
            self.sink.scalars({"clip/clipped_share": clipping["clipped_share"]}, epoch)
        losses = [w for w in self.losses.windows if w["step"] > since]
        context = dict(losses=losses, first_loss=self.losses.first, clipping=clipping)
        context.update(metrics=dict(metrics), num_classes=len(classes or ()), output_bias=bias)
        context.update(lr=learning_rate(self.hooks.optimizer), unit=unit)
        return summarize(epoch, self.steps, records, warm=unit == "epoch", **context)

    def _diagnose(
        self, summary: EpochSummary | None, epoch: int = 0, ended: bool = False
    ) -> list[Finding]:
        """Every rule on the history with `summary` added, and where the run `ended`, the rules
        that judge it as a whole; the diagnosis written (diagnosis.json, the Text tab, the lines
        for `diagnose`). Returns the findings that began, which a window of steps and the run's end
        also print, since no epoch_end returns them. Without a summary (several models watched),
        the parts' diagnosis, written as the run's at `epoch`."""
        windowed = summary is not None and summary.unit == "steps"
        if windowed:
            self._restart(epoch_ended=False)
        begun = self.diagnosis.add(summary, self.guard) if summary is not None else []
        lines = [{"summary": summary.to_dict()}] if summary is not None else []
        if ended and self.diagnosis.history and not self.diagnosis.history[-1].loop.get("ended"):
            begun += self.diagnosis.conclude(self.guard)
            last = self.diagnosis.history[-1]
            windowed = last.unit == "steps"
            lines.append({"ended": {"epoch": last.epoch, "step": self.steps}})
        if summary is not None and self.choice.members:
            self.diagnosis.facts["families"] = report(summary.layers, self.choice.members)
        if self.parts is not None:
            self.diagnosis.findings = self.parts.findings
            self.diagnosis.facts = self.parts.facts()
        step = self.steps if windowed else summary.epoch if summary is not None else epoch
        told = summary is not None or self.parts is not None or begun  # else the Text tab has it
        with self.guard("writing the diagnosis"):
            write_diagnosis(self.sink, self.diagnosis, step if told else None, windowed, lines)
        for finding in begun if (windowed or ended) and self.is_writer else ():
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
        self.cadence.logged_epoch = epoch
        if self.parts is not None:  # each part writes its own, in its folder
            for monitor in self.parts.monitors.values():
                monitor.log_epoch_parameters(epoch)
            return
        with self.guard("the histograms"):
            self.log_parameters(self._parameters, epoch)
        with self.guard("the gradient-flow picture"):
            flow = folded_flow(gradient_flow(self._parameters), self.choice.members)
            flow = gradient_flow_image(*flow, epoch)
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
        checkpoint loaded with torch.load(weights_only=True). With parts, theirs by name."""
        if self.parts is not None:
            return {**self.parts.state_dict(), **self.sink.state_dict()}
        self.sink.scalars({**self.losses.take(), **self.clipping.take()}, self.steps, per_step=True)
        return own_state(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> TrainingMonitor:
        """Continue from a state_dict() saved with a checkpoint; call it before the first step() of
        the resumed run. The step count goes on from the saved one, and each step axis is rewritten
        from just after it: the epoch after the last one written, the step after the saved one."""
        if self.parts is not None:
            self.parts.load_state_dict(state)
            self.sink.resume_at(state.get("next_epoch", 0), None)
            return self
        before = own_state(self)
        problem = state_problem(state, before, "the state", sorted(STATE_KEYS))
        problem = problem or items_problem(state, STATE_LISTS, "the state")
        if problem:
            raise ValueError(f"not a TrainingMonitor state: {problem}")
        try:
            load_own_state(self, state)
        except Exception as err:  # an item of another shape within: what it was before stays
            load_own_state(self, before)
            raise ValueError(f"not a TrainingMonitor state ({type(err).__name__}: {err})") from None
        self.sink.load_state_dict(state)
        if self.model is not None and self.cadence.reads(self.steps, ahead=1):
            self.hooks.prepare(self._parameters, first=self.cadence.first(ahead=1))
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
        for monitor in self.parts.monitors.values() if self.parts is not None else ():
            monitor.flush()

    def close(self) -> None:
        """The run ended: diagnose the last window of steps of a loop without epochs (the readings
        since the last window), and the run as a whole (a loss still where it started however few
        its epochs); remove the hooks and close the event files. Safe to call twice."""
        if self.parts is not None:
            if self.parts.close():  # each part diagnoses its last window and its end
                self._diagnose(None, max(self.sink.next_epoch - 1, 0))
        elif self.cadence.diagnose_every and self.diagnosis.undiagnosed():
            with self.guard("the last window's diagnosis"):
                settle(self.diagnosis.records, self.replicas)
                self._diagnose(self._summary(self.diagnosis.next_epoch(), "steps"), ended=True)
        elif self.diagnosis.history:
            with self.guard("the run's end"):
                self._diagnose(None, self.diagnosis.history[-1].epoch, ended=True)
        with self.guard("the last comparison of the replicas"):
            self.replicas.settle()  # none of the monitor's collectives left under way
        self.unwatch()
        self.sink.close()

    def __enter__(self) -> TrainingMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
