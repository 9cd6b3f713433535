"""The quality report of a labeled folder (`evaluate`) and its table (`format_report`), for the
`python -m labeling.evaluate` command: instances by class-agnostic COCOeval, the semantic map by
mIoU, the alignment of the two, and panoptic quality of the painted maps, each against human
ground truth read by `ground_truth`, computed in `metrics`. `QUALITY_FILE` is where the command
writes it (the card shows it)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dataset_card.contract import codecs, layout
from labeling.quality import ground_truth as gt_io
from labeling.quality import metrics

QUALITY_FILE = "quality.json"


def _dense_lookup(mapping: dict[int, int], size: int, fill: int) -> np.ndarray:
    lookup = np.full(size, fill, np.int64)
    for k, v in mapping.items():
        if 0 <= k < size:
            lookup[k] = v
    return lookup


def evaluate(pred_root: str, gt_instances: str | None = None, semantic_gt: gt_io.SemanticGroundTruth | None = None,
             class_map: dict[int, int] | None = None, limit: int | None = None) -> dict:
    """All the scores the given ground truth allows, as the dict written to quality.json."""
    if gt_instances is None and semantic_gt is None:
        raise gt_io.GroundTruthError("give instance ground truth (--gt) and/or semantic ground truth (--gt-semantic)")
    metadata = layout.DatasetMetadata.from_json(Path(pred_root, layout.METADATA_FILE).read_text())
    pred_classes = {c.id: c.name for c in metadata.semantic_classes}
    coco = gt_io.load_coco(gt_instances) if gt_instances else None
    coco_ids = gt_io.coco_ids_by_file_name(coco) if coco else {}
    coco_map = (gt_io.taxonomy_mapping(pred_classes, {c["id"]: c["name"] for c in coco.cats.values()}, class_map)
                if coco else {})

    if semantic_gt is not None:
        sem_map = gt_io.taxonomy_mapping(pred_classes, semantic_gt.classes, class_map)
        gt_order = sorted(semantic_gt.classes)
        dense = {g: i for i, g in enumerate(gt_order)}
        # our id -> dense ground-truth index; unmapped ids become -1 (always wrong)
        pred_lookup = _dense_lookup({k: dense[v] for k, v in sem_map.items() if v in dense}, 1 << 16, -1)
        gt_lookup = {g: i for i, g in enumerate(gt_order)}
        cm = np.zeros((len(gt_order), len(gt_order) + 1), np.int64)
    panoptic = semantic_gt is not None and semantic_gt.panoptic_segments is not None
    if panoptic:
        pq = metrics.PanopticScores(semantic_gt.things, set(semantic_gt.classes))
        to_gt = _dense_lookup(sem_map, 1 << 16, pq.unmatched)  # our id -> ground-truth category id

    predictions, hits, objects, scored, unmatched = {}, 0, 0, 0, 0
    rows = gt_io.labeled_rows(pred_root, with_semantic=semantic_gt is not None, with_instance_map=panoptic)
    for row in tqdm(rows, desc="scoring", unit="img"):
        if limit is not None and scored >= limit:
            break
        matched = False
        img_id = coco_ids.get(row.file_name)
        if img_id is not None:
            matched = True
            predictions[img_id] = row.instances
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id], iscrowd=False))
            gt_objects = [(coco.annToRLE(a), a["category_id"]) for a in anns]
            n_hit, n_obj = metrics.alignment_hits(gt_objects, row.instances, coco_map)
            hits, objects = hits + n_hit, objects + n_obj
        if semantic_gt is not None:
            path = semantic_gt.find(row.file_name)
            if path is not None:
                matched = True
                gt_map = semantic_gt.read(path)
                pred_map = codecs.decode_mask(row.semantic_map)
                if gt_map.shape != pred_map.shape:
                    raise gt_io.GroundTruthError(
                        f"{path} is {gt_map.shape[1]}x{gt_map.shape[0]} but {row.image_id} was labeled at "
                        f"{pred_map.shape[1]}x{pred_map.shape[0]}: the ground truth must match the images"
                    )
                gt_dense = _map_ids(gt_map, gt_lookup)
                cm += metrics.confusion_matrix(gt_dense, pred_lookup[pred_map], len(gt_order), ignore_value=-1)
                if panoptic:
                    categories, segments = semantic_gt.read_panoptic(path)
                    instance_map = codecs.decode_mask(row.instance_map_bytes)
                    pq.update(metrics.panoptic_prediction(pred_map, instance_map, row.instances, to_gt,
                                                          semantic_gt.things, pq.unmatched),
                              metrics.panoptic_target(categories, segments,
                                                      (semantic_gt.crowd or {}).get(path.stem, ()), pq.void))
        scored += matched
        unmatched += not matched
    if scored == 0:
        raise gt_io.GroundTruthError(
            "no labeled image matches a ground-truth file name: the labels' input files must be the "
            "ground truth's images (e.g. labeling/run.py --input on COCO val2017)"
        )

    report: dict = {"images_scored": scored, "images_without_ground_truth": unmatched}
    if coco is not None:
        report["instances"] = metrics.instance_scores(coco, predictions)
        report["alignment"] = {"accuracy": hits / objects if objects else float("nan"), "objects": objects}
    if semantic_gt is not None:
        scores = metrics.semantic_scores(cm)
        report["semantic"] = {
            "mIoU": scores.miou,
            "pixel_accuracy": scores.pixel_accuracy,
            "per_class_iou": {semantic_gt.classes[gt_order[i]]: v for i, v in scores.per_class_iou.items()},
        }
    if panoptic:
        report["panoptic"] = pq.summary()
    return report


def _map_ids(ids: np.ndarray, lookup: dict[int, int]) -> np.ndarray:
    """Ground-truth ids -> dense indices (-1 for ids outside the taxonomy, e.g. the ignore value)."""
    values, inverse = np.unique(ids, return_inverse=True)
    dense = np.array([lookup.get(int(v), -1) for v in values], np.int64)
    return dense[inverse].reshape(ids.shape)


def format_report(report: dict) -> str:
    lines = [f"{'metric':<28} {'value':>8}", "-" * 37]

    def add(name, value):
        lines.append(f"{name:<28} {'n/a' if value is None or (isinstance(value, float) and math.isnan(value)) else f'{value:8.4f}':>8}")

    for name in ("AR@1", "AR@10", "AR@100", "AR_small@100", "AR_medium@100", "AR_large@100", "AP"):
        if "instances" in report:
            add(f"instances {name}", report["instances"][name])
    if "alignment" in report:
        add("alignment accuracy", report["alignment"]["accuracy"])
    if "semantic" in report:
        add("semantic mIoU", report["semantic"]["mIoU"])
        add("semantic pixel accuracy", report["semantic"]["pixel_accuracy"])
    for group, scores in (report.get("panoptic") or {}).items():
        for name in ("PQ", "SQ", "RQ"):
            add(f"panoptic {name} ({group})", scores[name])
    lines.append(f"{'images scored':<28} {report['images_scored']:>8d}")
    return "\n".join(lines)
