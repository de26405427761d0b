"""The epoch summary: what the diagnosis rules read about one epoch, built in one place.

The live monitor builds one at each epoch's end from the statistics it logged during the epoch; the
`diagnose` command builds one per logged step from the histograms and scalars of an event folder.
Every number in it can be NaN or missing, and a rule skips what it cannot see.
"""

from __future__ import annotations

import contextlib
import json
import math
import operator
import os
import statistics
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy

# the file of a run folder that holds the summaries the rules read, one JSON line each, which
# `diagnose` replays to tell the live story
SUMMARIES = "gradwatch-summaries.jsonl"


def summary_lines(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[int]]:
    """The lines of a summaries file that hold a summary (JSON objects with a "summary" object) or
    the run's end (an "ended" object: its epoch and step), and the numbers of the others: a line
    cut short by a kill, a byte that is not UTF-8, a line of another shape. ([], []) where there
    is no such file."""
    found = []
    bad = []
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                line = json.loads(raw.decode("utf-8"))
                held = line.get("summary", line.get("ended")) if isinstance(line, dict) else None
                if not isinstance(held, dict):
                    raise ValueError(line)
                found.append(line)
            except ValueError:  # UnicodeDecodeError and json's JSONDecodeError among them
                bad.append(number)
    return found, bad


# The per-parameter keys of a statistics record (see stats.parameter_statistics) that an epoch
# summary keeps
STAT_KEYS = (
    "grad_norm",
    "grad_rms",
    "grad_zero_share",
    "weight_norm",
    "max_abs_weight",
    "update_ratio",
    "nonfinite_share",
)
EMPTY: dict = {}  # what a record holds of a parameter it does not hold (never changed)
EXTRA = ("total", "activations", "loop")  # the keys of a statistics record that are not parameters
# jumps: a layer's gradient norm or update ratio at one reading, over its median in the summary
JUMP_KEYS = ("grad_norm", "update_ratio")
JUMP = 3.0  # the least ratio kept
JUMP_LAYERS = 3  # the layers kept per reading, largest ratio first
JUMP_READINGS = 8  # the readings kept per summary, earliest first


