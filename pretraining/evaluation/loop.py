"""The resumable, iteration-based training loop of the dense protocols (`segment`, `detect`), and
their optimiser groups (BEiT's layer-wise lr decay).

mmsegmentation and detectron2 count iterations, not epochs (160k for ADE20K, 184375 for ViTDet),
so this loop does too. Iterations between two checkpoints form a chunk with its own seeds and its
own DataLoader: a run stopped anywhere and rerun with the same command repeats the interrupted
chunk and ends with exactly the weights of an uninterrupted run (tested on CPU). The run folder
holds `config.json` (the resolved config), `checkpoint.pt` (model, optimizer, iteration, config;
written atomically) and TensorBoard logs under `tb/`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from pretraining.evaluation.finetune import (
    CHECKPOINT,
    RunError,
    load_checkpoint,
    rank_world,
    save_checkpoint,
    seed_epoch,
)


def iteration_batches(n: int, batch: int, seed: int, rank: int, world: int, start: int, stop: int) -> list[list[int]]:
    """This rank's sample indices for iterations [start, stop): epoch e is a permutation of range(n)
    seeded by seed + e, cut into world x batch slices (the last partial slice dropped)."""
    per_epoch = n // (batch * world)
    if per_epoch == 0:
        raise RunError(f"{n} training samples make no batch of {batch * world}; lower --set batch_size")
    out, perms = [], {}
    for it in range(start, stop):
        epoch, pos = divmod(it, per_epoch)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        first = (pos * world + rank) * batch
        out.append(perms[epoch][first:first + batch])
    return out


def local_batch_size(batch_size: int, accum_steps: int = 1) -> int:
    """Samples per device and micro-batch for a global `batch_size`; a RunError when it does not divide."""
    _, world = rank_world()
    if batch_size % (world * accum_steps):
        raise RunError(f"batch_size {batch_size} is not divisible by devices x accum_steps = {world * accum_steps}; "
                       f"change --set batch_size or accum_steps")
    return batch_size // (world * accum_steps)


def layer_decay_groups(vit: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups for a timm ViT with BEiT's layer-wise lr decay, the rule mmsegmentation's and
    detectron2's configs for MAE use: patch / position embeddings and tokens get
    `layer_decay ** (depth + 1)`, block i `layer_decay ** (depth - i)` (the last block one factor),
    anything after the blocks the full lr. Norms, biases and `no_weight_decay()` have no weight decay.
    (timm's `param_groups_layer_decay` counts from the last parameter present, so a ViT without its
    final norm would leave the last block undecayed.) Each group carries `lr_scale` for timm's schedulers."""
    depth = len(vit.blocks)
    skip = set(vit.no_weight_decay()) if hasattr(vit, "no_weight_decay") else set()
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in vit.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        elif name.split(".")[0] in ("patch_embed", "pos_embed", "cls_token", "reg_token", "norm_pre"):
            layer = 0
        else:
            layer = depth + 1
        no_decay = param.ndim <= 1 or name in skip
        group = groups.setdefault((layer, no_decay), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                                      "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(param)
    return list(groups.values())


def train_iterations(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, dataset: Dataset,
                     loss_fn: Callable[[nn.Module, object], torch.Tensor], *, iterations: int, batch_size: int,
                     checkpoint_every: int, output: str, config: dict, device: torch.device, seed: int = 0,
                     accum_steps: int = 1, num_workers: int = 0, collate_fn=None, eval_every: int = 0,
                     evaluate: Callable[[], dict[str, float]] | None = None, clip_grad: float = 0.0,
                     name: str = "train", progress: bool = True) -> None:
    """Train `model` for `iterations` optimizer updates of `batch_size` samples (global), resuming
    from `output`/checkpoint.pt when it exists (and was written with the same `config`).

    `loss_fn(net, batch)` returns the scalar loss of one micro-batch; `net` is `model`, wrapped in
    DistributedDataParallel under torchrun. `evaluate()` (every `eval_every` iterations, at
    checkpoints) returns scalars logged under `val/`. Rank 0 writes the checkpoints.
    """
    rank, world = rank_world()
    local_batch = local_batch_size(batch_size, accum_steps)
    os.makedirs(output, exist_ok=True)
    if rank == 0:
        with open(os.path.join(output, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    start = 0
    state = load_checkpoint(os.path.join(output, CHECKPOINT), config)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["iteration"]
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    writer = SummaryWriter(os.path.join(output, "tb")) if rank == 0 else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    bar = tqdm(total=iterations, initial=start, desc=name, disable=not (progress and rank == 0))
    it = start
    while it < iterations:
        stop = min(iterations, (it // checkpoint_every + 1) * checkpoint_every)
        seed_epoch(seed, it, rank)  # every random draw of the chunk (augmentation, drop path) restarts here
        batches = iteration_batches(len(dataset), local_batch, seed, rank, world, it * accum_steps,
                                    stop * accum_steps)  # micro-batches
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate_fn,
                            generator=torch.Generator().manual_seed(seed + it), pin_memory=device.type == "cuda")
        net.train()
        for i, batch in enumerate(loader):
            last_micro = (i + 1) % accum_steps == 0
            with autocast, (net.no_sync() if world > 1 and not last_micro else contextlib.nullcontext()):
                loss = loss_fn(net, batch)
                (loss / accum_steps).backward()
            if not last_micro:
                continue
            scheduler.step_update(it)  # the lr of this update (timm applies each group's layer-decay scale)
            if clip_grad > 0:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            it += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if writer is not None and it % 20 == 0:
                writer.add_scalar("train/loss", loss.item(), it)
                writer.add_scalar("train/lr", max(g["lr"] for g in optimizer.param_groups), it)
        if evaluate is not None and eval_every and it % eval_every == 0 and it < iterations:
            scores = evaluate()
            for key, value in scores.items():
                if writer is not None:
                    writer.add_scalar(f"val/{key}", value, it)
        if rank == 0:
            save_checkpoint(os.path.join(output, CHECKPOINT), {"model": model.state_dict(),
                                                               "optimizer": optimizer.state_dict(), "iteration": it,
                                                               "config": config})
        if world > 1:
            dist.barrier()
    bar.close()
    if writer is not None:
        writer.close()

