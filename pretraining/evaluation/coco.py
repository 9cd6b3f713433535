"""COCO instance annotations through pycocotools: the detection data and its box / mask AP.

`load_coco(root)` reads the release layout, `ROOT/annotations/instances_{train,val}2017.json` with
the images in `ROOT/train2017/` and `ROOT/val2017/` (any `instances_train*.json` /
`instances_val*.json` pair whose suffix names the image folder). Training images without a usable
object are skipped and crowd regions are not training targets (as detectron2 does); evaluation
keeps every image. `coco_ap` scores detections with COCOeval, in percent.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
from dataclasses import dataclass

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes

from dataset_card.contract import codecs
from pretraining.evaluation.folders import EvalDataError

STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]


@dataclass(frozen=True)
class Instances:
    image: np.ndarray  # (H, W, 3) uint8
    masks: np.ndarray  # (N, H, W) uint8, one per non-crowd object (training) or (0, H, W)
    labels: np.ndarray  # (N,) int64 in 1..C (0 is torchvision's background)
    image_id: int


class CocoSource:
    """The images of one COCO annotation file; `coco` is the pycocotools index (the ground truth)."""

    def __init__(self, annotation_file: str, image_dir: str, train: bool):
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
                self.coco = COCO(annotation_file)
        except (OSError, ValueError, KeyError) as err:
            raise EvalDataError(f"cannot read COCO annotations {annotation_file} ({type(err).__name__}: {err}); "
                                f"pass the instances_*.json of a COCO release") from err
        self.image_dir, self.train = image_dir, train
        self.cat_ids = sorted(self.coco.getCatIds())
        self.label_of = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        ids = sorted(self.coco.getImgIds())
        self.ids = [i for i in ids if self._targets(i)] if train else ids

    def _targets(self, image_id: int) -> list[dict]:
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id, iscrowd=False))
        return [a for a in anns if a.get("area", 1) > 0 and a["bbox"][2] > 0 and a["bbox"][3] > 0]

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> Instances:
        image_id = self.ids[index]
        info = self.coco.loadImgs(image_id)[0]
        path = os.path.join(self.image_dir, info["file_name"])
        try:
            with open(path, "rb") as f:
                image = codecs.decode_image(f.read())
        except (OSError, codecs.DecodeError) as err:
            raise EvalDataError(f"cannot read {path} ({err}); restore the COCO image folder") from err
        anns = self._targets(image_id) if self.train else []
        h, w = image.shape[:2]
        masks = np.stack([self.coco.annToMask(a) for a in anns]) if anns else np.zeros((0, h, w), np.uint8)
        labels = np.array([self.label_of[a["category_id"]] for a in anns], np.int64)
        return Instances(image, masks, labels, image_id)


@dataclass(frozen=True)
class CocoData:
    train: CocoSource
    val: CocoSource
    class_names: tuple[str, ...]  # label k (1..C) is class_names[k - 1]


def load_coco(root: str) -> CocoData:
    """The train and val splits of a COCO release folder (see the module docstring)."""
    ann_dir = os.path.join(root, "annotations")
    found = {}
    for split in ("train", "val"):
        files = sorted(glob.glob(os.path.join(ann_dir, f"instances_{split}*.json")))
        if not files:
            raise EvalDataError(f"{root} has no annotations/instances_{split}*.json; pass a COCO folder laid out as "
                                f"annotations/instances_{{train,val}}2017.json + train2017/ + val2017/")
        name = os.path.basename(files[-1])[len("instances_"):-len(".json")]
        if not os.path.isdir(os.path.join(root, name)):
            raise EvalDataError(f"{root} has {os.path.relpath(files[-1], root)} but no image folder {name}/; "
                                f"restore it next to annotations/")
        found[split] = CocoSource(files[-1], os.path.join(root, name), train=split == "train")
    train, val = found["train"], found["val"]
    if train.cat_ids != val.cat_ids:
        raise EvalDataError(f"{root}: the train and val annotations list different categories; use one release")
    if len(train) == 0 or len(val) == 0:
        raise EvalDataError(f"{root} gives {len(train)} training images with objects and {len(val)} validation "
                            f"images; both must be non-empty")
    names = tuple(c["name"] for c in train.coco.loadCats(train.cat_ids))
    return CocoData(train, val, names)


class DetectionSet(torch.utils.data.Dataset):
    """Training: (image float (3, H, W) in [0, 1], target {boxes (N, 4) xyxy, labels (N,), masks (N, H, W)})
    after `transform` (on the image and masks together); boxes are recomputed from the transformed
    masks and objects the crop removed are dropped. Evaluation (`transform=None`): (image, image_id)."""

    def __init__(self, source: CocoSource, transform=None):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        sample = self.source.load(index)
        image = tv_tensors.Image(torch.from_numpy(sample.image.copy()).permute(2, 0, 1))
        if self.transform is None:
            return image.float() / 255, sample.image_id
        image, masks = self.transform(image, tv_tensors.Mask(torch.from_numpy(sample.masks)))
        keep = masks.flatten(1).any(1).bool()
        masks, labels = masks[keep].as_subclass(torch.Tensor), torch.from_numpy(sample.labels)[keep]
        boxes = masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])  # pixel edges: x2 = last column + 1
        return image.float() / 255, {"boxes": boxes, "labels": labels, "masks": masks}


def collate_lists(batch: list) -> tuple[list, list]:
    """Detection batches stay lists: images of different sizes, targets of different lengths."""
    return tuple(list(items) for items in zip(*batch))


def to_coco_results(output: dict[str, torch.Tensor], image_id: int, cat_ids: list[int]) -> list[dict]:
    """One torchvision Mask R-CNN output (boxes xyxy, labels 1..C, scores, masks (N, 1, H, W) in [0, 1])
    -> COCO result dicts (bbox xywh, category_id, score, segmentation as RLE of mask > 0.5)."""
    boxes = output["boxes"].float().cpu().numpy()
    masks = (output["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8) if "masks" in output else None
    results = []
    for i, (box, label, score) in enumerate(zip(boxes, output["labels"].tolist(), output["scores"].tolist())):
        result = {"image_id": int(image_id), "category_id": cat_ids[label - 1], "score": float(score),
                  "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]}
        if masks is not None:
            rle = mask_utils.encode(np.asfortranarray(masks[i]))
            result["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        results.append(result)
    return results


def coco_ap(gt: COCO, results: list[dict], iou_type: str, image_ids: list[int] | None = None,
            verbose: bool = False) -> dict[str, float]:
    """COCOeval of `results` against `gt` ("bbox" or "segm") over `image_ids` (default: all) ->
    {AP, AP50, AP75, APs, APm, APl} in percent (-1 where COCOeval has nothing to average)."""
    if not results:
        return dict.fromkeys(STATS, 0.0)
    # loadRes takes a detection's area from its box when it has one; mask AP needs the mask's area
    # (detectron2 drops the box for "segm" too). Copies: loadRes writes into the dicts.
    results = [{k: v for k, v in r.items() if not (iou_type == "segm" and k == "bbox")} for r in results]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        evaluator = COCOeval(gt, gt.loadRes(results), iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    if verbose:
        print(f"COCOeval {iou_type}:\n" + "\n".join(line for line in out.getvalue().splitlines()
                                                     if line.strip().startswith("Average")), flush=True)
    return {k: (100.0 * float(v) if v >= 0 else -1.0) for k, v in zip(STATS, evaluator.stats[:6])}
