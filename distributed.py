"""Process setup for single-process and torchrun (DDP) training: device, process group, seeds, CPU threads and
mixed precision.

`torchrun --nproc_per_node=N train.py ...` sets RANK / LOCAL_RANK / WORLD_SIZE; `init` then joins the process
group (NCCL on GPUs with the local rank's device, gloo on CPUs). Without those variables it is one process.
Follows torch.distributed's init_process_group / DistributedDataParallel API and torch.amp (autocast,
GradScaler: https://pytorch.org/docs/stable/amp.html).

CPU threads: torch's OpenMP runtime (libgomp) lets idle threads spin-wait, which stalls every parallel op when
another process holds a core. `OMP_WAIT_POLICY=PASSIVE` makes them sleep instead, but libgomp reads it only
once, when torch loads: this module sets it before importing torch, so scripts import it before torch.
"""

import contextlib
import datetime
import gc
import os
import random
import sys
from collections import Counter
from dataclasses import dataclass

# Whether the wait policy reaches libgomp: set by the user, or torch not loaded yet (then set here).
WAIT_POLICY_APPLIES = "OMP_WAIT_POLICY" in os.environ or "torch" not in sys.modules
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

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
        # TF32 for float32 matmuls (what autocast leaves in float32); cuDNN convolutions use TF32 by default
        torch.set_float32_matmul_precision("high")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def pick_device(name="auto"):
    """A device for inference commands: `auto` is cuda when available, else cpu."""
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def init(seed, device="auto", timeout_min=60):
    """Join the process group when launched by torchrun, pick the device, seed everything.
    Every rank uses the same seed, so models start identical (data sharding makes the batches differ).
    `timeout_min`: how long a collective waits for every rank (training.dist_timeout_min): long enough for the
    other ranks to wait at a barrier while rank 0 writes a checkpoint (~20 GB at 1.7B with the optimizer's state:
    over NCCL's default 10 minutes at 30 MB/s)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    dev = _device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None,
                                timeout=datetime.timedelta(minutes=timeout_min))
    seed_everything(seed)
    return Dist(rank, local_rank, world_size, dev)


def resolve_dtype(device, dtype="auto"):
    """`training.dtype` for this device: "auto" is bfloat16 on CUDA and float32 on the CPU, where bf16 is fast
    only with native support (AVX512-BF16 / AMX) and ~7x slower than float32 without it (README, Throughput)."""
    if dtype == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return dtype


def autocast(device, dtype="auto"):
    """Autocast to `dtype` (bfloat16 | float16) on the device's type, CPU included; float32 is a null context.
    Parameters stay float32 (the master weights); matmuls and attention run in the low precision."""
    dtype = resolve_dtype(device, dtype)
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def grad_scaler(device, dtype="auto"):
    """A loss scaler for float16 (whose range underflows small gradients); disabled, a pass-through, otherwise:
    `scale(loss)` returns the loss and `step(optimizer)` just steps."""
    return torch.amp.GradScaler(device.type, enabled=resolve_dtype(device, dtype) == "float16")


def default_threads():
    """CPU threads when none are given: OMP_NUM_THREADS when set (torchrun sets 1); else this process's share
    of its cores (cores / processes on the node) when the PASSIVE wait policy is in effect; else 1, since
    spin-waiting threads collapse on a shared CPU (README, CPU threads)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    if not WAIT_POLICY_APPLIES:
        return 1
    return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def set_threads(n=None):
    """Set torch's CPU (intra-op) threads to `n`, or `default_threads()` when None; returns the number set."""
    if n is not None and n < 1:
        raise ValueError(f"threads must be at least 1, got {n}")
    torch.set_num_threads(n or default_threads())
    return torch.get_num_threads()


def all_reduce(tensor, op="sum"):
    """In-place all-reduce when distributed (sum | mean | min | max); a no-op in a single process."""
    if dist.is_initialized():
        if op == "mean":
            dist.all_reduce(tensor, dist.ReduceOp.SUM)
            tensor /= dist.get_world_size()
        else:
            dist.all_reduce(tensor, getattr(dist.ReduceOp, op.upper()))
    return tensor


def gather_objects(obj):
    """Every rank's `obj` (picklable), in rank order (all_gather_object); [obj] in one process."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def sum_counts(counts):
    """A {name: count} Counter summed over the ranks (all_gather_object); the Counter itself in one process."""
    if not dist.is_initialized():
        return Counter(counts)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(counts))
    return sum((Counter(c) for c in gathered), Counter())


def barrier():
    if dist.is_initialized():
        dist.barrier()


def cleanup():
    """Destroy the process group, after collecting what still holds it. A DDP wrapper's reducer that outlives the
    group and drops the last reference to it runs gloo's destructor with the GIL held, which can deadlock with
    gloo's worker thread releasing a finished collective (seen at the end of 2-process runs); destroyed here,
    the group goes without the GIL."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
