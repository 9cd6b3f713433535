"""ImageFolder inputs: a tree `ROOT/<class>/<file>`, listed by walking it or from `--file-list`.

ImageNet's `train/n01440764/n01440764_10026.JPEG` is one. Class names are the sorted folder
names, `label` is the index of the folder's name, `image_id` is the relative path without
extension. Class folders are listed in parallel; the listing never stats a file, so 1.28M files
take a minute or two, not hours. `FolderSource` reads an input's original bytes.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pyarrow.fs as pafs
from tqdm.auto import tqdm

from dataset_card.shards import filesystem
from labeling.inputs.input_list import InputError, Inputs, inputs_table

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})


class FolderSource:
    """Reads files below a root (a local path or a URL pyarrow understands)."""

    def __init__(self, root: str):
        self.root = root
        self._fs: tuple[pafs.FileSystem, str] | None = None

    def __getstate__(self):  # filesystems are rebuilt in each worker, not pickled
        return {"root": self.root}

    def __setstate__(self, state):
        self.__init__(state["root"])

    def read(self, paths: Sequence[str]) -> list[bytes | BaseException]:
        """The bytes of each relative path, or the exception reading it raised."""
        if self._fs is None:
            self._fs = filesystem(self.root)
        fs, base = self._fs

        def one(path: str) -> bytes | BaseException:
            try:
                with fs.open_input_stream(posixpath.join(base, path)) as stream:
                    return stream.read()
            except Exception as err:  # a missing or unreadable file fails that input only
                return err

        if isinstance(fs, pafs.LocalFileSystem) or len(paths) < 2:
            return [one(p) for p in paths]
        with ThreadPoolExecutor(min(16, len(paths))) as pool:  # object stores: hide latency
            return list(pool.map(one, paths))


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _walk_local(folder: str) -> list[str]:
    """Relative paths of every non-hidden file below `folder` (scandir: no stat per file)."""
    found, stack = [], [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(folder, rel)) as entries:
            for entry in entries:
                if _hidden(entry.name):
                    continue
                child = posixpath.join(rel, entry.name) if rel else entry.name
                if entry.is_dir():
                    stack.append(child)
                elif entry.is_file():
                    found.append(child)
    return found


def _walk(fs: pafs.FileSystem, folder: str) -> list[str]:
    if isinstance(fs, pafs.LocalFileSystem):
        return _walk_local(folder)
    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=True))
    out = []
    for info in infos:
        rel = posixpath.relpath(info.path, folder)
        if info.type == pafs.FileType.File and not any(_hidden(part) for part in rel.split("/")):
            out.append(rel)
    return out


def _entries(class_names: Sequence[str], files_per_class: Sequence[Sequence[str]]):
    """ImageFolder entries in sorted order (class, then file), and the count of non-image files."""
    entries, skipped = [], 0
    for label, (name, files) in enumerate(zip(class_names, files_per_class)):
        for rel in sorted(files):
            if not _is_image(rel):
                skipped += 1
                continue
            path = f"{name}/{rel}"
            entries.append((path, os.path.splitext(path)[0], label, path))
    return entries, skipped


def list_image_folder(root: str, workers: int = 32) -> Inputs:
    """An ImageFolder tree `root/<class>/<file>` -> Inputs (class folders listed in parallel)."""
    fs, base = filesystem(root)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input {root} does not exist; check --input")
    if info.type != pafs.FileType.Directory:
        raise InputError(f"input {root} is a file; pass a folder laid out as <root>/<class>/<image>")
    top = fs.get_file_info(pafs.FileSelector(base))
    class_names = sorted(posixpath.basename(i.path) for i in top
                         if i.type == pafs.FileType.Directory and not _hidden(posixpath.basename(i.path)))
    if not class_names:
        raise InputError(f"no class folders in {root}: lay images out as <root>/<class>/<image>.jpg "
                         "(ImageFolder), or pass a Parquet / datasets folder")
    with ThreadPoolExecutor(workers) as pool:
        jobs = pool.map(partial(_walk, fs), [posixpath.join(base, c) for c in class_names])
        files = list(tqdm(jobs, total=len(class_names), desc="listing class folders", unit="folder"))
    entries, skipped = _entries(class_names, files)
    if not entries:
        raise InputError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in the class folders of {root}")
    return Inputs(FolderSource(root), tuple(class_names), inputs_table(entries), skipped)


def read_file_list(root: str, file_list: str) -> Inputs:
    """An ImageFolder tree given by a precomputed list of relative paths (`<class>/<file>` per line)."""
    fs, path = filesystem(file_list)
    try:
        with fs.open_input_stream(path) as stream:
            lines = stream.read().decode().splitlines()
    except (FileNotFoundError, OSError) as err:
        raise InputError(f"cannot read --file-list {file_list} ({err}); check the path") from err
    by_class: dict[str, list[str]] = {}
    for number, line in enumerate(lines, start=1):
        rel = line.strip().removeprefix("./")
        if not rel or rel.startswith("#"):
            continue
        name, sep, file = rel.partition("/")
        if not sep or not file:
            raise InputError(f"line {number} of {file_list} ({rel!r}) has no class folder; "
                             "write paths relative to --input as <class>/<file>")
        by_class.setdefault(name, []).append(file)
    class_names = sorted(by_class)
    entries, skipped = _entries(class_names, [by_class[c] for c in class_names])
    if not entries:
        raise InputError(f"--file-list {file_list} names no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return Inputs(FolderSource(root), tuple(class_names), inputs_table(entries), skipped)
