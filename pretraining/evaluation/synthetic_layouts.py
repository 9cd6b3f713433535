"""Small synthetic data sets in the ADE20K and COCO release layouts, for the tiny twins.

The images are `dataset_card.synthetic.shapes.shapes_image` scenes (a textured background with coloured
ellipses and rectangles whose class is known), so a segmenter or detector that learns anything
scores visibly above an untrained one. The tests write them; so can a user who wants to see
`segment --config tiny` or `detect --config tiny` run end to end.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from dataset_card.synthetic.shapes import SEMANTIC_CLASSES, shapes_image

COCO_CATEGORY_IDS = {1: 3, 2: 7, 3: 11}  # shape class -> a COCO-style, non-contiguous category id


def write_ade20k_layout(root: str, num_train: int = 16, num_val: int = 4, size: tuple[int, int] = (64, 80),
                        seed: int = 0) -> str:
    """ROOT/ADEChallengeData2016/{images,annotations}/{training,validation}/ADE_*.{jpg,png}; returns
    the ADEChallengeData2016 folder. Annotations follow ADE20K: 0 ("other", ignored; the first
    row of every image) and k = class k - 1 (background 1, shape classes 2..4)."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "ADEChallengeData2016")
    for split, count in (("training", num_train), ("validation", num_val)):
        os.makedirs(os.path.join(base, "images", split), exist_ok=True)
        os.makedirs(os.path.join(base, "annotations", split), exist_ok=True)
        for i in range(count):
            rgb, semantic, _ = shapes_image(rng, *size)
            annotation = semantic.astype(np.uint8) + 1
            annotation[0] = 0
            name = f"ADE_{split[:5]}_{i:08d}"
            Image.fromarray(rgb).save(os.path.join(base, "images", split, f"{name}.jpg"), quality=95)
            Image.fromarray(annotation).save(os.path.join(base, "annotations", split, f"{name}.png"))
    return base


def _polygon(mask: np.ndarray) -> list[list[float]]:
    """The outline of a filled axis-aligned rectangle as one COCO polygon (pixel edges)."""
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def coco_annotations(images: list[tuple[int, list[tuple[int, np.ndarray]]]], size: tuple[int, int],
                     crowd: bool = False) -> dict:
    """COCO instances JSON for [(image_id, [(shape class, visible bool mask), ...])]: whole rectangles
    as polygons, other shapes as compressed RLE; with `crowd`, the first object of the first image with
    two or more becomes an iscrowd region."""
    height, width = size
    anns, crowd_done = [], not crowd
    for image_id, objects in images:
        for cls, mask in objects:
            ys, xs = np.nonzero(mask)
            if mask.sum() == (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1):  # an unoccluded rectangle
                segmentation = _polygon(mask)
            else:
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            is_crowd = not crowd_done and len(objects) >= 2
            crowd_done = crowd_done or is_crowd
            if is_crowd:
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": COCO_CATEGORY_IDS[cls],
                         "segmentation": segmentation, "area": float(mask.sum()), "iscrowd": int(is_crowd),
                         "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                                  float(ys.max() - ys.min() + 1)]})
    return {"images": [{"id": image_id, "file_name": f"{image_id:012d}.png", "height": height, "width": width}
                       for image_id, _ in images],
            "annotations": anns,
            "categories": [{"id": COCO_CATEGORY_IDS[c.id], "name": c.name, "supercategory": "shape"}
                           for c in SEMANTIC_CLASSES if c.id in COCO_CATEGORY_IDS]}


def visible_masks(shapes: list[tuple[int, np.ndarray]]) -> list[tuple[int, np.ndarray]]:
    """Painted-over shapes lose the pixels later shapes cover; fully hidden ones are dropped."""
    out, covered = [], np.zeros_like(shapes[0][1]) if shapes else None
    for cls, mask in reversed(shapes):
        visible = mask & ~covered
        covered = covered | mask
        if visible.sum() >= 4:
            out.append((cls, visible))
    return out[::-1]


def write_coco_layout(root: str, num_train: int = 24, num_val: int = 6, size: tuple[int, int] = (64, 64),
                      seed: int = 0) -> str:
    """ROOT/{train2017,val2017}/*.png and ROOT/annotations/instances_{train,val}2017.json; returns ROOT.
    The training split also holds one image without objects and one crowd region, as COCO does."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    next_id = 1
    for split, count in (("train2017", num_train), ("val2017", num_val)):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        images = []
        for i in range(count):
            rgb, _, shapes = shapes_image(rng, *size, max_shapes=3)
            objects = visible_masks(shapes)
            if split == "train2017" and i == 0:  # an image with nothing to detect
                rgb, objects = np.full((*size, 3), 128, np.uint8), []
            Image.fromarray(rgb).save(os.path.join(root, split, f"{next_id:012d}.png"))
            images.append((next_id, objects))
            next_id += 1
        with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump(coco_annotations(images, size, crowd=split == "train2017"), f)
    return root
