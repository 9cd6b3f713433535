"""Seconds per named stage of a labeler (`with clock("encoder"): ...`).

A GPU runs asynchronously: without `sync`, a stage's time is the time to queue its work, and the
wait shows up in whichever later stage first reads a result back. Benchmarks pass `sync=True`,
which waits for the device at every stage boundary so each stage is charged its own work (and
costs the overlap a real run gets, so they time the throughput in a separate pass).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class StageClock:
    def __init__(self, device: torch.device | str | None = None, sync: bool = False):
        self.device = torch.device(device) if device is not None else None
        self.sync = sync and self.device is not None and self.device.type == "cuda"
        self.seconds: defaultdict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str):
        if self.sync:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize(self.device)
            self.seconds[stage] += time.perf_counter() - start
