"""Time one full weight-and-gradient histogram log: the tutorial's loop, per-tensor torch.histc, and the monitor.

    python bench/histograms.py                          # ResNet-50 and a 162M-parameter transformer, CPU
    python bench/histograms.py --device cuda            # the same on a GPU
    python bench/histograms.py --models resnet50 --repeats 9

Every variant writes each parameter's <name>_data and <name>_grad histogram once per repeat into its own
event folder (a temporary one) and flushes it, so writing is timed too. The variants take turns after the
same backward pass, so that a slower spell of the machine hits all of them alike; a first round warms up
and is not counted. Printed per model: the median milliseconds of a full log, for the monitor split into
computing the histograms and writing them; the ratios of the medians; event bytes per histogram.

- tutorial: `writer.add_histogram(name + '_grad', layer.grad.cpu().data.numpy(), epoch)`, as Chapter 4.4;
- histc: what peers such as wandb.watch do, per tensor on its device: min and max (read by the host),
  `torch.histc` with 64 bins, sums, then `add_histogram_raw`;
- monitor: `TrainingMonitor.log_parameters` (compute_histograms, then one event for all histograms).
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from tensorboardX import SummaryWriter

from gradwatch import TrainingMonitor, compute_histograms
from gradwatch.stats import parameter_tensors


def transformer(vocabulary=50257, width=768, layers=12):
    """A GPT-2-small-sized encoder with its own output layer: 162M parameters."""
    layer = torch.nn.TransformerEncoderLayer(width, width // 64, 4 * width, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    return torch.nn.Sequential(torch.nn.Embedding(vocabulary, width), encoder, torch.nn.Linear(width, vocabulary))


MODELS = {  # name: (model, one batch of its input)
    "resnet50": (lambda: torchvision.models.resnet50(weights=None), lambda d: torch.randn(8, 3, 224, 224, device=d)),
    "transformer": (transformer, lambda d: torch.randint(0, 50257, (2, 64), device=d)),
}


def tutorial_log(writer, model, step):
    for name, layer in model.named_parameters():
        writer.add_histogram(name + "_grad", layer.grad.cpu().data.numpy(), step)
        writer.add_histogram(name + "_data", layer.cpu().data.numpy(), step)


def histc_log(writer, model, step, bins=64):
    for tag, tensor in parameter_tensors(model).items():
        x = tensor.detach().reshape(-1).float()
        if not torch.isfinite(x).all():
            x = x[torch.isfinite(x)]
        lo, hi = torch.aminmax(x)
        lo, hi = lo.item(), hi.item()  # note: a host sync per tensor
        counts = torch.histc(x, bins, lo, hi).cpu().tolist()
        limits = torch.linspace(lo, hi, bins + 1)[1:].tolist()
        writer.add_histogram_raw(tag, lo, hi, x.numel(), x.sum().item(), x.dot(x).item(), limits, counts, step)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def event_bytes(folder):
    return sum(f.stat().st_size for f in Path(folder).rglob("events.out.tfevents.*"))


def bench(name, device, repeats, tmp):
    make_model, make_input = MODELS[name]
    torch.manual_seed(0)
    model = make_model().to(device)
    params = sum(p.numel() for p in model.parameters())
    histograms = 2 * len(list(model.parameters()))
    print(f"\n{name}: {params / 1e6:.1f}M parameters, {histograms} histograms per log", flush=True)
    with (
        SummaryWriter(f"{tmp}/{name}-tutorial") as tutorial,
        SummaryWriter(f"{tmp}/{name}-histc") as histc,
        TrainingMonitor(f"{tmp}/{name}-monitor") as monitor,
    ):
        times = {"tutorial": [], "histc": [], "monitor": [], "monitor: compute": [], "monitor: write": []}

        def monitor_log(step):
            start = time.perf_counter()
            computed = compute_histograms(parameter_tensors(model), monitor.choice.bins)
            synchronize(device)
            computing = time.perf_counter() - start
            monitor.sink.histograms(computed, step)
            monitor.flush()
            return computing

        logs = {
            "tutorial": lambda step: (tutorial_log(tutorial, model, step), tutorial.flush()),
            "histc": lambda step: (histc_log(histc, model, step), histc.flush()),
            "monitor": monitor_log,
        }
        for step in range(repeats + 1):
            for variant, log in logs.items():
                model.zero_grad(set_to_none=True)
                model(make_input(device)).float().logsumexp(-1).sum().backward()
                synchronize(device)
                start = time.perf_counter()
                computing = log(step)
                synchronize(device)
                if step:  # the first round warms up (first allocations, lazy set-up)
                    times[variant].append(time.perf_counter() - start)
                    if variant == "monitor":
                        times["monitor: compute"].append(computing)
                        times["monitor: write"].append(times["monitor"][-1] - computing)
    medians = {variant: statistics.median(values) for variant, values in times.items()}
    sizes = {
        v: event_bytes(f"{tmp}/{name}-{v}") / (histograms * (repeats + 1)) for v in ("tutorial", "histc", "monitor")
    }
    print(f"{'variant':20}{'ms per log':>12}{'bytes per histogram':>22}")
    for variant, median in medians.items():
        size = f"{sizes[variant]:,.0f}" if variant in sizes else ""
        print(f"{variant:20}{median * 1e3:>12.1f}{size:>22}")
    print(
        f"monitor: {medians['tutorial'] / medians['monitor']:.1f}x faster than the tutorial's loop, "
        f"{medians['histc'] / medians['monitor']:.1f}x faster than per-tensor histc",
        flush=True,
    )


def parse_arguments(doc, device_help, models):
    """The options of this benchmark and bench/sharded.py: --repeats, --device and --models, the last split into a
    list of names of MODELS (exit with one line for an unknown one)."""
    parser = argparse.ArgumentParser(
        description=doc.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up round (default 3)")
    parser.add_argument("--device", default="cpu", help=device_help)
    parser.add_argument("--models", default=models, help="comma-separated: resnet50, transformer")
    args = parser.parse_args()
    args.models = args.models.split(",")
    unknown = [name for name in args.models if name not in MODELS]
    if unknown:
        sys.exit(f"error: unknown model {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    return args


def main():
    args = parse_arguments(__doc__, "cpu (default), cuda, cuda:N", "resnet50,transformer")
    device = torch.device(args.device)
    print(f"device {device}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}, {args.repeats} repeats")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            bench(name, device, args.repeats, tmp)


if __name__ == "__main__":
    main()
