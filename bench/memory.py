"""What the monitor keeps over a long loop without epochs: its memory and its state_dict() at 10k, 100k and
1M optimizer steps of a small model.

    python bench/memory.py                    # 10k, 100k and 1M steps (about 15 minutes on 2 CPU cores)
    python bench/memory.py --steps 10000 100000

The loop calls only watch() and step(loss), at the monitor's defaults (statistics every 50 steps, a diagnosis every
16 readings). At each mark it prints the size of what the monitor holds for its rules (the statistics records, the
summaries, the loss windows, the clipping norms and the findings, measured as the deep size of those Python objects),
the size of its pickled state_dict(), the number of summaries in its history and the size of the summaries it logged
(gradwatch-summaries.jsonl, which grows with the run, as its event files do); each figure with its ratio to the mark
before. Flat means a ratio near 1 once the history is full (128 summaries, which takes about 100,000 steps).
"""

import argparse
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from gradwatch import TrainingMonitor  # noqa: E402


def deep_size(value, seen=None):
    """The bytes of a Python object and of everything it holds (dicts, lists, tuples, sets, strings, numbers)."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return 0
    seen.add(id(value))
    size = sys.getsizeof(value)
    if isinstance(value, dict):
        size += sum(deep_size(k, seen) + deep_size(v, seen) for k, v in value.items())
    elif isinstance(value, (list, tuple, set)):
        size += sum(deep_size(v, seen) for v in value)
    elif hasattr(value, "__dict__"):
        size += deep_size(vars(value), seen)
    return size


def held(monitor):
    """What the monitor keeps for its rules."""
    parts = (monitor.diagnosis, monitor.losses.windows, monitor.clipping.norms, monitor.clipping.recent)
    return sum(deep_size(part) for part in parts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="the marks")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(32, 8)
    y = torch.randint(0, 4, (32,))
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        monitor = TrainingMonitor(os.path.join(tmp, "run")).watch(model, optimizer)
        for step in range(1, max(args.steps) + 1):
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            monitor.step(loss, grad_norm=norm, max_norm=1.0)
            if step in args.steps:
                state = len(pickle.dumps(monitor.state_dict()))
                log = os.path.getsize(os.path.join(tmp, "run", "gradwatch-summaries.jsonl"))
                rows.append((step, held(monitor), state, len(monitor.diagnosis.history), log))
                print(f"  {step:>9,} steps done, {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        monitor.close()
    print(f"{'steps':>10} {'held kB':>9} {'ratio':>6} {'state kB':>9} {'ratio':>6} {'summaries':>9} {'log kB':>8}")
    for before, (step, memory, state, summaries, log) in zip([rows[0], *rows], rows):
        print(f"{step:>10,} {memory / 1e3:9.1f} {memory / before[1]:6.2f} {state / 1e3:9.1f} {state / before[2]:6.2f} "
              f"{summaries:>9} {log / 1e3:8.0f}")  # fmt: skip
    print(f"{len(model.state_dict())} parameters; {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
