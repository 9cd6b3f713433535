"""The CPU post-processing stage: model outputs -> one contract row at full size.

- semantic: the class map arrives at the image's size already (the semantic labeler upsamples its
  scores on the device), in the contract's dtype (8-bit below 255 classes, else 16-bit).
- instances: masks come already filtered (scores, stability, NMS) at the models' resolution; each
  is upsampled alone, inside its own box (bilinear on the box plus a one-pixel margin, then
  threshold), written into one reused full-size buffer and RLE-encoded. No stack of full-size
  masks ever exists, so an 8000x8000 image stays within a few hundred MB.
- the original image: its bytes (`image_storage` "inline") or only its path, sha256 and length
  ("reference", a labels-only release; `dataset_card.contract.images`);
- alignment and painting (`labeling.labelers.alignment`, under the contract's painting rule), the
  label maps' encoding (zstd-compressed `.npy`, schema v3: `dataset_card.contract.codecs`), and the
  per-row statistics the shard statistics are summed from, the alignment invariants' figures among
  them (`dataset_card.contract.invariants`), and the row's coverage: painted objects, instance
  regions at the trainer's patch grid, the level of the largest mask (`dataset_card.contract.coverage`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import pyarrow as pa

from dataset_card.contract import codecs, coverage, images, invariants, painting
from dataset_card.contract.painting import DEFAULT_RULE, RULES, PaintingRule
from dataset_card.contract.schema import arrow_schema, semantic_mask_dtype
from labeling.labelers import alignment
from labeling.pipeline import failures

# Per-row statistics (what `ShardStats.add_row` takes) and stage timings travel with each row.
STAT_FIELDS = [
    ("stat_instances", pa.int32()),
    ("stat_coverage", pa.float64()),
    ("stat_purities", pa.list_(pa.float32())),
    ("stat_semantic_ids", pa.list_(pa.int32())),
    ("stat_semantic_counts", pa.list_(pa.int64())),
    ("stat_levels", pa.string()),  # JSON {level: instances}
    ("stat_figures", pa.string()),  # JSON of the row's invariants.MapFigures
    # What instance-guided masking will see (dataset_card.contract.coverage.measure): measured, never painted.
    ("stat_painted", pa.int32()),
    ("stat_regions", pa.int32()),
    ("stat_largest", pa.string()),
]
TIME_COLUMNS = ("time_read", "time_instance", "time_semantic", "time_postprocess")
COUNT_COLUMNS = ("count_semantic_fillers",)  # work counters of the model stage, summed into stats.json's "counts"
ROUTING_FIELDS = [("index", pa.int64()), ("shard", pa.int64()), ("path", pa.string())] + [
    (name, pa.string()) for name in failures.COLUMNS
] + [("environment", pa.string())]  # what made the row (`labeling.pipeline.environment`), for the footer


def staged_schema(class_names: Sequence[str], semantic_class_names: Sequence[str],
                  painting: dict | None = None) -> pa.Schema:
    """The postprocess output: contract columns (null when the row failed) + routing, stats, times."""
    contract = arrow_schema(class_names, semantic_class_names, painting, image_reference=True)
    fields = (list(contract) + ROUTING_FIELDS + STAT_FIELDS + [(t, pa.float64()) for t in TIME_COLUMNS]
              + [(c, pa.int64()) for c in COUNT_COLUMNS]
              + [("started_at", pa.float64())])
    return pa.schema(fields)


@dataclass(frozen=True)
class PostprocessConfig:
    num_semantic_classes: int
    ignore_value: int
    min_instance_area: int = 16  # pixels at full size; smaller masks are dropped
    thing_ids: tuple[int, ...] = ()  # the taxonomy's thing classes
    rule: PaintingRule = RULES[DEFAULT_RULE]  # the contract's painting rule (metadata.json)
    image_storage: str = "inline"  # "reference": rows keep the image's path, hash and length, not its bytes


def semantic_map(row: Mapping, num_semantic_classes: int) -> np.ndarray:
    """The models-stage row's full-size class map (raw bytes in the contract's dtype)."""
    height, width = int(row["height"]), int(row["width"])
    if (row["semantic_h"], row["semantic_w"]) != (height, width):
        raise ValueError(f"the semantic map is {row['semantic_w']}x{row['semantic_h']}, the image {width}x{height}")
    return np.frombuffer(row["semantic"], semantic_mask_dtype(num_semantic_classes)).reshape(height, width)


def _target_span(lo: int, hi: int, scale: float, limit: int) -> tuple[int, int]:
    """Full-size pixels [a, b) whose bilinear sample can touch source pixels [lo, hi)."""
    a = max(0, math.floor((lo - 0.5) * scale - 0.5))
    b = min(limit, math.ceil((hi + 0.5) * scale - 0.5) + 1)
    return a, b


def _tighten(crop: np.ndarray, y0: int, x0: int) -> tuple[int, int, np.ndarray]:
    rows, cols = np.flatnonzero(crop.any(axis=1)), np.flatnonzero(crop.any(axis=0))
    if rows.size == 0:
        return y0, x0, crop[:0, :0]
    return y0 + int(rows[0]), x0 + int(cols[0]), crop[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def upsample_masks(masks: Sequence[Mapping], height: int, width: int, chunk_rows: int = 1024,
                   crop_budget: int = 256 * 2**20) -> list[dict]:
    """Masks at the models' size -> the same masks at (height, width), each resized inside its box.

    Bilinear on the box (plus a one-pixel margin) as 0/1 floats, thresholded at 0.5, `chunk_rows`
    output rows at a time: inside the box this equals resizing the whole mask (cv2.resize,
    INTER_LINEAR), at the cost of the box only. The RLE is written from the box too
    (`codecs.crop_rle`). The first `crop_budget` bytes of full-size boxes are kept as "crop",
    so alignment need not decode those masks again; the rest it decodes.
    """
    out, kept = [], 0
    for mask in masks:
        src_h, src_w = (int(s) for s in mask["rle"]["size"])
        if (src_h, src_w) == (height, width):
            out.append(dict(mask))
            continue
        y0, x0, y1, x1 = codecs.tight_box(mask["rle"])
        if y1 <= y0 or x1 <= x0:
            continue
        sy, sx = height / src_h, width / src_w
        ty0, ty1 = _target_span(y0, y1, sy, height)
        tx0, tx1 = _target_span(x0, x1, sx, width)
        cy0, cy1, cx0, cx1 = max(0, y0 - 1), min(src_h, y1 + 1), max(0, x0 - 1), min(src_w, x1 + 1)
        small = codecs.decode_rle(mask["rle"], check=False)[cy0:cy1, cx0:cx1].astype(np.float32)
        big = np.empty((ty1 - ty0, tx1 - tx0), bool)
        for top in range(ty0, ty1, chunk_rows):
            rows = min(chunk_rows, ty1 - top)
            # Output (u, v) -> small ((tx0 + u + 0.5) / sx - 0.5 - cx0, (top + v + 0.5) / sy - 0.5 - cy0).
            warp = np.array([[1 / sx, 0, (tx0 + 0.5) / sx - 0.5 - cx0],
                             [0, 1 / sy, (top + 0.5) / sy - 0.5 - cy0]], np.float64)
            chunk = cv2.warpAffine(small, warp, (tx1 - tx0, rows),
                                   flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
            big[top - ty0 : top - ty0 + rows] = chunk > 0.5
        by0, bx0, crop = _tighten(big, ty0, tx0)
        if crop.size == 0:
            continue
        resized = dict(mask)
        resized["rle"] = codecs.crop_rle(crop, by0, bx0, height, width)
        if kept + crop.size <= crop_budget:
            resized["crop"] = (by0, bx0, crop)
            kept += crop.size
        out.append(resized)
    return out


def class_pixel_counts(semantic: np.ndarray) -> dict[int, int]:
    """{class id: pixels} of a full-size map (ignore value included), counted in row slices."""
    total = np.zeros(65536 if semantic.dtype == np.uint16 else 256, np.int64)
    for y in range(0, semantic.shape[0], 512):
        counts = np.bincount(semantic[y : y + 512].ravel())
        total[: counts.size] += counts
    ids = np.flatnonzero(total)
    return dict(zip(ids.tolist(), total[ids].tolist()))


def label_row(row: Mapping, cfg: PostprocessConfig) -> dict:
    """One models-stage row (`predictors.MODELS_SCHEMA`) -> contract columns + per-row statistics."""
    height, width = int(row["height"]), int(row["width"])
    semantic = semantic_map(row, cfg.num_semantic_classes)
    masks = upsample_masks(json.loads(row["instances_json"]), height, width)
    instances, instance_map = alignment.align(masks, semantic, things=cfg.thing_ids,
                                              num_classes=cfg.num_semantic_classes, rule=cfg.rule,
                                              min_area=cfg.min_instance_area, ignore_value=cfg.ignore_value)
    counts = class_pixel_counts(semantic)
    figures = invariants.map_figures(instances, semantic, instance_map, cfg.thing_ids)
    measured = coverage.measure(instances, instance_map)
    original = row["image_bytes"]
    return {
        "image": {"bytes": original if cfg.image_storage == "inline" else None, "path": row["image_path"]},
        "image_sha256": images.digest(original),
        "image_nbytes": len(original),
        "width": width,
        "height": height,
        "semantic_mask": {"bytes": codecs.encode_mask(semantic), "path": None},
        "instance_mask": {"bytes": codecs.encode_instance_mask(instance_map), "path": None},
        "instances": instances,
        "stat_instances": len(instances),
        "stat_coverage": float(np.count_nonzero(instance_map)) / float(height * width),
        "stat_purities": [inst["category_purity"] for inst in instances],
        "stat_semantic_ids": list(counts),
        "stat_semantic_counts": list(counts.values()),
        "stat_levels": json.dumps(painting.level_counts(instances)),
        "stat_figures": json.dumps(dataclasses.asdict(figures)),
        "stat_painted": measured.painted,
        "stat_regions": measured.regions,
        "stat_largest": measured.largest,
    }


_NULL_PAYLOAD = {"image": None, "image_sha256": None, "image_nbytes": None, "width": None, "height": None, "semantic_mask": None, "instance_mask": None,
                 "instances": None, "stat_instances": 0, "stat_coverage": 0.0, "stat_purities": [],
                 "stat_semantic_ids": [], "stat_semantic_counts": [], "stat_levels": "{}", "stat_figures": "",
                 "stat_painted": 0, "stat_regions": 0, "stat_largest": ""}


def postprocess_stage(batch: pa.Table, cfg: PostprocessConfig, schema: pa.Schema) -> pa.Table:
    """`predictors.MODELS_SCHEMA` batch -> `staged_schema` batch; a row that fails here records its failure."""
    cv2.setNumThreads(1)
    out = []
    for row in batch.to_pylist():
        start = time.perf_counter()
        labeled = dict(_NULL_PAYLOAD)
        if not row["error_type"]:
            try:
                labeled = label_row(row, cfg)
            except Exception as err:  # one odd image fails alone
                row.update(failures.from_exception(failures.POSTPROCESS, err).as_row())
        labeled.update({k: row[k] for k in ("index", "shard", "path", "image_id", "label", *failures.COLUMNS)})
        labeled["environment"] = row.get("environment") or ""
        labeled.update({t: row.get(t) or 0.0 for t in (*TIME_COLUMNS, "started_at")})
        labeled.update({c: row.get(c) or 0 for c in COUNT_COLUMNS})
        labeled["time_postprocess"] = time.perf_counter() - start
        out.append(labeled)
    return pa.Table.from_pylist(out, schema=schema)
