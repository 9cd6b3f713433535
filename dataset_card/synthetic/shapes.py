"""A synthetic labeled dataset written through the contract: shapes whose classes and instances are known.

Tests of every stage and the demo's learning check use it; nothing here needs a model.
Each image is a textured background (semantic class 0, "background") with a few ellipses and
rectangles; a shape's semantic class is its kind and colour family, and every shape is one instance.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Collection

import numpy as np
import pyarrow as pa
from PIL import Image

from dataset_card.card.readme import write_minimal_card
from dataset_card.contract import codecs, coverage, images, invariants, layout, painting, shards
from dataset_card.contract.output_folder import OutputFolder
from dataset_card.contract.schema import build_features, rows_to_table

SEMANTIC_CLASSES = (
    layout.SemanticClass(0, "background", False),
    layout.SemanticClass(1, "red ellipse", True),
    layout.SemanticClass(2, "green rectangle", True),
    layout.SemanticClass(3, "blue ellipse", True),
)
_COLOURS = {1: (200, 40, 40), 2: (40, 180, 60), 3: (50, 70, 210)}
CLASS_NAMES = ("few_shapes", "many_shapes")


def shapes_image(rng: np.random.Generator, height: int, width: int, max_shapes: int = 5):
    """(RGB uint8 (H, W, 3), semantic (H, W) uint8, list of (class id, bool mask))."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = rng.integers(90, 160, size=3)
    rgb = (base + rng.normal(0, 12, size=(height, width, 3))).clip(0, 255)
    semantic = np.zeros((height, width), np.uint8)
    shapes = []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        cls = int(rng.integers(1, 4))
        cy, cx = rng.uniform(0.15, 0.85) * height, rng.uniform(0.15, 0.85) * width
        ry, rx = rng.uniform(0.08, 0.3) * height, rng.uniform(0.08, 0.3) * width
        if cls == 2:
            mask = (np.abs(yy - cy) < ry) & (np.abs(xx - cx) < rx)
        else:
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        if mask.sum() < 16:
            continue
        rgb[mask] = np.array(_COLOURS[cls]) + rng.normal(0, 8, size=(int(mask.sum()), 3))
        semantic[mask] = cls
        shapes.append((cls, mask))
    return rgb.clip(0, 255).astype(np.uint8), semantic, shapes


def _aligned(masks: list[np.ndarray], semantic: np.ndarray, things: Collection[int] | None,
             rule: painting.PaintingRule | None) -> tuple[list[dict], np.ndarray]:
    order = sorted(range(len(masks)), key=lambda i: -int(masks[i].sum()))
    instances = []
    for new_id, i in enumerate(order, start=1):
        m = masks[i]
        ys, xs = np.nonzero(m)
        classes, counts = np.unique(semantic[m], return_counts=True)
        instances.append({
            "id": new_id,
            "rle": codecs.encode_rle(m),
            "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)],
            "area": int(m.sum()),
            "visible_area": 0,
            "score": 1.0,
            "stability_score": 1.0,
            "category_id": int(classes[counts.argmax()]),
            "category_purity": float(np.float32(counts.max() / counts.sum())),
            "level": "",
            "parent": 0,
        })
    if things is None:  # the masks are whole objects: every class one of them is aligned to is a thing
        things = {inst["category_id"] for inst in instances}
    painted = painting.paint_instances(instances, semantic, things, rule or painting.RULES[painting.DEFAULT_RULE])
    return instances, painted


def instances_from_masks(masks: list[np.ndarray], semantic: np.ndarray, things: Collection[int] | None = None,
                         rule: painting.PaintingRule | None = None) -> list[dict]:
    """Contract `instances` for bool masks: ids 1..K by area (largest first), aligned to `semantic`,
    with `level`, `parent` and `visible_area` under `rule` (default: the default rule, objects).

    things: the taxonomy's thing class ids; None treats every class a mask is aligned to as a thing
    (these masks are whole objects). Pass them when a mask may land on a stuff class.
    """
    return _aligned(masks, semantic, things, rule)[0]


def synthetic_row(image_id: str, label: int, rgb: np.ndarray, semantic: np.ndarray, masks: list[np.ndarray],
                  things: Collection[int] | None = None, rule: painting.PaintingRule | None = None):
    """One contract row (PNG image) and its painted instance map (`things`, `rule`: as `instances_from_masks`)."""
    h, w = semantic.shape
    instances, painted = _aligned(masks, semantic, things, rule)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    row = {
        "image_id": image_id,
        "label": label,
        "image": {"bytes": buf.getvalue(), "path": f"{image_id}.png"},
        "width": w,
        "height": h,
        "semantic_mask": {"bytes": codecs.encode_mask(semantic), "path": None},
        "instance_mask": {"bytes": codecs.encode_instance_mask(painted), "path": None},
        "instances": instances,
    }
    return row, painted


def row_statistics(stats: layout.ShardStats, row: dict, semantic: np.ndarray, painted: np.ndarray,
                   things: Collection[int]) -> None:
    """Add one synthetic row to its shard's statistics, as the labeler does for a labeled one."""
    classes, counts = np.unique(semantic, return_counts=True)
    stats.add_row(len(row["instances"]), float((painted > 0).mean()),
                  [inst["category_purity"] for inst in row["instances"]], dict(zip(classes.tolist(), counts.tolist())),
                  painting.level_counts(row["instances"]),
                  invariants.map_figures(row["instances"], semantic, painted, things),
                  coverage.measure(row["instances"], painted))


