"""An output folder as one value: its filesystem, its root inside it, and the small reads and writes
of the files around the rows (`layout`), made once from the user's path or URL and passed on.

    folder = OutputFolder.open("s3://bucket/imagenet-c2f")  # or a local path
    folder.path(layout.data_path(3, 120))                     # where shard 3's data file is in folder.fs
    folder.read_metadata()                                    # metadata.json

A labeling run opens its output once and hands the value to the plan, the commits, the lease, the
card and the check; a Ray task receives it pickled in its job (pyarrow filesystems pickle with
their options, not their connections), so no worker turns the path back into a filesystem.
Commands a user runs on a path (`build_card`, `validate`, `repaint`) open it once at the top.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dataset_card.contract import layout, shards
from dataset_card.contract.schema import SCHEMA_VERSION


class OutputError(ValueError):
    """The folder is not (or not yet) a labeled output."""


@dataclass(frozen=True)
class OutputFolder:
    uri: str  # as the user named it: what messages say
    fs: pafs.FileSystem
    root: str  # the folder's path inside `fs`
    retry_s: float = shards.RETRY_S  # how long its writes retry a transient error (`shards.retrying`)

    @classmethod
    def open(cls, output: str | os.PathLike | OutputFolder, retry_s: float = shards.RETRY_S) -> OutputFolder:
        """The folder at `output` (a local path or a URL such as s3://bucket/prefix); a folder value
        is returned as it is. Nothing is read or created. `retry_s`: how long writes into it retry
        a transient error (a storage outage) before the run stops."""
        if isinstance(output, OutputFolder):
            return output
        uri = os.fspath(output)
        return cls(uri, *shards.filesystem(uri), retry_s)

    def __str__(self) -> str:
        return self.uri

    def path(self, *relative: str) -> str:
        """The path inside `fs` of `relative` (a `layout` path such as `layout.data_path(i, n)`)."""
        return posixpath.join(self.root, *relative)

    def shard_paths(self, index: int, num_shards: int) -> tuple[str, str, str]:
        """Paths inside `fs` of shard `index`'s data file, errors table and statistics."""
        return (self.path(layout.data_path(index, num_shards)), self.path(layout.errors_path(index, num_shards)),
                self.path(layout.stats_path(index, num_shards)))

    def is_folder(self) -> bool:
        return self.fs.get_file_info(self.root).type == pafs.FileType.Directory

    def exists(self, relative: str) -> bool:
        return shards.exists(self.fs, self.path(relative))

    def read_bytes(self, relative: str) -> bytes:
        return shards.read_bytes(self.fs, self.path(relative))

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Written under a temporary name and renamed into place (`shards.write_bytes`)."""
        shards.write_bytes(self.fs, self.path(relative), data, self.retry_s)

    def delete_dir_quietly(self, relative: str) -> None:
        shards.delete_dir_quietly(self.fs, self.path(relative))

    def list_files(self, folder: str) -> list[str]:
        """Names (not paths) of everything directly in `folder`, hidden files excluded, sorted."""
        selector = pafs.FileSelector(self.path(folder), allow_not_found=True)
        names = (posixpath.basename(info.path) for info in self.fs.get_file_info(selector))
        return sorted(name for name in names if not name.startswith("."))

    def read_json(self, relative: str, required: bool = False) -> dict | None:
        """The JSON file `relative` (None when it is missing and not `required`); `OutputError` when
        it is required and missing, or not valid JSON."""
        path = self.path(relative)
        if not shards.exists(self.fs, path):
            if required:
                raise OutputError(f"{path} does not exist: is this the output folder of a labeling run?")
            return None
        try:
            return json.loads(shards.read_bytes(self.fs, path))
        except json.JSONDecodeError as err:
            raise OutputError(f"{path} is not valid JSON ({err}); rewrite it or rerun the labeling") from err

    def read_metadata(self, accept: tuple[int, ...] = (SCHEMA_VERSION,)) -> layout.DatasetMetadata:
        """metadata.json; `OutputError` when it is missing, `SchemaError` for a version outside `accept`."""
        path = self.path(layout.METADATA_FILE)
        if not shards.exists(self.fs, path):
            raise OutputError(f"{path} does not exist: is this the output folder of a labeling run?")
        return layout.DatasetMetadata.from_json(shards.read_bytes(self.fs, path).decode(), source=path,
                                                output=self.uri, accept=accept)

    def read_errors(self, index: int, num_shards: int) -> pa.Table:
        """Shard `index`'s errors table (empty when it has none)."""
        path = self.path(layout.errors_path(index, num_shards))
        if not shards.exists(self.fs, path):
            return layout.ERRORS_SCHEMA.empty_table()
        with self.fs.open_input_file(path) as f:
            return pq.read_table(f).cast(layout.ERRORS_SCHEMA)
