"""Labeled images for downstream evaluation, from whatever folder the user has.

`load_eval_data(path)` recognises four layouts and returns a train and a held-out split of
`Sample`s (RGB uint8, image label, semantic mask with -1 = ignore):

- our labeled folder (`metadata.json` + `data/train-*.parquet`), read with pyarrow through the
  dataset contract's codecs;
- ADE20K as distributed (`ADEChallengeData2016/{images,annotations}/{training,validation}`);
- an ImageFolder (`ROOT/CLASS/*.jpg`, or `ROOT/{train,val}/CLASS/*.jpg` as ImageNet is laid out);
- anything else `datasets` reads (`save_to_disk` output, or a folder `load_dataset` understands),
  and `hub:REPO[@REVISION]` from the Hub (`scene_parse_150` read as ADE20K).
COCO's instance annotations are `coco.py`'s.

Where the data has no held-out split, a fixed fraction is held out by hashing each sample's key
(image id or path), so the split does not depend on sharding, file order or a seed.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torchvision import tv_tensors

from dataset_card.contract import codecs, layout
from dataset_card.contract.schema import SCHEMA_VERSION, UPGRADABLE_VERSIONS, SchemaError, validate_schema

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
ADE20K_CLASSES = 150
ADE20K_ON_HUB = "scene_parse_150"  # the Hub's ADEChallengeData2016 (image, annotation in ADE20K's convention)
HUB_PREFIX = "hub:"


class EvalDataError(ValueError):
    """The evaluation data cannot be read as asked; the message says what to do."""


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # (H, W, 3) uint8
    label: int  # image-level class, -1 when the data has none
    mask: np.ndarray | None  # (H, W) int64 semantic class ids, -1 = ignore; None without masks


class Source(Protocol):
    def __len__(self) -> int: ...

    def load(self, index: int) -> Sample: ...


@dataclass(frozen=True)
class EvalData:
    train: Source
    val: Source
    class_names: tuple[str, ...]  # image-level classes (empty when the data has none)
    num_semantic_classes: int  # 0 when the data has no semantic masks
    layout: str  # "labeled", "ade20k", "imagefolder" or "datasets"


def class_ids(mask: np.ndarray, ignore_value: int | None, reduce_zero_label: bool = False) -> np.ndarray:
    """Stored (H, W) mask -> (H, W) int64 class ids with -1 for "no class".

    `reduce_zero_label` is ADE20K's convention: stored 0 means "other" (ignored), k means class k-1.
    """
    mask = mask.astype(np.int64)
    if reduce_zero_label:
        return np.where(mask == 0, -1, mask - 1)
    return mask if ignore_value is None else np.where(mask == ignore_value, -1, mask)


def hash_split(keys: Sequence[str], val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): key k is held out iff sha1(k) / 2**64 < val_fraction. Order-free."""
    u = np.array([int.from_bytes(hashlib.sha1(k.encode()).digest()[:8], "big") / 2.0**64 for k in keys])
    return np.flatnonzero(u >= val_fraction), np.flatnonzero(u < val_fraction)


class Subset:
    def __init__(self, source: Source, indices: Sequence[int]):
        self.source, self.indices = source, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> Sample:
        return self.source.load(int(self.indices[index]))


