"""Copy the next batch to the GPU on a side stream while the current one computes.

Without this, the host-to-device copy of a batch (~117 MB at 256 samples of 224 px: RGB, two label
maps, the masking draws) runs on the compute stream, after the previous step's kernels drain,
and the step waits for it. `DevicePrefetcher` issues batch k+1's copies on its own CUDA stream
as soon as the loader hands it over, and hands the training loop batch k with the compute stream
told to wait (on the device, not the host) for batch k's copies. The loader pins its chunks
(`pin_memory=True` on CUDA), so the copies are truly asynchronous.

On a CPU (or any non-CUDA device) batches pass through unchanged: `Batch.to` moves them, as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from pretraining.data.batch import Batch


class DevicePrefetcher:
    """Iterates `batches` one ahead, each already copied to `device` (CUDA) or as it came (CPU)."""

    def __init__(self, batches: Iterable[Batch], device: torch.device):
        self.batches, self.device = batches, torch.device(device)

    def __iter__(self) -> Iterator[Batch]:
        if self.device.type != "cuda":
            yield from self.batches
            return
        stream = torch.cuda.Stream(self.device)
        pending: tuple[Batch, torch.cuda.Event] | None = None
        for batch in self.batches:
            # The copy waits for nothing the compute stream does (its source is pinned host memory,
            # its destination fresh memory of the side stream), so it can overlap the running step.
            with torch.cuda.stream(stream):
                moved = batch.moved(self.device)
                copied = torch.cuda.Event()
                copied.record(stream)
            if pending is not None:
                yield self._ready(*pending)
            pending = (moved, copied)
        if pending is not None:
            yield self._ready(*pending)

    def _ready(self, batch: Batch, copied: torch.cuda.Event) -> Batch:
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(copied)  # on the device: the host does not wait
        for chunk in batch.chunks:
            for tensor in chunk.values():
                # Allocated on the side stream, used on the compute stream: the caching allocator
                # must not reuse the memory until the compute stream is done with it. (Host entries,
                # such as the largest instance id, stay where they are.)
                if isinstance(tensor, torch.Tensor) and tensor.is_cuda:
                    tensor.record_stream(compute)
        return batch
