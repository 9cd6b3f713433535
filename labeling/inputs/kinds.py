"""The three kinds of `--input`, told apart and listed into one sorted `Inputs`.

- an ImageFolder tree `ROOT/<class>/<file>` (`labeling.inputs.folder`);
- the same tree given by a precomputed file list (`--file-list`, one relative path per line);
- a table: a folder of Parquet files or a `datasets.save_to_disk` folder with an image column and
  a label column (`labeling.inputs.tables`).
Ray gets the resulting list of paths, never a glob to resolve itself.
"""

from __future__ import annotations

import posixpath

import pyarrow.fs as pafs

from dataset_card.contract.shards import filesystem
from labeling.inputs.folder import list_image_folder, read_file_list
from labeling.inputs.input_list import InputError, Inputs


def detect_format(root: str) -> str:
    """"imagefolder", "parquet" or "arrow" (a `datasets.save_to_disk` folder) from what `root` holds."""
    fs, base = filesystem(root)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input {root} does not exist; check --input")
    if info.type == pafs.FileType.File:
        if base.endswith(".parquet"):
            return "parquet"
        raise InputError(f"input {root} is a file; pass an image folder, a Parquet file or folder, "
                         "or a datasets folder")
    names = {posixpath.basename(i.path): i.type for i in fs.get_file_info(pafs.FileSelector(base))}
    if "dataset_dict.json" in names or "state.json" in names:
        return "arrow"
    if any(n.endswith(".parquet") for n in names):
        return "parquet"
    if names.get("data") == pafs.FileType.Directory:
        data = fs.get_file_info(pafs.FileSelector(posixpath.join(base, "data")))
        if any(i.path.endswith(".parquet") for i in data):
            return "parquet"
    return "imagefolder"


def list_inputs(root: str, input_format: str = "auto", file_list: str | None = None, image_column: str = "image",
                label_column: str = "label", split: str = "train", workers: int = 32, progress: bool = True) -> Inputs:
    """The sorted inputs of `--input` (any of the three kinds; `input_format` "auto" detects it)."""
    if file_list:
        return read_file_list(root, file_list)
    kind = detect_format(root) if input_format == "auto" else input_format
    if kind == "imagefolder":
        return list_image_folder(root, workers, progress)
    from labeling.inputs import tables  # imports `datasets`: only when a table is given

    return tables.list_table(root, kind, image_column, label_column, split, workers)