class ParquetSource:
    """Rows of our labeled folder, read one Parquet row group at a time. The last row groups read
    stay in memory up to `cache_bytes` per process (least recently used first out), so a sequential
    pass reads each row group once and a shuffled pass over a small folder (a probe's, ADE20K-sized)
    reads it once per process, not once per sample."""

    COLUMNS = ("image", "label", "semantic_mask")

    def __init__(self, files: Sequence[str], rows: np.ndarray, labels: np.ndarray, ignore_value: int,
                 cache_bytes: int = 256 * 2**20):
        self.files, self.rows, self.labels, self.ignore_value = list(files), rows, labels, ignore_value
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple[int, int], tuple[list[dict], int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self):  # DataLoader workers start with an empty cache
        return {**self.__dict__, "_cache": OrderedDict()}

    def _row_group(self, file: int, group: int) -> list[dict]:
        key = (file, group)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key][0]
        table = pq.ParquetFile(self.files[file]).read_row_group(group, columns=list(self.COLUMNS))
        self._cache[key] = (table.to_pylist(), table.nbytes)
        while len(self._cache) > 1 and sum(n for _, n in self._cache.values()) > self.cache_bytes:
            self._cache.popitem(last=False)
        return self._cache[key][0]

    def load(self, index: int) -> Sample:
        file, group, offset = (int(v) for v in self.rows[index])
        row = self._row_group(file, group)[offset]
        mask = codecs.decode_mask(row["semantic_mask"]["bytes"])
        return Sample(codecs.decode_image(row["image"]["bytes"]), int(row["label"]),
                      class_ids(mask, self.ignore_value))


class FileSource:
    """Image files (and mask files) on disk."""

    def __init__(self, items: Sequence[tuple[str, int, str | None]], ignore_value: int | None = 255,
                 reduce_zero_label: bool = False):
        self.items, self.ignore_value, self.reduce_zero_label = list(items), ignore_value, reduce_zero_label

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> Sample:
        image_path, label, mask_path = self.items[index]
        image = _read(image_path, codecs.decode_image)
        mask = None if mask_path is None else class_ids(_read(mask_path, codecs.decode_mask), self.ignore_value,
                                                        self.reduce_zero_label)
        return Sample(image, label, mask)


class DatasetsSource:
    """Rows of a `datasets.Dataset`; image columns are read as bytes and decoded by our codecs."""

    def __init__(self, ds, image_column: str, label_column: str | None, mask_column: str | None,
                 ignore_value: int | None, reduce_zero_label: bool = False):
        self.ds, self.image_column, self.label_column = ds, image_column, label_column
        self.mask_column, self.ignore_value, self.reduce_zero_label = mask_column, ignore_value, reduce_zero_label

    def __len__(self) -> int:
        return len(self.ds)

    def load(self, index: int) -> Sample:
        row = self.ds[int(index)]
        label = -1 if self.label_column is None else int(row[self.label_column])
        mask = None
        if self.mask_column is not None:
            mask = class_ids(_decode_cell(row[self.mask_column], codecs.decode_mask), self.ignore_value,
                             self.reduce_zero_label)
        return Sample(_decode_cell(row[self.image_column], codecs.decode_image), label, mask)


def _read(path: str, decode):
    try:
        with open(path, "rb") as f:
            return decode(f.read())
    except (OSError, codecs.DecodeError) as err:
        raise EvalDataError(f"cannot read {path} ({err}); remove or replace the file") from err


def _decode_cell(cell: dict, decode):
    return decode(cell["bytes"]) if cell.get("bytes") else _read(cell["path"], decode)


def load_eval_data(path: str, val_fraction: float = 0.1, num_semantic_classes: int | None = None,
                   ignore_value: int | None = None, image_column: str | None = None,
                   label_column: str | None = None, mask_column: str | None = None,
                   reduce_zero_label: bool = False) -> EvalData:
    """Find out what `path` holds and return its train and held-out splits (see the module docstring).

    `num_semantic_classes` / `ignore_value` / `reduce_zero_label` / the column names are needed
    only for a generic `datasets` folder, where nothing else says which column or value means what.
    `hub:REPO[@REVISION]` loads a dataset from the Hugging Face Hub (online only).
    """
    columns = (image_column, label_column, mask_column)
    if path.startswith(HUB_PREFIX):
        data = _hub(path[len(HUB_PREFIX):], val_fraction, num_semantic_classes, ignore_value, reduce_zero_label,
                    *columns)
        return _non_empty(data, path)
    if not os.path.isdir(path):
        raise EvalDataError(f"{path} is not a folder; pass a labeled folder, an ImageFolder, ADE20K or a "
                            f"`datasets` folder")
    if not 0.0 < val_fraction < 1.0:
        raise EvalDataError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    if os.path.isfile(os.path.join(path, layout.METADATA_FILE)):
        data = _labeled(path, val_fraction)
    elif (ade := _ade20k_root(path)) is not None:
        data = _ade20k(ade)
    elif _class_folders(path) or _class_folders(os.path.join(path, "train")):
        data = _imagefolder(path, val_fraction)
    else:
        data = _datasets(_load_local(path), path, val_fraction, num_semantic_classes, ignore_value,
                         reduce_zero_label, *columns)
    return _non_empty(data, path)


