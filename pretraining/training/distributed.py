"""The processes of a run: joining torchrun's process group (or running alone), wrapping the model for
them (DDP, then compile), and the few collectives the training loop needs outside DDP's gradient sync."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(loader_workers: int = 0) -> Distributed:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs), or run alone.

    On a CPU (unless OMP_NUM_THREADS is set), also size torch's thread pool to the cores left by
    `loader_workers` per process.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # The loader's workers take a core each; this process's threads share the rest with the other
        # local ranks (oversubscribed OpenMP threads spin and slow everything down).
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (cores - local * loader_workers) // local))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank() if world_size > 1 else 0, world_size, device)


def parallelize(model: torch.nn.Module, distributed: Distributed, compile: bool) -> torch.nn.Module:
    """The module the loop calls: `model` in DDP when there are several processes, then torch.compile'd when
    `compile` (PyTorch's documented order: dynamo then splits the graph at DDP's gradient buckets, so their
    all-reduce overlaps the backward; compiled first, DDP would wait for the whole backward). `model`
    itself stays the bare module (checkpoints, figures, export)."""
    wrapped = model
    if distributed.world_size > 1:
        # forward_sync_buffers=False: the only buffers are fixed sin-cos position embeddings, equal on every
        # rank, so no forward pass syncs them (torch 2.14's name for the deprecated broadcast_buffers=False).
        device = distributed.device
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          forward_sync_buffers=False)
    return torch.compile(wrapped) if compile else wrapped


def mean_over_ranks(values: torch.Tensor, distributed: Distributed) -> torch.Tensor:
    """`values` averaged over the ranks (all-reduce), or as they are in a single process."""
    if distributed.world_size > 1:
        dist.all_reduce(values)
        values = values / distributed.world_size
    return values


def param_hash(model: torch.nn.Module) -> str:
    """sha256 of the model's state, bit for bit: ranks that ended in sync give the same one."""
    digest = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def gather(obj, distributed: Distributed) -> list:
    """Every rank's `obj` (a picklable value), in rank order."""
    if distributed.world_size == 1:
        return [obj]
    out = [None] * distributed.world_size
    dist.all_gather_object(out, obj)
    return out
