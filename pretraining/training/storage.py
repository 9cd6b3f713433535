"""Writing a run's files: atomic JSON, and disk errors (full, read-only, no permission) as one sentence.

Every file a run writes (checkpoints, config.json, run.json, summary.json, the sample log,
TensorBoard events, figures) is written inside `writing(path)`: an OSError of the disk kind
becomes a `StorageError` naming the path and what to do, and the temporary file the write was
going through (if any) is removed. The data already committed (the previous checkpoint) is never
touched, so the run resumes from it once there is room.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path

# Errors that mean "this disk will not take the write", not a bug: the user frees space, fixes
# permissions or points --output elsewhere.
DISK_ERRNOS = {
    errno.ENOSPC: "the disk is full: free space there",
    errno.EDQUOT: "the disk quota is exhausted: free space there or raise the quota",
    errno.EACCES: "permission denied: make it writable for this user",
    errno.EPERM: "the operation is not permitted: make it writable for this user",
    errno.EROFS: "the file system is read-only: remount it read-write",
}


class StorageError(RuntimeError):
    """A run's file could not be written (disk full, read-only, no permission); the message says what to do."""


def disk_error(err: OSError, path: str | Path) -> StorageError | None:
    """The one-sentence error for a disk-kind OSError while writing `path`; None for any other error."""
    why = DISK_ERRNOS.get(err.errno)
    if why is None:
        return None
    return StorageError(f"cannot write {path} ({why}, or give another --output), then rerun the same command: "
                        "it resumes from the last checkpoint.")


@contextlib.contextmanager
def writing(path: str | Path, tmp: str | Path | None = None) -> Iterator[None]:
    """Turn a disk-kind OSError inside the block into a StorageError naming `path`; remove `tmp` on any failure."""
    try:
        yield
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(err, OSError) and (sentence := disk_error(err, path)) is not None:
            raise sentence from err
        raise


def write_json(path: Path, data: dict) -> None:
    """Write `data` atomically (other ranks may be reading the file); a disk error is a StorageError."""
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path, tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
