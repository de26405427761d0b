"""Diagnose any TensorBoard log folder from its scalars and histograms, whoever wrote them.

    diagnose Result                      # every run under Result (or: python diagnose.py Result)
    diagnose Result/my-run --classes 10  # one run; 10 classes: an untrained model's loss is ln 10
    diagnose Result/my-run --json        # its findings as JSON

Weight and gradient histograms are recognised in the common conventions: the tutorial's
`<name>_data` / `<name>_grad`, and prefixes such as `weights/<name>`, `parameters/<name>`,
`grad/<name>`, `gradients/<name>`; per-layer statistics come from them (the norm from the sum of
squares, max |w| from min and max). The training and validation loss and accuracy are read from the
scalars under common tags (train/loss, train_loss, Loss/train, loss; val_acc, valid/accuracy,
val/accuracy; ...). The rules that need only these run at every logged step, and their findings are
told as the monitor tells them.
"""

import argparse
import contextlib
import importlib.util
import json
import math
import os
import statistics
import sys
from pathlib import Path

import numpy as np

from .diagnosis import (
    METRIC_TAGS,
    Finding,
    RunDiagnosis,
    Thresholds,
    diagnose,
    indented,
    record,
    story,
    threshold_override,
)
from .summary import SUMMARIES, EpochSummary, summarize, summary_lines

WEIGHT_PREFIXES = ("weights/", "weight/", "parameters/", "params/", "param/")
GRADIENT_PREFIXES = ("gradients/", "gradient/", "grads/", "grad/")


def classify(tag):
    """('weight' | 'grad', parameter name) for a recognised tag, else None."""
    for suffix, kind in (("_data", "weight"), ("_grad", "grad")):
        # "<name>_data", or "<section>/<name>_data" (TrainingMonitor's group_depth)
        if tag.endswith(suffix):
            return kind, tag[: -len(suffix)].rsplit("/", 1)[-1]
    for prefixes, kind in ((WEIGHT_PREFIXES, "weight"), (GRADIENT_PREFIXES, "grad")):
        for prefix in prefixes:
            if tag.lower().startswith(prefix):
                return kind, tag[len(prefix) :]
    return None


def _statistics(histogram):
    """A weight's or gradient's statistics from its histogram: the norm from the sum of squares,
    max |w| from the minimum and maximum."""
    h = histogram
    norm = math.sqrt(h.sum_squares) if h.sum_squares >= 0 else math.nan
    rms = norm / math.sqrt(h.num) if h.num else math.nan
    return {
        "weight": {
            "weight_norm": norm,
            "max_abs_weight": max(abs(h.min), abs(h.max)) if h.num else math.nan,
        },
        "grad": {
            "grad_rms": rms,
            "grad_norm": norm,
            "nonfinite_share": 0.0 if math.isfinite(norm) else 1.0,
        },
    }


def _records(events):
    """({step: statistics record}, {step: its latest wall time}) from the recognised histograms."""
    records = {}
    walls = {}
    for tag in events.Tags().get("histograms", []):
        recognised = classify(tag)
        if recognised is None:
            continue
        kind, name = recognised
        for event in events.Histograms(tag):
            layer = records.setdefault(event.step, {}).setdefault(name, {})
            layer.update(_statistics(event.histogram_value)[kind])
            walls[event.step] = max(walls.get(event.step, 0), event.wall_time)
    return records, walls


def _steps_of_metrics(metrics):
    """Without histograms, the steps of the metrics: epoch by epoch where the validation's are
    logged."""
    order = ("valid_accuracy", "valid_loss", "train_accuracy", "train_loss")
    series = next((metrics[key] for key in order if metrics[key]), [])
    return {step: {} for step, _, _ in series}, {step: wall for step, wall, _ in series}


