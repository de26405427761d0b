"""Run under torchrun with 2 gloo processes by tests/test_replicas.py: a small DistributedDataParallel
loop, healthy or with one of the bugs that make the replicas of a data-parallel run drift apart in silence,
each reproduced the way users hit it. Writes each run's findings (and its facts) as JSON to OUT/<bug>.json."""

import gc
import json
import math
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from gradwatch import TrainingMonitor

BUGS = ("healthy", "unwrapped", "moved", "no_sync", "loaded_on_one_rank", "nan_on_one_rank", "extra_step")
# FSDP2 with a replicate dimension (HSDP): a mesh of 2 replicas of 1 shard each
HSDP = ("hsdp_healthy", "hsdp_loaded_on_one_rank")


def wrapped(bug, net):
    """The model as the loop trains it: DistributedDataParallel, or FSDP2 over a (replicate, shard) mesh."""
    if bug not in HSDP:
        return nn.parallel.DistributedDataParallel(net)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard"))
    for module in (net[0], net[2], net):
        fully_shard(module, mesh=mesh)
    return net


def run(bug, out):
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    model = wrapped(bug, net)
    if bug == "moved":  # moved after wrapping: DDP's gradient hooks stay on the float32 tensors
        model = model.double()
    dtype = next(net.parameters()).dtype
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if bug.endswith("loaded_on_one_rank") and rank == 0:  # a checkpoint loaded by rank 0 alone, after wrapping
        with torch.no_grad():
            for p in net.parameters():
                (p.to_local() if hasattr(p, "to_local") else p).mul_(0.5)
    generator = torch.Generator().manual_seed(rank)  # each rank its own shard of the data
    monitor = TrainingMonitor(os.path.join(out, bug), stats_every=5).watch(model, optimizer)
    for step in range(1, 21):
        x = torch.randn(16, 8, generator=generator, dtype=dtype)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        optimizer.zero_grad()
        forward = model.module if bug == "unwrapped" and step % 2 else model  # now and then the inner module
        if bug == "no_sync":
            with model.no_sync():  # the whole step: the gradients stay each rank's own
                loss = nn.functional.cross_entropy(forward(x), y)
                loss.backward()
        else:
            loss = nn.functional.cross_entropy(forward(x), y)
            loss.backward()
        optimizer.step()
        reported = loss.detach() * math.nan if bug == "nan_on_one_rank" and rank == 1 and step == 7 else loss
        monitor.step(reported)
        if bug == "extra_step" and rank == 1 and step == 8:
            monitor.step(loss)  # one call too many on one rank
    monitor.close()
    if rank == 0:
        saved = {"findings": [f.to_json() for f in monitor.findings], "facts": monitor.diagnosis.facts}
        with open(os.path.join(out, f"{bug}.json"), "w") as fh:
            json.dump(saved, fh, default=str)
    dist.barrier()


if __name__ == "__main__":
    dist.init_process_group("gloo")
    for bug in sys.argv[2:] or BUGS + HSDP:
        run(bug, sys.argv[1])
        gc.collect()
    dist.destroy_process_group()
