"""Pseudo-label quality metrics (pure functions): class-agnostic instance AR/AP with COCOeval,
semantic mIoU from a confusion matrix, instance-semantic alignment, and panoptic quality
(PQ / SQ / RQ, with torchmetrics' `PanopticQuality`, panopticapi's definition).

Ground truth comes in through `labeling/quality/ground_truth.py`; this module only scores.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pycocotools.mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dataset_card.contract.painting import AGNOSTIC

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


def panoptic_prediction(semantic: np.ndarray, instance_map: np.ndarray, instances: Sequence[Mapping],
                        to_gt: np.ndarray, gt_things: Collection[int], unmatched: int) -> np.ndarray:
    """Our labels of one image as a panoptic map in the ground truth's taxonomy: (H, W, 2) int64 of
    (category id, instance id).

    semantic, instance_map: (H, W) our maps. to_gt: our class id -> ground-truth category id
    (`unmatched` where ours has no counterpart), indexable by every value of `semantic`. Painted
    instances are the thing segments (instance id = their `id`); the other pixels take their
    semantic class as a stuff segment (instance id 0), except pixels of a ground-truth thing class
    that no instance covers: a panoptic prediction has no instance-less things, so they join the
    `unmatched` category (as do classes without a counterpart, and class-agnostic objects of the
    "salient" rule: segments without a class). Nothing is void: torchmetrics excuses
    a ground-truth segment the prediction leaves mostly void, panopticapi counts it as missed.
    """
    category = to_gt[semantic.astype(np.int64)]
    category[np.isin(category, list(gt_things)) & (instance_map == 0)] = unmatched
    instance = np.zeros(semantic.shape, np.int64)
    for inst in instances:
        painted = instance_map == int(inst["id"])
        if painted.any():
            own = int(inst["category_id"])  # a class-agnostic object's is not its class
            classed = 0 <= own < to_gt.size and inst.get("level") != AGNOSTIC
            category[painted] = to_gt[own] if classed else unmatched
            instance[painted] = int(inst["id"])
    return np.stack([category, instance], axis=-1)


def panoptic_target(categories: np.ndarray, segments: np.ndarray, void_segments: Collection[int],
                    void: int) -> np.ndarray:
    """A ground-truth panoptic map (H, W, 2) from its per-pixel categories and segment ids; pixels of
    `void_segments` (crowd regions) and of segment 0 (unlabeled) are void, as panopticapi ignores them."""
    category = categories.astype(np.int64).copy()
    category[(segments == 0) | np.isin(segments, list(void_segments))] = void
    return np.stack([category, segments.astype(np.int64)], axis=-1)


class PanopticScores:
    """PQ, SQ and RQ over images, for things, stuff and all classes (`update` per image, then `summary`).

    `void` marks ground-truth pixels to ignore; `unmatched` is the extra prediction category of
    `panoptic_prediction`: a stuff class for torchmetrics, left out of every mean.
    """

    def __init__(self, things: Collection[int], stuff: Collection[int]):
        from torchmetrics.detection import PanopticQuality

        self.things, self.stuff = set(map(int, things)), set(map(int, stuff)) - set(map(int, things))
        self.void = max(self.things | self.stuff | {0}) + 1  # categories neither side uses
        self.unmatched = self.void + 1
        self.metric = PanopticQuality(self.things, self.stuff | {self.unmatched})

    def update(self, prediction: np.ndarray, target: np.ndarray) -> None:
        """prediction, target: (H, W, 2) from `panoptic_prediction` / `panoptic_target`."""
        import torch

        self.metric.update(torch.from_numpy(prediction)[None], torch.from_numpy(target)[None])

    def summary(self) -> dict[str, dict[str, float]]:
        """{"all" | "things" | "stuff": {"PQ", "SQ", "RQ", "classes"}}: means over the classes that
        occur in the ground truth or the prediction (panopticapi's averaging)."""
        m = self.metric
        tp, fp, fn, iou = (t.double().numpy() for t in (m.true_positives, m.false_positives, m.false_negatives,
                                                         m.iou_sum))
        ids = {continuous: category for category, continuous in m.cat_id_to_continuous_id.items()}
        out = {}
        for name, members in (("all", self.things | self.stuff), ("things", self.things), ("stuff", self.stuff)):
            rows = [c for c in range(len(ids)) if ids[c] in members and tp[c] + fp[c] + fn[c] > 0]
            sq = np.array([iou[c] / tp[c] if tp[c] else 0.0 for c in rows])
            rq = np.array([tp[c] / (tp[c] + 0.5 * fp[c] + 0.5 * fn[c]) for c in rows])
            out[name] = {"PQ": float((sq * rq).mean()) if rows else float("nan"),
                         "SQ": float(sq.mean()) if rows else float("nan"),
                         "RQ": float(rq.mean()) if rows else float("nan"), "classes": len(rows)}
        return out
