"""One writer per output folder: a lease file that a run takes, renews while it runs, and gives back.

`OUTPUT/.lease.json` names the run writing the folder: its run id, host, process id (with the
process's start time, so a reused pid is not mistaken for it), when it started, when it last
renewed the lease and how long a renewal holds (`ttl_s`).

- `Lease.take` creates the file exclusively where the storage can: O_EXCL on a filesystem, a
  conditional write on S3 through s3fs (PutObject with `If-None-Match: *`, `EXCLUSIVE_STORES`).
  Elsewhere (gs:// and other fsspec stores, s3:// without s3fs) it checks, then writes, and says
  in one warning line that two runs started at the same moment could both take it. When the file exists, a holder on this host whose
  process is gone is taken over at once (so a killed run's rerun resumes immediately), a holder
  on another host once it has not renewed within its time-to-live; any other holder makes the
  take fail with `LeaseHeld`, one sentence naming it and how to take over.
- A taken-over lease is first renamed away (atomic on a filesystem), so of two runs that find
  the same stale lease only one takes it. On an object store that rename is a copy and a delete:
  there the guarantee is only as good as the store's conditional write.
- Its time-to-live is at least twice the output's write-retry window (`ttl_for`): a run riding out
  a storage outage its writes survive (`shards.retrying`) keeps its lease, whose renewals fail
  meanwhile and are tolerated for a whole `ttl_s`.
- A background thread renews the lease every `ttl_s / 4`; when it finds another run's lease (its
  own was taken over) or cannot renew for a whole `ttl_s`, `lost` is set and the run stops before
  committing more. `release` deletes the file if it is still this run's.

Clocks of different hosts are assumed to agree to well within `ttl_s`.
"""

from __future__ import annotations

import datetime
import json
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from dataset_card.contract import layout
from dataset_card.contract.output_folder import OutputFolder

TTL_S = 300.0
# fsspec filesystems whose exclusive create ("xb") is a conditional write the store itself enforces:
# s3fs sends PutObject with If-None-Match: * (AWS S3 and stores that implement conditional writes).
EXCLUSIVE_STORES = ("S3FileSystem",)


def ttl_for(retry_s: float) -> float:
    """The time-to-live of a run's lease whose writes retry for `retry_s`: TTL_S, or twice the
    retry window when that is longer (renewals fail during an outage too)."""
    return max(TTL_S, 2.0 * retry_s)


class LeaseHeld(RuntimeError):
    """Another live run writes this folder; the message names it and how to take over."""


@dataclass(frozen=True)
class Holder:
    run_id: str
    host: str
    pid: int
    pid_started: str | None  # the process's start time as the OS counts it, to tell a reused pid apart
    started: str  # ISO time the run took the lease
    renewed: float  # epoch seconds of the last renewal
    ttl_s: float

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Holder:
        value = json.loads(data)
        return cls(**{k: value[k] for k in cls.__dataclass_fields__})

    def alive(self, now: float | None = None) -> bool:
        """Whether the holder may still be writing: on this host, its process exists; elsewhere,
        it renewed within its time-to-live."""
        if self.host == socket.gethostname():
            return _process_alive(self.pid, self.pid_started)
        return (now or time.time()) - self.renewed <= self.ttl_s

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}"


def process_start(pid: int) -> str | None:
    """When process `pid` started, as an opaque token (Linux: clock ticks since boot, from
    /proc/PID/stat); None where that is not known."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _process_alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    now = process_start(pid)
    return started is None or now is None or now == started


class _Files:
    """Exclusive create, read, overwrite, rename and delete of small files in `folder`: `os` for local
    paths, fsspec for URLs (the folder's pyarrow filesystem wrapped for fsspec where fsspec has no
    driver; without an exclusive mode, creation checks then writes)."""

    def __init__(self, folder: OutputFolder):
        output = folder.uri
        self.local = "://" not in output or output.startswith("file://")
        self.store = "a local filesystem"
        if self.local:
            self.root = os.path.abspath(output.removeprefix("file://"))
        else:
            import fsspec

            try:
                self.fs, self.root = fsspec.core.url_to_fs(output)
            except (ImportError, ValueError):  # a URL only pyarrow speaks here (s3:// without s3fs)
                from fsspec.implementations.arrow import ArrowFSWrapper

                self.fs, self.root = ArrowFSWrapper(folder.fs), folder.root
            self.store = type(self.fs).__name__
        # Whether creating a file exclusively is enforced by the storage (else: check, then write).
        self.exclusive = self.local or self.store in EXCLUSIVE_STORES

    def path(self, name: str) -> str:
        return os.path.join(self.root, name) if self.local else posixpath.join(self.root, name)

    def create_exclusive(self, path: str, data: bytes) -> bool:
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            except BaseException:
                self.delete(path)  # ours, cut short (no space?): leave nothing behind
                raise
            return True
        if self.exclusive:
            try:
                with self.fs.open(path, "xb") as f:
                    f.write(data)
                return True
            except FileExistsError:
                return False
        if self.fs.exists(path):  # no exclusive create here: check, then write (`Lease.take` warns)
            return False
        self.fs.pipe_file(path, data)
        return True

    def read(self, path: str) -> bytes | None:
        try:
            if self.local:
                with open(path, "rb") as f:
                    return f.read()
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def overwrite(self, path: str, data: bytes) -> None:
        if self.local:
            tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                self.delete(tmp)
                raise
        else:
            self.fs.pipe_file(path, data)

    def rename(self, src: str, dst: str) -> bool:
        try:
            if self.local:
                os.rename(src, dst)
            else:
                self.fs.mv(src, dst)
            return True
        except FileNotFoundError:
            return False

    def delete(self, path: str) -> None:
        try:
            if self.local:
                os.remove(path)
            else:
                self.fs.rm_file(path)
        except FileNotFoundError:
            pass


def holder_of(folder: OutputFolder) -> Holder | None:
    """The lease's holder (None when no run holds one)."""
    files = _Files(folder)
    data = files.read(files.path(layout.LEASE_FILE))
    try:
        return Holder.from_json(data) if data else None
    except (ValueError, KeyError, TypeError):
        return None