def summaries(events, classes=None, step_events=None) -> list[EpochSummary]:
    """Epoch summaries, one per logged step, from an EventAccumulator's histograms and scalars (the
    steps of a metric where there are no histograms). The training loss and the clipping scalars
    (clip/*) come per optimizer step from `step_events` (the monitor's <run>/steps) when given,
    else from the run's scalars; their points are given to the logged steps by wall time, since the
    two may count steps differently."""
    records, walls = _records(events)
    metrics = {key: _scalars(events, tags) for key, tags in METRIC_TAGS.items()}
    if not records:
        records, walls = _steps_of_metrics(metrics)
    per_step = step_events or events
    losses = (_scalars(step_events, ("loss",)) if step_events else []) or metrics["train_loss"]
    first_loss = _first_loss(losses, len(records), classes, bool(step_events))
    clips = {key: _scalars(per_step, (f"clip/{key}",)) for key in ("grad_norm", "clipped_share")}
    history = []
    previous = -math.inf  # the wall time of the step before
    for index, (step, record_) in enumerate(sorted(records.items())):
        total = math.sqrt(sum(layer.get("grad_norm", 0.0) ** 2 for layer in record_.values()))
        windows = [_window(s, v) for s, wall, v in losses if previous < wall <= walls[step]]
        values = {key: v for key, series in metrics.items() for s, _, v in series if s == step}
        done = windows[-1]["step"] if windows else step  # on the loss's step axis where it has one
        context = dict(losses=windows, metrics=values, first_loss=first_loss, num_classes=classes)
        context["clipping"] = _clipping(clips, previous, walls[step])
        history.append(
            summarize(index, done, [{**record_, "total": {"grad_norm": total}}], **context)
        )
        previous = walls[step]
    return history


def _first_loss(losses, logged_steps, classes, per_step):
    """Where the loss started: the lower of its first value where it is logged by optimizer steps
    (more often than the histograms) and ln C for C classes, an untrained model's, since a first
    logged mean may hold a divergence; else its first logged value."""
    starts = [losses[0][2]] if losses and (per_step or len(losses) > 2 * logged_steps) else []
    starts += [math.log(classes)] if classes and classes > 1 else []
    if starts:
        return min(starts)
    return losses[0][2] if losses else None


def _clipping(clips, after, until):
    """The clipping of the points logged between two wall times (see EpochSummary.clipping; the
    threshold is not logged), or {}."""
    norms = [v for _, wall, v in clips["grad_norm"] if after < wall <= until and math.isfinite(v)]
    shares = [v for _, wall, v in clips["clipped_share"] if after < wall <= until]
    if not norms or not shares:
        return {}
    return {
        "max_norm": None,
        "steps": len(norms),
        "clipped_share": statistics.fmean(shares),
        "grad_norm_median": statistics.median(norms),
        "grad_norm_p90": float(np.percentile(norms, 90)),
    }


def _scalars(events, tags):
    """[(step, wall time, value)] of the first of `tags` that `events` holds, else []."""
    tag = next((tag for tag in tags if tag in events.Tags().get("scalars", [])), None)
    return [(e.step, e.wall_time, e.value) for e in events.Scalars(tag)] if tag else []


def _window(step, value):
    """One logged training loss as a window of the loss (see EpochSummary.losses)."""
    nonfinite = None if math.isfinite(value) else step
    return {
        "step": step,
        "mean": value,
        "max": value,
        "max_step": step,
        "nonfinite_step": nonfinite,
    }


