"""Table inputs: a folder of Parquet files, or a `datasets.save_to_disk` folder, with an image column
(a `datasets.Image` struct {bytes, path} or plain binary) and a label column (e.g. an ImageNet export).

An input's `path` is `<file>:<row>` (Parquet, file relative to the root) or `<split>:<row>`
(save_to_disk), in file then row order. `image_id` is the stored image path without extension
when there is one, else that locator. Class names come from the label column's `ClassLabel`
feature; a string label column is mapped to its sorted values; plain ints get "0", "1", ...
"""

from __future__ import annotations

import bisect
import os
import posixpath
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import datasets
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dataset_card.contract.shards import filesystem
from labeling.inputs.input_list import InputError, Inputs, inputs_table


def parquet_files(root: str, split: str) -> list[str]:
    """Parquet files of `split` under `root` (relative, sorted): those named `<split>-*` or under a
    `<split>/` folder when there are any, else every Parquet file."""
    fs, base = filesystem(root)
    if fs.get_file_info(base).type == pafs.FileType.File:
        return [""]
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    files = sorted(posixpath.relpath(i.path, base) for i in infos
                   if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                   and not any(part.startswith(".") for part in posixpath.relpath(i.path, base).split("/")))
    of_split = [f for f in files if posixpath.basename(f).startswith(f"{split}-") or f"/{split}/" in f"/{f}"]
    return of_split or files


def _class_names(feature, values: pa.ChunkedArray, column: str, source: str) -> tuple[tuple[str, ...], list[int]]:
    if isinstance(feature, datasets.ClassLabel):
        return tuple(feature.names), [-1 if v is None else int(v) for v in values.to_pylist()]
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        names = tuple(sorted({v for v in values.to_pylist() if v is not None}))
        index = {n: i for i, n in enumerate(names)}
        return names, [index.get(v, -1) for v in values.to_pylist()]
    if pa.types.is_integer(values.type):
        labels = [-1 if v is None else int(v) for v in values.to_pylist()]
        return tuple(str(i) for i in range(max(labels, default=-1) + 1)), labels
    raise InputError(f"label column {column!r} in {source} has type {values.type}; pass --label-column "
                     "naming an integer, string or ClassLabel column")


def _image_paths(table: pa.Table, column: str) -> list[str | None]:
    values = table.column(column)
    if pa.types.is_struct(values.type) and values.type.get_field_index("path") >= 0:
        return pa.chunked_array([c.field("path") for c in values.chunks], pa.string()).to_pylist()
    return [None] * table.num_rows


def _entries(names: Sequence[str], row_counts: Sequence[int], paths: Sequence[str | None], labels: Sequence[int]):
    entries, i = [], 0
    for name, count in zip(names, row_counts):
        for row in range(count):
            image_path = paths[i]
            locator = f"{name}:{row}"
            image_id = os.path.splitext(image_path)[0] if image_path else locator
            entries.append((locator, image_id, labels[i], image_path or locator))
            i += 1
    return entries


def _check_columns(schema: pa.Schema, image_column: str, label_column: str, source: str) -> None:
    for flag, column in (("--image-column", image_column), ("--label-column", label_column)):
        if schema.get_field_index(column) < 0:
            raise InputError(f"column {column!r} is not in {source} (columns: {', '.join(schema.names)}); "
                             f"pass {flag}")


def list_parquet(root: str, image_column: str, label_column: str, split: str, workers: int) -> Inputs:
    files = parquet_files(root, split)
    if not files:
        raise InputError(f"no Parquet files under {root}")
    fs, base = filesystem(root)

    def columns(rel: str) -> pa.Table:
        path = posixpath.join(base, rel) if rel else base
        with fs.open_input_file(path) as f:
            schema = pq.read_schema(f)
            _check_columns(schema, image_column, label_column, path)
            wanted = [label_column]
            if pa.types.is_struct(schema.field(image_column).type):
                wanted.append(f"{image_column}.path")
            table = pq.read_table(f, columns=wanted)
        return table.rename_columns([label_column, image_column][: table.num_columns]), schema

    with ThreadPoolExecutor(workers) as pool:
        tables = list(pool.map(columns, files))
    schema = tables[0][1]
    features = datasets.Features.from_arrow_schema(schema) if schema.metadata and b"huggingface" in schema.metadata \
        else {}
    table = pa.concat_tables([t for t, _ in tables], promote_options="permissive")
    class_names, labels = _class_names(features.get(label_column), table.column(label_column), label_column, root)
    paths = table.column(image_column).to_pylist() if table.num_columns > 1 else [None] * table.num_rows
    names = [f or posixpath.basename(base) for f in files]
    entries = _entries(names, [t.num_rows for t, _ in tables], paths, labels)
    return Inputs(TableSource(root, "parquet", image_column, tuple(files), split), class_names, inputs_table(entries))


