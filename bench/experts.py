"""The monitor's cost against the number of tensors: a Mixture-of-Experts-shaped model, whose experts are
separate tensors, against a dense model of the same bytes, both watched at `stats_every=1`.

    python bench/experts.py                    # 16 layers of 64 two-matrix experts (2,050 tensors) and the dense twin
    python bench/experts.py --experts 256      # more, smaller experts: 8,194 tensors against 34, the same bytes
    python bench/experts.py --experts 625 --batch 1250 --threads 1 --rounds 1 --steps 6   # 20,002 tensors

Each layer of the expert model sends each of its slices of the batch through one expert (two matrices, no bias;
the batch needs a row for each expert); the dense twin's layer is one pair of matrices as wide as all the experts
together, run on the whole batch, so that both hold the same parameters and do about the same arithmetic. Per model
and thread count, two copies of the model, one watched, take their steps in turn on the same batch; printed: the
plain step (median), the monitor's added cost per step (every step is a statistics step): the median and the mean
of the paired differences (the mean counts the garbage collector's pauses, which a median hides), and `epoch_end`
(the histograms, one per family of experts, the gradient-flow picture, the diagnosis). The goals, expert model over
dense model: at most 2x a statistics step's added cost and 3x `epoch_end`.
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


def step(net, optimizer, x, y):
    loss = nn.functional.cross_entropy(net(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def measure(kind, args, threads, folder):
    """(tensors, plain step, added per step: median and mean, epoch_end) in seconds. Two copies of the model,
    one watched, take their steps in turn (each first in every other pair), so that the machine's slower spells
    hit both alike; the added cost is the paired differences' median and mean over `args.rounds` rounds, the
    first steps of each (the monitor's first readings, once) left out."""
    torch.set_num_threads(threads)
    x = torch.randn(args.batch, args.width)
    y = torch.randint(0, 10, (args.batch,))
    plain, added, ends = [], [], []
    for round_ in range(args.rounds):
        nets = [model(kind, args.layers, args.width, args.hidden, args.experts) for _ in range(2)]
        optimizers = [torch.optim.SGD(net.parameters(), lr=0.01) for net in nets]
        with TrainingMonitor(f"{folder}/{kind}-{threads}-{round_}", stats_every=1) as monitor:
            monitor.watch(nets[1], optimizers[1])
            for i in range(args.steps):
                times = [0.0, 0.0]
                for j in (0, 1) if i % 2 else (1, 0):
                    start = time.perf_counter()
                    loss = step(nets[j], optimizers[j], x, y)
                    if j == 1:
                        monitor.step(loss)
                    times[j] = time.perf_counter() - start
                if i >= 2:
                    plain.append(times[0])
                    added.append(times[1] - times[0])
            start = time.perf_counter()
            monitor.epoch_end(0, {"train/loss": 1.0})
            ends.append(time.perf_counter() - start)
    tensors = len(list(nets[0].parameters()))
    median, mean = statistics.median, statistics.fmean
    return tensors, median(plain), median(added), mean(added), median(ends)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=16, help="each expert's hidden width")
    parser.add_argument("--experts", type=int, default=64, help="experts per layer")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="steps per round and copy")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    print(f"{'model':8} {'threads':>7} {'tensors':>7} {'step':>9} {'added':>9} {'mean':>9} {'epoch_end':>9}")
    with tempfile.TemporaryDirectory() as folder:
        for threads in args.threads:
            found = {}
            for kind in ("dense", "experts"):
                tensors, plain, added, mean, end = measure(kind, args, threads, folder)
                found[kind] = (added, mean, end)
                print(f"{kind:8} {threads:7} {tensors:7} {plain * 1e3:7.1f}ms {added * 1e3:7.1f}ms "
                      f"{mean * 1e3:7.1f}ms {end:8.2f}s")  # fmt: skip
            ratios = [e / max(d, 1e-9) for e, d in zip(found["experts"], found["dense"])]
            print(f"  {threads} thread(s): experts over dense, added per statistics step {ratios[0]:.1f}x "
                  f"(mean {ratios[1]:.1f}x), epoch_end {ratios[2]:.1f}x (goals: 2x and 3x)")  # fmt: skip


if __name__ == "__main__":
    main()