@dataclass
class EpochSummary:
    """One epoch as the rules see it, or one window of steps in a loop without epochs."""

    epoch: int  # from 0; in a loop without epochs, the window's number
    step: int  # optimizer steps done at the epoch's (the window's) end
    # {parameter: {key of STAT_KEYS: value}}: medians over the epoch's statistics logs;
    # weight_norm and max_abs_weight as at the latest one
    layers: dict[str, dict[str, float]] = field(default_factory=dict)
    # {module: {"kind": "relu" | "sigmoid" | "tanh", "layer": str, "share": float}}: the median
    # share of a ReLU's units with no positive output for a whole batch, or of a sigmoid's or
    # tanh's outputs within 1% of their limits; "layer" is the layer that feeds it
    activations: dict[str, dict[str, Any]] = field(default_factory=dict)
    total_grad_norm_max: float = math.nan
    total_grad_norm_median: float = math.nan
    # the training loss in windows of steps, one per statistics log:
    # [{"first", "step", "mean", "max", "max_step", "nonfinite_step" (None if all were finite)}],
    # "first" and "step" the window's first and last step
    losses: list[dict[str, Any]] = field(default_factory=list)
    first_loss: float | None = None  # the run's first training loss
    # with gradient clipping: {"max_norm", "steps", "clipped_share", "grad_norm_median",
    # "grad_norm_p90"}, the norms before clipping None where it was read from the norms after it
    clipping: dict[str, float] = field(default_factory=dict)
    # the training and validation loss and accuracy: train_loss, train_accuracy, valid_loss,
    # valid_accuracy
    metrics: dict[str, float] = field(default_factory=dict)
    num_classes: int | None = None
    lr: float | None = None  # the learning rate most of the model's parameters train with
    # with class names: {"name": the output layer's bias, "values", "classes", "recall": per class
    # or None}
    output_bias: dict[str, Any] = field(default_factory=dict)
    # what the statistics steps told of the training loop (see loop.py and _loop below)
    loop: dict[str, Any] = field(default_factory=dict)
    # "epoch", or "steps" for a window of statistics readings in a loop that calls no epoch_end
    unit: str = "epoch"

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values, for a checkpoint loaded with torch.load(weights_only=True): a copy
        (of dicts, lists and numbers: faster than dataclasses.asdict, which looks for dataclasses
        in every value of thousands of layers)."""
        return {f.name: _copied(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EpochSummary:
        """A summary from to_dict() (or an earlier version's dict); keys it does not know are left
        out."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


def _copied(value: Any) -> Any:
    """A copy of a value made of dicts, lists, tuples and numbers."""
    if isinstance(value, dict):
        return {key: _copied(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_copied(item) for item in value)
    return value


def _median(values: list[float | None]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def _layers(records: list[dict]) -> dict[str, dict[str, float]]:
    """Each parameter's medians of STAT_KEYS over the records (those it has; NaN and None left
    out), and its weights as at the latest: per key, a table of the records by the latest's
    parameters, whose medians numpy takes (thousands of experts make millions of numbers)."""
    latest = records[-1]
    names = [name for name in latest if name not in EXTRA]
    rows = [[record.get(name, EMPTY) for name in names] for record in records]
    layers: dict[str, dict[str, float]] = {name: {} for name in names}
    for key in STAT_KEYS:
        get = operator.methodcaller("get", key, math.nan)
        table = numpy.array([list(map(get, row)) for row in rows], dtype=float)
        for name, median in zip(names, _medians(table)):
            if median == median or any(key in record.get(name, EMPTY) for record in records):
                layers[name][key] = median  # NaN where it has the key but only NaN values
    for name in names:
        for key in ("max_abs_weight", "weight_norm"):  # the latest: where the weights are now
            if key in latest[name]:
                layers[name][key] = latest[name][key]
    return layers


def _medians(table: numpy.ndarray) -> list[float]:
    """The median of each column of a (records, parameters) table, its NaN left out (a column of
    NaN alone: NaN)."""
    if not numpy.isnan(table).any():
        return numpy.median(table, axis=0).tolist()  # a quarter of nanmedian's time
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "All-NaN slice encountered"
        return numpy.nanmedian(table, axis=0).tolist()


def _activations(records: list[dict]) -> dict[str, dict[str, Any]]:
    found: dict[str, list[dict]] = {}
    for record in records:
        for name, values in record.get("activations", {}).items():
            found.setdefault(name, []).append(values)
    return {
        name: {**seen[-1], "share": _median([v["share"] for v in seen])}
        for name, seen in found.items()
    }


def _output(facts: dict[str, Any]) -> dict[str, Any]:
    """One reading of the model's output: its facts (loop.output_facts), the step and its loss."""
    return {"step": facts["step"], "loss": facts["loss"], **facts["output"]}


def _weight_norm(record: dict) -> float | None:
    """The norm of all weight tensors of a record together (biases and norms' gains left aside)."""
    squares = [
        values["weight_norm"] ** 2
        for name, values in record.items()
        if name.endswith("weight") and "weight_norm" in values
    ]
    return math.sqrt(sum(squares)) if squares else None


def _at_every(seen: list[dict], key: str, least: int = 1) -> list[str]:
    """The names listed under `key` at every reading past the first steps that lists it, where
    there are `least` such readings; none before."""
    lists = [f[key] for f in seen if key in f and not f.get("first")]
    if len(lists) < least:
        return []
    return [n for n in lists[-1] if all(n in names for names in lists)]


def _replicas(seen: list[dict]) -> dict[str, Any]:
    """The readings of the replicas (each reading's comparison ends by a later one): the latest, the
    first that found them apart ("first_step", "first") among those that compared the ranks at
    the same optimizer step, the last before it that found them equal ("agreed_step"), the first
    that found ranks at different optimizer steps ("out_of_step"), and the first that found a loss
    NaN or Inf on some ranks only ("nonfinite")."""
    found = [r for f in seen for r in f.get("replicas", ())]
    if not found:
        return {}
    in_step = [r for r in found if r["optimizer_steps"][0] == r["optimizer_steps"][1]]
    apart = [r for r in in_step if r["weights_differ"] or r["gradients_differ"]]
    first = apart[0] if apart else found[-1]
    agreed = [r["step"] for r in found if r["step"] < first["step"] and r not in apart]
    latest = dict(found[-1])
    if apart:
        latest.update(first_step=first["step"], first=first)
    out_of_step = next((r for r in found if r not in in_step), None)
    nonfinite = next((r for r in found if r["nonfinite_ranks"]), None)
    latest.update(out_of_step=out_of_step, nonfinite=nonfinite)
    return {**latest, "agreed_step": max(agreed, default=None)}


def _exact(seen: list[dict]) -> dict[str, Any]:
    """The facts of the readings that hold exactly (what the optimizer holds and changes, the loss's
    graph, the replicas): the latest of what stays, what held at every reading, the readings that
    found ranks out of step or a loss NaN on some ranks only."""
    latest = seen[-1]
    graph = next((f["graph"] for f in reversed(seen) if f.get("graph")), {})
    return {
        "held": latest.get("held"),
        "lr_set": latest.get("lr_set"),
        "held_frozen": latest.get("held_frozen"),
        "zero_lr": latest.get("zero_lr", []),
        "not_updated": _at_every(seen, "not_updated", least=2),
        "rounded": {name: latest["rounded"][name] for name in _at_every(seen, "rounded", least=2)},
        "graph": graph,
        "replicas": _replicas(seen),
    }


def loop_summary(records: list[dict]) -> dict[str, Any]:
    """The epoch's loop facts: from the latest reading, what does not change (trainable parameters
    outside the optimizer, the weight decay, whether training mode matters); over the readings, how
    many found the model in eval mode, the parameters that never had a gradient, how many checks
    found the gradients not cleared, the learning rates, and each reading of the output; and the
    exact facts of _exact."""
    seen = [r["loop"] for r in records if "loop" in r]
    if not seen:
        return {}
    latest = seen[-1]
    checks = [f["cleared"] for f in seen if f.get("cleared") is not None]
    lrs = [[f["step"], f["lr"]] for f in seen if f.get("lr") is not None]
    rates = [lr for _, lr in lrs]
    return {
        **_exact(seen),
        "readings": len(seen),
        "weight_norm_first": _weight_norm(records[0]),
        "weight_norm": _weight_norm(records[-1]),
        "decayed_norm_first": seen[0].get("decayed_norm"),
        "decayed_norm": latest.get("decayed_norm"),
        "eval_readings": sum(not f["training"] for f in seen),
        "mode_matters": latest["mode_matters"],
        "trainable": latest["trainable"],
        "frozen": latest["frozen"],
        "not_in_optimizer": latest["not_in_optimizer"],
        "no_gradient": [
            n for n in latest["no_gradient"] if all(n in f["no_gradient"] for f in seen)
        ],
        "clearing_checks": len(checks),
        "not_cleared": checks.count(False),
        "lrs": lrs,
        "lr_first": seen[0].get("lr_start") or (rates[0] if rates else None),
        "lr_peak": max(rates, default=None),
        "weight_decay": latest["weight_decay"],
        "outputs": [_output(f) for f in seen if "output" in f],
    }


def jumped(record: dict, layers: dict[str, dict[str, float]]) -> dict[str, Any] | None:
    """For the loss_spikes rule: whether a layer's gradient norm or update ratio at one statistics
    reading is JUMP times or more its median in `layers` (the summary before): {"step", "layers":
    {name: {"grad_norm": ratio, "update_ratio": ratio}}} for the JUMP_LAYERS largest; else None."""
    ratios = {}
    for name, median in layers.items():
        found = {
            key: record[name][key] / median[key]
            for key in JUMP_KEYS
            if finite(median.get(key)) and median[key] > 0 and finite(record.get(name, {}).get(key))
        }
        if found and max(found.values()) >= JUMP:
            ratios[name] = found
    largest = sorted(ratios, key=lambda n: -max(ratios[n].values()))[:JUMP_LAYERS]
    if not largest:
        return None
    return {"step": record["loop"]["step"], "layers": {n: ratios[n] for n in largest}}


def finite(value: float | None) -> bool:
    """Whether `value` is a number, neither None nor NaN nor Inf (what the rules can read)."""
    return value is not None and math.isfinite(value)


def _first_update_ratios(records: list[dict]) -> dict[str, float]:
    """Each weight's largest update ratio at the readings of the first steps, which the medians
    leave out (their "loop" says "first"): a rate large enough pushes units to their limits before
    any reading past them."""
    found: dict[str, float] = {}
    for record in records:
        if not record.get("loop", {}).get("first"):
            continue
        for name, values in record.items():
            ratio = values.get("update_ratio") if name.endswith("weight") else None
            if finite(ratio):
                found[name] = max(ratio, found.get(name, 0.0))
    return found


def summarize(
    epoch: int, step: int, records: list[dict], warm: bool = True, **context: Any
) -> EpochSummary:
    """The summary of an epoch from the statistics records logged during it (see
    stats.parameter_statistics; "activations" as the monitor's hooks measure them): medians per
    layer and per activation, the latest weight norm and max |w|, from the records after the first
    steps (whose "loop" says "first": they give the loop's facts, and a baseline only where there
    is nothing else, and `warm`). `context`
    gives the other fields (losses, metrics, first_loss, clipping, num_classes, lr, output_bias)."""
    # past the first steps; where there are none, with `warm`, the first steps (a short epoch)
    settled = [r for r in records if not r.get("loop", {}).get("first")] or (
        records if warm else []
    )
    totals = [r["total"]["grad_norm"] for r in settled if "total" in r]
    # the norm each reading's step was taken with (after any clipping), and its loss
    norms = [
        [r["total"]["grad_norm"], r.get("loop", {}).get("loss")] for r in settled if "total" in r
    ]
    return EpochSummary(
        epoch,
        step,
        layers=_layers(settled) if settled else {},
        activations=_activations(settled),
        total_grad_norm_max=max(totals, default=math.nan),
        total_grad_norm_median=_median(totals),
        loop={
            **loop_summary(records),
            "total_norms": norms,
            "first_update_ratios": _first_update_ratios(records),
        },
        **context,
    )
