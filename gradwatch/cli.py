"""Diagnose any TensorBoard log folder from its scalars and histograms, whoever wrote them.

    diagnose Result                      # every run under Result (or: python diagnose.py Result)
    diagnose Result/my-run --classes 10  # one run; the number of classes gives the untrained loss, ln C
    diagnose Result/my-run --json        # its findings as JSON

Weight and gradient histograms are recognised in the common conventions: the tutorial's `<name>_data` /
`<name>_grad`, and prefixes such as `weights/<name>`, `parameters/<name>`, `grad/<name>`, `gradients/<name>`;
per-layer statistics come from them (the norm from the sum of squares, max |w| from min and max). The training
and validation loss and accuracy are read from the scalars under common tags (train/loss, train_loss, Loss/train,
loss; val_acc, valid/accuracy, val/accuracy; ...). The rules that need only these run at every logged step, and
their findings are told as the monitor tells them.
"""

import argparse
import json
import math
import sys
from pathlib import Path

from .diagnosis import METRIC_TAGS, Thresholds, diagnose, indented, record, story, threshold_override

WEIGHT_PREFIXES = ("weights/", "weight/", "parameters/", "params/", "param/")
GRADIENT_PREFIXES = ("gradients/", "gradient/", "grads/", "grad/")


def classify(tag):
    """('weight' | 'grad', parameter name) for a recognised tag, else None."""
    for suffix, kind in (("_data", "weight"), ("_grad", "grad")):
        if tag.endswith(suffix):  # "<name>_data", or "<section>/<name>_data" (TrainingMonitor's group_depth)
            return kind, tag[: -len(suffix)].rsplit("/", 1)[-1]
    for prefixes, kind in ((WEIGHT_PREFIXES, "weight"), (GRADIENT_PREFIXES, "grad")):
        for prefix in prefixes:
            if tag.lower().startswith(prefix):
                return kind, tag[len(prefix) :]
    return None


def summaries(events, classes=None, step_events=None):
    """Epoch summaries (diagnosis.py's format), one per logged step, from an EventAccumulator's histograms and
    scalars (the steps of a metric where there are no histograms). The training loss comes per optimizer step from
    `step_events` (the monitor's <run>/steps) when given, else from the run's scalars; its points are given to the
    logged steps by wall time, since the two may count steps differently."""
    by_step, walls = {}, {}
    for tag in events.Tags().get("histograms", []):
        recognised = classify(tag)
        if recognised is None:
            continue
        kind, name = recognised
        for event in events.Histograms(tag):
            h = event.histogram_value  # its norm from the sum of squares, max |w| from min and max
            norm = math.sqrt(h.sum_squares) if h.sum_squares >= 0 else math.nan
            layer = by_step.setdefault(event.step, {}).setdefault(name, {})
            walls[event.step] = max(walls.get(event.step, 0), event.wall_time)
            if kind == "weight":
                layer.update(weight_norm=norm, max_abs_weight=max(abs(h.min), abs(h.max)) if h.num else math.nan)
            else:
                rms = norm / math.sqrt(h.num) if h.num else math.nan
                layer.update(grad_rms=rms, grad_norm=norm, nonfinite_share=0.0 if math.isfinite(norm) else 1.0)
    metrics = {key: _scalars(events, tags) for key, tags in METRIC_TAGS.items()}  # key: [(step, wall, value)]
    if not by_step:  # no histograms: the steps of the metrics, epoch by epoch where the validation's are logged
        order = ("valid_accuracy", "valid_loss", "train_accuracy", "train_loss")
        for step, wall, _ in next((metrics[key] for key in order if metrics[key]), []):
            by_step[step], walls[step] = {}, wall
    losses = (_scalars(step_events, ("loss",)) if step_events else []) or metrics["train_loss"]
    # an untrained model's loss is where the loss starts: a first logged value may already hold a divergence
    first_loss = math.log(classes) if classes and classes > 1 else losses[0][2] if losses else None
    history, previous = [], -math.inf
    for index, (step, layers) in enumerate(sorted(by_step.items())):
        total = math.sqrt(sum(layer.get("grad_norm", 0.0) ** 2 for layer in layers.values()))
        windows = [_window(s, v) for s, wall, v in losses if previous < wall <= walls[step]]
        values = {key: v for key, series in metrics.items() for s, _, v in series if s == step}
        done = windows[-1]["step"] if windows else step  # on the loss's step axis where it has one
        history.append({"epoch": index, "step": done, "layers": layers, "losses": windows, "metrics": values})
        history[-1].update(total_grad_norm_max=total, total_grad_norm_median=total, num_classes=classes)
        history[-1]["first_loss"], previous = first_loss, walls[step]
    return history


