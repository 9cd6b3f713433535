"""Ground truth for label-quality scoring: COCO instances JSON, semantic label PNGs (ADE20K-style)
or COCO panoptic PNG + JSON, matched to our rows by file name; and taxonomy mapping by name.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image
from pycocotools.coco import COCO

from dataset_card.contract import codecs, layout
from dataset_card.contract.schema import validate_schema


class GroundTruthError(ValueError):
    """Ground truth that cannot be read or matched to the labeled rows."""


@dataclass(frozen=True)
class LabeledRow:
    image_id: str
    file_name: str  # basename of the input path, the key ground truth is matched by
    height: int
    width: int
    instances: list
    semantic_map: bytes | None
    instance_map_bytes: bytes | None = None


def labeled_rows(pred_root: str, with_semantic: bool, with_instance_map: bool = False) -> Iterator[LabeledRow]:
    """Stream our rows (only the columns scoring needs), shard by shard."""
    files = sorted(Path(pred_root, layout.DATA_DIR).glob("train-*.parquet"))
    if not files:
        raise GroundTruthError(f"no data files under {pred_root}/{layout.DATA_DIR}: is it a labeled output folder?")
    columns = (["image_id", "image.path", "width", "height", "instances"] + (["semantic_mask"] if with_semantic else [])
               + (["instance_mask"] if with_instance_map else []))
    for path in files:
        parquet = pq.ParquetFile(path)
        validate_schema(parquet.schema_arrow, columns=("image_id", "image", "width", "height", "instances"),
                        source=str(path))
        for batch in parquet.iter_batches(columns=columns, batch_size=64):
            for row in batch.to_pylist():
                yield LabeledRow(
                    image_id=row["image_id"],
                    file_name=Path((row.get("image") or {}).get("path") or row["image_id"]).name,
                    height=row["height"],
                    width=row["width"],
                    instances=row["instances"],
                    semantic_map=(row["semantic_mask"] or {}).get("bytes") if with_semantic else None,
                    instance_map_bytes=(row["instance_mask"] or {}).get("bytes") if with_instance_map else None,
                )


def load_coco(path: str) -> COCO:
    if not Path(path).is_file():
        raise GroundTruthError(f"ground-truth annotation file {path} does not exist")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(path)
    except (json.JSONDecodeError, KeyError) as err:
        raise GroundTruthError(f"{path} is not a COCO annotation file ({err})") from err


def coco_ids_by_file_name(coco: COCO) -> dict[str, int]:
    return {Path(img["file_name"]).name: int(img_id) for img_id, img in coco.imgs.items()}


def normalise_name(name: str) -> str:
    """'Tree-merged' -> 'tree', 'wall-other-merged' -> 'wall', 'dining table' -> 'dining table'."""
    name = name.lower().strip().replace("_", " ")
    return re.sub(r"(-(merged|other|stuff))+$", "", name)


def taxonomy_mapping(pred_classes: Mapping[int, str], gt_classes: Mapping[int, str],
                     explicit: Mapping[int, int] | None = None) -> dict[int, int]:
    """Our semantic class id -> ground-truth class id, by `explicit` if given, else by normalised name."""
    if explicit is not None:
        unknown = sorted(set(explicit.values()) - set(gt_classes))
        if unknown:
            raise GroundTruthError(f"the class map names ground-truth ids {unknown[:5]} that the ground truth lacks")
        return {int(k): int(v) for k, v in explicit.items()}
    by_name = {normalise_name(n): int(i) for i, n in gt_classes.items()}
    mapping = {int(i): by_name[normalise_name(n)] for i, n in pred_classes.items() if normalise_name(n) in by_name}
    if not mapping:
        raise GroundTruthError(
            "no semantic class name matches between the labels and the ground truth "
            f"(ours e.g. {list(pred_classes.values())[:3]}, theirs e.g. {list(gt_classes.values())[:3]}): "
            "pass --class-map with a JSON {our_id: gt_id}"
        )
    return mapping


@dataclass(frozen=True)
class SemanticGroundTruth:
    """A folder of ground-truth semantic maps and their taxonomy."""

    folder: Path
    classes: dict[int, str]
    ignore_value: int
    panoptic_segments: dict[str, dict[int, int]] | None = None  # file stem -> segment id -> category
    things: frozenset[int] = frozenset()  # panoptic thing categories (the rest of `classes` are stuff)
    crowd: dict[str, frozenset[int]] | None = None  # file stem -> its crowd segments (void for PQ)

    def find(self, file_name: str) -> Path | None:
        path = self.folder / (Path(file_name).stem + ".png")
        return path if path.is_file() else None

    def read(self, path: Path) -> np.ndarray:
        """(H, W) int64 ground-truth class ids, `ignore_value` where unlabeled."""
        if self.panoptic_segments is None:
            return codecs.decode_mask(path.read_bytes())
        return self.read_panoptic(path)[0]

    def read_panoptic(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """(categories, segment ids), both (H, W) int64, of a COCO panoptic PNG: unlabeled pixels
        have category `ignore_value` and segment 0."""
        rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
        out = np.full(ids.shape, self.ignore_value, np.int64)
        for segment, category in (self.panoptic_segments or {}).get(path.stem, {}).items():
            out[ids == segment] = category
        return out, ids


def label_folder(folder: str, classes_json: str, ignore_value: int) -> SemanticGroundTruth:
    """Label PNGs named like the images (`<stem>.png`), with a JSON {id: name} taxonomy."""
    if not Path(folder).is_dir():
        raise GroundTruthError(f"ground-truth semantic folder {folder} does not exist")
    try:
        classes = {int(k): str(v) for k, v in json.loads(Path(classes_json).read_text()).items()}
    except (OSError, ValueError) as err:
        raise GroundTruthError(f"cannot read the class list {classes_json} as a JSON {{id: name}}: {err}") from err
    return SemanticGroundTruth(Path(folder), classes, ignore_value)


def coco_panoptic(png_folder: str, panoptic_json: str) -> SemanticGroundTruth:
    """COCO panoptic PNGs (id = R + 256 G + 256^2 B) and their JSON; void (id 0) is ignored."""
    try:
        data = json.loads(Path(panoptic_json).read_text())
        classes = {int(c["id"]): c["name"] for c in data["categories"]}
        things = frozenset(int(c["id"]) for c in data["categories"] if c["isthing"])
        segments = {
            Path(ann["file_name"]).stem: {int(s["id"]): int(s["category_id"]) for s in ann["segments_info"]}
            for ann in data["annotations"]
        }
        crowd = {Path(ann["file_name"]).stem: frozenset(int(s["id"]) for s in ann["segments_info"] if s.get("iscrowd"))
                 for ann in data["annotations"]}
    except (OSError, ValueError, KeyError) as err:
        raise GroundTruthError(f"{panoptic_json} is not a COCO panoptic annotation file: {err}") from err
    if not Path(png_folder).is_dir():
        raise GroundTruthError(f"panoptic PNG folder {png_folder} does not exist")
    return SemanticGroundTruth(Path(png_folder), classes, ignore_value=-1, panoptic_segments=segments, things=things,
                               crowd=crowd)
