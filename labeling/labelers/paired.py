"""Both labelers on one device, fed with encoded images: what one model actor runs per batch.

`PairedLabeler(instance, semantic, max_side)(list of image file bytes)` returns, per image, its
`ImageLabels` (SAM's masks at the models' resolution and the semantic map at the image's size), or
the exception that image alone raised (a `DecodeError`, or its CPU half's failure). The work is
split so the device rarely waits for the CPU:

- a thread pool decodes each image (`codecs.decode_image`, the canonical decode), shrinks it to
  `max_side` (area interpolation) and runs both labelers' `prepare` (SAM's resize, the semantic
  processor) while the device works on the images before it: decoding, resizing and the processor
  (PIL, cv2, numpy) release the GIL;
- the instance labeler's device pass takes images as they become ready, and hands each finished
  image's CPU half (RLE strings, cleanup) back to the pool, which runs it while the semantic model
  computes: `finisher` runs it, by default `instance.finish` in the pool's thread; the model actor
  on a GPU passes a `labelers.child_pool.FinishPool`, which runs it in processes of the actor's own
  (the thread only waits on a pipe), so that work does not hold the GIL the thread launching the
  device's kernels needs, and a crash there costs one image (its `FinishCrashed`), not the actor;
- only the original bytes travel to the actor: model-size pixels exist only here;
- `decoder` does the decoding and shrinking, by default in the calling thread; the model actor
  passes a `labelers.child_pool.DecodePool`, which runs it in processes of the actor's own, so a
  decoder crash costs one file, not the actor;
- calls may come from several threads at once: the device passes of one call hold a lock, while
  another call's decoding and CPU halves run beside them (the model actor takes two batches at
  once, so one batch's CPU work overlaps the next one's device work).

Nothing here imports Ray or `datasets` (the GPU benchmark runs this class on a bare CUDA box).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import cv2
import numpy as np

from dataset_card.contract import codecs
from labeling.labelers.instance import InstanceLabeler
from labeling.labelers.instance_finish import DeviceResult
from labeling.labelers.model_input import decode
from labeling.labelers.semantic import SemanticLabeler


@dataclass
class ImageLabels:
    masks: list[dict]  # the instance labeler's records, at model_size
    semantic: np.ndarray  # (height, width) class map in the contract's dtype
    model_size: tuple[int, int]  # (h, w) the models saw
    seconds: dict[str, float] = field(default_factory=dict)  # this image's share of each step
    semantic_fillers: int = 0  # the call's semantic filler images, on its first labeled image (0 on the others)


class PairedLabeler:
    def __init__(self, instance: InstanceLabeler, semantic: SemanticLabeler, max_side: int,
                 max_pixels: int = 100_000_000, threads: int = 4,
                 decoder: Callable[[bytes], tuple[np.ndarray, int, int]] | None = None,
                 finisher: Callable[[DeviceResult], list[dict]] | None = None):
        self.instance, self.semantic = instance, semantic
        self.finisher = finisher
        self.max_side, self.max_pixels = max_side, max_pixels
        self.decoder = decoder or (lambda data: decode(data, max_pixels, max_side))
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="labeling-cpu")
        self.device = threading.Lock()

    def _prepare(self, data: bytes):
        start = time.perf_counter()
        cv2.setNumThreads(1)  # parallel across images, not inside one
        pixels, width, height = self.decoder(data)
        sam_input = self.instance.prepare(pixels)
        semantic_input = self.semantic.prepare(pixels, (height, width))
        return pixels.shape[:2], sam_input, semantic_input, time.perf_counter() - start

    def _finish(self, result: DeviceResult) -> list[dict] | Exception:
        """An image's records, or the exception its CPU half raised (that image's failure alone)."""
        try:
            return (self.finisher or self.instance.finish)(result)
        except Exception as err:
            return err

    def __call__(self, images: Sequence[bytes]) -> list[ImageLabels | Exception]:
        """Labels of each encoded image, or the exception it alone raised: the DecodeError of its
        decoding, or whatever its CPU half (`finisher`) raised. Any other error raises."""
        # Decoding starts before the device is free: it overlaps the device work of a batch that another
        # thread of the actor runs (the model actor takes two calls at once), as that batch's CPU half overlaps this
        # batch's device work.
        futures = [self.pool.submit(self._prepare, data) for data in images]
        prepared: list = [None] * len(images)

        def ready():  # SAM inputs in order, as their threads finish them
            for i, future in enumerate(futures):
                try:
                    prepared[i] = future.result()
                except codecs.DecodeError as err:
                    prepared[i] = err
                    continue
                yield prepared[i][1]

        with self.device:  # one batch on the device at a time (so the semantic fillers counted are this batch's)
            start = time.perf_counter()
            finishing = [self.pool.submit(self._finish, result)
                         for result in self.instance.device_pass(ready())]
            instance_s = time.perf_counter() - start
            good = [i for i, p in enumerate(prepared) if not isinstance(p, BaseException)]
            start, fillers = time.perf_counter(), self.semantic.fillers
            maps = self.semantic.label([prepared[i][2] for i in good])
            fillers = self.semantic.fillers - fillers
            semantic_s = time.perf_counter() - start
        masks = [future.result() for future in finishing]
        instance_s += time.perf_counter() - start - semantic_s  # waiting for the CPU half, if at all
        out: list[ImageLabels | Exception] = list(prepared)
        for i, image_masks, image_map in zip(good, masks, maps):
            if isinstance(image_masks, Exception):
                out[i] = image_masks
                continue
            seconds = {"decode": prepared[i][3], "instance": instance_s / len(good), "semantic": semantic_s / len(good)}
            out[i] = ImageLabels(image_masks, image_map, prepared[i][0], seconds, fillers)
            fillers = 0  # counted once, on the first labeled image
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        for pool in (self.decoder, self.finisher):
            if hasattr(pool, "close"):
                pool.close()
