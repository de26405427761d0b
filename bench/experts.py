"""The monitor's cost against the number of tensors: a Mixture-of-Experts-shaped model, whose experts are
separate tensors, against a dense model of the same bytes, both watched at `stats_every=1`.

    python bench/experts.py                    # 16 layers of 64 two-matrix experts (2,050 tensors) and the dense twin
    python bench/experts.py --experts 256      # more, smaller experts: 8,194 tensors against 34, the same bytes
    python bench/experts.py --experts 625 --batch 1250 --threads 1 --rounds 1 --steps 4   # 20,002 tensors

Each layer of the expert model sends each of its slices of the batch through one expert (two matrices, no bias;
the batch needs a row for each expert); the dense twin's layer is one pair of matrices as wide as all the experts
together, run on the whole batch, so that both hold the same parameters and do about the same arithmetic. Per model
and thread count, the same loop runs with no monitor and with one, alternating, and the figures are medians: the
step time, the monitor's added cost per step (every step is a statistics step), and `epoch_end` (the histograms, one
per family of experts, the gradient-flow picture, the diagnosis). The goals, expert model over dense model: at most
2x a statistics step's added cost and 3x `epoch_end`.
"""

import argparse
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


class Experts(nn.Module):
    """One layer of `count` experts (width -> hidden -> width, no bias), slice i of the batch to expert i."""

    def __init__(self, width, hidden, count):
        super().__init__()
        self.up = nn.ParameterList(nn.Parameter(torch.randn(hidden, width) / width**0.5) for _ in range(count))
        self.down = nn.ParameterList(nn.Parameter(0.1 * torch.randn(width, hidden) / hidden**0.5) for _ in range(count))

    def forward(self, x):
        slices = x.chunk(len(self.up))
        outputs = [torch.relu(s @ up.T) @ down.T for s, up, down in zip(slices, self.up, self.down)]
        return x + torch.cat(outputs)


class Dense(nn.Module):
    """The same bytes as Experts, in one pair of matrices run on the whole batch."""

    def __init__(self, width, hidden, count):
        super().__init__()
        self.up = nn.Parameter(torch.randn(hidden * count, width) / width**0.5)
        self.down = nn.Parameter(0.1 * torch.randn(width, hidden * count) / (hidden * count) ** 0.5)

    def forward(self, x):
        return x + torch.relu(x @ self.up.T) @ self.down.T


def model(kind, layers, width, hidden, count, classes=10):
    torch.manual_seed(0)
    block = Experts if kind == "experts" else Dense
    return nn.Sequential(
        nn.Linear(width, width, bias=False),
        *(block(width, hidden, count) for _ in range(layers)),
        nn.Linear(width, classes, bias=False),
    )


def timed_steps(net, monitor, steps, batch, width):
    """Seconds per step (median) of `steps` SGD steps, each given to `monitor` if there is one."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    if monitor is not None:
        monitor.watch(net, optimizer)
    x = torch.randn(batch, width)
    y = torch.randint(0, 10, (batch,))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if monitor is not None:
            monitor.step(loss)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])  # the first steps: the monitor's first readings, once


def measure(kind, args, threads, folder):
    """(tensors, plain step, monitored step, epoch_end) in seconds, medians over `args.rounds` rounds."""
    torch.set_num_threads(threads)
    plain, watched, ends = [], [], []
    for round_ in range(args.rounds):
        net = model(kind, args.layers, args.width, args.hidden, args.experts)
        plain.append(timed_steps(net, None, args.steps, args.batch, args.width))
        with TrainingMonitor(f"{folder}/{kind}-{threads}-{round_}", stats_every=1) as monitor:
            watched.append(timed_steps(net, monitor, args.steps, args.batch, args.width))
            start = time.perf_counter()
            monitor.epoch_end(0, {"train/loss": 1.0})
            ends.append(time.perf_counter() - start)
    tensors = len(list(net.parameters()))
    return tensors, statistics.median(plain), statistics.median(watched), statistics.median(ends)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=16, help="each expert's hidden width")
    parser.add_argument("--experts", type=int, default=64, help="experts per layer")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12, help="steps per round and variant")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    print(f"{'model':8} {'threads':>7} {'tensors':>7} {'step':>9} {'watched':>9} {'added':>9} {'epoch_end':>9}")
    with tempfile.TemporaryDirectory() as folder:
        for threads in args.threads:
            found = {}
            for kind in ("dense", "experts"):
                tensors, plain, watched, end = measure(kind, args, threads, folder)
                found[kind] = (watched - plain, end)
                print(f"{kind:8} {threads:7} {tensors:7} {plain * 1e3:7.1f}ms {watched * 1e3:7.1f}ms "
                      f"{(watched - plain) * 1e3:7.1f}ms {end:8.2f}s")  # fmt: skip
            added = found["experts"][0] / max(found["dense"][0], 1e-9)
            ends = found["experts"][1] / max(found["dense"][1], 1e-9)
            print(f"  {threads} thread(s): experts over dense, added per statistics step {added:.1f}x, "
                  f"epoch_end {ends:.1f}x (goals: 2x and 3x)")  # fmt: skip


if __name__ == "__main__":
    main()
