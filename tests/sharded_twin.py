"""Run under torchrun (2 processes, gloo): a model sharded with fully_shard and its unsharded twin train on the
same batches, each watched by a TrainingMonitor; rank 0 writes what both measured into <out>/results.json.

python -m torch.distributed.run --nproc_per_node 2 tests/sharded_twin.py OUT
"""

import copy
import gc
import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from gradwatch import TrainingMonitor, compute_histograms, gradient_flow, parameter_statistics
from gradwatch.stats import parameter_tensors


def histograms_json(histograms):
    return {
        name: dict(
            num=h.num,
            nonfinite=h.nonfinite,
            min=h.min,
            max=h.max,
            sum=h.sum,
            sum_squares=h.sum_squares,
            limits=h.bucket_limits.tolist(),
            counts=h.bucket_counts.tolist(),
        )
        for name, h in histograms.items()
    }


def measure(out, rank):
    torch.manual_seed(0)
    # 33 rows split 17/16; 3 rows 2/1; the last layer's single row leaves rank 1 an empty shard
    model = nn.Sequential(nn.Linear(16, 33), nn.ReLU(), nn.Linear(33, 3), nn.ReLU(), nn.Linear(3, 1))
    twin = copy.deepcopy(model)
    for module in (model[0], model[2], model[4], model):
        fully_shard(module)
    models = {"sharded": model, "twin": twin}
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=0.05) for name, m in models.items()}
    monitors = {
        name: TrainingMonitor(out / name, stats_every=1, hist_every=2).watch(m, optimizers[name])
        for name, m in models.items()
    }
    batches = torch.Generator().manual_seed(1)  # the same batches on both ranks: FSDP's mean gradient is theirs
    for epoch in range(2):
        for _ in range(3):
            inputs, targets = torch.randn(8, 16, generator=batches), torch.randn(8, 1, generator=batches)
            for name, m in models.items():
                optimizers[name].zero_grad()
                loss = nn.functional.mse_loss(m(inputs), targets)
                loss.backward()
                optimizers[name].step()
                monitors[name].step(loss)
        for monitor in monitors.values():
            monitor.epoch_end(epoch, {})
    for monitor in monitors.values():
        monitor.close()

    # Non-finite values in one rank's shard only: rank 1 holds rows 17-32 of the first weight, rank 0 the bias's 0
    if rank == 1:
        model[0].weight.grad.to_local()[0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    else:
        model[0].bias.grad.to_local()[0] = math.nan
    twin[0].weight.grad[17, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    twin[0].bias.grad[0] = math.nan
    tensors = parameter_tensors(model)
    return {
        "sharded": histograms_json(compute_histograms(tensors)),
        "gathered": histograms_json(compute_histograms({n: t.full_tensor() for n, t in tensors.items()})),
        "twin": histograms_json(compute_histograms(parameter_tensors(twin))),
        "values": {n: t.full_tensor().flatten().tolist() for n, t in tensors.items()},
        "local_sizes": {n: t.to_local().numel() for n, t in tensors.items()},
        "statistics": {name: parameter_statistics(m) for name, m in models.items()},
        "flow": {name: gradient_flow(m) for name, m in models.items()},
    }


def main(out):
    dist.init_process_group("gloo")
    results = measure(out, dist.get_rank())
    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results))
    # The sharded model freed while its process group lives: freed at interpreter exit, after the group, torch
    # 2.14.1 with gloo aborted 3 of 28 runs of this script ("terminate called without an active exception")
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
