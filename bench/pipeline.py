"""Training throughput at batch 16 on CIFAR-sized PNGs: the tutorial's loop, train.py, and the compute ceiling.

    python bench/pipeline.py                    # 5,000 generated 32x32 PNGs, 5 rounds, medians
    python bench/pipeline.py --device cuda      # the same on a GPU (train.py with its cache on the GPU)

In one process, on the same images and the same model step (the tutorial's Net, SGD with momentum),
in rounds that take one epoch of each variant in turn (so that a slower spell of the machine hits all
three alike):
- the tutorial's loop: MyDataset decoding each PNG with PIL every epoch, DataLoader without workers;
- train.py as users run it (its cache, its monitor at the defaults), images/s from its summary line;
- the compute ceiling: the same step on batches already in memory as tensors.
"""

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torchvision.transforms as transforms
from PIL import Image
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from data import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from utils import MyDataset, Net  # noqa: E402

BATCH = 16


def make_images(folder, count, seed=0):
    """`count` 32x32 RGB PNGs of smooth random blobs (10 classes) and their lists."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    (folder / "img").mkdir(parents=True)
    lines = []
    for i in range(count):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((32, 32), Image.Resampling.BICUBIC).save(folder / "img" / f"{i}.png")
        lines.append(f"img/{i}.png {i % 10}\n")
    (folder / "train.txt").write_text("".join(lines))
    (folder / "valid.txt").write_text("".join(lines[:200]))
    return folder


def model_step(device):
    torch.manual_seed(0)
    net = Net()
    net.initialize_weights()
    net.to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9, dampening=0.1)
    criterion = nn.CrossEntropyLoss()

    def step(inputs, labels):
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        optimizer.zero_grad()
        criterion(net(inputs), labels).backward()
        optimizer.step()

    return step


def timed_epoch(step, batches, images, device):
    start = time.perf_counter()
    for inputs, labels in batches:
        step(inputs, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def train_py_epoch(data_dir, log_dir, round_, device):
    """One train.py run of 2 epochs; the second epoch's images/s as its summary line reports it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        train.main(
            [
                "--data",
                str(data_dir),
                "--log-dir",
                str(log_dir),
                "--run-name",
                str(round_),
                "--epochs",
                "2",
                "--batch-size",
                str(BATCH),
                "--lr",
                "0.001",
                "--print-every",
                "100000",
                "--device",
                str(device),
            ]
        )
    events = EventAccumulator(str(Path(log_dir) / str(round_)))
    events.Reload()
    return events.Scalars("train/images_per_second")[-1].value


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of one epoch per variant")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU row")
    args = parser.parse_args()
    device = torch.device(args.device)
    normalize = transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)
    generator = torch.Generator().manual_seed(0)
    in_memory = [
        (
            torch.randn(BATCH, 3, 32, 32, generator=generator).to(device),
            torch.randint(0, 10, (BATCH,), generator=generator).to(device),
        )
        for _ in range(args.images // BATCH)
    ]
    ceiling_step, tutorial_step = model_step(device), model_step(device)
    names = [
        "compute ceiling (tensors in memory)",
        "tutorial loop (PIL per image, no workers)",
        "train.py (cache + monitor defaults)",
    ]
    rates = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = make_images(Path(tmp) / "data", args.images)
        dataset = MyDataset(
            txt_path=data_dir / "train.txt",
            transform=transforms.Compose(
                [transforms.Resize(32), transforms.RandomCrop(32, padding=4), transforms.ToTensor(), normalize]
            ),
        )
        tutorial_loader = DataLoader(dataset, batch_size=BATCH, shuffle=True)
        for round_ in range(args.rounds):
            rates[names[0]].append(timed_epoch(ceiling_step, in_memory, len(in_memory) * BATCH, device))
            rates[names[1]].append(timed_epoch(tutorial_step, tutorial_loader, len(dataset), device))
            rates[names[2]].append(train_py_epoch(data_dir, Path(tmp) / "runs", round_, device))
    results = {name: statistics.median(values) for name, values in rates.items()}
    top = results["compute ceiling (tensors in memory)"]
    print(
        f"batch {BATCH}, {args.images} images, {torch.get_num_threads()} threads, device {device}, "
        f"medians of {args.rounds} rounds"
    )
    print(f"{'':44}{'images/s':>10}{'of ceiling':>12}")
    for name, rate in results.items():
        print(f"{name:44}{rate:>10,.0f}{rate / top:>12.0%}   (rounds: {', '.join(f'{r:,.0f}' for r in rates[name])})")


if __name__ == "__main__":
    main()