def _scalars(events, tags):
    """[(step, wall time, value)] of the first of `tags` that `events` holds, else []."""
    tag = next((tag for tag in tags if tag in events.Tags().get("scalars", [])), None)
    return [(e.step, e.wall_time, e.value) for e in events.Scalars(tag)] if tag else []


def _window(step, value):
    """One logged training loss as a window of the loss (diagnosis.py's format)."""
    nonfinite = None if math.isfinite(value) else step
    return {"step": step, "mean": value, "max": value, "max_step": step, "nonfinite_step": nonfinite}


def diagnose_run(run_dir, thresholds, classes=None):
    """(findings, message): the rules applied at every logged step of one run folder, its findings merged as the
    monitor merges them; findings is None when nothing could be examined, and the message says why."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def load(folder):
        events = EventAccumulator(str(folder), size_guidance={"histograms": 0, "scalars": 0})
        events.Reload()
        return events

    events = load(run_dir)
    try:
        events.FirstEventTimestamp()
    except ValueError:
        return None, "no readable event in its event files (corrupt, or not TensorBoard event files)"
    tags = events.Tags().get("histograms", [])
    history = summaries(events, classes, load(run_dir / "steps") if (run_dir / "steps").is_dir() else None)
    if not history:
        found = f"among {len(tags)} histogram tags (e.g. {tags[0]})" if tags else "and no histograms"
        return None, f"no weight or gradient histograms and no loss or accuracy scalars recognised {found}"
    findings = []
    for i, summary in enumerate(history):
        findings, _ = record(findings, diagnose(history[: i + 1], thresholds), summary["epoch"])
    steps, parameters = len(history), len(history[-1]["layers"])
    return findings, f"{steps} step{'s' * (steps != 1)}, {parameters} parameters"


def run_folders(path):
    """Every folder under path (path included) that holds event files, except the monitor's step-axis folders:
    `<run>/steps` belongs to the run `<run>`, whose epoch histograms are the ones diagnosed."""
    folders = {file.parent for file in Path(path).rglob("*tfevents*") if file.is_file()}
    return sorted(f for f in folders if not (f.name == "steps" and f.parent in folders))


def main(argv=None):
    """The `diagnose` command; returns the exit status. Ctrl-C stops it quietly (nothing is written)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return 130


def _main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n")[1])
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("path", type=Path, help="a run folder or a folder of runs")
    parser.add_argument("--json", action="store_true", help="print {run: [findings]} as JSON")
    parser.add_argument("--classes", type=int, help="the number of classes, for the loss of an untrained model")
    names = ", ".join(Thresholds.names())
    about = f"change a threshold (repeatable); names: {names}"
    parser.add_argument(
        "--threshold", action="append", type=threshold_override, default=[], metavar="NAME=VALUE", help=about
    )
    args = parser.parse_args(argv)
    thresholds = Thresholds().replace(dict(args.threshold))  # names and values checked by the parser
    if not args.path.exists():
        print(f"error: {args.path}: not found; pass a run folder or a folder of runs", file=sys.stderr)
        return 1
    folders = run_folders(args.path)
    if not folders:
        print(f"error: {args.path}: no event files (events.out.tfevents.*) in it or below it", file=sys.stderr)
        return 1
    report = {}
    for folder in folders:
        name = str(folder.relative_to(args.path)) if folder != args.path else folder.name
        try:
            findings, summary = diagnose_run(folder, thresholds, args.classes)
        except Exception as err:  # a damaged file must not hide the other runs
            findings, summary = None, f"could not read the event files ({type(err).__name__}: {err})"
        report[name] = findings or []
        if args.json:
            continue
        if findings is None:
            print(f"{name}: {summary}")
            continue
        problems = sum(f.cause is None and f.severity == "warning" for f in findings)
        print(f"{name}: {summary}; " + (f"{problems} problem{'s' * (problems != 1)}" if problems else "healthy"))
        if findings:
            print(indented(story(findings)))
    if args.json:
        print(json.dumps({name: [f.to_json() for f in findings] for name, findings in report.items()}, indent=2))
    return 0
