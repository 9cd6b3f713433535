"""Pseudo-label quality metrics (pure functions): class-agnostic instance AR/AP with COCOeval,
semantic mIoU from a confusion matrix, and instance-semantic alignment.

Ground truth comes in through `labeling/quality/ground_truth.py`; this module only scores.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pycocotools.mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# COCOeval's `stats` for segmentation, in its order.
COCO_STAT_NAMES = (
    "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
    "AR@1", "AR@10", "AR@100", "AR_small@100", "AR_medium@100", "AR_large@100",
)


def _rle(rle: Mapping) -> dict:
    counts = rle["counts"]
    return {"size": [int(s) for s in rle["size"]], "counts": counts.encode() if isinstance(counts, str) else counts}


def instance_scores(gt: COCO, predictions: Mapping[int, Sequence[Mapping]]) -> dict[str, float]:
    """Class-agnostic COCO segmentation metrics.

    gt: a pycocotools COCO index (categories are ignored: every object counts as one class).
    predictions: COCO image id -> our `instances` (each with `rle` and `score`), for the images
    that were labeled. Only those images are scored.
    """
    results = [
        {"image_id": int(img_id), "category_id": 1, "segmentation": _rle(inst["rle"]), "score": float(inst["score"])}
        for img_id, instances in predictions.items()
        for inst in instances
    ]
    if not results:
        return {name: 0.0 for name in COCO_STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, iouType="segm")
        evaluator.params.imgIds = sorted(int(i) for i in predictions)
        evaluator.params.useCats = 0
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # COCOeval reports -1 where a size range has no ground truth; keep that as NaN, not a score.
    return {name: (float(v) if v >= 0 else float("nan")) for name, v in zip(COCO_STAT_NAMES, evaluator.stats)}


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore_value: int) -> np.ndarray:
    """(C, C + 1) int64 counts, rows = ground truth, columns = prediction, skipping `ignore_value` in gt.

    The extra last column counts predictions outside [0, C) (e.g. a class with no ground-truth
    counterpart): wrong for their ground-truth class, and no class's prediction.
    """
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in size")
    keep = (gt != ignore_value) & (gt >= 0) & (gt < num_classes)
    g, p = gt[keep].astype(np.int64), pred[keep].astype(np.int64)
    valid = (p >= 0) & (p < num_classes)
    cm = np.bincount(g[valid] * num_classes + p[valid], minlength=num_classes**2).reshape(num_classes, num_classes)
    missed = np.bincount(g[~valid], minlength=num_classes)
    return np.concatenate([cm, missed[:, None]], axis=1)


@dataclass(frozen=True)
class SemanticScores:
    miou: float
    pixel_accuracy: float
    per_class_iou: dict[int, float]  # only classes present in ground truth or prediction


def semantic_scores(cm: np.ndarray) -> SemanticScores:
    """mIoU, pixel accuracy and per-class IoU from `confusion_matrix` output (C, C + 1)."""
    num_classes = cm.shape[0]
    square = cm[:, :num_classes]
    tp = np.diag(square).astype(np.float64)
    gt_total = cm.sum(axis=1).astype(np.float64)
    pred_total = square.sum(axis=0).astype(np.float64)
    union = gt_total + pred_total - tp
    present = union > 0
    iou = np.divide(tp, union, out=np.zeros_like(tp), where=present)
    total = gt_total.sum()
    return SemanticScores(
        miou=float(iou[present].mean()) if present.any() else float("nan"),
        pixel_accuracy=float(tp.sum() / total) if total else float("nan"),
        per_class_iou={int(c): float(iou[c]) for c in np.flatnonzero(present)},
    )


def alignment_hits(gt_objects: Sequence[tuple[Mapping, int]], instances: Sequence[Mapping],
                   category_of: Mapping[int, int]) -> tuple[int, int]:
    """(objects whose best-matching instance carries the right class, objects with any match).

    gt_objects: (RLE, ground-truth category id) per object of one image. instances: our
    `instances` of that image. category_of maps our semantic class id to the ground-truth
    category id (ids without a counterpart are never right). The best match is the instance of
    highest mask IoU; an object no instance overlaps counts as a miss.
    """
    if not gt_objects:
        return 0, 0
    if not instances:
        return 0, len(gt_objects)
    gt_rles = [_rle(rle) for rle, _ in gt_objects]
    dt_rles = [_rle(inst["rle"]) for inst in instances]
    ious = np.asarray(mask_utils.iou(dt_rles, gt_rles, [0] * len(gt_rles))).reshape(len(dt_rles), len(gt_rles))
    hits = 0
    for j, (_, category) in enumerate(gt_objects):
        best = int(ious[:, j].argmax())
        if ious[best, j] > 0 and category_of.get(int(instances[best]["category_id"])) == int(category):
            hits += 1
    return hits, len(gt_objects)
