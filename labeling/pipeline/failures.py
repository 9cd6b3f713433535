"""Why an input failed, and when a failure is not the input's fault.

- Every stage catches what one image can cause and turns it into a `Failure`; the row then
  travels on with empty payload and lands in its shard's errors table
  (`dataset_card.contract.layout.ERRORS_SCHEMA`).
- Model exceptions are classified (`classify`): an accelerator error that leaves the process's
  CUDA context unusable (a sticky CUDA error: an illegal address, a device-side assert, a launch
  failure, a library's execution failure) is not the image's fault and would fail every later
  image on that actor: `restart_on_fatal_device_error` ends the actor's process, Ray starts a new
  one and retries the batch (`ACTOR_RETRIES`). Out-of-memory is transient: `run_each` retries
  with smaller batches, never records it. A deterministic error (an unsupported shape or kernel,
  a bad argument) is the image's failure like any other. A batch that kills every actor it lands
  on runs out of retries and its images are labeled alone in the second pass.
- `FailureWindow`: a run stops (committed shards kept) when more than `--max-failure-rate` of the
  images in its most recent committed shards failed, so a systematic fault does not grind through
  1.28M images one failure at a time.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dataset_card.contract.codecs import DecodeError
from labeling.inputs import input_list

# Stages, in pipeline order (the errors table's `stage` column).
LIST, READ, DECODE, MODEL, POSTPROCESS, WRITE = "list", "read", "decode", "model", "postprocess", "write"

# Reasons (the errors table's `error_type` column): short, stable, machine readable.
DUPLICATE_ID = input_list.DUPLICATE_ID  # two inputs with one image_id (the listing finds it)
READ_FAILED = "read_failed"
EMPTY_FILE = "empty_file"
UNDECODABLE = "undecodable"
TOO_LARGE = "too_large"
MODEL_FAILED = "model_failed"
POSTPROCESS_FAILED = "postprocess_failed"
WORKER_CRASH = "worker_crash"

# The three columns every in-flight batch carries; "" means no failure so far.
COLUMNS = ("error_stage", "error_type", "error_message")

# Ray options of the stages. CPU tasks retry a few times, not forever (Ray Data's default), so a
# crash-looping input cannot hang the run. Model actors are restarted whenever their process dies
# (a fatal device error ends it on purpose) and each of their tasks is retried three times.
TASK_RETRIES = {"max_retries": 3}
ACTOR_RETRIES = {"max_restarts": -1, "max_task_retries": 3}
DEVICE_ERROR_EXIT_CODE = 75  # EX_TEMPFAIL: the actor's process ends so that Ray restarts it


@dataclass(frozen=True)
class Failure:
    stage: str
    error_type: str
    message: str

    def as_row(self) -> dict[str, str]:
        return {"error_stage": self.stage, "error_type": self.error_type, "error_message": self.message}


NO_FAILURE = {"error_stage": "", "error_type": "", "error_message": ""}

# "<_io.BytesIO object at 0x7f...>" and the like: an address says nothing to the reader and makes
# equal failures look different.
_OBJECT_REPR = re.compile(r"<(?:[\w.]+\.)?(\w+) object at 0x[0-9a-fA-F]+>")
_ADDRESS = re.compile(r"\bat 0x[0-9a-fA-F]+")


def clean_message(text: str) -> str:
    """One line, without memory addresses: `<_io.BytesIO object at 0x7f..>` -> `<BytesIO>`."""
    text = _OBJECT_REPR.sub(r"<\1>", " ".join(text.split()))
    return _ADDRESS.sub("", text).replace(" >", ">")


def from_exception(stage: str, err: BaseException) -> Failure:
    """The failure one exception stands for, with a one-line message."""
    message = clean_message(str(err)) or type(err).__name__
    if isinstance(err, DecodeError):
        kind = EMPTY_FILE if message.startswith("empty file") else UNDECODABLE
        if "too large" in message:
            kind = TOO_LARGE
        return Failure(stage, kind, message)
    default = {
        READ: READ_FAILED,
        DECODE: UNDECODABLE,
        MODEL: MODEL_FAILED,
        POSTPROCESS: POSTPROCESS_FAILED,
    }.get(stage, f"{stage}_failed")
    return Failure(stage, default, f"{type(err).__name__}: {message}"[:2000])


# What an exception raised by a model means for the process that raised it (`classify`):
POISONED = "poisoned"  # the CUDA context is unusable: only a new process recovers
OUT_OF_MEMORY = "out_of_memory"  # transient: retried with fewer images, never the image's failure
OTHER = "other"  # the input's or the code's: recorded as the image's failure

# Sticky CUDA errors: after one, every later call in the process fails (the CUDA programming guide's
# "sticky" errors: a kernel faulted, asserted or hung), and the libraries' execution failures that
# report one. Matched in lower-cased messages.
_POISONED = ("illegal memory access", "an illegal instruction", "misaligned address", "invalid program counter",
             "hardware stack error", "device-side assert", "unspecified launch failure", "launch timed out",
             "uncorrectable ecc error", "cuda driver error", "nccl error", "cublas_status_execution_failed",
             "cudnn_status_execution_failed", "cudnn_status_internal_error", "cudnn_status_mapping_error",
             "cufft_exec_failed", "cusolver_status_execution_failed")
# Library statuses that mean an allocation failed: out-of-memory by another name.
_OUT_OF_MEMORY = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed",
                  "cusolver_status_alloc_failed", "cufft_alloc_failed", "cublas_status_not_initialized")
# Errors CUDA reports for one call and forgets: an argument, a shape or a kernel the device or the
# library does not support (deterministic: the same input fails the same way in a new process).
_NOT_STICKY = ("invalid argument", "invalid configuration argument", "invalid value", "no kernel image",
               "not supported", "cudnn_status_bad_param", "cudnn_status_not_supported", "cudnn_status_arch_mismatch",
               "cublas_status_invalid_value", "cublas_status_not_supported", "cublas_status_arch_mismatch",
               "invalid device function")


def classify(err: BaseException) -> str:
    """POISONED, OUT_OF_MEMORY or OTHER for an exception a model raised, looking through chained
    causes (`raise ... from err`): out-of-memory (torch's OutOfMemoryError, or an allocation status
    of cuBLAS / cuDNN) first; then a sticky CUDA error; an unsupported shape, argument or kernel is
    OTHER. Any other CUDA runtime error (`CUDA error: ...`, torch's AcceleratorError) counts as
    POISONED: restarting the actor costs a model load, while a poisoned context would fail every
    image after it."""
    seen: set[int] = set()
    chain = []
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    texts = [(type(e).__name__, str(e).lower()) for e in chain]
    if any(name == "OutOfMemoryError" or any(m in text for m in _OUT_OF_MEMORY) for name, text in texts):
        return OUT_OF_MEMORY
    if any(any(m in text for m in _POISONED) for _, text in texts):
        return POISONED
    if any(any(m in text for m in _NOT_STICKY) for _, text in texts):
        return OTHER
    if any(name == "AcceleratorError" or "cuda error" in text for name, text in texts):
        return POISONED
    return OTHER


def is_fatal_device_error(err: BaseException) -> bool:
    """True for an accelerator error after which the process's CUDA context cannot be trusted (only
    a new process recovers): `classify(err) == POISONED`."""
    return classify(err) == POISONED


def restart_on_fatal_device_error(err: BaseException) -> None:
    """Called by a predictor on every exception its model raises: a fatal device error ends this
    actor's process (Ray restarts the actor and retries the batch on a fresh CUDA context; the
    images are not blamed); anything else returns."""
    if is_fatal_device_error(err):
        _restart(f"fatal accelerator error, restarting this model actor: {clean_message(str(err))[:500]}")


def _restart(why: str) -> None:
    print(why, file=sys.stderr, flush=True)
    os._exit(DEVICE_ERROR_EXIT_CODE)


# An image that runs out of memory alone is tried this many times (the memory others held may be
# free by then) before the actor's process is restarted (a fresh allocator) and Ray retries its batch.
OOM_TRIES = 3
OOM_WAIT_S = 1.0


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_each(fn: Callable[[list], list], items: Sequence, free: Callable[[], None] = _free_accelerator_memory,
             wait_s: float = OOM_WAIT_S) -> list:
    """fn(items): a result or the exception it raised, per item, under the failure policy.

    - A batch that fails is retried one item at a time, so one bad image cannot take the others
      with it; the exception an item raises alone is its result (the caller records it).
    - Out-of-memory is never an item's failure: the batch is split in halves (smaller batches)
      down to single items, and an item still out of memory alone is tried OOM_TRIES times, then
      this actor's process is restarted and Ray retries the batch.
    - A fatal device error (`classify` -> POISONED) restarts the actor's process at once.
    """
    if not items:
        return []
    try:
        results = fn(list(items))
        if len(results) != len(items):
            raise RuntimeError(f"the model returned {len(results)} results for {len(items)} images")
        return list(results)
    except Exception as err:  # find the culprit: retry smaller, so the others still get labels
        restart_on_fatal_device_error(err)  # a poisoned CUDA context: a new actor, not a failure
        free()
        if classify(err) == OUT_OF_MEMORY and len(items) > 1:
            half = (len(items) + 1) // 2
            return run_each(fn, items[:half], free, wait_s) + run_each(fn, items[half:], free, wait_s)
    return [_run_alone(fn, item, free, wait_s) for item in items]


def _run_alone(fn: Callable[[list], list], item, free: Callable[[], None], wait_s: float):
    for attempt in range(OOM_TRIES):
        try:
            return fn([item])[0]
        except Exception as err:
            restart_on_fatal_device_error(err)
            free()
            if classify(err) != OUT_OF_MEMORY:
                return err
            time.sleep(wait_s * (attempt + 1))
    _restart(f"out of memory on one image alone, {OOM_TRIES} times: restarting this model actor (Ray retries "
             "its batch)")
    raise AssertionError("unreachable")


class FailureRateExceeded(RuntimeError):
    """Too many of the most recent images failed; the message says which and what to do."""


@dataclass
class FailureWindow:
    """The share of failed images over the most recent committed shards, at least `window` images.

    Listing failures (duplicate ids) are known before labeling starts and never count.
    """

    max_rate: float
    window: int = 2000
    _shards: deque = None  # (processed, failed, failed by reason) per committed shard, newest last

    def __post_init__(self):
        self._shards = deque()

    def add(self, processed: int, failed_by_type: dict[str, int]) -> str | None:
        """Record one committed shard's images of this run; the reason to stop, or None."""
        failed = {k: v for k, v in failed_by_type.items() if k != DUPLICATE_ID}
        counted = processed - failed_by_type.get(DUPLICATE_ID, 0)
        if counted <= 0:
            return None
        self._shards.append((counted, failed))
        total, reasons, kept = 0, {}, 0
        for n, by_type in reversed(self._shards):
            total += n
            kept += 1
            for k, v in by_type.items():
                reasons[k] = reasons.get(k, 0) + v
            if total >= self.window:
                break
        while len(self._shards) > kept:  # older shards can never be in a window again
            self._shards.popleft()
        bad = sum(reasons.values())
        if self.max_rate >= 1 or total < self.window or bad <= self.max_rate * total:
            return None
        why = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))
        return (f"{bad} of the last {total} images failed ({bad / total:.0%}: {why}), more than --max-failure-rate "
                f"{self.max_rate:g}")
