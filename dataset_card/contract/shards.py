"""The shard commit protocol, for local paths and anything pyarrow.fs understands (s3://, gs://, ...).

A shard is committed by three writes in this order: its errors table, its statistics, then its
data file. Each goes to a dot-prefixed temporary name unique to the write attempt and is renamed
into place, so the data file's existence is the commit point, and rewriting a shard (a retried
task, a rerun) replaces the same files, never adds rows. The data file's Parquet metadata (its
"footer", under the contract's key) also says which run wrote it, under which manifest, and how
many rows and failed inputs the shard holds: a rerun trusts a committed shard only when the files
agree with it (`labeling.pipeline.plan`).

A labeling run replaces a shard that already has a data file through a journal (`commit_shard(...,
journal=True)`): the three new files are written beside the old, the journal naming their renames
is committed (`.journal/shard-SSSSS.json`), then the renames run; a run that finds a journal
finishes it first (`recover`), so a killed replacement never leaves a shard's files from two runs.

Writes retry transient errors with backoff for a window of minutes (`RETRY_S`, a run's
`--storage-retry-seconds`, carried by its `OutputFolder`), so a storage outage shorter than that is
ridden out. An error no retry fixes (no space, no permission, a read-only filesystem, a
symbolic-link loop) becomes `OutputWriteError` at once, one sentence naming the path and what to
do, and the write's temporary file is removed.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import shutil
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dataset_card.contract import layout
from dataset_card.contract.schema import SCHEMA_METADATA_KEY, read_file_metadata

if TYPE_CHECKING:
    from dataset_card.contract.output_folder import OutputFolder

# Row groups are the unit the training loader shuffles and splits over workers: small enough to
# spread a shard over many workers, large enough to read efficiently.
ROW_GROUP_SIZE = 64
# What the labeler aims a row group at: ~16 MB reads a shard in a few large sequential requests
# (object stores favour 8-64 MB reads), yet a loader worker holds only one at a time.
ROW_GROUP_BYTES = 16 * 2**20

# Columns whose values are already compressed files (JPEG / PNG bytes): compressing them again or
# building a dictionary of them costs time for nothing, and min/max statistics of them are noise.
BINARY_LEAVES = ("image.bytes", "semantic_mask.bytes", "instance_mask.bytes")
# Columns whose values are (nearly) all distinct: a dictionary page would only be thrown away.
UNIQUE_LEAVES = ("image_id", "image.path", "image_sha256", "instances.list.element.rle.counts")

# errno values a retry cannot fix, and what the user should do about each.
_ADVICE = {
    errno.ENOSPC: "free space there (or write somewhere else) and run the command again; what was committed is kept",
    errno.EDQUOT: "raise the quota or free space (or write somewhere else) and run the command again; "
                  "what was committed is kept",
    errno.EACCES: "make the folder writable for this user (or write somewhere else)",
    errno.EPERM: "make the folder writable for this user (or write somewhere else)",
    errno.EROFS: "the filesystem is read-only: write somewhere else",
    errno.ELOOP: "a symbolic link on the way points back at itself: fix the link",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.ENOTDIR: "a file stands where a folder must be: move it away",
    errno.EEXIST: "a file stands where a folder must be: move it away",
}
JOURNAL_DIR = ".journal"  # a replacement's renames, committed before they run
# A write failing with a transient error (a dropped connection, a storage outage) is retried for
# this long: an NFS server restart or an object store's bad minutes, not seconds. The lease's
# time-to-live is kept above it (`lease.ttl_for`), so a run riding out an outage keeps its folder.
RETRY_S = 240.0
BACKOFF_S = 0.5  # first wait; doubled after each attempt ...
MAX_BACKOFF_S = 30.0  # ... up to this


class OutputWriteError(RuntimeError):
    """A write that cannot succeed as things stand; the message names the path and what to do."""

    def __init__(self, message: str, errno_value: int | None = None):
        super().__init__(message)
        self.errno = errno_value


def write_error(err: OSError, path: str) -> OutputWriteError:
    """The one-sentence error for `err` (an OSError from writing `path`)."""
    reason = os.strerror(err.errno) if err.errno else str(err).split(". Detail:")[0]
    advice = _ADVICE.get(err.errno, "check the path and the filesystem, then run the command again")
    return OutputWriteError(f"cannot write {path} ({reason}): {advice}", err.errno)


def filesystem(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URL such as s3://bucket/prefix.

    pyarrow's own filesystems first; any other URL fsspec understands (memory://, az://, ...)
    goes through fsspec.
    """
    uri = os.fspath(uri)
    if "://" not in uri:
        uri = os.path.abspath(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def retrying(write: Callable[[], object], path: str, retry_s: float = RETRY_S, backoff_s: float = BACKOFF_S):
    """`write()`, retried with exponential backoff (from `backoff_s`, doubled up to MAX_BACKOFF_S) on
    transient OSErrors for up to `retry_s` seconds; a permanent error, or a transient one whose next
    retry would start after the window, raises `OutputWriteError` naming `path`."""
    deadline = time.monotonic() + retry_s
    wait = backoff_s
    while True:
        try:
            return write()
        except OSError as err:
            if err.errno in _ADVICE or time.monotonic() + wait > deadline:
                raise write_error(err, path) from err
            time.sleep(wait)
            wait = min(2 * wait, MAX_BACKOFF_S)


def _delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except OSError:
        pass


def _atomic_write(fs: pafs.FileSystem, path: str, write, retry_s: float = RETRY_S) -> None:
    """`write(stream)` into a fresh temporary name, renamed to `path`; each retry uses a new name and
    a failed attempt leaves nothing behind."""

    def attempt() -> None:
        tmp = layout.temporary_path(path)
        try:
            fs.create_dir(posixpath.dirname(path), recursive=True)
            with fs.open_output_stream(tmp) as stream:
                write(stream)
            fs.move(tmp, path)
        except BaseException:
            _delete_quietly(fs, tmp)
            raise

    retrying(attempt, path, retry_s)


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes, retry_s: float = RETRY_S) -> None:
    _atomic_write(fs, path, lambda stream: stream.write(data), retry_s)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.read()


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def delete_dir_quietly(fs: pafs.FileSystem, path: str) -> None:
    """Remove a folder of our own temporary files, if it is there."""
    try:
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)
    except OSError:
        pass


