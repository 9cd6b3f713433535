"""ImageFolder inputs: a tree `ROOT/<class>/<file>`, listed by walking it or from `--file-list`.

ImageNet's `train/n01440764/n01440764_10026.JPEG` is one. Class names are the sorted folder
names, `label` is the index of the folder's name, `image_id` is the relative path without
extension. Class folders are listed in parallel; the listing never stats a file, so 1.28M files
take a minute or two, not hours. `FolderSource` reads an input's original bytes.

Symbolic links to folders are followed, each real folder once: a link back to a folder on its own
path (a loop), to the input root or to a class folder, or to a folder already listed through
another link is skipped with a warning, so every image is listed once, where it really is (a
class folder's images under that class, never also under a class that links to it). Two class
folders that are the same folder are refused. Links that cannot be followed are skipped with a
warning.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType

import pyarrow.fs as pafs
from tqdm.auto import tqdm

from dataset_card.contract.shards import filesystem
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


@dataclass
class _Walk:
    """One class folder's listing: files by folder, each folder's real path, what was skipped."""

    folders: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # rel dir -> (real path, file names)
    notes: list[str] = field(default_factory=list)

    def files(self, dropped: Collection[str] = ()) -> list[str]:
        out = []
        for rel, (_, names) in self.folders.items():
            if rel not in dropped:
                out += [posixpath.join(rel, n) if rel else n for n in names]
        return out


def _walk_local(folder: str, claimed: Mapping[str, str] = MappingProxyType({})) -> _Walk:
    """Every non-hidden file below `folder` (scandir: no stat per plain file), following symbolic
    links to folders once each: a folder whose real path this walk has seen, or that is another
    listed folder (`claimed`: real path -> what it is, for the input root and the class folders), is
    skipped with a note (a symbolic-link loop, or a folder listed where it really is); a link that
    cannot be followed is skipped with a note."""
    walk, stack = _Walk(), [""]
    seen = {os.path.realpath(folder)}
    while stack:
        rel = stack.pop()
        names = []
        with os.scandir(os.path.join(folder, rel)) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if _hidden(entry.name):
                    continue
                child = posixpath.join(rel, entry.name) if rel else entry.name
                try:
                    is_dir, is_file = entry.is_dir(), entry.is_file()
                    real = os.path.realpath(entry.path) if is_dir and entry.is_symlink() else None
                except OSError as err:  # ELOOP: a link to itself, or links in a circle
                    walk.notes.append(f"{posixpath.join(posixpath.basename(folder), child)} cannot be followed "
                                      f"({os.strerror(err.errno) if err.errno else err}); skipped")
                    continue
                if is_dir:
                    here = posixpath.join(posixpath.basename(folder), child)
                    if real is not None and (real in seen or real in claimed):
                        above = os.path.realpath(os.path.join(folder, rel))
                        if above == real or above.startswith(real + os.sep):
                            why = "a folder above it (a symbolic-link loop)"
                        elif real in claimed:
                            why = f"{claimed[real]}, listed as itself"
                        else:
                            why = f"{real}, listed already through another link"
                        walk.notes.append(f"{here} is a link to {why}; skipped")
                        continue
                    seen.add(real or os.path.realpath(entry.path))
                    stack.append(child)
                elif is_file:
                    names.append(entry.name)
        walk.folders[rel] = (os.path.realpath(os.path.join(folder, rel)), names)
    return walk


def _walk(fs: pafs.FileSystem, folder: str, claimed: Mapping[str, str] = MappingProxyType({})) -> _Walk:
    if isinstance(fs, pafs.LocalFileSystem):
        return _walk_local(folder, claimed)
    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=True))
    walk = _Walk()
    for info in infos:
        rel = posixpath.relpath(info.path, folder)
        if info.type == pafs.FileType.File and not any(_hidden(part) for part in rel.split("/")):
            head, name = posixpath.split(rel)
            walk.folders.setdefault(head, (posixpath.join(folder, head), []))[1].append(name)
    return walk


def _once(class_names: Sequence[str], walks: Sequence[_Walk]) -> tuple[list[list[str]], list[str]]:
    """Each class's files, with every folder reached through links from several classes listed only
    under the first (in class order); and the notes saying what was dropped."""
    owner: dict[str, str] = {}
    files, notes = [], []
    for name, walk in zip(class_names, walks):
        dropped = set()
        for rel, (real, _) in sorted(walk.folders.items()):
            if rel and any(rel.startswith(d + "/") for d in dropped):
                dropped.add(rel)
            elif rel and real in owner:
                dropped.add(rel)
                notes.append(f"{name}/{rel} is a link to {real}, listed already as {owner[real]}; skipped")
            else:
                owner.setdefault(real, f"{name}/{rel}" if rel else name)
        files.append(walk.files(dropped))
        notes += walk.notes
    return files, notes


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


def list_image_folder(root: str, workers: int = 32, progress: bool = True) -> Inputs:
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
    folders = [posixpath.join(base, c) for c in class_names]
    claimed: dict[str, str] = {}
    if isinstance(fs, pafs.LocalFileSystem):  # a class folder reached again through a link is skipped
        claimed = {os.path.realpath(base): "the input folder"}
        claimed.update({os.path.realpath(p): f"class folder {c}" for c, p in zip(class_names, folders)})
        owner: dict[str, str] = {}
        for name, folder in zip(class_names, folders):
            first = owner.setdefault(os.path.realpath(folder), name)
            if first != name:
                raise InputError(f"class folders {first} and {name} of {root} are the same folder (a link): remove "
                                 "the link, or list the images with --file-list")
    with ThreadPoolExecutor(workers) as pool:
        jobs = pool.map(partial(_walk, fs, claimed=claimed), folders)
        walks = list(tqdm(jobs, total=len(class_names), desc="listing class folders", unit="folder",
                           disable=not progress))
    files, notes = _once(class_names, walks)
    entries, skipped = _entries(class_names, files)
    if not entries:
        raise InputError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in the class folders of {root}")
    return Inputs(FolderSource(root), tuple(class_names), inputs_table(entries), skipped, tuple(notes))


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