def _load(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    return events


def replay(path, overrides=()):
    """(findings, message) of the live monitor again: the summaries it wrote (summary.SUMMARIES)
    given to the same RunDiagnosis in the same order, under the thresholds it ran with (and
    `overrides`); None if the file holds none. Damaged lines are left out, with one warning; the
    last line, cut short by a kill, silently."""
    lines, bad = summary_lines(path)
    if bad and bad != [len(lines) + len(bad)]:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        print(f"warning: {path}: line {shown} not a summary (damaged); left out", file=sys.stderr)
    if not lines:
        return None
    known = set(Thresholds.names())
    ran_with = {k: v for k, v in lines[-1].get("thresholds", {}).items() if k in known}
    diagnosis = RunDiagnosis(Thresholds(**ran_with).replace(dict(overrides)))
    for line in lines:  # a rule that fails is skipped, as the monitor's guard skips it
        if "summary" in line:
            diagnosis.add(EpochSummary.from_dict(line["summary"]), lambda what: _SKIP)
        else:  # the run ended there (close()): judged as a whole
            diagnosis.conclude(lambda what: _SKIP)
    if not diagnosis.history:
        return None
    last = diagnosis.history[-1]
    count = last.epoch + 1 if last.unit == "epoch" else last.step
    counted = _plural(count, "epoch" if last.unit == "epoch" else "step")
    parameters = _plural(len(last.layers), "parameter")
    return diagnosis.findings, f"{counted}, {parameters}, diagnosed as the monitor did"


_SKIP = contextlib.suppress(Exception)


def _plural(count, word):
    return f"{count} {word}{'s' * (count != 1)}"


def _replayed(path, overrides):
    """replay() of the summaries file at `path`, or None where there is none or it cannot be
    replayed (then said in one warning): the event files tell the run instead."""
    if not path.is_file():
        return None
    try:
        return replay(path, overrides)
    except Exception as err:  # summaries of another shape
        why = f"{type(err).__name__}: {err}"
        print(f"warning: {path}: not read ({why}); read the event files", file=sys.stderr)
        return None


def diagnose_run(run_dir, thresholds, classes=None, overrides=()):
    """(findings, message) of one run folder: for a run this monitor wrote, its live diagnosis
    replayed from the summaries it logged; otherwise the rules applied at every logged step, the
    findings merged as the monitor merges them. findings is None when nothing could be examined,
    and the message says why."""
    replayed = _replayed(run_dir / SUMMARIES, overrides)
    if replayed is not None:
        return replayed
    events = _load(run_dir)
    try:
        events.FirstEventTimestamp()
    except ValueError:
        return (
            None,
            "no readable event in its event files (corrupt, or not TensorBoard event files)",
        )
    steps = _load(run_dir / "steps") if (run_dir / "steps").is_dir() else None
    history = summaries(events, classes, steps)
    if not history:
        tags = events.Tags().get("histograms", [])
        found = (
            f"among {len(tags)} histogram tags (e.g. {tags[0]})" if tags else "and no histograms"
        )
        return (
            None,
            f"no weight or gradient histograms and no loss or accuracy scalars recognised {found}",
        )
    findings = []
    rose = False  # whether the loss rose above its start: then no advice to raise the lr
    for i, summary in enumerate(history):
        rose = rose or _rose(summary)
        found = diagnose(history[: i + 1], thresholds)
        findings, _ = record(findings, found, summary.epoch, rose)
    parameters = _plural(len(history[-1].layers), "parameter")
    return findings, f"{_counted(history, events, steps)}, {parameters}"


def _rose(summary, by=1.1):
    """Whether a logged training loss of `summary` is `by` times the run's first loss or more."""
    first = summary.first_loss
    means = [w["mean"] for w in summary.losses if math.isfinite(w["mean"])]
    return bool(first) and first > 0 and any(mean >= by * first for mean in means)


def _counted(history, events, step_events):
    """How much of the run was read, in its own units: epochs where the histograms are an epoch
    axis beside a step axis (the monitor's <run>/steps), else logged steps, with the last step and
    the epoch where a scalar `epoch` or `train/epoch` tells it (Lightning's, Hugging Face's)."""
    if step_events is not None:
        losses = _scalars(step_events, ("loss",))
        return f"{_plural(len(history), 'epoch')}, {losses[-1][0] if losses else '?'} steps"
    epochs = _scalars(events, ("epoch", "train/epoch"))
    text = _plural(len(history), "logged step")
    if epochs:
        text += f" (to step {epochs[-1][0]}, epoch {epochs[-1][2]:g})"
    return text


def run_folders(path):
    """Every folder under path (path included) that holds event files, except the monitor's
    step-axis folders: `<run>/steps` belongs to the run `<run>`, whose epoch histograms are the ones
    diagnosed. Returns (folders, unreadable): [(folder or event file, why)] of what could not be
    read (permission denied), so that no run is left out unsaid."""
    folders = set()
    unreadable = []
    seen = set()  # real paths walked: a symlinked folder is followed once, a link loop ends

    def refused(err):
        unreadable.append((Path(err.filename), err.strerror or type(err).__name__))

    for top, dirs, files in os.walk(path, followlinks=True, onerror=refused):
        seen.add(os.path.realpath(top))
        dirs[:] = [d for d in dirs if os.path.realpath(os.path.join(top, d)) not in seen]
        events = [os.path.join(top, name) for name in files if "tfevents" in name]
        events = [event for event in events if os.path.isfile(event)]
        denied = [event for event in events if not os.access(event, os.R_OK)]
        if events:
            folders.add(Path(top))
        if denied:  # its run cannot be read whole
            unreadable.append((Path(top), f"Permission denied: {os.path.basename(denied[0])}"))
    left_out = {where for where, _ in unreadable}
    runs = [f for f in folders if not (f.name == "steps" and f.parent in folders)]
    return sorted(f for f in runs if f not in left_out and f.parent not in left_out), unreadable


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("path", type=Path, help="a run folder or a folder of runs")
    parser.add_argument("--json", action="store_true", help="print {run: [findings]} as JSON")
    about = "the number of classes, for the loss of an untrained model"
    parser.add_argument("--classes", type=int, help=about)
    about = f"change a threshold (repeatable); names: {', '.join(Thresholds.names())}"
    parser.add_argument(
        "--threshold",
        action="append",
        type=threshold_override,
        default=[],
        metavar="NAME=VALUE",
        help=about,
    )
    return parser


def main(argv=None):
    """The `diagnose` command; returns the exit status: 0 when every run was read, 1 when a run or
    the path could not be. Ctrl-C stops it quietly (nothing is written), and so does a reader that
    closes the pipe (`diagnose Result --json | head`)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
        return 141


def _folders(path):
    """(run folders, error, unreadable): the run folders under `path` (an event file stands for its
    folder), the line that says why there are none (or None), and whether something could not be
    read (said in a warning each)."""
    if importlib.util.find_spec("tensorboard") is None:
        why = "error: diagnose reads event files with TensorBoard's reader: pip install tensorboard"
        return [], why, False
    if not path.exists():
        return [], f"error: {path}: not found; pass a run folder or a folder of runs", False
    if path.is_file() and "tfevents" in path.name:
        return [path.parent], None, False
    folders, unreadable = run_folders(path)
    for where, why in unreadable:
        print(f"warning: {where}: cannot be read ({why}); left out", file=sys.stderr)
    if unreadable and not folders:
        why = f"error: {path}: nothing in it could be read; read access to it is needed"
        return [], why, True
    if not folders:
        why = f"error: {path}: no event files (events.out.tfevents.*) in it or below it"
        return [], why, False
    return folders, None, bool(unreadable)


def _diagnosed(folder, thresholds, classes, overrides):
    try:
        return diagnose_run(folder, thresholds, classes, overrides)
    except Exception as err:  # a damaged file must not hide the other runs
        return None, f"could not read the event files ({type(err).__name__}: {err})"


def _print_run(name: str, findings: list[Finding] | None, summary: str) -> None:
    if findings is None:
        print(f"{name}: {summary}")
        return
    problems = sum(f.cause is None and f.severity == "warning" for f in findings)
    verdict = f"{problems} problem{'s' * (problems != 1)}" if problems else "healthy"
    print(f"{name}: {summary}; {verdict}")
    if findings:
        print(indented(story(findings)))


def _main(argv):
    args = build_parser().parse_args(argv)
    # names and values checked by the parser
    thresholds = Thresholds().replace(dict(args.threshold))
    folders, error, unreadable = _folders(args.path)
    if error:
        print(error, file=sys.stderr)
        return 1
    report = {}
    unread = 0
    for folder in folders:
        name = _name(folder, args.path)
        findings, summary = _diagnosed(folder, thresholds, args.classes, dict(args.threshold))
        unread += findings is None
        if findings is not None:
            report[name] = findings
        if args.json and findings is None:  # stdout holds only the JSON of the runs read
            print(f"{name}: {summary}", file=sys.stderr)
        elif not args.json:
            _print_run(name, findings, summary)
    if args.json:
        runs = {name: [f.to_json() for f in findings] for name, findings in report.items()}
        print(json.dumps(runs, indent=2))
    return 1 if unread or unreadable else 0


def _name(folder: Path, path: Path) -> str:
    """A run's name: its folder below `path`, or the folder's own name."""
    if path.is_dir() and folder != path:
        return str(folder.relative_to(path))
    return folder.name
