"""How a run's global batch is spread over its processes, and the banner every start prints.

A recipe states the global batch (`TrainConfig.global_batch`: samples per optimizer step over all
ranks) and `data.batch_size`, the most samples one process computes at once. At start the run
takes the fewest micro-batches per optimizer step whose equal split reaches the global batch:

    accum = the smallest a >= ceil(global / (ranks x batch_size)) with ranks x a dividing global
    per-process batch = global / (ranks x accum)

so 4096 is 256 x 8 x 2 on 8 GPUs and 128 x 32 x 1 on 32. A global batch the ranks cannot split
evenly (4096 over 24 GPUs) is refused in one sentence naming the GPU counts and global batches
that fit. Without a global batch (the tiny CPU twin) each process computes one micro-batch of
`data.batch_size`: global = batch_size x ranks. The learning rate is MAE's base_lr x global / 256
(or the config's absolute `optim.lr`), so it never depends on the allocation.
"""

from __future__ import annotations

from dataclasses import dataclass

from pretraining.training.config import ConfigError


@dataclass(frozen=True)
class Allocation:
    world_size: int  # processes (GPUs)
    per_gpu: int  # samples per process per micro-batch
    accum: int  # micro-batches per optimizer step

    @property
    def global_batch(self) -> int:
        return self.per_gpu * self.world_size * self.accum


def _split(global_batch: int, cap: int, world_size: int) -> Allocation | None:
    accum = max(1, -(-global_batch // (world_size * cap)))
    while world_size * accum <= global_batch:
        if global_batch % (world_size * accum) == 0:
            return Allocation(world_size, global_batch // (world_size * accum), accum)
        accum += 1
    return None


def allocate(global_batch: int | None, batch_size: int, world_size: int) -> Allocation:
    """The per-process batch and accumulation that reach `global_batch` on `world_size` processes with
    at most `batch_size` samples per process at once (ConfigError, one sentence, when none does)."""
    if global_batch is None:
        return Allocation(world_size, batch_size, 1)
    found = _split(global_batch, batch_size, world_size)
    if found is not None:
        return found
    fitting = [w for w in range(1, 4 * world_size + 1) if global_batch % w == 0]
    near = sorted(fitting, key=lambda w: (abs(w - world_size), w))[:2]
    lower = global_batch - global_batch % world_size
    raise ConfigError(f"global batch {global_batch} cannot be split evenly over {world_size} processes: run on "
                      f"{' or '.join(map(str, sorted(near)))} GPUs, or set --set global_batch={lower or world_size} "
                      f"(or {lower + world_size}) for {world_size}.")


def peak_lr(lr: float | None, base_lr: float, global_batch: int) -> float:
    """The schedule's peak: the config's absolute `lr`, else MAE's base_lr x global batch / 256."""
    return lr if lr is not None else base_lr * global_batch / 256


def banner(name: str, allocation: Allocation, lr: float, lr_rule: str, warmup_epochs: float, epochs: int,
           steps_per_epoch: int, workers: int, numerics: str) -> str:
    """The block a run prints at start (and `--dry-run` prints alone): what the recipe trains with here."""
    a = allocation
    processes = f"{a.world_size} process{'es' if a.world_size > 1 else ''}"
    return "\n".join([
        f"{name} on {processes}:",
        f"  global batch     {a.global_batch} = {a.per_gpu} per process x {processes} x {a.accum} "
        f"accumulation step{'s' if a.accum > 1 else ''}",
        f"  peak lr          {lr:.3g} ({lr_rule}), {warmup_epochs:g} warm-up epochs, then a cosine",
        f"  epochs           {epochs} of {steps_per_epoch} optimizer steps ({epochs * steps_per_epoch} in all)",
        f"  numerics         {numerics}",
        f"  loader workers   {workers} per process",
    ])
