"""Epoch-time overhead of the monitor at its defaults, on the sample data, measured side by side.

    python bench/monitor_overhead.py              # 6 epochs per variant, interleaved, medians

Two measurements in one process:
1. the bare training loop (the cached sample digits, the tutorial's Net, SGD, batch 16: training
   only), alternating epochs between no monitor, the monitor at its defaults (statistics every
   20 steps, epoch histograms, gradient-flow image, diagnosis) and the monitor with histograms
   every 10 steps as well;
2. `python train.py --epochs N` as a user runs it (validation, confusion matrix and checkpoints
   included): each epoch's wall time, and the time spent inside the monitor during it.
Prints median times; for the loop, the wall-clock overhead of each variant; for both, the time spent
inside the monitor's calls and its optimizer hooks (and, in train.py, drawing the confusion-matrix
picture it is handed) as a share of the epoch without it, which this machine's noise does not blur.
"""
import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from data import build_loaders  # noqa: E402
from gradwatch import TrainingMonitor  # noqa: E402
from utils import Net  # noqa: E402


class TimedMonitor(TrainingMonitor):
    """The real monitor, adding up the seconds spent in its calls and optimizer hooks and noting when each
    epoch_end() returns; train.py draws the confusion-matrix picture only to hand it over, so it counts too."""

    runs = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.spent, self.epochs = 0.0, []  # epochs: (time epoch_end returned, seconds inside since the last)
        TimedMonitor.runs.append(self)
        for name in ("_before_step", "step"):
            setattr(self, name, self._timed(getattr(self, name)))

    def _timed(self, call):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.spent += time.perf_counter() - start
        return run

    def epoch_end(self, *args, **kwargs):
        result = self._timed(super().epoch_end)(*args, **kwargs)
        self.epochs.append((time.perf_counter(), self.spent))
        self.spent = 0.0
        return result


def timed_picture(draw, runs):
    def run(*args):
        start = time.perf_counter()
        try:
            return draw(*args)
        finally:
            runs[-1].spent += time.perf_counter() - start
    return run


def time_train_py(epochs, repeats, tmp):
    """Per epoch of `train.py --epochs N` runs (all but the first epoch of each): the epoch's wall time
    (from one epoch_end() to the next) and the seconds spent inside the monitor during it."""
    train.TrainingMonitor = TimedMonitor
    draw = train.confusion_matrix_image
    train.confusion_matrix_image = timed_picture(draw, TimedMonitor.runs)
    try:
        for repeat in range(repeats):
            with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
                train.main(["--epochs", str(epochs), "--log-dir", tmp, "--run-name", f"run-{repeat}"])
    finally:
        train.TrainingMonitor, train.confusion_matrix_image = TrainingMonitor, draw
    walls, inside = [], []
    for run in TimedMonitor.runs:
        for (before, _), (after, spent) in zip(run.epochs, run.epochs[1:]):
            walls.append(after - before)
            inside.append(spent)
    return walls, inside


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6, help="epochs per variant")
    parser.add_argument("--runs", type=int, default=3, help="train.py runs")
    args = parser.parse_args()

    torch.manual_seed(0)
    loader, _, classes, _ = build_loaders(ROOT / "Data", 16, 0, torch.device("cpu"), 0)
    variants = {"no monitor": None, "monitor, defaults": {}, "monitor, --hist-every 10": {"hist_every": 10}}
    times = {name: [] for name in variants}
    inside = {name: [] for name in variants}  # seconds spent inside the monitor's calls, per epoch
    in_hooks = {name: 0.0 for name in variants}  # inside its optimizer hooks, since the epoch began

    def timed(hook, name):
        def run(*args):
            start = time.perf_counter()
            hook(*args)
            in_hooks[name] += time.perf_counter() - start
        return run

    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for name, options in variants.items():
            net = Net(num_classes=len(classes))
            net.initialize_weights()
            optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, dampening=0.1)
            monitor = None
            if options is not None:
                monitor = TrainingMonitor(f"{tmp}/{len(runs)}", **options)
                monitor._before_step = timed(monitor._before_step, name)  # its optimizer hook counts as inside
                monitor.watch(net, optimizer)
            runs[name] = (net, optimizer, monitor)
        criterion = nn.CrossEntropyLoss()
        for epoch in range(args.epochs + 1):  # epoch 0 warms up and is not counted
            for name, (net, optimizer, monitor) in runs.items():
                loader.batch_sampler.set_epoch(epoch)
                start, spent, in_hooks[name] = time.perf_counter(), 0.0, 0.0
                for inputs, labels in loader:
                    optimizer.zero_grad(set_to_none=True)
                    criterion(net(inputs), labels).backward()
                    optimizer.step()
                    if monitor:
                        called = time.perf_counter()
                        monitor.step()
                        spent += time.perf_counter() - called
                if monitor:
                    called = time.perf_counter()
                    monitor.epoch_end(epoch, {"train/loss": 0.0})
                    spent += time.perf_counter() - called
                if epoch:
                    times[name].append(time.perf_counter() - start)
                    inside[name].append(spent + in_hooks[name])
        for _, _, monitor in runs.values():
            if monitor:
                monitor.close()

        walls, spent_in_runs = time_train_py(args.epochs, args.runs, tmp)

    base = statistics.median(times["no monitor"])
    print(f"{'variant':34}{'median s':>12}{'overhead':>10}{'inside the monitor':>20}")
    for name, values in times.items():
        median, spent = statistics.median(values), statistics.median(inside[name])
        print(f"{name + ' (epoch)':34}{median:>12.3f}{(median / base - 1):>10.1%}"
              f"{f'{spent * 1e3:.1f} ms = {spent / base:.1%}':>20}")
    wall, spent = statistics.median(walls), statistics.median(spent_in_runs)
    print(f"{'train.py, monitor defaults (epoch)':34}{wall:>12.3f}{'':>10}"
          f"{f'{spent * 1e3:.1f} ms = {spent / (wall - spent):.1%}':>20}")
    print(f"train.py: {args.runs} runs of {args.epochs} epochs; an epoch there includes validation and checkpoints, "
          f"and the share is of the epoch without the monitor's time")


if __name__ == "__main__":
    main()
