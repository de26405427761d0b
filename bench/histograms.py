"""Time one full weight-and-gradient histogram log of a ResNet-50: the monitor against the tutorial's loop.

    python bench/histograms.py            # 9 repeats each after one warm-up round, CPU
    python bench/histograms.py --repeats 9 --device cuda

Both write every parameter's <name>_data and <name>_grad histogram once per repeat into their own
event folder (a temporary one), taking turns; the script prints the median time of a full log, the
ratio of the medians with the range of the repeats' own ratios, and the event-file bytes per histogram.
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from tensorboardX import SummaryWriter

import sys
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gradwatch import TrainingMonitor  # noqa: E402


def tutorial_log(writer, model, step):
    for name, layer in model.named_parameters():
        writer.add_histogram(name + '_grad', layer.grad.cpu().data.numpy(), step)
        writer.add_histogram(name + '_data', layer.cpu().data.numpy(), step)


def backward(model, device):
    model(torch.randn(8, 3, 224, 224, device=device)).logsumexp(1).sum().backward()


def timed(log, step, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    log(step)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def event_bytes(folder):
    return sum(f.stat().st_size for f in Path(folder).rglob("events.out.tfevents.*"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).to(device)
    backward(model, device)
    params = sum(p.numel() for p in model.parameters())
    histograms = 2 * len(list(model.parameters()))
    print(f"ResNet-50: {params / 1e6:.1f}M parameters, {histograms} histograms per log, device {device}, "
          f"{torch.get_num_threads()} CPU threads")

    with tempfile.TemporaryDirectory() as tmp:
        times = {"tutorial": [], "monitor": []}
        with SummaryWriter(f"{tmp}/tutorial") as writer, TrainingMonitor(f"{tmp}/monitor") as monitor:
            # each log ends with a flush, so its event writing is timed too and never spills into the other's turn
            logs = {"tutorial": lambda step: (tutorial_log(writer, model, step), writer.flush()),
                    "monitor": lambda step: (monitor.log_parameters(model, step), monitor.writer.flush())}
            for step in range(args.repeats + 1):  # interleaved, so that both see the same machine
                for name, log in logs.items():
                    backward(model, device)  # as in training, each log follows a backward pass
                    seconds = timed(log, step, device)
                    if step:  # the first round warms up (first allocations, lazy set-up) and is not counted
                        times[name].append(seconds)
        tutorial, ours = (statistics.median(times[name]) for name in ("tutorial", "monitor"))
        sizes = {name: event_bytes(f"{tmp}/{name}") / (histograms * (args.repeats + 1)) for name in ("tutorial", "monitor")}

    print(f"{'':28}{'median s / log':>16}{'bytes / histogram':>20}")
    print(f"{'tutorial add_histogram loop':28}{tutorial:>16.3f}{sizes['tutorial']:>20,.0f}")
    print(f"{'TrainingMonitor':28}{ours:>16.3f}{sizes['monitor']:>20,.0f}")
    paired = sorted(t / m for t, m in zip(times["tutorial"], times["monitor"]))  # each repeat's own ratio
    print(f"speed-up: {tutorial / ours:.1f}x (repeat by repeat: {paired[0]:.1f}x to {paired[-1]:.1f}x)   "
          f"size ratio: {sizes['tutorial'] / sizes['monitor']:.1f}x")


if __name__ == "__main__":
    main()
