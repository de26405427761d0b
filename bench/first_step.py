"""What reading the loop's facts at the first step costs: the loss's graph walked, the calls of the first training
step noted, the first two steps read whatever the cadence.

    python bench/first_step.py                      # ResNet-50 and a transformer, CPU
    python bench/first_step.py --models resnet50 --repeats 5

For each model, training steps (forward, cross-entropy, backward, SGD step, `monitor.step(loss)`) are timed
without a monitor, and with a fresh monitor reading statistics every 3 steps: its first step, which also walks the
loss's graph and notes the step's calls; its third, a statistics reading of the cadence; its fourth, no reading.
Printed: the medians (milliseconds), what the first step costs beyond a reading of the cadence, and the graph's
size.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from gradwatch import TrainingMonitor

sys.path.insert(0, os.path.dirname(__file__))
from histograms import MODELS  # noqa: E402  the models of bench/histograms.py


def step(model, optimizer, inputs, labels, monitor=None):
    """Seconds of one training step, with the monitor's step() when given."""
    start = time.perf_counter()
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(inputs).flatten(0, -2), labels)
    loss.backward()
    optimizer.step()
    if monitor is not None:
        monitor.step(loss)
    return time.perf_counter() - start


def bench(name, repeats):
    make_model, make_input = MODELS[name]
    torch.manual_seed(0)
    model = make_model()
    inputs = make_input("cpu")
    classes = model(inputs).shape[-1]
    labels = torch.randint(0, classes, model(inputs).shape[:-1]).flatten()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    times = {"plain": [], "first": [], "reading": [], "watched": []}
    step(model, optimizer, inputs, labels)  # warm-up
    with tempfile.TemporaryDirectory() as folder:
        for i in range(repeats):
            times["plain"].append(step(model, optimizer, inputs, labels))
            with TrainingMonitor(os.path.join(folder, str(i)), stats_every=3, diagnose_every=0).watch(
                model, optimizer
            ) as monitor:
                steps = [step(model, optimizer, inputs, labels, monitor) for _ in range(4)]
            times["first"].append(steps[0])
            times["reading"].append(steps[2])
            times["watched"].append(steps[3])
    ms = {key: 1000 * statistics.median(values) for key, values in times.items()}
    nodes = monitor.diagnosis.facts["loss"]["nodes"]
    print(f"{name:12} plain {ms['plain']:7.1f}  watched {ms['watched']:7.1f}  reading {ms['reading']:7.1f}  "
          f"first {ms['first']:7.1f} ms: the graph and the calls +{ms['first'] - ms['reading']:.1f} ms, once "
          f"({nodes:,} graph nodes)")  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,transformer", help="comma-separated, of: " + ", ".join(MODELS))
    parser.add_argument("--repeats", type=int, default=3, help="timed steps of each (default 3)")
    args = parser.parse_args(argv)
    for name in args.models.split(","):
        bench(name, args.repeats)


if __name__ == "__main__":
    main()
