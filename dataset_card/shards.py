"""The shard commit protocol, for local paths and anything pyarrow.fs understands (s3://, gs://, ...).

A shard is committed by three writes in this order: its errors table, its statistics, then its
data file. Each goes to a dot-prefixed temporary name and is renamed into place, so the data
file's existence is the commit point: a shard whose data file exists is complete, and rewriting
it (a Ray retry, a rerun) replaces the same files with the same content, never adds rows.
"""

from __future__ import annotations

import os
import posixpath

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dataset_card import layout

# Row groups are the unit the training loader shuffles and splits over workers: small enough to
# spread a shard over many workers, large enough to read efficiently.
ROW_GROUP_SIZE = 64


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


def _atomic_write(fs: pafs.FileSystem, path: str, write) -> None:
    tmp = layout.temporary_path(path)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(tmp) as stream:
        write(stream)
    fs.move(tmp, path)


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    _atomic_write(fs, path, lambda stream: stream.write(data))


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.read()


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_parquet(table: pa.Table, sink, row_group_size: int = ROW_GROUP_SIZE) -> None:
    """Write `table`; an empty table gets no row group at all (`datasets` fails on a 0-row group)."""
    with pq.ParquetWriter(sink, table.schema) as writer:
        if table.num_rows:
            writer.write_table(table, row_group_size=row_group_size)


def commit_shard(
    fs: pafs.FileSystem,
    root: str,
    index: int,
    num_shards: int,
    rows: pa.Table,
    errors: pa.Table,
    stats: layout.ShardStats,
) -> str:
    """Write shard `index`'s errors, statistics, then data (the commit point). Returns the data path."""
    errors = errors.cast(layout.ERRORS_SCHEMA)
    _atomic_write(fs, posixpath.join(root, layout.errors_path(index, num_shards)),
                  lambda s: write_parquet(errors, s))
    write_bytes(fs, posixpath.join(root, layout.stats_path(index, num_shards)), stats.to_json().encode())
    data = posixpath.join(root, layout.data_path(index, num_shards))
    _atomic_write(fs, data, lambda s: write_parquet(rows, s))
    return data


def committed_shards(fs: pafs.FileSystem, root: str, num_shards: int) -> set[int]:
    """Indices of shards whose data file exists under `root` for a run of `num_shards` shards."""
    selector = pafs.FileSelector(posixpath.join(root, layout.DATA_DIR), allow_not_found=True)
    names = {posixpath.basename(info.path) for info in fs.get_file_info(selector)}
    return {i for i in range(num_shards) if posixpath.basename(layout.data_path(i, num_shards)) in names}