def _non_empty(data: EvalData, path: str) -> EvalData:
    if len(data.train) == 0 or len(data.val) == 0:
        raise EvalDataError(f"{path} gives {len(data.train)} training and {len(data.val)} held-out samples; "
                            f"add images or change --val-fraction so both are non-empty")
    return data


def _labeled(path: str, val_fraction: float) -> EvalData:
    with open(os.path.join(path, layout.METADATA_FILE)) as f:
        # only images and image labels are read here, which every schema version holds alike
        metadata = layout.DatasetMetadata.from_json(f.read(), source=os.path.join(path, layout.METADATA_FILE),
                                                    accept=(*UPGRADABLE_VERSIONS, SCHEMA_VERSION))
    files = sorted(os.path.join(path, layout.DATA_DIR, name) for name in os.listdir(os.path.join(path, layout.DATA_DIR))
                   if name.startswith("train-") and name.endswith(".parquet")) \
        if os.path.isdir(os.path.join(path, layout.DATA_DIR)) else []
    if not files:
        raise EvalDataError(f"{path} has metadata.json but no {layout.DATA_GLOB}; point at a finished labeling run")
    rows, labels, keys = [], [], []
    for i, file in enumerate(files):
        parquet = pq.ParquetFile(file)
        try:
            validate_schema(parquet.schema_arrow, ParquetSource.COLUMNS, source=file)
        except SchemaError as err:
            raise EvalDataError(str(err)) from err
        table = parquet.read(columns=["image_id", "label"])
        keys += table.column("image_id").to_pylist()
        labels.append(table.column("label").to_numpy())
        for g in range(parquet.num_row_groups):
            n = parquet.metadata.row_group(g).num_rows
            rows.append(np.stack([np.full(n, i), np.full(n, g), np.arange(n)], axis=1))
    source = ParquetSource(files, np.concatenate(rows) if rows else np.zeros((0, 3), np.int64),
                           np.concatenate(labels), metadata.ignore_value)
    train, val = hash_split(keys, val_fraction)
    return EvalData(Subset(source, train), Subset(source, val), metadata.class_names,
                    metadata.num_semantic_classes, "labeled")


def _ade20k_root(path: str) -> str | None:
    for root in (path, os.path.join(path, "ADEChallengeData2016")):
        if all(os.path.isdir(os.path.join(root, kind, split)) for kind in ("images", "annotations")
               for split in ("training", "validation")):
            return root
    return None


def _ade20k(root: str) -> EvalData:
    """ADE20K scene parsing: 150 classes; annotation 0 ("other") is ignored and k becomes class k-1."""
    splits = []
    for split in ("training", "validation"):
        image_dir, mask_dir = os.path.join(root, "images", split), os.path.join(root, "annotations", split)
        items = [(os.path.join(image_dir, name), -1, os.path.join(mask_dir, os.path.splitext(name)[0] + ".png"))
                 for name in sorted(os.listdir(image_dir)) if name.lower().endswith(IMAGE_SUFFIXES)]
        missing = [m for _, _, m in items if not os.path.isfile(m)]
        if missing:
            raise EvalDataError(f"{len(missing)} ADE20K images have no annotation, e.g. {missing[0]}; "
                                f"restore the annotations folder")
        splits.append(FileSource(items, ignore_value=None, reduce_zero_label=True))
    return EvalData(splits[0], splits[1], (), ADE20K_CLASSES, "ade20k")


