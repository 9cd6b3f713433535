"""Checkpoints of a run: atomic writes, the last K kept, loaded with `weights_only=True`.

RUN/checkpoints/step-00001000.pt holds everything needed to continue bit-exactly: model,
optimizer, grad scaler, the schedule's and curriculum's position, the data position (epoch, step),
each rank's RNG states and the resolved config. A checkpoint is written to a dot-prefixed
temporary file, flushed to disk and renamed, so a run killed mid-write leaves the previous
checkpoint as the latest. A disk error while writing is one sentence (`storage.StorageError`) and
leaves no temporary file. `CheckpointWriter` writes them on a background thread from a host copy
(`checkpoint_async`, on by default), so training stalls only for the copy. On resume, a newest
checkpoint that cannot be read is moved aside
(`step-N.pt.unreadable`, kept for inspection) and the one before it is used, with a warning.

With `keep_every_epochs`, the checkpoint at the end of every N-th epoch is also kept for good as
`epoch-NNNN.pt` (NNNN epochs done): a hard link to its step checkpoint, so nothing is written twice
(a copy where the file system has no hard links). The rolling deletion and resume read only
`step-*.pt`, so kept ones never count among the last K and are never resumed from by accident;
export one with `python -m pretraining.export RUN --checkpoint RUN/checkpoints/epoch-NNNN.pt`.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretraining.training.storage import writing

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{8,})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (unreadable, or from another config)."""


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{step:08d}.pt"


def kept_path(run_dir: str | Path, epochs_done: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"epoch-{epochs_done:04d}.pt"


def keep_checkpoint(checkpoint: Path, kept: Path) -> Path:
    """Make `kept` the same file as `checkpoint` for good: a hard link, else a copy; atomic either way."""
    tmp = kept.with_name(f".{kept.name}.tmp")
    with writing(kept, tmp):
        tmp.unlink(missing_ok=True)
        try:
            os.link(checkpoint, tmp)
        except OSError:  # no hard links here (another device, some network or FUSE file systems)
            shutil.copyfile(checkpoint, tmp)
        os.replace(tmp, kept)
        _fsync_dir(kept.parent)
    return kept


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: dict[str, Any], run_dir: str | Path, step: int, keep: int) -> Path:
    """Write `state` as the checkpoint of optimizer step `step` atomically; keep the newest `keep`."""
    path = checkpoint_path(run_dir, step)
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path, tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:  # a file object: a full disk is an OSError, not torch's "unexpected pos"
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


class CheckpointWriter:
    """Writes checkpoints (`save_checkpoint`), in the background when `asynchronous`.

    Asynchronous: `save` copies the state's tensors into host buffers reused from one save to the next
    (pinned for device tensors: non-blocking copies, one synchronisation) and returns; a background thread serialises, fsyncs and
    renames, so training stalls only for the copy. One write at a time: a save while the previous
    write is still going waits for it first. A failed write (a full disk) is raised, as its one sentence,
    by `poll` (the loop calls it at log steps), by the next `save` or by `close`. The file is the same
    as a synchronous save's, committed by the same rename, so every reader (resume, export, --init) reads it.
    """

    def __init__(self, asynchronous: bool):
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="checkpoint") if asynchronous else None
        self.pending: Future | None = None
        self.buffers: dict[str, torch.Tensor] = {}  # host copies of device tensors, by their place in the state

    def save(self, state: dict[str, Any], run_dir: str | Path, step: int, keep: int,
             then: Callable[[Path], None] | None = None) -> Path:
        """Checkpoint `state` as optimizer step `step` (`save_checkpoint`), then call `then(path)` (after the
        write, in the background too); returns the path it is (or will be) at."""
        self.wait()
        if self.executor is None:
            return _write(state, run_dir, step, keep, then)
        self.pending = self.executor.submit(_write, self._host_copy(state), run_dir, step, keep, then)
        return checkpoint_path(run_dir, step)

    def _host_copy(self, state: Any, key: str = "") -> Any:
        """`state` with every tensor copied to host memory that training will not write to."""
        if isinstance(state, dict):
            out = {k: self._host_copy(v, f"{key}/{k}") for k, v in state.items()}
            if not key and torch.cuda.is_available() and any(b.is_pinned() for b in self.buffers.values()):
                torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
            return out
        if isinstance(state, list | tuple):
            return type(state)(self._host_copy(v, f"{key}/{i}") for i, v in enumerate(state))
        if not isinstance(state, torch.Tensor):
            return state
        buffer = self.buffers.get(key)  # reused: the previous write is done (`save` waited for it)
        if buffer is None or buffer.shape != state.shape or buffer.dtype != state.dtype:
            buffer = self.buffers[key] = torch.empty(state.shape, dtype=state.dtype,
                                                     pin_memory=state.device.type == "cuda")
        return buffer.copy_(state.detach(), non_blocking=state.device.type == "cuda")

    def poll(self) -> None:
        """Raise a finished background write's error (StorageError for a disk fault), if any."""
        if self.pending is not None and self.pending.done():
            self.wait()

    def wait(self) -> None:
        """Wait for the write in flight; raise its error."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self, raise_errors: bool = True) -> None:
        """Wait for the write in flight and stop the thread (`raise_errors=False` when another error is on its way)."""
        try:
            if raise_errors:
                self.wait()
            elif self.pending is not None:
                with contextlib.suppress(Exception):
                    self.pending.result()
        finally:
            if self.executor is not None:
                self.executor.shutdown(wait=True)


def _write(state: dict[str, Any], run_dir: str | Path, step: int, keep: int,
           then: Callable[[Path], None] | None) -> Path:
    path = save_checkpoint(state, run_dir, step, keep)
    if then is not None:
        then(path)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU with `weights_only=True` (tensors, numbers, strings, containers only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged file fails in many ways (zip, pickle, struct, EOF errors)
        detail = (str(err).strip().splitlines() or [""])[0][:200]  # unpickler errors run to many lines
        raise CheckpointError(f"checkpoint {path} cannot be read ({err.__class__.__name__}: {detail}); it is "
                              "damaged or not a checkpoint of this code.") from err


def load_newest_readable(run_dir: str | Path, move_aside: bool = True,
                         warn=None) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of a run that loads, and its state; None when there is none.

    A newer one that cannot be read is renamed to `step-N.pt.unreadable` (when `move_aside`: rank 0
    only, so ranks do not race) and `warn(sentence)` is called for it. Only if none loads is the
    newest one's CheckpointError raised (and nothing moved).
    """
    unreadable: list[tuple[Path, CheckpointError]] = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            state = load_checkpoint(path)
        except CheckpointError as err:
            unreadable.append((path, err))
            continue
        for bad, err in unreadable:  # only now: with no readable one left, nothing is moved
            aside = bad.with_name(bad.name + ".unreadable")
            if move_aside:
                with contextlib.suppress(OSError):
                    os.replace(bad, aside)
            if warn is not None:
                warn(f"warning: checkpoint {bad} cannot be read ({err.__cause__.__class__.__name__}); moved it "
                     f"aside to {aside.name} and resuming from {path.name}.")
        return path, state
    if unreadable:
        path, err = unreadable[0]
        raise CheckpointError(f"no checkpoint in {path.parent} can be read (the newest, {path.name}: "
                              f"{err.__cause__.__class__.__name__}); restore one from a backup, or move the folder "
                              "aside to start the run afresh.") from err
    return None


def rng_state() -> dict[str, Any]:
    """This process's random states (torch CPU and CUDA, numpy, python) as tensors and plain values."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (the legacy global state, for code that uses it)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))  # noqa: NPY002
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
