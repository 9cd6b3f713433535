"""Decoding in processes of their own, so a decoder that crashes on one file (a codec library's
segfault, an abort, the kernel's out-of-memory killer) costs that file, not the model actor that
holds the GPU and its loaded weights.

    decode = DecodePool(workers=4, max_pixels=100_000_000, max_side=1024)
    pixels, width, height = decode(data)   # what `model_input.decode` returns, or raises DecodeError

A small pool of spawned processes runs `model_input.decode`; the decoded, shrunk pixels come back
through a pipe (at most `max_side`^2 x 3 bytes an image). When a worker dies, the pool is broken
for every image in it: it is replaced, and each image that was in it is decoded again alone in a
process of its own, so the file that kills a process alone is the one blamed, with a `DecodeError`
(`undecodable`, its message saying the decoder crashed); the others are decoded as usual.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from dataset_card.contract import codecs
from labeling.labelers import model_input

CRASH_MESSAGE = ("the image decoder's process died on this file (a crash in the codec library, or out of memory); "
                 "the model actor went on")


def _one_thread() -> None:
    import cv2

    cv2.setNumThreads(1)  # parallel across images, not inside one


class DecodePool:
    """`model_input.decode` in `workers` processes; a call is safe from many threads at once."""

    def __init__(self, workers: int, max_pixels: int, max_side: int,
                 decode: Callable[[bytes, int, int], tuple[np.ndarray, int, int]] = model_input.decode):
        self.workers, self.max_pixels, self.max_side, self.decode = workers, max_pixels, max_side, decode
        self._context = multiprocessing.get_context("spawn")  # never fork a process holding CUDA and threads
        self._lock = threading.Lock()
        self._pool = self._new_pool(workers)

    def _new_pool(self, workers: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(workers, mp_context=self._context, initializer=_one_thread)

    def __call__(self, data: bytes) -> tuple[np.ndarray, int, int]:
        pool = self._pool
        try:
            return pool.submit(self.decode, data, self.max_pixels, self.max_side).result()
        except BrokenProcessPool:  # this image, or another one in the pool, killed a worker
            self._replace(pool)
        return self._alone(data)

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:  # the first thread to notice replaces it
                self._pool = self._new_pool(self.workers)
        broken.shutdown(wait=False, cancel_futures=True)

    def _alone(self, data: bytes) -> tuple[np.ndarray, int, int]:
        with self._new_pool(1) as one:
            try:
                return one.submit(self.decode, data, self.max_pixels, self.max_side).result()
            except BrokenProcessPool as err:
                raise codecs.DecodeError(CRASH_MESSAGE) from err

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