def write_labeled_folder(root: str | OutputFolder, metadata: layout.DatasetMetadata, example: Callable[[int], tuple],
                         num_images: int, num_shards: int, manifest: dict,
                         image_root: str | None = None) -> layout.DatasetMetadata:
    """Write a complete labeled folder (shards, errors, stats, metadata, manifest, card) at `root`.

    `example(i)` gives image i as (image_id, label, rgb (H, W, 3) uint8, semantic (H, W), masks: list of
    (H, W) bool); it is called for i = 0, 1, ... in order, so it may draw from one generator. The
    masks are aligned and painted by `metadata`'s thing classes and painting rule, as the labeler
    does. `manifest` adds to the manifest's schema version and counts. `image_root` (a local folder)
    makes a labels-only folder, as `--image-storage reference` does: each image is written there as
    a file at its `image.path`, and its row keeps that path, its sha256 and length, not its bytes.
    """
    labels_only = image_root is not None
    features = build_features(metadata.class_names, metadata.semantic_class_names, image_reference=labels_only,
                              image_bytes=not labels_only)
    footer = {"image_storage": images.REFERENCE} if labels_only else None
    folder = OutputFolder.open(root)
    bounds = np.linspace(0, num_images, num_shards + 1).astype(int)
    for s in range(num_shards):
        rows, stats = [], layout.ShardStats(shard=s)
        for i in range(bounds[s], bounds[s + 1]):
            image_id, label, rgb, semantic, masks = example(i)
            row, painted = synthetic_row(image_id, label, rgb, semantic, masks, metadata.thing_ids, metadata.painting)
            if labels_only:
                _keep_reference(row, image_root)
            rows.append(row)
            row_statistics(stats, row, semantic, painted, metadata.thing_ids)
        errors = pa.Table.from_pylist([], schema=layout.ERRORS_SCHEMA)
        shards.commit_shard(folder, s, num_shards, rows_to_table(rows, features, metadata.painting.to_dict()),
                            errors, stats, footer=footer)
    folder.write_bytes(layout.METADATA_FILE, metadata.to_json().encode())
    manifest = {"schema_version": metadata.schema_version, "num_inputs": num_images, "num_shards": num_shards,
                **manifest}
    folder.write_bytes(layout.MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
    write_minimal_card(folder, metadata, image_reference=labels_only, image_bytes=not labels_only)
    return metadata


def _keep_reference(row: dict, image_root: str) -> None:
    """Move `row`'s image bytes into a file under `image_root`, leaving the path, hash and length."""
    data, path = row["image"]["bytes"], row["image"]["path"]
    target = os.path.join(image_root, path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "wb") as f:
        f.write(data)
    row.update(image={"bytes": None, "path": path}, image_sha256=images.digest(data), image_nbytes=len(data))


def write_synthetic_dataset(root: str | OutputFolder, num_images: int = 32, num_shards: int = 2, size: tuple[int, int] = (64, 80),
                            seed: int = 0, image_root: str | None = None) -> layout.DatasetMetadata:
    """Write a complete labeled folder of synthetic shape images under `root` (labels only, the
    images under `image_root`, when that is given: see `write_labeled_folder`)."""
    rng = np.random.default_rng(seed)
    metadata = layout.DatasetMetadata(CLASS_NAMES, SEMANTIC_CLASSES, semantic_source="synthetic shapes")

    def example(i: int) -> tuple:
        rgb, semantic, shapes = shapes_image(rng, *size)
        label = int(len(shapes) >= 3)
        return f"{CLASS_NAMES[label]}/{i:06d}", label, rgb, semantic, [m for _, m in shapes]

    return write_labeled_folder(root, metadata, example, num_images, num_shards,
                                {"source": "dataset_card.synthetic.shapes", "seed": seed}, image_root)


def write_colour_task(root: str | OutputFolder, num_images: int, seed: int, size: int = 64) -> layout.DatasetMetadata:
    """A labeled folder whose image class is the semantic class of its one or two small shapes
    (red ellipse / green rectangle / blue ellipse) on a background of any colour.

    The background's mean colour, which is most of what a random encoder's pooled features carry,
    says little about the class, so a probe only does well on features that learned the shapes.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    metadata = layout.DatasetMetadata(("red", "green", "blue"), SEMANTIC_CLASSES, semantic_source="synthetic shapes")
    features = build_features(metadata.class_names, metadata.semantic_class_names)
    rows = []
    for i in range(num_images):
        label = int(rng.integers(0, 3))
        rgb = (rng.integers(0, 256, size=3) + rng.normal(0, 12, (size, size, 3))).clip(0, 255)
        semantic, masks = np.zeros((size, size), np.uint8), []
        for _ in range(int(rng.integers(1, 3))):
            (cy, cx), (ry, rx) = rng.uniform(0.2, 0.8, 2) * size, rng.uniform(0.08, 0.15, 2) * size
            box = (abs(yy - cy) < ry) & (abs(xx - cx) < rx)
            mask = box if label == 1 else ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            rgb[mask] = np.array(_COLOURS[label + 1]) + rng.normal(0, 8, (int(mask.sum()), 3))
            semantic[mask] = label + 1
            masks.append(mask)
        rows.append(synthetic_row(f"{metadata.class_names[label]}/{i:06d}", label,
                                  rgb.clip(0, 255).astype(np.uint8), semantic, masks, metadata.thing_ids)[0])
    folder = OutputFolder.open(root)
    shards.commit_shard(folder, 0, 1, rows_to_table(rows, features, metadata.painting.to_dict()),
                        pa.Table.from_pylist([], schema=layout.ERRORS_SCHEMA), layout.ShardStats(shard=0))
    folder.write_bytes(layout.METADATA_FILE, metadata.to_json().encode())
    return metadata
