"""What the monitor adds to each training step of the tutorial's CNN at batch 16, beside wandb.watch where it is
installed: the variants' steps taken in turn, step after step, so that the machine's slower spells hit all alike.

    python bench/step_cost.py                  # 6,000 steps of each variant
    python bench/step_cost.py --threads 1      # the same on one thread

The loop is the tutorial's step (utils.Net, SGD with momentum, cross-entropy, zero_grad to step) on batches already
in memory, so that the step is as short as it gets (about 2.5 ms on this machine's CPU) and the monitor's share as
large. Each variant trains its own copy of the model on the same batches; every variant takes its step i before
any takes step i + 1, each variant first in turn. The monitor runs at its defaults (statistics every 50 steps until
an epoch's length is known). wandb.watch runs offline at its defaults (gradients every 1,000 steps), with wandb.log
each step as its hooks need. Printed per variant: the median and the mean step; `added`, its mean step over the
plain loop's (statistics readings included); `between readings`, the median of its paired differences from the
plain loop's steps, over the steps without a statistics reading (the goal: within 2% of a step).
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
from gradwatch import TrainingMonitor  # noqa: E402
from utils import Net  # noqa: E402


class Variant:
    """One copy of the model and its optimizer, with what runs after each step (`after`), and whether a step
    is a statistics reading (`reading`)."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = Net()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.after = None
        self.reading = None
        self.times = []
        self.quiet = []  # the steps without a reading

    def step(self, inputs, labels):
        start = time.perf_counter()
        self.optimizer.zero_grad()
        loss = nn.functional.cross_entropy(self.model(inputs), labels)
        loss.backward()
        self.optimizer.step()
        if self.after is not None:
            self.after(loss)
        self.times.append(time.perf_counter() - start)
        self.quiet.append(self.reading is None or not self.reading(len(self.times)))


def with_gradwatch(variant, stack, folder):
    monitor = stack.enter_context(TrainingMonitor(folder).watch(variant.model, variant.optimizer))
    variant.after = monitor.step
    variant.reading = monitor.cadence.reads
    return variant


def with_wandb(variant, stack, folder):
    import wandb

    run = wandb.init(mode="offline", dir=folder, project="step-cost")
    stack.callback(run.finish)
    wandb.watch(variant.model)
    variant.after = lambda loss: wandb.log({"loss": loss.item()})  # its hooks log with the next log call
    return variant


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6000, help="steps of each variant")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_SILENT", "true")
    batches = [(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))) for _ in range(50)]
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stderr(open(os.devnull, "w")))  # noqa: SIM115 (its findings)
        variants = {"plain": Variant(), "gradwatch": with_gradwatch(Variant(), stack, f"{folder}/gradwatch")}
        try:
            variants["wandb.watch"] = with_wandb(Variant(), stack, folder)
        except ImportError:
            print("wandb is not installed: its variant is left out (pip install wandb)")
        order = list(variants.values())
        for step in range(args.steps):
            for variant in order[step % len(order) :] + order[: step % len(order)]:  # each goes first in turn
                variant.step(*batches[step % len(batches)])
    report(variants, args)


def report(variants, args):
    warm = args.steps // 10  # the first steps: caches, the monitor's first readings
    plain = variants["plain"].times[warm:]
    base = statistics.median(plain)
    print(f"{args.steps} steps of each variant, {args.threads} threads. added: the mean step over the plain loop's;")
    print("between readings: the median paired difference of the steps without a statistics reading")
    print(f"{'variant':12} {'median step':>12} {'mean step':>10} {'added':>8} {'between readings':>17}")
    for name, variant in variants.items():
        times = variant.times[warm:]
        differences = [t - p for t, p in zip(times, plain)]
        quiet = [d for d, q in zip(differences, variant.quiet[warm:]) if q]
        added = statistics.fmean(differences) / statistics.fmean(plain)
        print(f"{name:12} {statistics.median(times) * 1e3:10.3f}ms {statistics.fmean(times) * 1e3:8.3f}ms "
              f"{added:+8.1%} {statistics.median(quiet) / base:+16.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
