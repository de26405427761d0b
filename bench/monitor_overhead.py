"""The monitor's share of a training epoch at its defaults: on a CIFAR-10-size epoch, and on the sample data.

    python bench/monitor_overhead.py                 # 50,000 generated 32x32 images, 2 epochs per variant
    python bench/monitor_overhead.py --sample-only   # the shipped digits only (a smoke test: 0.4 s epochs)

`train.py` runs as users run it (the cache, validation, confusion matrix, checkpoints), with the monitor at
its defaults, on the CPU. The time spent inside the monitor's calls, its optimizer hook and its activation
hooks (and drawing the confusion-matrix picture that train.py draws only to hand it over) is added up per
epoch and set against the epoch's wall time (from one epoch_end() to the next: the first epoch, with start-up,
is not counted). A second variant writes every value through tensorboardX's one-value calls (`add_scalar`,
`add_histogram_raw`) instead of one event per log, to show what that would cost; a third takes statistics every
50 steps throughout (the default stretches that to 16 readings an epoch after a first epoch of over 800 steps).
The last column adds up the step() calls that neither take nor prepare a statistics reading: what every step
costs, the goal at most 0.5% of a CIFAR-10-size epoch.

The CIFAR-10-size data are an archive of the official layout with random pixels (as
bench/prepare_cifar10.py builds it), converted by prepare_data.py: 50,000 training and 5,000 validation
images. The sample data's epoch is reported too; at 0.4 s, fixed per-epoch costs look large there.
"""

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from conftest import make_cifar_archive  # noqa: E402

import prepare_data  # noqa: E402
import train  # noqa: E402
from gradwatch import TrainingMonitor, hooks, sink  # noqa: E402


class OneValueSink(sink.EventSink):
    """The event sink, writing each value through tensorboardX's public one-value calls."""

    def event(self, values, step, per_step=False):
        writer = self.writer(per_step, step)
        for value in values:
            if value.HasField("histo"):
                h = value.histo
                limits, counts = list(h.bucket_limit), list(h.bucket)
                writer.add_histogram_raw(value.tag, h.min, h.max, h.num, h.sum, h.sum_squares, limits, counts, step)
            else:
                writer.add_scalar(value.tag, value.simple_value, step)


class TimedHooks(hooks.Hooks):
    """The monitor's hooks, adding up the seconds spent in the optimizer hook."""

    def _before_step(self, *args):
        return TimedMonitor.runs[-1]._timed(super()._before_step, *args)


class TimedMonitor(TrainingMonitor):
    """The real monitor, adding up the seconds spent in its calls and optimizer hook; `epochs` holds, per
    epoch_end(), the time it returned and the seconds spent inside since the one before."""

    one_value_events = False
    runs = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.spent, self.epochs = 0.0, []
        self.between = 0.0  # the seconds of the step() calls that neither read nor prepared a reading
        self.hooks = TimedHooks(self.guard)
        if self.one_value_events:
            self.sink = OneValueSink(self.log_dir, 30, None, None)
            self.guard.sink = self.sink
        TimedMonitor.runs.append(self)

    def _timed(self, call, *args, **kwargs):
        start = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            self.spent += time.perf_counter() - start

    def step(self, *args, **kwargs):
        before = self.spent
        result = self._timed(super().step, *args, **kwargs)
        cadence = self.cadence
        if not (cadence.reads(self.steps) or cadence.reads(self.steps, ahead=1) or cadence.hist_due(self.steps)):
            self.between += self.spent - before
        return result

    def epoch_end(self, *args, **kwargs):
        result = self._timed(super().epoch_end, *args, **kwargs)
        self.epochs.append((time.perf_counter(), self.spent, self.between))
        self.spent, self.between = 0.0, 0.0
        return result


def measure(data, epochs, tmp, name, one_value_events=False, options=()):
    """(epoch wall times, seconds inside the monitor per epoch) of `train.py --epochs N [options]` on `data`."""
    TimedMonitor.runs, TimedMonitor.one_value_events = [], one_value_events
    draw, share = train.confusion_matrix_image, hooks.activation_share

    def timed(call):
        def timed_call(*args):
            start = time.perf_counter()
            try:
                return call(*args)
            finally:
                TimedMonitor.runs[-1].spent += time.perf_counter() - start

        return timed_call

    train.TrainingMonitor, train.confusion_matrix_image = TimedMonitor, timed(draw)
    hooks.activation_share = timed(share)  # what the activation hooks compute
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            args = ["--data", str(data), "--epochs", str(epochs), "--log-dir", tmp, "--run-name", name]
            assert train.main([*args, "--device", "cpu", *options]) == 0
    finally:
        train.TrainingMonitor, train.confusion_matrix_image = TrainingMonitor, draw
        hooks.activation_share = share
    (run,) = TimedMonitor.runs
    walls = [after[0] - before[0] for before, after in zip(run.epochs, run.epochs[1:])]
    return walls, [spent for _, spent, _ in run.epochs[1:]], [between for _, _, between in run.epochs[1:]]


def report(title, data, epochs, tmp):
    print(f"\n{title}: train.py --epochs {epochs} (the first epoch not counted)")
    print(f"{'variant':44}{'epoch s':>10}{'inside the monitor':>24}{'steps between readings':>28}")
    variants = [("monitor, defaults", False, []), ("monitor, one event per value", True, [])]
    variants.append(("--stats-every 50 (every 50 steps throughout)", False, ["--stats-every", "50"]))
    for name, one_value, options in variants:
        walls, inside, between = measure(data, epochs, tmp, f"{title}-{name}".replace(" ", "_"), one_value, options)
        wall, spent, quiet = statistics.median(walls), statistics.median(inside), statistics.median(between)
        share = f"{spent * 1e3:.1f} ms = {spent / (wall - spent):.2%}"
        steps = f"{quiet * 1e3:.1f} ms = {quiet / (wall - spent):.2%}"
        print(f"{name:44}{wall:>10.2f}{share:>24}{steps:>28}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per CIFAR-size run (default 3)")
    parser.add_argument("--sample-only", action="store_true", help="measure on the shipped sample data only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report("sample data (1,438 images, 90 steps an epoch)", ROOT / "Data", 6, tmp)
        if args.sample_only:
            return
        start = time.perf_counter()
        archive, _ = make_cifar_archive(tmp, per_batch=10_000, test_size=10_000)
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            assert prepare_data.main(["cifar10", "--archive", str(archive), "--out", f"{tmp}/cifar10"]) == 0
        print(f"\n(made the CIFAR-10-size data in {time.perf_counter() - start:.0f} s)")
        report("CIFAR-10 size (50,000 images, 3,125 steps an epoch)", f"{tmp}/cifar10", args.epochs, tmp)


if __name__ == "__main__":
    main()
