"""What comparing the replicas of a DistributedDataParallel run costs, against the training step it watches.

    python -m torch.distributed.run --nproc_per_node 2 bench/replicas.py                 # ResNet-18, CPU, gloo
    python -m torch.distributed.run --nproc_per_node 2 bench/replicas.py --steps 60 --batch 32

Every process trains torchvision's ResNet-18 (11.7M parameters in 62 tensors) under DistributedDataParallel on
CIFAR-10-size batches, three times in turns, a round at a time (the first round warms up and is not counted):

- plain: no monitor;
- monitor: a TrainingMonitor reading statistics at every step (stats_every=1), the replicas not compared;
- replicas: the same, the replicas compared at every reading (one asynchronous all_reduce of 4 numbers per
  parameter, in a gloo group of the monitor's own).

Printed, on rank 0: the median milliseconds of a step of each, the cost of one comparison (replicas minus monitor,
per reading), and that cost as a share of a step at the default cadence (a reading every 50 steps) and at every
step.
"""

import argparse
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torchvision
from torch import nn

from gradwatch import TrainingMonitor


def arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each variant per round (default 30)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the first one a warm-up (default 3)")
    parser.add_argument("--batch", type=int, default=32, help="images per process per step (default 32)")
    return parser.parse_args(argv)


def train(model, optimizer, monitor, steps, batch):
    """Median seconds of a training step (forward, backward, optimizer step, the monitor's step)."""
    inputs = torch.randn(batch, 3, 32, 32)
    labels = torch.randint(0, 10, (batch,))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
        if monitor is not None:
            monitor.step()
        times.append(time.perf_counter() - start)
    dist.barrier()
    return statistics.median(times)


def timings(args, model, optimizer, folder):
    """{variant: [median seconds of a step, per round after the first]}."""
    found = {"plain": [], "monitor": [], "replicas": []}
    for round_ in range(args.rounds):
        for name in found:
            monitor = None
            if name != "plain":
                monitor = TrainingMonitor(f"{folder}/{name}{round_}", stats_every=1)
                monitor.watch(model, optimizer, replicas=name == "replicas")
            seconds = train(model, optimizer, monitor, args.steps, args.batch)
            if monitor is not None:
                monitor.close()
            if round_:
                found[name].append(seconds)
    return found


def main(argv=None):
    args = arguments(argv)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(torchvision.models.resnet18(num_classes=10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with tempfile.TemporaryDirectory() as folder:
        timed = timings(args, model, optimizer, folder)
    if dist.get_rank() == 0:
        step = {name: 1000 * statistics.median(values) for name, values in timed.items()}
        cost = step["replicas"] - step["monitor"]
        print(f"ResNet-18 under DDP, {dist.get_world_size()} processes (gloo), batch {args.batch} per process")
        for name, ms in step.items():
            print(f"  {name:9} {ms:8.1f} ms a step")
        print(f"  one comparison of the replicas: {cost:.2f} ms ({cost / step['plain']:.2%} of a step)")
        print(f"  at the default cadence (a reading every 50 steps): {cost / 50 / step['plain']:.3%} of a step")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
