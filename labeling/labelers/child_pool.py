"""The model actor's CPU work in processes of its own, so a crash on one image (a codec library's
segfault, an abort in OpenCV, the kernel's out-of-memory killer) costs that image, not the actor
that holds the GPU and its loaded weights, and so that work does not hold the actor's GIL.

    pool = ChildPool(workers=4, function=model_input.decode)
    pool(data, max_pixels, max_side)   # function(*args), computed in a child; raises ChildDied if it died

Its two uses, each turning a child's death into that image's failure:

    decode = DecodePool(workers=4, max_pixels=100_000_000, max_side=1024)
    pixels, width, height = decode(data)   # what `model_input.decode` returns, or raises DecodeError
    finish = FinishPool(workers=4, cfg=instance_labeler.cfg)
    records = finish(device_result)        # `instance_finish.finish_image`, or raises FinishCrashed

Up to `workers` plain child processes (`subprocess`, started on first need) each run `function`
on one call at a time; a call's arguments and its reply travel as length-prefixed pickles over the
child's stdin and stdout (a decode sends the file's bytes and gets the shrunk pixels back, at most
`max_side`^2 x 3 bytes; a finish sends the `DeviceResult`'s arrays and gets the mask records back).
One call per process at a time makes the blame exact: a process that dies while it holds an image
died on that image, which fails (`ChildDied`, saying how: "killed by SIGSEGV", "exit code 1"), and so
does a call no answer reaches within `timeout_s` (the child, hung, is killed: "no answer within 300 s,
killed"); the
process is replaced by the next call that needs one. An ordinary exception travels back as itself.
Children are started with `subprocess` (fork and exec): none is a fork of the actor, whose CUDA
context a forked child could not use; each runs one OpenMP / OpenCV thread (parallel across
images, not inside one).

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

import functools
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

DECODE_CRASH_MESSAGE = ("the image decoder's process died on this file ({how}; a crash in the codec library, out of "
                        "memory, or a decode that never ended); the model actor went on")
FINISH_CRASH_MESSAGE = ("the process finishing SAM's masks (RLE strings, NMS, small-region cleanup) died on this "
                        "image ({how}; a crash in OpenCV or pycocotools, out of memory, or work that never ended); the "
                        "model actor went on")
# A call whose child has not answered by then is that image's failure: a real image takes well under a
# second to decode and a few seconds to finish on one core, so only a hung child gets near it.
CALL_TIMEOUT_S = 300.0
_LENGTH = struct.Struct("<Q")
# The child runs with its parent's sys.path (as multiprocessing's spawn does), so it imports what the parent
# imports, under Ray's runtime environments too.
_BOOT = "import json, sys; sys.path[:] = json.loads(sys.argv[1]); from labeling.labelers.child_pool import serve; serve()"
_ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


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
    """A child: the function, then argument tuples until stdin ends; replies ("ok", value) or ("error", exception)."""
    import cv2

    cv2.setNumThreads(1)  # parallel across images, not inside one
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the parent's to handle
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the replies
    requests = sys.stdin.buffer
    try:
        function = _receive(requests)
        _send(replies, "ready")
        while True:
            args = _receive(requests)
            try:
                reply = ("ok", function(*args))
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


class ChildDied(Exception):
    """The child computing a call died; `how` says how ("killed by SIGSEGV", "exit code 1")."""

    def __init__(self, how: str):
        super().__init__(how)
        self.how = how


class _Worker:
    """One child process; serves one call at a time."""

    def __init__(self, function: Callable):
        self.silent_s = None  # set when the watchdog killed the child
        self.process = subprocess.Popen([sys.executable, "-c", _BOOT, json.dumps(sys.path)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, **_ONE_THREAD})
        try:
            _send(self.process.stdin, function)
            ready = _receive(self.process.stdout)
        except (EOFError, BrokenPipeError):
            ready = None
        if ready != "ready":
            how = self._died()
            raise RuntimeError(f"the model actor's child process could not start ({how}); its error is printed above")

    def call(self, args: tuple, timeout_s: float | None) -> tuple[str, object]:
        """The child's reply to `args`; a child silent for `timeout_s` is killed (a decoder looping on a
        crafted file would otherwise hold its image, and the actor's batch, for ever)."""
        watchdog = threading.Timer(timeout_s, self._kill_silent, (timeout_s,)) if timeout_s else None
        self.silent_s = None
        try:
            if watchdog is not None:
                watchdog.start()
            _send(self.process.stdin, args)
            return _receive(self.process.stdout)
        except (EOFError, OSError):
            raise ChildDied(self._died()) from None
        finally:
            if watchdog is not None:
                watchdog.cancel()

    def _kill_silent(self, timeout_s: float) -> None:
        self.silent_s = timeout_s
        self.process.kill()

    def _died(self) -> str:
        self.close()
        code = self.process.wait()
        if self.silent_s is not None:
            return f"no answer within {self.silent_s:g} s, killed"
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


