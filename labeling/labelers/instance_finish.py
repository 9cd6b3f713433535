"""SAM's CPU half: what the device pass hands over for an image (`DeviceResult`) and what the host
makes of it (`finish_image`): each crop's box NMS completed, COCO RLE strings, cross-crop NMS and
segment_anything's small-region cleanup, in the stock generator's order.

Separate from the device pass (`instance.InstanceLabeler`) because it runs elsewhere: on a GPU actor
in the actor's own child processes (`child_pool.FinishPool`), on a CPU actor in its threads. It is a
module-level function of picklable values for that reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from pycocotools import mask as mask_utils
from segment_anything.utils.amg import batched_mask_to_box, box_xyxy_to_xywh, remove_small_regions
from torchvision.ops.boxes import batched_nms, box_area, nms

from dataset_card.contract import codecs
from labeling.labelers.mask_postprocess import rle_from_changes

if TYPE_CHECKING:
    from labeling.labelers.instance import InstanceLabelerConfig


@dataclass
class DeviceResult:
    """One image's kept masks as they come back from the device, before `finish`."""

    size: tuple[int, int]
    crop_boxes: list[list[int]]
    packed: np.ndarray  # float64: per mask [crop, iou, stability, x0, y0, x1, y1, area, changes], then the changes
    count: int


_META = 9  # values per mask at the head of DeviceResult.packed


def finish_image(cfg: InstanceLabelerConfig, result: DeviceResult) -> list[dict]:
    """The CPU half of an image: each crop's box NMS completed (the device keeps a superset of it
    in fixed shapes, `nms_superset`; on exact input it keeps every mask, in order), RLE strings,
    cross-crop NMS (prefer smaller crops) and the small-region cleanup, as the stock generator
    orders them. A module-level function of picklable values, so the model actor can run it in
    processes of its own (`labelers.child_pool.FinishPool`)."""
    height, width = result.size
    meta = result.packed[: result.count * _META].reshape(result.count, _META)
    changes = result.packed[result.count * _META :].astype(np.int64)
    ends = np.cumsum(meta[:, 8].astype(np.int64))
    kept = []
    for j in range(len(result.crop_boxes)):
        rows = np.flatnonzero(meta[:, 0] == j)
        keep = nms(torch.from_numpy(meta[rows, 3:7]).float(), torch.from_numpy(meta[rows, 1]).float(),
                   cfg.box_nms_thresh)
        kept.extend(rows[keep.numpy()])
    crops: list[tuple[list[int], list[dict]]] = [(box, []) for box in result.crop_boxes]
    for row, end in zip(meta[kept], ends[kept]):
        crop, iou, stability, x0, y0, x1, y1, area, count = row
        crops[int(crop)][1].append({
            "rle": rle_from_changes(changes[end - int(count) : end], height, width),
            "bbox": [float(v) for v in box_xyxy_to_xywh(torch.tensor([x0, y0, x1, y1])).tolist()],
            "area": int(area),
            "predicted_iou": float(iou),
            "stability_score": float(stability),
        })
    return _merge(cfg, crops, result.size)


def _merge(cfg: InstanceLabelerConfig, crops: list[tuple[list[int], list[dict]]],
           image_size: tuple[int, int]) -> list[dict]:
    """Cross-crop NMS (prefer smaller crops) and small-region cleanup, as the stock generator."""
    records = [r for _, rs in crops for r in rs]
    if len(crops) > 1 and records:
        boxes = torch.tensor([_xyxy(r["bbox"]) for r in records], dtype=torch.float32)
        crop_boxes = torch.tensor([box for box, rs in crops for _ in rs], dtype=torch.float32)
        keep = batched_nms(boxes, 1 / box_area(crop_boxes), torch.zeros(len(boxes)), cfg.crop_nms_thresh)
        records = [records[i] for i in keep.tolist()]
    if cfg.min_mask_region_area > 0 and records:
        records = remove_small_regions_records(records, cfg.min_mask_region_area,
                                               max(cfg.box_nms_thresh, cfg.crop_nms_thresh))
    if cfg.max_mask_fraction is not None:
        limit = cfg.max_mask_fraction * image_size[0] * image_size[1]
        records = [r for r in records if r["area"] < limit]
    return records


def _xyxy(bbox: list[float]) -> list[float]:
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def cleanup_window(box: tuple[int, int, int, int], height: int, width: int, min_area: int) -> tuple[int, int, int, int]:
    """The window (y0, x0, y1, x1) around a mask's box (y0, x0, y1, x1) in which segment_anything's
    small-region rule gives what it gives on the whole image: the box plus, on every side that is
    not the image's edge, a margin of ceil(min_area / shorter box side) pixels (at least 1).

    Why it is exact: outside its box a mask has no pixel, so each margin strip is one background
    region of at least `min_area` pixels; a background region that reaches a margin is then large
    in the window and (a superset of it) on the whole image alike, and every other region lies
    whole inside the window, bounded by mask pixels or the image's edge, as on the whole image.
    """
    y0, x0, y1, x1 = box
    k = max(1, -(-min_area // max(1, min(y1 - y0, x1 - x0))))
    return max(0, y0 - k), max(0, x0 - k), min(height, y1 + k), min(width, x1 + k)


def remove_small_regions_records(records: list[dict], min_area: int, nms_thresh: float) -> list[dict]:
    """Fill holes and drop islands smaller than `min_area` (segment_anything's cv2 rule), then NMS
    preferring unchanged masks, as the stock generator does; each mask is cleaned inside
    `cleanup_window` (the same result as on the whole image), one at a time."""
    boxes, scores, changed = [], [], []
    for record in records:
        rle = dict(record["rle"], counts=record["rle"]["counts"].encode("utf-8"))
        height, width = (int(v) for v in rle["size"])
        y0, x0, y1, x1 = cleanup_window(codecs.tight_box(record["rle"]), height, width, min_area)
        window = mask_utils.decode(rle)[y0:y1, x0:x1].astype(bool)
        window, holes = remove_small_regions(window, min_area, mode="holes")
        window, islands = remove_small_regions(window, min_area, mode="islands")
        box = batched_mask_to_box(torch.as_tensor(window)[None])[0]
        boxes.append(box + torch.tensor([x0, y0, x0, y0]) if window.any() else box)
        scores.append(float(not (holes or islands)))
        changed.append((y0, x0, window) if (holes or islands) else None)
    boxes = torch.stack(boxes)
    keep = batched_nms(boxes.float(), torch.tensor(scores), torch.zeros(len(boxes)), iou_threshold=nms_thresh)
    out = []
    for i in keep.tolist():
        record = records[i]
        if changed[i] is not None:
            y0, x0, window = changed[i]
            height, width = (int(v) for v in record["rle"]["size"])
            record = dict(record, rle=codecs.crop_rle(window, y0, x0, height, width),
                          bbox=[float(v) for v in box_xyxy_to_xywh(boxes[i]).tolist()], area=int(window.sum()))
        out.append(record)
    return out