def _class_folders(path: str) -> list[str]:
    """Sorted subfolders of `path` that contain image files (an ImageFolder's classes)."""
    if not os.path.isdir(path):
        return []
    return sorted(name for name in os.listdir(path) if os.path.isdir(os.path.join(path, name))
                  and any(f.lower().endswith(IMAGE_SUFFIXES) for f in os.listdir(os.path.join(path, name))))


def _image_items(root: str, classes: Sequence[str]) -> list[tuple[str, int, None]]:
    items = []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        for dirpath, _, files in sorted(os.walk(folder)):
            items += [(os.path.join(dirpath, f), label, None) for f in sorted(files) if f.lower().endswith(IMAGE_SUFFIXES)]
    return items


def _imagefolder(path: str, val_fraction: float) -> EvalData:
    """ROOT/{train,val}/CLASS/* when both exist (ImageNet), else ROOT/CLASS/* with a hashed hold-out."""
    val_dir = next((os.path.join(path, d) for d in ("val", "validation") if os.path.isdir(os.path.join(path, d))), None)
    if _class_folders(os.path.join(path, "train")) and val_dir is not None:
        classes = _class_folders(os.path.join(path, "train"))
        unknown = sorted(set(_class_folders(val_dir)) - set(classes))
        if unknown:
            raise EvalDataError(f"{val_dir} has classes that train/ lacks ({', '.join(unknown[:3])}); "
                                f"use the same class folders in both")
        return EvalData(FileSource(_image_items(os.path.join(path, "train"), classes)),
                        FileSource(_image_items(val_dir, classes)), tuple(classes), 0, "imagefolder")
    classes = _class_folders(path)
    items = _image_items(path, classes)
    train, val = hash_split([os.path.relpath(p, path) for p, _, _ in items], val_fraction)
    source = FileSource(items)
    return EvalData(Subset(source, train), Subset(source, val), tuple(classes), 0, "imagefolder")


def _load_local(path: str):
    import datasets

    try:
        if os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json")):
            return datasets.load_from_disk(path)
        return datasets.load_dataset(path)
    except Exception as err:  # datasets raises many types for "not a dataset"
        raise EvalDataError(f"{path} is not a labeled folder, ImageFolder, ADE20K or a folder `datasets` can "
                            f"read ({type(err).__name__}: {_first_line(err)})") from err


def _hub(spec: str, val_fraction: float, num_semantic_classes: int | None, ignore_value: int | None,
         reduce_zero_label: bool, image_column: str | None, label_column: str | None,
         mask_column: str | None) -> EvalData:
    """A Hub dataset; one named like the Hub's `scene_parse_150` is read in ADE20K's convention."""
    import datasets

    repo, _, revision = spec.partition("@")
    try:
        loaded = datasets.load_dataset(repo, revision=revision or None)
    except Exception as err:  # offline, unknown repo, a loading script `datasets` no longer runs, ...
        raise EvalDataError(f"cannot load {repo!r} from the Hugging Face Hub ({type(err).__name__}: "
                            f"{_first_line(err)}); check the name and that this machine is online, or download "
                            f"the data (ADE20K: ADEChallengeData2016) and pass its folder") from err
    if repo.rsplit("/", 1)[-1] == ADE20K_ON_HUB:  # ADEChallengeData2016 as image + annotation columns
        return _datasets(loaded, f"hub:{spec}", val_fraction, ADE20K_CLASSES, None, True, image_column or "image",
                         label_column or "", mask_column or "annotation")
    return _datasets(loaded, f"hub:{spec}", val_fraction, num_semantic_classes, ignore_value, reduce_zero_label,
                     image_column, label_column, mask_column)


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def _datasets(loaded, path: str, val_fraction: float, num_semantic_classes: int | None, ignore_value: int | None,
              reduce_zero_label: bool, image_column: str | None, label_column: str | None,
              mask_column: str | None) -> EvalData:
    """Train / held-out sources over a loaded `datasets.Dataset` or `DatasetDict`; an empty
    `label_column` means "no image-level labels"."""
    import datasets

    splits = loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    train_name = "train" if "train" in splits else next(iter(splits))
    val_name = next((s for s in ("validation", "val", "test") if s in splits and s != train_name), None)
    features = splits[train_name].features
    images = [n for n, f in features.items() if isinstance(f, datasets.Image)]
    image_column = image_column or ("image" if "image" in images else (images[0] if images else None))
    if image_column not in features:
        raise EvalDataError(f"{path} has no image column {image_column!r}; name it with --image-column "
                            f"(columns: {', '.join(features)})")
    labels = [n for n, f in features.items() if isinstance(f, datasets.ClassLabel)]
    if label_column != "":
        label_column = label_column or ("label" if "label" in labels else (labels[0] if labels else None))
    if mask_column is None:
        mask_column = next((n for n in ("semantic_mask", "annotation", "segmentation", "mask", "label")
                            if n in images and n != image_column), None)
    class_names = tuple(features[label_column].names) if label_column in labels else ()
    if mask_column is not None and num_semantic_classes is None:
        raise EvalDataError(f"{path} has masks in column {mask_column!r} but does not say how many semantic "
                            f"classes there are; pass --num-classes")

    def source(ds):
        casts = {c: datasets.Image(decode=False) for c in (image_column, mask_column) if c is not None}
        for column, feature in casts.items():
            ds = ds.cast_column(column, feature)
        return DatasetsSource(ds, image_column, label_column or None, mask_column,
                              255 if ignore_value is None else ignore_value, reduce_zero_label)

    if val_name is not None:
        train, val = source(splits[train_name]), source(splits[val_name])
    else:
        ds = splits[train_name]
        keys = ds["image_id"] if "image_id" in ds.column_names else [str(i) for i in range(len(ds))]
        full = source(ds)
        train_idx, val_idx = hash_split(keys, val_fraction)
        train, val = Subset(full, train_idx), Subset(full, val_idx)
    return EvalData(train, val, class_names, num_semantic_classes or 0, "datasets")


