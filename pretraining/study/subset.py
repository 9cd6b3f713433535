"""The decision study's data: an ImageNet-100-style subset of an ImageFolder, and its evaluation folders.

    classes      `count` class folders in the order of a seeded key (sha256("SEED:class:NAME")), or the
                 names of a list (ImageNet-100's, for instance), kept in sorted order
    held out     per class, the `val_per_class` files first in the order of sha256("SEED:FILE"): never
                 labeled, never pretrained on, only scored (unless a separate validation folder is given)
    candidates   every other file of those classes: the labeling stage's `--file-list`, from which its
                 `--sample` draws the class-stratified training subset

Everything is a function of the seed and the names alone (not of the listing order or the machine), so
a rerun picks the same subset. `link_eval_folders` lays out what the evaluation commands read as an
ImageNet-style ImageFolder: ROOT/train/CLASS/ (the labeled images: what every arm pretrained on) and
ROOT/val/CLASS/ (the held-out ones), as symbolic links to the original files.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# What the labeling stage lists as images (labeling/inputs/folder.py); other files are not candidates.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class SubsetError(ValueError):
    """The image folder cannot give the subset asked for; the message says what to do."""


def _key(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


@dataclass(frozen=True)
class Subset:
    classes: tuple[str, ...]  # sorted
    candidates: tuple[str, ...]  # CLASS/FILE, sorted: what the labeling stage may draw from
    held_out: tuple[str, ...]  # CLASS/FILE, sorted: the scored images


def class_folders(root: Path) -> list[str]:
    """Sorted subfolders of `root` holding at least one image."""
    if not root.is_dir():
        raise SubsetError(f"{root} is not a folder; pass an ImageFolder (ROOT/CLASS/IMAGE), e.g. ImageNet's train/")
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and any(_images(Path(e.path))))
    if not names:
        raise SubsetError(f"{root} has no class folders with images ({', '.join(IMAGE_SUFFIXES)}); pass an "
                          "ImageFolder (ROOT/CLASS/IMAGE)")
    return names


def _images(folder: Path) -> Iterable[str]:
    return (e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))


def choose_classes(available: Sequence[str], count: int | None, seed: int, listed: Sequence[str] = ()) -> list[str]:
    """`listed` (each must be in `available`) or the first `count` of `available` in seeded-key order
    (all of them when `count` is None); sorted."""
    if listed:
        missing = sorted(set(listed) - set(available))
        if missing:
            raise SubsetError(f"the class list names {len(missing)} classes the image folder lacks, e.g. "
                              f"{missing[:3]}; check the list against the folder's class names")
        return sorted(set(listed))
    if count is not None and count > len(available):
        raise SubsetError(f"--classes {count} asks for more classes than the folder's {len(available)}; pass "
                          f"--classes {len(available)} or fewer")
    ranked = sorted(available, key=lambda name: _key(f"{seed}:class:{name}"))
    return sorted(ranked[:count] if count is not None else ranked)


def choose_subset(root: Path, classes: Sequence[str], val_per_class: int, seed: int) -> Subset:
    """The candidates and held-out files of `classes` under `root` (see the module docstring);
    `val_per_class` 0: nothing held out (a separate validation folder scores)."""
    candidates, held_out = [], []
    for name in classes:
        files = sorted(_images(root / name), key=lambda f: _key(f"{seed}:{name}/{f}"))
        if len(files) <= val_per_class:
            raise SubsetError(f"class {name} has {len(files)} images, too few to hold out {val_per_class} and "
                              "train on the rest; lower --val-per-class or drop the class")
        held_out += [f"{name}/{f}" for f in files[:val_per_class]]
        candidates += [f"{name}/{f}" for f in files[val_per_class:]]
    return Subset(tuple(sorted(classes)), tuple(sorted(candidates)), tuple(sorted(held_out)))


def validation_files(root: Path, classes: Sequence[str]) -> list[str]:
    """CLASS/FILE of every image of `classes` in a separate validation ImageFolder (ImageNet's val/)."""
    missing = [c for c in classes if not (root / c).is_dir()]
    if missing:
        raise SubsetError(f"the validation folder {root} lacks {len(missing)} of the chosen classes, e.g. "
                          f"{missing[:3]}; lay it out as ROOT/CLASS/IMAGE with the training folder's class names")
    return sorted(f"{c}/{f}" for c in classes for f in _images(root / c))


def image_id(relative: str) -> str:
    """The labeling stage's id of an ImageFolder file: its relative path without the extension."""
    return os.path.splitext(relative)[0]


def link_eval_folders(out: Path, train_root: Path, train: Iterable[str], val_root: Path, val: Iterable[str]) -> dict:
    """OUT/train/CLASS/FILE and OUT/val/CLASS/FILE as links to `train_root`/... and `val_root`/...;
    replaces what OUT held. Returns the image counts."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    counts = {}
    for split, root, files in (("train", train_root, train), ("val", val_root, val)):
        count = 0
        for rel in files:
            link = out / split / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((root / rel).resolve())
            count += 1
        counts[split] = count
    return counts
