"""Decoding in processes of their own, so a decoder that crashes on one file (a codec library's
segfault, an abort, the kernel's out-of-memory killer) costs that file, not the model actor that
holds the GPU and its loaded weights.

    decode = DecodePool(workers=4, max_pixels=100_000_000, max_side=1024)
    pixels, width, height = decode(data)   # what `model_input.decode` returns, or raises DecodeError

Up to `workers` plain child processes (`subprocess`, started on first need) each run
`model_input.decode` on one image at a time; a request and its reply (the decoded, shrunk pixels:
at most `max_side`^2 x 3 bytes) travel as length-prefixed pickles over the child's stdin and
stdout. One image per process at a time makes the blame exact: a process that dies while it holds
an image died on that image, which fails with a `DecodeError` (`undecodable`, its message saying
the decoder crashed and how); the process is replaced by the next call that needs one. An ordinary
decode error travels back as itself.

Why not `multiprocessing` (a `ProcessPoolExecutor`): its queues' semaphores are registered with
multiprocessing's resource tracker, a process of its own. When a Ray actor exits, Ray kills the
worker's child processes first (`kill_child_processes_on_worker_exit`, on by default), tracker
included, and then the interpreter's shutdown unregisters those semaphores: multiprocessing finds
its tracker dead, warns "resource_tracker: process died unexpectedly, relaunching. Some resources
might leak." and the relaunched tracker prints a KeyError for every name it never saw, at the end
of every healthy run. Plain child processes need no tracker; a child killed at exit costs nothing,
and a child whose parent dies reads the end of its stdin and exits.
"""

from __future__ import annotations

import json
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import BinaryIO

import numpy as np

from dataset_card.contract import codecs

CRASH_MESSAGE = ("the image decoder's process died on this file ({how}: a crash in the codec library, or out of "
                 "memory); the model actor went on")
_LENGTH = struct.Struct("<Q")
# The child runs with its parent's sys.path (as multiprocessing's spawn does), so it imports what the parent
# imports, under Ray's runtime environments too.
_BOOT = "import json, sys; sys.path[:] = json.loads(sys.argv[1]); from labeling.labelers.decode_pool import serve; serve()"


def _send(stream: BinaryIO, value) -> None:
    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(payload)) + payload)
    stream.flush()


def _receive(stream: BinaryIO):
    """The next value on `stream`, or raises EOFError when the other end is gone."""
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        raise EOFError
    size, = _LENGTH.unpack(head)
    payload = stream.read(size)
    if len(payload) < size:
        raise EOFError
    return pickle.loads(payload)


def serve() -> None:
    """A decoding child: the decode function, then (bytes, max_pixels, max_side) requests until stdin ends."""
    import warnings

    import cv2
    from PIL import Image

    cv2.setNumThreads(1)  # parallel across images, not inside one
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # PIL only warns below 2x of our limit
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the parent's to handle
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the replies
    requests = sys.stdin.buffer
    try:
        decode = _receive(requests)
        _send(replies, "ready")
        while True:
            data, max_pixels, max_side = _receive(requests)
            Image.MAX_IMAGE_PIXELS = max_pixels  # our own limit, checked from the header, decides
            try:
                reply = ("ok", decode(data, max_pixels, max_side))
            except Exception as err:  # the caller raises it: an undecodable file, or a bug
                reply = ("error", err if _picklable(err) else RuntimeError(f"{type(err).__name__}: {err}"))
            _send(replies, reply)
    except (EOFError, BrokenPipeError):  # the parent closed the pool, or is gone
        return


def _picklable(err: Exception) -> bool:
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:
        return False
    return True


class WorkerDied(Exception):
    """The child decoding an image died; `how` says how ("killed by SIGSEGV", "exit code 1")."""

    def __init__(self, how: str):
        super().__init__(how)
        self.how = how


class _Worker:
    """One child process; serves one image at a time."""

    def __init__(self, decode: Callable):
        self.process = subprocess.Popen([sys.executable, "-c", _BOOT, json.dumps(sys.path)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            _send(self.process.stdin, decode)
            ready = _receive(self.process.stdout)
        except (EOFError, BrokenPipeError):
            ready = None
        if ready != "ready":
            how = self._died()
            raise RuntimeError(f"the image decoder's process could not start ({how}); its error is printed above")

    def decode(self, data: bytes, max_pixels: int, max_side: int):
        try:
            _send(self.process.stdin, (data, max_pixels, max_side))
            return _receive(self.process.stdout)
        except (EOFError, OSError):
            raise WorkerDied(self._died()) from None

    def _died(self) -> str:
        self.close()
        code = self.process.wait()
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit code {code}"

    def close(self) -> None:
        """End the child: it reads the end of its stdin and returns."""
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass


class DecodePool:
    """`decode` (`model_input.decode` by default) in up to `workers` processes; safe from many threads at once.

    `decode` travels to the processes by name (pickled by reference): a module-level function."""

    def __init__(self, workers: int, max_pixels: int, max_side: int,
                 decode: Callable[[bytes, int, int], tuple[np.ndarray, int, int]] | None = None):
        if decode is None:
            from labeling.labelers.model_input import decode
        self.max_pixels, self.max_side, self.decode = max_pixels, max_side, decode
        self._free = threading.BoundedSemaphore(workers)  # a thread holds one while it holds a worker
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()

    def __call__(self, data: bytes) -> tuple[np.ndarray, int, int]:
        with self._free:
            worker = self._take()
            try:
                status, value = worker.decode(data, self.max_pixels, self.max_side)
            except WorkerDied as died:  # this file killed the process that held it
                self._forget(worker)
                raise codecs.DecodeError(CRASH_MESSAGE.format(how=died.how)) from None
            self._idle.put(worker)
        if status == "error":
            raise value
        return value

    def _take(self) -> _Worker:
        try:
            return self._idle.get_nowait()
        except queue.Empty:  # fewer than `workers` started, or some died: start one
            worker = _Worker(self.decode)
            with self._lock:
                self._all.append(worker)
            return worker

    def _forget(self, worker: _Worker) -> None:
        with self._lock:
            self._all.remove(worker)

    def close(self) -> None:
        """End every child (each exits when its stdin closes)."""
        with self._lock:
            workers, self._all = self._all, []
        for worker in workers:
            worker.close()
        for worker in workers:
            try:
                worker.process.wait(timeout=10)
            except subprocess.TimeoutExpired:  # busy with an image: it is not needed any more
                worker.process.kill()
                worker.process.wait()
