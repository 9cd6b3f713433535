"""Align automatic instance masks with a semantic map: the contract's `instances` and `instance_mask`.

The painting order is the contract's (`dataset_card.codecs.paint`): ids 1..K by area, largest
first, painted in id order, so a smaller mask (a part) lies on top of a larger one (its whole).
Every RLE is decoded once, and everything after the decode happens inside the mask's tight box,
so a huge image costs one full-size decode at a time and one full-size map, never a stack of masks.

Category: the majority semantic class under the mask, voting among real classes only (pixels with
the ignore value do not vote); purity is that class's share of all the mask's pixels. A mask that
lies entirely on ignore pixels gets the ignore value as its category and purity 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pycocotools.mask as mask_utils

from dataset_card import codecs

# `instance_mask` is a 16-bit PNG; id 0 means "no instance".
MAX_INSTANCES = 65535

# Rows per slice when counting over a full-size map: bounds the temporary int64 copy bincount makes.
_CHUNK_ROWS = 512


def _counts(rle: Mapping) -> dict:
    counts = rle["counts"]
    return {"size": [int(s) for s in rle["size"]], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def tight_box(rle: Mapping) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1), the half-open pixel box holding every pixel of the mask (zeros if empty)."""
    x, y, w, h = (int(round(v)) for v in mask_utils.toBbox(_counts(rle)))
    return y, x, y + h, x + w


def crop_rle(crop: np.ndarray, y0: int, x0: int, height: int, width: int) -> dict:
    """The full-size COCO RLE of a mask given as a crop at (y0, x0): {"size": [H, W], "counts": str}.

    Costs O(H x crop width), not O(H x W): column-major runs of the box's columns, padded with the
    zero runs of the columns left and right of it.
    """
    h, w = crop.shape
    columns = np.zeros((height, w), np.uint8, order="F")
    columns[y0 : y0 + h] = crop
    flat = columns.ravel(order="F")
    if not flat.any():
        return {"size": [height, width], "counts": _as_str(mask_utils.encode(np.zeros((height, width), np.uint8,
                                                                                      order="F"))["counts"])}
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat[0]:
        runs.insert(0, 0)  # RLE starts with a run of zeros
    runs[0] += x0 * height
    right = (width - x0 - w) * height
    if not flat[-1]:
        runs[-1] += right
    elif right:
        runs.append(right)
    rle = mask_utils.frPyObjects({"counts": runs, "size": [height, width]}, height, width)
    return {"size": [height, width], "counts": _as_str(rle["counts"])}


def number_by_area(masks: Sequence[Mapping], min_area: int = 1) -> list[tuple[int, Mapping, int]]:
    """[(id, mask, area)] for the masks of at least `min_area` pixels (never empty ones), numbered
    1..K by area, largest first (ties keep input order), at most MAX_INSTANCES of them."""
    areas = [codecs.rle_area(m["rle"]) for m in masks]
    keep = [i for i, a in enumerate(areas) if a >= max(1, min_area)]
    keep.sort(key=lambda i: -areas[i])  # stable: equal areas keep their input order
    keep = keep[:MAX_INSTANCES]
    return [(k + 1, masks[i], areas[i]) for k, i in enumerate(keep)]


def majority_class(labels: np.ndarray, ignore_value: int) -> tuple[int, float]:
    """(class, share) for the semantic labels under one mask: the most frequent real class (ties go
    to the lower id) and its share of all `labels`; the ignore value only if nothing else is there."""
    if labels.size == 0:
        return ignore_value, 0.0
    counts = np.bincount(labels.ravel())
    votes = counts.copy()
    if ignore_value < votes.size:
        votes[ignore_value] = 0
    if votes.max(initial=0) == 0:
        return ignore_value, 1.0
    category = int(votes.argmax())
    return category, float(counts[category]) / float(labels.size)


def visible_areas(instance_map: np.ndarray, num_instances: int) -> np.ndarray:
    """(K + 1,) pixel count of each id in an (H, W) instance map, counted in row slices."""
    total = np.zeros(num_instances + 1, np.int64)
    for y in range(0, instance_map.shape[0], _CHUNK_ROWS):
        total += np.bincount(instance_map[y : y + _CHUNK_ROWS].ravel(), minlength=num_instances + 1)[
            : num_instances + 1
        ]
    return total


def align(
    masks: Sequence[Mapping], semantic: np.ndarray, min_area: int = 1, ignore_value: int = 255
) -> tuple[list[dict], np.ndarray]:
    """Automatic masks + semantic map -> (contract `instances`, (H, W) uint16 `instance_mask`).

    masks: dicts with "rle" ({"size": [H, W], "counts"}), "predicted_iou", "stability_score"
        (extra keys are ignored); all at the semantic map's size. A mask may also carry its pixels
        as "crop": (y0, x0, (h, w) bool) holding all of them; it is then used instead of a decode.
    semantic: (H, W) integer class map (the ignore value marks "no class").
    Returns instances with dense ids 1..K in painting order, and the map that equals
    `codecs.paint(instances, H, W)`.
    """
    height, width = semantic.shape
    instance_map = np.zeros((height, width), np.uint16)
    instances = []
    for new_id, mask, area in number_by_area(masks, min_area):
        if [int(s) for s in mask["rle"]["size"]] != [height, width]:
            raise ValueError(f"a mask has RLE size {list(mask['rle']['size'])}, the semantic map is {[height, width]}")
        if "crop" in mask:  # pixels already at hand (see `crop_rle`): no decode at all
            y0, x0, inside = mask["crop"]
            y1, x1 = y0 + inside.shape[0], x0 + inside.shape[1]
        else:
            y0, x0, y1, x1 = tight_box(mask["rle"])
            inside = codecs.decode_rle(mask["rle"], check=False)[y0:y1, x0:x1]  # the one decode of this RLE
        category, purity = majority_class(semantic[y0:y1, x0:x1][inside], ignore_value)
        instance_map[y0:y1, x0:x1][inside] = new_id
        instances.append({
            "id": new_id,
            "rle": {"size": [height, width], "counts": _as_str(mask["rle"]["counts"])},
            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
            "area": int(area),
            "visible_area": 0,
            "score": float(mask.get("predicted_iou", 0.0)),
            "stability_score": float(mask.get("stability_score", 0.0)),
            "category_id": category,
            "category_purity": purity,
        })
    visible = visible_areas(instance_map, len(instances))
    for inst in instances:
        inst["visible_area"] = int(visible[inst["id"]])
    return instances, instance_map


def _as_str(counts) -> str:
    return counts.decode("ascii") if isinstance(counts, bytes) else str(counts)