def _load_arrow(root: str, split: str) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(root)
    except FileNotFoundError as err:
        raise InputError(f"{root} is not a datasets.save_to_disk folder ({err})") from err
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise InputError(f"{root} has splits {sorted(loaded)}, not {split!r}; pass --split")
        loaded = loaded[split]
    return loaded


def list_arrow(root: str, image_column: str, label_column: str, split: str) -> Inputs:
    ds = _load_arrow(root, split)
    _check_columns(ds.features.arrow_schema, image_column, label_column, root)
    table = ds.select_columns([image_column, label_column]).with_format("arrow")[:]
    class_names, labels = _class_names(ds.features[label_column], table.column(label_column), label_column, root)
    entries = _entries([split], [ds.num_rows], _image_paths(table, image_column), labels)
    return Inputs(TableSource(root, "arrow", image_column, (), split), class_names, inputs_table(entries))


def list_table(root: str, kind: str, image_column: str, label_column: str, split: str, workers: int = 16) -> Inputs:
    if kind == "parquet":
        inputs = list_parquet(root, image_column, label_column, split, workers)
    elif kind == "arrow":
        inputs = list_arrow(root, image_column, label_column, split)
    else:
        raise InputError(f"unknown input format {kind!r}; use imagefolder, parquet or arrow")
    if not len(inputs):
        raise InputError(f"{root} holds no rows")
    return inputs


def _image_bytes(values: pa.Array) -> list[bytes | None]:
    if pa.types.is_struct(values.type):
        values = values.field("bytes")
    return values.to_pylist()


class TableSource:
    """Reads rows' image bytes from the Parquet files (by row group) or the save_to_disk folder."""

    def __init__(self, root: str, kind: str, image_column: str, files: tuple[str, ...], split: str):
        self.root, self.kind, self.image_column, self.files, self.split = root, kind, image_column, files, split
        self._cache: dict = {}

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_cache"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._cache = {}

    def _parquet(self, rel: str) -> tuple[pq.ParquetFile, list[int]]:
        if rel not in self._cache:
            fs, base = filesystem(self.root)
            pf = pq.ParquetFile(fs.open_input_file(posixpath.join(base, rel) if rel else base))
            starts = [0]
            for g in range(pf.metadata.num_row_groups):
                starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)
            self._cache.clear()  # one open file at a time: batches are contiguous runs of rows
            self._cache[rel] = (pf, starts)
        return self._cache[rel]

    def _read_parquet(self, rel: str, rows: list[int]) -> list[bytes | None]:
        pf, starts = self._parquet(rel)
        groups = sorted({bisect.bisect_right(starts, r) - 1 for r in rows})
        table = pf.read_row_groups(groups, columns=[self.image_column])
        offsets, total = {}, 0
        for g in groups:
            offsets[g] = total
            total += starts[g + 1] - starts[g]
        take = [offsets[bisect.bisect_right(starts, r) - 1] + r - starts[bisect.bisect_right(starts, r) - 1]
                for r in rows]
        return _image_bytes(table.column(self.image_column).take(take).combine_chunks())

    def read(self, paths: Sequence[str]) -> list[bytes | BaseException]:
        by_name: dict[str, list[tuple[int, int]]] = {}
        for i, path in enumerate(paths):
            name, _, row = path.rpartition(":")
            by_name.setdefault(name, []).append((i, int(row)))
        out: list[bytes | BaseException] = [b""] * len(paths)
        for name, items in by_name.items():
            try:
                rows = [r for _, r in items]
                if self.kind == "arrow":
                    if "ds" not in self._cache:
                        self._cache["ds"] = _load_arrow(self.root, self.split).select_columns([self.image_column])
                    values = _image_bytes(self._cache["ds"].with_format("arrow")[rows].column(0).combine_chunks())
                else:
                    rel = "" if self.files == ("",) else name  # a single file given as --input
                    values = self._read_parquet(rel, rows)
                for (i, _), value in zip(items, values):
                    out[i] = value if value is not None else ValueError("the image cell is empty (null)")
            except Exception as err:  # an unreadable file fails its rows only
                for i, _ in items:
                    out[i] = err
        return out

