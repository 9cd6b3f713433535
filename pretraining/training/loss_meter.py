"""The loss terms of every micro-step, kept on the device and read back only when the loop asks.

Reading a loss (`.item()`, `.tolist()`) waits for the step's kernels to finish; doing it every
micro-step stalls the GPU between steps. `LossMeter.add` keeps each micro-step's terms as a device
tensor (no sync), and `LossMeter.check` (called every `log_every` optimizer steps, before every
checkpoint and at the end) averages them over ranks in one all-reduce, reads them in one transfer,
and stops the run at the first micro-step whose loss is not finite, naming its optimizer step,
epoch, batch and terms, exactly as a per-step check would have. A NaN is therefore noticed at most
`log_every` steps late; since the check runs before every checkpoint, nothing after the last good
checkpoint is ever saved.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


class NonFiniteLoss(RuntimeError):
    """A loss term was NaN or infinite; the message names where."""


@dataclass(frozen=True)
class MicroStep:
    optimizer_step: int  # 1-based, the optimizer step this micro-step belongs to
    epoch: int
    batch: int
    index: torch.Tensor | list[int] | None  # (B,) sample indices: on the device from `add`, a list from `check`
    values: list[float] | None = None  # rank-averaged loss and terms, filled by `check`


class LossMeter:
    """`names`: the loss and its terms, in the order `add` gets their values."""

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)
        self.pending: list[tuple[MicroStep, torch.Tensor]] = []
        self.last: dict[str, float] = {}  # the last checked optimizer step's mean terms

    def add(self, values: torch.Tensor, step: MicroStep) -> None:
        """One micro-step's (T,) loss terms, as device tensors (detached); nothing is read."""
        self.pending.append((step, values.detach().float()))

    def check(self, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> list[MicroStep]:
        """Read the micro-steps since the last check (averaged over ranks by `reduce`, an all-reduce
        mean), raise `NonFiniteLoss` at the first non-finite one, and return them with their values.
        Sets `last` to the mean terms of the last complete optimizer step read."""
        if not self.pending:
            return []
        steps = [s for s, _ in self.pending]
        values = reduce(torch.stack([v for _, v in self.pending])).tolist()  # (S, T): one all-reduce, one transfer
        indices = [s.index for s in steps]
        hosts = torch.cat(indices).tolist() if all(i is not None for i in indices) else None
        self.pending = []
        out, offset = [], 0
        for step, row in zip(steps, values):
            if not all(math.isfinite(v) for v in row):
                terms = ", ".join(f"{n}={v:.4g}" for n, v in zip(self.names, row))
                raise NonFiniteLoss(f"the loss is not finite at optimizer step {step.optimizer_step} (epoch "
                                    f"{step.epoch}, batch {step.batch}): {terms}")
            index = None
            if hosts is not None:
                index, offset = hosts[offset:offset + len(step.index)], offset + len(step.index)
            out.append(MicroStep(step.optimizer_step, step.epoch, step.batch, index, row))
        last = [s for s in out if s.optimizer_step == out[-1].optimizer_step]
        self.last = {n: sum(s.values[t] for s in last) / len(last) for t, n in enumerate(self.names)}
        return out
