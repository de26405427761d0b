"""Diagnose any TensorBoard log folder from its weight and gradient histograms, whoever wrote them.

    diagnose Result                 # every run under Result (or: python diagnose.py Result)
    diagnose Result/my-run --json   # one run, findings as JSON

Weight and gradient tags are recognised in the common conventions: the tutorial's `<name>_data` /
`<name>_grad`, and prefixes such as `weights/<name>`, `parameters/<name>`, `grad/<name>`,
`gradients/<name>` (tensorboardX, torch.utils.tensorboard and this project's monitor all qualify).
Per-layer statistics come from the stored histograms (min, max, count, sum of squares), and the
rules that need only those run on them: vanishing gradients, non-finite values,
exploding gradients and weights growing, one epoch summary per logged step.
"""

import argparse
import json
import math
import sys
from pathlib import Path

from .diagnosis import Thresholds, diagnose, threshold_override

WEIGHT_PREFIXES = ("weights/", "weight/", "parameters/", "params/", "param/")
GRADIENT_PREFIXES = ("gradients/", "gradient/", "grads/", "grad/")


def classify(tag):
    """('weight' | 'grad', parameter name) for a recognised tag, else None."""
    for suffix, kind in (("_data", "weight"), ("_grad", "grad")):
        if tag.endswith(suffix):
            return kind, tag[: -len(suffix)]
    for prefixes, kind in ((WEIGHT_PREFIXES, "weight"), (GRADIENT_PREFIXES, "grad")):
        for prefix in prefixes:
            if tag.lower().startswith(prefix):
                return kind, tag[len(prefix) :]
    return None


def summaries(events):
    """Epoch summaries (diagnosis.py's format), one per logged step, from an EventAccumulator's histograms."""
    by_step = {}
    for tag in events.Tags().get("histograms", []):
        recognised = classify(tag)
        if recognised is None:
            continue
        kind, name = recognised
        for event in events.Histograms(tag):
            h = event.histogram_value  # its norm from the sum of squares, max |w| from min and max
            norm = math.sqrt(h.sum_squares) if h.sum_squares >= 0 else math.nan
            layer = by_step.setdefault(event.step, {}).setdefault(name, {})
            if kind == "weight":
                layer.update(weight_norm=norm, max_abs_weight=max(abs(h.min), abs(h.max)) if h.num else math.nan)
            else:
                rms = norm / math.sqrt(h.num) if h.num else math.nan
                layer.update(grad_rms=rms, grad_norm=norm, nonfinite_share=0.0 if math.isfinite(norm) else 1.0)
    history = []
    for step, layers in sorted(by_step.items()):
        total = math.sqrt(sum(layer.get("grad_norm", 0.0) ** 2 for layer in layers.values()))
        history.append({"epoch": step, "step": step, "layers": layers})
        history[-1].update(total_grad_norm_max=total, total_grad_norm_median=total)
    return history


def diagnose_run(run_dir, thresholds):
    """(findings, message): the rules applied at every logged step of one run folder; findings is None
    when nothing could be examined, and the message says why."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"histograms": 0})
    events.Reload()
    try:
        events.FirstEventTimestamp()
    except ValueError:
        return None, "no readable event in its event files (corrupt, or not TensorBoard event files)"
    tags = events.Tags().get("histograms", [])
    if not tags:
        return None, "no histograms"
    history = summaries(events)
    if not history:
        return None, f"no weight or gradient histograms recognised among {len(tags)} tags (e.g. {tags[0]})"
    findings = []
    for i in range(1, len(history) + 1):
        findings += diagnose(history[:i], thresholds)
    steps = len(history)
    return findings, f"{steps} step{'s' * (steps != 1)}, {len(history[-1]['layers'])} parameters"


def first_occurrences(findings):
    """[(first finding, how many steps it held, its last step)] per finding key, in order of appearance: a
    finding that lasts is printed once, as train.py's console does, where --json lists it at every step."""
    groups = {}
    for finding in findings:
        first, count, _ = groups.get(finding.key, (finding, 0, None))
        groups[finding.key] = (first, count + 1, finding.step)
    return list(groups.values())


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
            findings, summary = diagnose_run(folder, thresholds)
        except Exception as err:  # a damaged file must not hide the other runs
            findings, summary = None, f"could not read the event files ({type(err).__name__}: {err})"
        report[name] = findings or []
        if args.json:
            continue
        if findings is None:
            print(f"{name}: {summary}")
            continue
        groups = first_occurrences(findings)
        print(f"{name}: {summary}; " + (f"{len(groups)} finding{'s' * (len(groups) != 1)}" if groups else "healthy"))
        for finding, count, last in groups:
            print(f"  {finding}" + (f" (holds at {count} logged steps, the last at step {last})" if count > 1 else ""))
    if args.json:
        print(json.dumps({name: [f.to_json() for f in findings] for name, findings in report.items()}, indent=2))
    return 0