class ClassificationSet(torch.utils.data.Dataset):
    """(image tensor, label) pairs; `transform` takes a PIL image (timm's `create_transform`)."""

    def __init__(self, source: Source, transform):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        sample = self.source.load(index)
        return self.transform(Image.fromarray(sample.image)), sample.label


class SegmentationSet(torch.utils.data.Dataset):
    """(image (3, H, W) float, mask (H, W) int64 with -1 = ignore) pairs, transformed jointly."""

    def __init__(self, source: Source, transform):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        sample = self.source.load(index)
        if sample.mask is None:
            raise EvalDataError("this data has no semantic masks; segmentation needs a dataset with masks")
        image = tv_tensors.Image(torch.from_numpy(sample.image.copy()).permute(2, 0, 1))
        return self.transform(image, tv_tensors.Mask(torch.from_numpy(sample.mask.copy())))


def evenly_spaced(source: Source, count: int | None) -> Source:
    """At most `count` samples spread over the whole source (which may be sorted by class)."""
    if count is None or count >= len(source):
        return source
    return Subset(source, np.linspace(0, len(source) - 1, count).round().astype(np.int64))


def probe_loaders(path: str, img_size: int, mean: Sequence[float], std: Sequence[float], batch_size: int = 64,
                  val_fraction: float = 0.1, max_train: int | None = 10000, max_val: int | None = 2000,
                  num_workers: int = 0) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """(train, held-out) loaders of (images (B, 3, img_size, img_size) normalised by mean/std, labels (B,))
    for a probe during pretraining: evaluation transform (resize, centre crop), at most max_train /
    max_val images, in a fixed order."""
    from timm.data import create_transform

    data = load_eval_data(path, val_fraction)
    if not data.class_names:
        raise EvalDataError(f"{path} has no image-level labels, so no probe can be scored on it")
    transform = create_transform(img_size, is_training=False, interpolation="bicubic", mean=tuple(mean),
                                 std=tuple(std), crop_pct=0.875)
    return tuple(torch.utils.data.DataLoader(ClassificationSet(evenly_spaced(split, n), transform), batch_size,
                                             num_workers=num_workers)
                 for split, n in ((data.train, max_train), (data.val, max_val)))
