"""Process setup for single-process and torchrun (DDP) training: device, process group, seeds, autocast.

`torchrun --nproc_per_node=N train.py ...` sets RANK / LOCAL_RANK / WORLD_SIZE; `init` then joins the process
group (NCCL on GPUs with the local rank's device, gloo on CPUs). Without those variables it is one process.
Follows torch.distributed's init_process_group / DistributedDataParallel API.
"""

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def _device(choice, local_rank):
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("training.device is 'cuda' but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def init(seed, device="auto"):
    """Join the process group when launched by torchrun, pick the device, seed everything.
    Every rank uses the same seed, so models start identical (data sharding makes the batches differ)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    dev = _device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    seed_everything(seed)
    return Dist(rank, local_rank, world_size, dev)


def autocast(device, dtype="bfloat16"):
    """bf16 (or the configured dtype) autocast on CUDA; a null context on the CPU, which trains in float32."""
    if device.type != "cuda" or dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=getattr(torch, dtype))


def all_reduce(tensor, op="sum"):
    """In-place all-reduce when distributed (sum | mean | min | max); a no-op in a single process."""
    if dist.is_initialized():
        if op == "mean":
            dist.all_reduce(tensor, dist.ReduceOp.SUM)
            tensor /= dist.get_world_size()
        else:
            dist.all_reduce(tensor, getattr(dist.ReduceOp, op.upper()))
    return tensor


def barrier():
    if dist.is_initialized():
        dist.barrier()


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()
