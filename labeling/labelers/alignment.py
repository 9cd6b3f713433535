"""Align automatic instance masks with a semantic map: the contract's `instances` and `instance_mask`.

Masks are numbered 1..K by area, largest first, and each gets its semantic class here; what each
mask is (`level`, `parent`) and what the map shows follow from the contract's painting rule
(`dataset_card.contract.painting`: by default, objects clipped to their class region; under
"salient" also class-agnostic objects, the whole, salient masks without a thing class). Every RLE is
decoded at most twice (once here, once more when painted, unless its pixels came as a "crop"),
and everything after a decode happens inside the mask's tight box, so a huge image costs one
full-size decode at a time and one full-size map, never a stack of masks.

Category: the majority semantic class under the mask, voting among real classes only (pixels with
the ignore value do not vote); purity is that class's share of all the mask's pixels. A mask that
lies entirely on ignore pixels gets the ignore value as its category and purity 1.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np

from dataset_card.contract import codecs, painting

# `instance_mask` holds at most 16-bit ids (`codecs.encode_instance_mask`); id 0 means "no instance".
MAX_INSTANCES = 65535

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


def align(masks: Sequence[Mapping], semantic: np.ndarray, *, things: Collection[int], num_classes: int,
          rule: painting.PaintingRule, min_area: int = 1, ignore_value: int = 255) -> tuple[list[dict], np.ndarray]:
    """Automatic masks + semantic map -> (contract `instances`, (H, W) uint16 `instance_mask`).

    masks: dicts with "rle" ({"size": [H, W], "counts"}), "predicted_iou", "stability_score"
        (extra keys are ignored); all at the semantic map's size. A mask may also carry its pixels
        as "crop": (y0, x0, (h, w) bool) holding all of them; it is then used instead of a decode.
    semantic: (H, W) integer class map (the ignore value marks "no class").
    things: the thing class ids of the taxonomy of `num_classes` classes (the others are stuff).
    Returns instances with dense ids 1..K by area, largest first, with `level` and `parent` set,
    and the map `rule` paints from them (`painting.paint_instances`).
    """
    height, width = semantic.shape
    instances, crops = [], []
    for new_id, mask, area in number_by_area(masks, min_area):
        if [int(s) for s in mask["rle"]["size"]] != [height, width]:
            raise ValueError(f"a mask has RLE size {list(mask['rle']['size'])}, the semantic map is {[height, width]}")
        if "crop" in mask:  # pixels already at hand (see `crop_rle`): no decode at all
            y0, x0, inside = mask["crop"]
            y1, x1 = y0 + inside.shape[0], x0 + inside.shape[1]
            crops.append(mask["crop"])
        else:
            y0, x0, y1, x1 = codecs.tight_box(mask["rle"])
            inside = codecs.decode_rle(mask["rle"], check=False)[y0:y1, x0:x1]
            crops.append(None)  # not kept: a huge image's masks would not fit in memory together
        category, purity = majority_class(semantic[y0:y1, x0:x1][inside], ignore_value)
        instances.append({
            "id": new_id,
            "rle": {"size": [height, width], "counts": _as_str(mask["rle"]["counts"])},
            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
            "area": int(area),
            "visible_area": 0,
            "score": float(mask.get("predicted_iou", 0.0)),
            "stability_score": float(mask.get("stability_score", 0.0)),
            "category_id": category,
            "category_purity": float(np.float32(purity)),  # as stored (float32), so a repaint decides alike
            "level": "",
            "parent": 0,
        })
    instance_map = painting.paint_instances(instances, semantic, things, rule, num_classes, crops)
    return instances, instance_map


def _as_str(counts) -> str:
    return counts.decode("ascii") if isinstance(counts, bytes) else str(counts)
