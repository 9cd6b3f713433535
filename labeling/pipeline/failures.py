"""Why an input failed: the stage and short reason that go into the errors table, never a crash.

Every stage catches what one image can cause and turns it into a `Failure`; the row then travels
on with empty payload and lands in its shard's errors table (`dataset_card.layout.ERRORS_SCHEMA`).
"""

from __future__ import annotations

from dataclasses import dataclass

from dataset_card.codecs import DecodeError

# Stages, in pipeline order (the errors table's `stage` column).
LIST, READ, DECODE, MODEL, POSTPROCESS, WRITE = "list", "read", "decode", "model", "postprocess", "write"

# Reasons (the errors table's `error_type` column): short, stable, machine readable.
DUPLICATE_ID = "duplicate_id"
READ_FAILED = "read_failed"
EMPTY_FILE = "empty_file"
UNDECODABLE = "undecodable"
TOO_LARGE = "too_large"
MODEL_FAILED = "model_failed"
POSTPROCESS_FAILED = "postprocess_failed"
WORKER_CRASH = "worker_crash"

# The three columns every in-flight batch carries; "" means no failure so far.
COLUMNS = ("error_stage", "error_type", "error_message")


@dataclass(frozen=True)
class Failure:
    stage: str
    error_type: str
    message: str

    def as_row(self) -> dict[str, str]:
        return {"error_stage": self.stage, "error_type": self.error_type, "error_message": self.message}


NO_FAILURE = {"error_stage": "", "error_type": "", "error_message": ""}


def from_exception(stage: str, err: BaseException) -> Failure:
    """The failure one exception stands for, with a one-line message."""
    message = " ".join(str(err).split()) or type(err).__name__
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


# CUDA errors that leave the device (or this process's context on it) unusable: every later image on
# the same actor would fail too, so they must restart the actor instead of blaming the image.
_DEVICE_ERROR_MARKERS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error", "device-side assert",
                         "NCCL error", "illegal memory access")


def is_fatal_device_error(err: BaseException) -> bool:
    """Whether `err` is an accelerator error other than out-of-memory (which one image can cause and
    which a retry with fewer images can survive); such errors propagate out of the model stage."""
    names = {cls.__name__ for cls in type(err).__mro__}
    message = str(err)
    if "OutOfMemoryError" in names or "out of memory" in message:
        return False
    return "AcceleratorError" in names or any(marker in message for marker in _DEVICE_ERROR_MARKERS)
