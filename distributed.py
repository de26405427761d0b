"""Where train.py runs: one process, or one of a torchrun job (DistributedDataParallel, or FSDP2
with --fsdp), and the collectives its loop needs.

    torchrun --nproc_per_node 2 train.py          # the model copied to each process (DDP)
    torchrun --nproc_per_node 2 train.py --fsdp   # its parameters sharded over them (FSDP2)
"""

import gc
import os
import sys

import torch

from gradwatch import is_main_process


class Distributed:
    """This process's place in a torchrun job (WORLD_SIZE, RANK and LOCAL_RANK set by torchrun), or rank 0 of 1.

    Every rank runs the same loop on its shard of each epoch; the main process (rank 0, is_main_process())
    alone prints, writes events and checkpoints. The collectives below are no-ops for a single process.
    """

    def __init__(self, device_name, fsdp=False):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if device_name == "auto":
            device_name = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device_name)
        if self.world_size > 1 or fsdp:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.is_main = is_main_process()
        if not self.is_main:  # one console for the job: the other ranks stay quiet
            sys.stdout = sys.stderr = open(os.devnull, "w")

    def sum(self, values):
        """Sum a list of numbers over all ranks."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag):
        """True on every rank when it is true on one: a stop request must stop all ranks at the same step."""
        return self.sum([float(flag)])[0] > 0

    def broadcast(self, value):
        """Rank 0's value on every rank."""
        box = [value]
        if self.world_size > 1:
            torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def close(self):
        if torch.distributed.is_initialized():
            # An FSDP model outlives train() in reference cycles; freed at exit, after its gloo group, it can abort
            # the exit in torch 2.14.1 ("terminate called without an active exception"): freed while the group lives
            gc.collect()
            torch.distributed.destroy_process_group()


def shard_model(net, dist):
    """FSDP2, as PyTorch's guide does it: each layer that holds parameters is sharded over all processes (gathered
    for its own forward and backward only), then the root module (what is left, and when to gather)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    for module in net.modules():
        if module is not net and any(True for _ in module.parameters(recurse=False)):
            fully_shard(module, mesh=mesh)
    fully_shard(net, mesh=mesh)
