"""Epoch-time overhead of the monitor at its defaults, on the sample data, measured side by side.

    python bench/monitor_overhead.py              # 6 epochs per variant, interleaved, medians

Runs train.py's loop (the cached sample digits, the tutorial's Net, SGD, batch 16) in one
process, alternating epochs between three variants: no monitor, the monitor at its defaults
(statistics every 20 steps, epoch histograms, gradient-flow image, diagnosis), and the monitor
with histograms every 10 steps as well. Prints the median epoch time of each and the overhead.
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
from data import build_loaders  # noqa: E402
from monitor import TrainingMonitor  # noqa: E402
from utils import Net  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6, help="epochs per variant")
    args = parser.parse_args()

    torch.manual_seed(0)
    loader, _, classes, _ = build_loaders(ROOT / "Data", 16, 0, torch.device("cpu"), 0)
    variants = {"no monitor": None, "monitor, defaults": {}, "monitor, --hist-every 10": {"hist_every": 10}}
    times = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for name, options in variants.items():
            net = Net(num_classes=len(classes))
            net.initialize_weights()
            optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, dampening=0.1)
            monitor = None
            if options is not None:
                monitor = TrainingMonitor(f"{tmp}/{len(runs)}", **options).watch(net, optimizer)
            runs[name] = (net, optimizer, monitor)
        criterion = nn.CrossEntropyLoss()
        for epoch in range(args.epochs + 1):  # epoch 0 warms up and is not counted
            for name, (net, optimizer, monitor) in runs.items():
                loader.batch_sampler.set_epoch(epoch)
                start = time.perf_counter()
                for inputs, labels in loader:
                    optimizer.zero_grad(set_to_none=True)
                    criterion(net(inputs), labels).backward()
                    optimizer.step()
                    if monitor:
                        monitor.step()
                if monitor:
                    monitor.epoch_end(epoch, {"train/loss": 0.0})
                if epoch:
                    times[name].append(time.perf_counter() - start)
        for _, _, monitor in runs.values():
            if monitor:
                monitor.close()

    base = statistics.median(times["no monitor"])
    print(f"{'variant':28}{'median epoch s':>16}{'overhead':>10}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:28}{median:>16.3f}{(median / base - 1):>10.1%}")


if __name__ == "__main__":
    main()