class ChildPool:
    """`function(*args)` in up to `workers` child processes; safe from many threads at once.

    `function` travels to the processes pickled: a module-level function (by name), or a
    `functools.partial` of one with picklable arguments."""

    def __init__(self, workers: int, function: Callable, timeout_s: float | None = CALL_TIMEOUT_S):
        self.function, self.timeout_s = function, timeout_s
        self._free = threading.BoundedSemaphore(workers)  # a thread holds one while it holds a worker
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()

    def __call__(self, *args):
        """`function(*args)`'s value, or the exception it raised; ChildDied if the child died on it
        (the child is then replaced by the next call that needs one)."""
        with self._free:
            worker = self._take()
            try:
                status, value = worker.call(args, self.timeout_s)
            except ChildDied:  # these arguments killed the process that held them
                self._forget(worker)
                raise
            self._idle.put(worker)
        if status == "error":
            raise value
        return value

    def _take(self) -> _Worker:
        try:
            return self._idle.get_nowait()
        except queue.Empty:  # fewer than `workers` started, or some died: start one
            worker = _Worker(self.function)
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


def decode_with_limit(decode: Callable, data: bytes, max_pixels: int, max_side: int):
    """`decode(data, max_pixels, max_side)` under PIL's pixel limit set to ours (in a decoding child)."""
    import warnings

    from PIL import Image

    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # PIL only warns below 2x of our limit
    Image.MAX_IMAGE_PIXELS = max_pixels  # our own limit, checked from the header, decides
    return decode(data, max_pixels, max_side)


class DecodePool(ChildPool):
    """`decode` (`model_input.decode` by default) in up to `workers` processes; a crash is that file's
    `DecodeError` (`undecodable`). `decode` must be a module-level function."""

    def __init__(self, workers: int, max_pixels: int, max_side: int,
                 decode: Callable[[bytes, int, int], tuple[np.ndarray, int, int]] | None = None,
                 timeout_s: float | None = CALL_TIMEOUT_S):
        if decode is None:
            from labeling.labelers.model_input import decode
        super().__init__(workers, functools.partial(decode_with_limit, decode), timeout_s)
        self.max_pixels, self.max_side = max_pixels, max_side

    def __call__(self, data: bytes) -> tuple[np.ndarray, int, int]:
        try:
            return super().__call__(data, self.max_pixels, self.max_side)
        except ChildDied as died:
            raise codecs.DecodeError(DECODE_CRASH_MESSAGE.format(how=died.how)) from None


class FinishCrashed(RuntimeError):
    """The process finishing an image's masks died on it; the message says how."""


class FinishPool(ChildPool):
    """The instance labeler's CPU half (`instance_finish.finish_image(cfg, result)` by default) in up to
    `workers` processes; a crash is that image's `FinishCrashed`. `finish` must be a module-level
    function of (cfg, result)."""

    def __init__(self, workers: int, cfg, finish: Callable | None = None, timeout_s: float | None = CALL_TIMEOUT_S):
        if finish is None:
            from labeling.labelers.instance_finish import finish_image as finish
        super().__init__(workers, functools.partial(finish, cfg), timeout_s)

    def __call__(self, result) -> list[dict]:
        try:
            return super().__call__(result)
        except ChildDied as died:
            raise FinishCrashed(FINISH_CRASH_MESSAGE.format(how=died.how)) from None