class Lease:
    """This run's lease on `folder` (see the module docstring)."""

    def __init__(self, folder: OutputFolder, run_id: str, ttl_s: float = TTL_S, log=print):
        self.folder, self.run_id, self.ttl_s, self.log = folder, run_id, ttl_s, log
        self.files = _Files(folder)
        self.path = self.files.path(layout.LEASE_FILE)
        self.lost: str | None = None  # why the lease was lost, once it is
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._renewed = 0.0

    def _holder(self) -> Holder:
        now = time.time()
        return Holder(self.run_id, socket.gethostname(), os.getpid(), process_start(os.getpid()),
                      datetime.datetime.now().astimezone().isoformat(timespec="seconds"), now, self.ttl_s)

    def take(self) -> Lease:
        """Take the lease (taking over a dead holder's) and start renewing it; raises LeaseHeld, or
        `shards.OutputWriteError` (one sentence naming the lease file) when it cannot be written."""
        try:
            return self._take()
        except OSError as err:
            from dataset_card.contract.shards import write_error

            raise write_error(err, self.path) from err

    def _take(self) -> Lease:
        if not self.files.exclusive:
            self.log(f"warning: the lease {self.path} cannot be created exclusively on this storage "
                     f"({self.files.store}): two runs started at the same moment could both write {self.folder}; "
                     "start one run at a time" + (" (install s3fs to make it exclusive on s3://)"
                                                  if self.folder.uri.startswith("s3://") else ""))
        for _ in range(3):
            if self.files.create_exclusive(self.path, self._holder().to_json()):
                self._renewed = time.time()
                self._thread = threading.Thread(target=self._renew_loop, name="lease-renewal", daemon=True)
                self._thread.start()
                return self
            data = self.files.read(self.path)
            if data is None:
                continue  # released meanwhile: try again
            try:
                old = Holder.from_json(data)
            except (ValueError, KeyError, TypeError):
                old = None  # unreadable: a write cut short; nobody can be renewing it
            if old is not None and old.alive():
                raise LeaseHeld(self._refusal(old))
            aside = f"{self.path}.stale-{uuid.uuid4().hex[:8]}"
            if self.files.rename(self.path, aside):  # only one taker wins this rename
                self.files.delete(aside)
                self.log(f"taking over the lease of {self.folder} from a run that is gone"
                         + (f" ({old.describe()})" if old else "") + "; what it committed is kept")
        raise LeaseHeld(f"could not take the lease {self.path}: another run keeps taking it; stop the other runs "
                        "writing this folder and try again")

    def _refusal(self, old: Holder) -> str:
        ago = time.time() - old.renewed
        if old.host == socket.gethostname():
            takeover = "stop it first (its lease is taken over at once when its process is gone)"
        else:
            takeover = (f"if it is gone, rerun after its lease expires (in {max(0.0, old.ttl_s - ago):.0f} s), "
                        f"or delete {self.path} to take over now")
        return (f"{self.folder} is being written by another run ({old.describe()}, lease renewed {ago:.0f} s ago): "
                f"wait for it to finish, or {takeover}; --overwrite cannot delete a folder a live run is writing")

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            self.renew()

    def renew(self) -> None:
        try:
            data = self.files.read(self.path)
            current = Holder.from_json(data) if data else None
            if current is None or current.run_id != self.run_id:
                self.lost = ("another run took over the lease of this folder"
                             + (f" ({current.describe()})" if current else ""))
                self._stop.set()
                return
            fresh = Holder(**{**asdict(current), "renewed": time.time()})
            self.files.overwrite(self.path, fresh.to_json())
            self._renewed = fresh.renewed
        except (OSError, ValueError, KeyError, TypeError) as err:
            if time.time() - self._renewed > self.ttl_s:
                self.lost = f"the lease could not be renewed for {self.ttl_s:.0f} s ({err})"
                self._stop.set()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = holder_of(self.folder)
        if holder is not None and holder.run_id == self.run_id:
            self.files.delete(self.path)

    def __enter__(self) -> Lease:
        return self.take()

    def __exit__(self, *exc) -> None:
        self.release()


def new_run_id() -> str:
    """A run id: UTC time and a random tag, e.g. 20260105T101500Z-3f2a9c1b."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{uuid.uuid4().hex[:8]}"
