"""Why an input failed, and when a failure is not the input's fault.

- Every stage catches what one image can cause and turns it into a `Failure`; the row then
  travels on with empty payload and lands in its shard's errors table
  (`dataset_card.contract.layout.ERRORS_SCHEMA`).
- An accelerator error that leaves the process's CUDA context unusable (an illegal address, a
  device-side assert, a launch failure; not out-of-memory) is not the image's fault and would fail
  every later image on that actor: `restart_on_fatal_device_error` ends the actor's process, Ray
  starts a new one and retries the batch (`ACTOR_RETRIES`). Predictors call it on every exception
  their model raises, before recording a failure. A batch that kills every actor it lands on runs
  out of retries and its images are labeled alone in the second pass.
- `FailureWindow`: a run stops (committed shards kept) when more than `--max-failure-rate` of the
  images in its most recent committed shards failed, so a systematic fault does not grind through
  1.28M images one failure at a time.
"""

from __future__ import annotations

import os
import re
import sys
from collections import deque
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


# Messages of CUDA runtime / driver / library errors that poison the process's context.
_FATAL_DEVICE = ("cuda error", "cuda driver error", "cudnn_status", "cublas_status", "cusolver_status",
                 "cufft_status", "device-side assert", "illegal memory access", "unspecified launch failure",
                 "an illegal instruction", "uncorrectable ecc error", "nccl error", "cudaerror")


def is_fatal_device_error(err: BaseException) -> bool:
    """True for an accelerator error after which the process's CUDA context cannot be trusted (only
    a new process recovers); False for out-of-memory (the batch is retried image by image) and for
    anything else. Looks through chained causes (`raise ... from err`)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        name = type(current).__name__
        text = str(current).lower()
        if name == "OutOfMemoryError" or "out of memory" in text:
            return False
        if name == "AcceleratorError" or any(marker in text for marker in _FATAL_DEVICE):
            return True
        current = current.__cause__ or current.__context__
    return False


def restart_on_fatal_device_error(err: BaseException) -> None:
    """Called by a predictor on every exception its model raises: a fatal device error ends this
    actor's process (Ray restarts the actor and retries the batch on a fresh CUDA context; the
    images are not blamed); anything else returns, and the caller records the failure."""
    if not is_fatal_device_error(err):
        return
    print(f"fatal accelerator error, restarting this model actor: {clean_message(str(err))[:500]}",
          file=sys.stderr, flush=True)
    os._exit(DEVICE_ERROR_EXIT_CODE)


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