def _leaves(schema: pa.Schema) -> list[str]:
    """Dotted paths of every leaf column (what Parquet's per-column options name)."""
    out = []

    def walk(name: str, kind: pa.DataType) -> None:
        if pa.types.is_struct(kind):
            for child in kind:
                walk(f"{name}.{child.name}", child.type)
        elif pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
            walk(f"{name}.list.element", kind.value_type)
        else:
            out.append(name)

    for f in schema:
        walk(f.name, f.type)
    return out


def parquet_options(schema: pa.Schema, compression: str | None = "zstd") -> dict:
    """ParquetWriter options: already-compressed bytes stored as they are (no compression, no
    dictionary, no statistics); every other column `compression`-compressed."""
    leaves = _leaves(schema)
    return {
        "compression": {c: ("NONE" if c in BINARY_LEAVES else (compression or "NONE")) for c in leaves},
        "use_dictionary": [c for c in leaves if c not in BINARY_LEAVES + UNIQUE_LEAVES],
        "write_statistics": [c for c in leaves if c not in BINARY_LEAVES],
    }


def row_group_rows(table: pa.Table, target_bytes: int = ROW_GROUP_BYTES, lo: int = 16, hi: int = 1024) -> int:
    """Rows per row group so that one holds about `target_bytes` (between `lo` and `hi` rows)."""
    if table.num_rows == 0:
        return ROW_GROUP_SIZE
    per_row = max(1, table.nbytes // table.num_rows)
    return int(min(hi, max(lo, target_bytes // per_row)))


def write_parquet(table: pa.Table, sink, row_group_size: int = ROW_GROUP_SIZE, compression: str | None = "zstd") -> None:
    """Write `table`; an empty table gets no row group at all (`datasets` fails on a 0-row group)."""
    with pq.ParquetWriter(sink, table.schema, **parquet_options(table.schema, compression)) as writer:
        if table.num_rows:
            writer.write_table(table, row_group_size=row_group_size)


def with_footer(table: pa.Table, **fields) -> pa.Table:
    """`table` whose schema metadata (the contract's key) also carries `fields` (run id, counts...)."""
    metadata = dict(table.schema.metadata or {})
    value = read_file_metadata(table.schema)
    value.update(fields)
    metadata[SCHEMA_METADATA_KEY] = json.dumps(value, sort_keys=True).encode()
    return table.replace_schema_metadata(metadata)


def read_footer(fs: pafs.FileSystem, path: str) -> tuple[int, dict]:
    """(row count, the contract key's value) of a data file, from its Parquet footer alone.
    Raises OSError or pyarrow.ArrowException when the file is not readable Parquet."""
    with fs.open_input_file(path) as f:
        metadata = pq.read_metadata(f)
    return metadata.num_rows, read_file_metadata(metadata.schema.to_arrow_schema())


def commit_shard(
    folder: OutputFolder,
    index: int,
    num_shards: int,
    rows: pa.Table,
    errors: pa.Table,
    stats: layout.ShardStats,
    footer: dict | None = None,
    row_group_size: int = ROW_GROUP_SIZE,
    journal: bool = False,
) -> str:
    """Write shard `index`'s errors, statistics, then data (the commit point). Returns the data path.

    `footer` (run id, manifest hash, counts) goes into the data file's Parquet metadata. With
    `journal`, a shard that has a data file already has its three files replaced together (see the
    module docstring); else each is renamed into place in turn.
    """
    errors = errors.cast(layout.ERRORS_SCHEMA)
    if footer:
        rows = with_footer(rows, **footer)
    data, errors_path, stats_path = folder.shard_paths(index, num_shards)
    writes = {errors_path: lambda s: write_parquet(errors, s),
              stats_path: lambda s: s.write(stats.to_json().encode()),
              data: lambda s: write_parquet(rows, s, row_group_size)}
    if journal and exists(folder.fs, data):
        _replace(folder, index, writes)
    else:
        for path, write in writes.items():
            _atomic_write(folder.fs, path, write, folder.retry_s)
    return data


def _replace(folder: OutputFolder, index: int, writes: dict[str, Callable]) -> None:
    """Replace a committed shard's files together: staged beside them, a journal, then the renames."""
    fs = folder.fs
    attempt = uuid.uuid4().hex[:12]
    renames = []
    try:
        for target, write in writes.items():
            staging = posixpath.join(posixpath.dirname(target), f".{posixpath.basename(target)}.{attempt}.rewrite")
            renames.append([staging, target])

            def one(staging=staging, write=write):
                fs.create_dir(posixpath.dirname(staging), recursive=True)  # a folder deleted by hand
                with fs.open_output_stream(staging) as stream:
                    write(stream)

            retrying(one, target, folder.retry_s)
    except BaseException:  # nothing was renamed yet: the old files stand; remove the new ones
        for staging, _ in renames:
            _delete_quietly(fs, staging)
        raise
    journal_path = folder.path(JOURNAL_DIR, f"shard-{index:05d}.json")
    write_bytes(fs, journal_path, json.dumps(renames).encode(), folder.retry_s)  # the replacement's commit point
    _apply(fs, journal_path, folder.retry_s)


def _apply(fs: pafs.FileSystem, journal_path: str, retry_s: float = RETRY_S) -> None:
    """The journal's renames, then the journal; a rename no retry fixes is one sentence naming its
    target (the journal stays: the next run finishes it)."""
    for staging, target in json.loads(read_bytes(fs, journal_path).decode()):
        if exists(fs, staging):
            retrying(lambda staging=staging, target=target: fs.move(staging, target), target, retry_s)
    retrying(lambda: fs.delete_file(journal_path), journal_path, retry_s)


def recover(folder: OutputFolder) -> int:
    """Finish the renames of replacements a killed run had committed; returns how many."""
    selector = pafs.FileSelector(folder.path(JOURNAL_DIR), allow_not_found=True)
    journals = sorted(i.path for i in folder.fs.get_file_info(selector)
                      if i.type == pafs.FileType.File and i.path.endswith(".json"))
    for path in journals:
        _apply(folder.fs, path, folder.retry_s)
    return len(journals)


def committed_shards(folder: OutputFolder, num_shards: int) -> set[int]:
    """Indices of shards whose data file exists in `folder` for a run of `num_shards` shards."""
    names = set(folder.list_files(layout.DATA_DIR))
    return {i for i in range(num_shards) if posixpath.basename(layout.data_path(i, num_shards)) in names}


def probe_output(folder: OutputFolder) -> int | None:
    """Create `folder` if needed and write (then remove) a small file in it, so that a folder this
    user cannot write fails now, in one sentence, not after the cluster started. Returns the free
    bytes of its filesystem where that is known (local paths), else None."""
    fs, root, output = folder.fs, folder.root, folder.uri
    probe = posixpath.join(root, f".probe-{uuid.uuid4().hex[:12]}")

    def attempt() -> None:
        fs.create_dir(root, recursive=True)
        try:
            with fs.open_output_stream(probe) as stream:
                stream.write(b"c2fmae write probe\n")
        finally:
            _delete_quietly(fs, probe)

    retrying(attempt, probe if "://" in output else os.path.join(os.path.abspath(output), posixpath.basename(probe)),
             folder.retry_s)
    if isinstance(fs, pafs.LocalFileSystem):
        return shutil.disk_usage(root).free
    return None
