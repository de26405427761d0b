"""Time a histogram log and a statistics reading of a model sharded with FSDP2 against the same model unsharded.

    python -m torch.distributed.run --nproc_per_node 2 bench/sharded.py                  # ResNet-50, CPU, gloo
    python -m torch.distributed.run --nproc_per_node 2 bench/sharded.py --device cuda    # GPUs, nccl
    python -m torch.distributed.run --nproc_per_node 2 bench/sharded.py --models resnet50,transformer --repeats 5

Every process builds the model, keeps an unsharded copy, shards the model with `fully_shard` (each residual block
or transformer layer, then the root) and runs one forward and backward pass of the same batch through both, so
that both hold the same weights and gradients. Then, in turns, a round at a time (the first round warms up and is
not counted), rank 0 times:

- unsharded: `TrainingMonitor.log_parameters` of the unsharded copy, on every rank (as under DDP, where each rank
  holds the whole model): the histograms of 2 x parameters tensors, written and flushed by rank 0;
- sharded: the same call on the sharded model: each rank bins its shards, and minima, maxima, sums and bucket
  counts are combined by all-reduce (O(bins) numbers per tensor);
- gather: what one would do without it: `full_tensor()` of every tensor (an all-gather of the whole model onto
  every rank), then the unsharded histograms;
- and `parameter_statistics` (norms, update ratios' inputs, zero shares) of the unsharded copy and of the sharded
  model.

Printed: the median milliseconds of each, the ratios, and the bytes each rank sends for the sharded histograms
against the bytes of the parameters and gradients that the gather moves.
"""

import copy
import gc
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torchvision
from torch.distributed.fsdp import fully_shard

from gradwatch import TrainingMonitor, compute_histograms, parameter_statistics
from gradwatch.stats import parameter_tensors

sys.path.insert(0, os.path.dirname(__file__))
from histograms import MODELS, parse_arguments  # noqa: E402  the models and options of bench/histograms.py


def blocks(model):
    """The modules FSDP2 shards one by one: ResNet's bottleneck blocks, a transformer's layers."""
    kinds = (torchvision.models.resnet.Bottleneck, torch.nn.TransformerEncoderLayer)
    return [module for module in model.modules() if isinstance(module, kinds)]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()


def bench(name, device, repeats, tmp):
    make_model, make_input = MODELS[name]
    torch.manual_seed(0)
    model = make_model().to(device)
    twin = copy.deepcopy(model)
    for block in blocks(model):
        fully_shard(block)
    fully_shard(model)
    torch.manual_seed(1)
    batch = make_input(device)
    for m in (model, twin):
        m(batch).float().logsumexp(-1).sum().backward()
    tensors = len(parameter_tensors(twin))
    params = sum(p.numel() for p in twin.parameters())
    if dist.get_rank() == 0:
        print(f"\n{name}: {params / 1e6:.1f}M parameters, {tensors} histograms per log", flush=True)

    monitors = {v: TrainingMonitor(f"{tmp}/{name}-{v}") for v in ("unsharded", "sharded", "gather")}

    def gather_log(step):
        whole = {tag: t.full_tensor() for tag, t in parameter_tensors(model).items()}
        monitors["gather"].sink.histograms(compute_histograms(whole, monitors["gather"].choice.bins), step)

    runs = {
        "unsharded": lambda step: monitors["unsharded"].log_parameters(twin, step),
        "sharded": lambda step: monitors["sharded"].log_parameters(model, step),
        "gather": gather_log,
        "statistics, unsharded": lambda step: parameter_statistics(twin),
        "statistics, sharded": lambda step: parameter_statistics(model),
    }
    times = {variant: [] for variant in runs}
    for step in range(repeats + 1):
        for variant, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            run(step)
            for monitor in monitors.values():
                monitor.flush()
            synchronize(device)
            if step:  # the first round warms up
                times[variant].append(time.perf_counter() - start)
    for monitor in monitors.values():
        monitor.close()
    if dist.get_rank() != 0:
        return
    medians = {variant: statistics.median(values) * 1e3 for variant, values in times.items()}
    print(f"{'variant':24}{'ms (median)':>12}")
    for variant, median in medians.items():
        print(f"{variant:24}{median:>12.1f}")
    # min, max, their NaN flags, 2 sums; bucket counts
    reduced = tensors * (6 + monitors["sharded"].choice.bins + 1) * 8
    print(
        f"sharded histograms: {medians['unsharded'] / medians['sharded']:.2f}x the speed of unsharded ones, "
        f"{medians['gather'] / medians['sharded']:.2f}x that of gathering first; statistics: "
        f"{medians['statistics, unsharded'] / medians['statistics, sharded']:.2f}x. The sharded histograms all-reduce "
        f"{reduced / 1e3:,.0f} kB; a gather moves {2 * params * 4 / 1e6:,.0f} MB of weights and gradients.",
        flush=True,
    )


def main():
    args = parse_arguments(__doc__, "cpu (default, gloo) or cuda (nccl, a GPU per process)", "resnet50")
    if "LOCAL_RANK" not in os.environ:
        sys.exit("error: run under torchrun: python -m torch.distributed.run --nproc_per_node 2 bench/sharded.py")
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_rank() == 0:
        print(
            f"{dist.get_world_size()} processes on {device.type}, {torch.get_num_threads()} CPU threads each, "
            f"torch {torch.__version__}, {args.repeats} repeats"
        )
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            bench(name, device, args.repeats, tmp)
    gc.collect()  # the sharded models freed before their group, as in distributed.py's Distributed.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
