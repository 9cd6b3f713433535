"""Semantic labeler: any `transformers` universal or semantic segmentation checkpoint -> class maps.

`SemanticLabeler(model_name_or_path, cfg, device)(images)` returns one int64 class map per image
at the model's output resolution (the argmax is taken there); the pipeline resizes it to the
image with nearest-neighbour. A 133-class score volume is never upsampled to the image size.

Input resolution: the checkpoint's own image processor decides it (the default COCO-panoptic
Mask2Former resizes the shorter side to 384 px, the longer side at most 384 * 1333 / 800, both
rounded up to a multiple of 32; SegFormer resizes to 512 x 512). `cfg.shortest_edge` overrides the
shorter side for processors that have one. Images larger than `cfg.max_input_side` are first
shrunk with area averaging (cv2.INTER_AREA), which bounds memory for huge inputs.

Universal models (Mask2Former, MaskFormer, EoMT; OneFormer with its text task input) predict
queries; the per-pixel class score is sum_q p_q(c) * sigmoid(m_q), as in Mask2Former's semantic
inference, computed on the valid (unpadded) part of the mask logits. Semantic models (SegFormer,
UperNet, DPT, ...) give per-class logits directly.

The ignore value (255 for < 255 classes, else 65535) arises only where the best class score is
below `cfg.min_score` (off by default: every pixel gets a class).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from dataset_card.layout import SemanticClass  # imports without `datasets` (a GPU box may lack it)
from dataset_card.schema import semantic_ignore_value

DEFAULT_SEMANTIC_MODEL = "facebook/mask2former-swin-large-coco-panoptic"
COCO_PANOPTIC_CLASSES, COCO_PANOPTIC_THINGS = 133, 80  # ids 0..79 are things, 80..132 stuff
CITYSCAPES_CLASSES, CITYSCAPES_THINGS = 19, range(11, 19)  # person .. bicycle


@dataclass(frozen=True)
class SemanticLabelerConfig:
    batch_size: int = 8  # images per forward pass
    half: bool = True  # float16 weights and inputs on a GPU (always float32 on CPU)
    shortest_edge: int | None = None  # override the processor's shorter-side size
    max_input_side: int = 2048  # larger images are area-downscaled to this longer side first
    min_score: float = 0.0  # pixels whose best class score is below this get the ignore value
    max_aspect: float = 8.0  # thinner images are zero-padded to this aspect ratio (the map is cropped back)


def class_taxonomy(config) -> tuple[SemanticClass, ...]:
    """(id, name, isthing) for every class of a transformers model config, ordered by id.

    isthing: the config's `thing_ids` when it has them; else the COCO-panoptic rule (133 classes:
    ids < 80 are things) or the Cityscapes rule (19 classes: ids 11-18); else unknown -> False.
    """
    id2label = {int(k): str(v) for k, v in config.id2label.items()}
    ids = sorted(id2label)
    if ids != list(range(len(ids))):
        raise ValueError(f"The model's id2label ids are not 0..{len(ids) - 1}; class ids must be dense.")
    thing_ids = getattr(config, "thing_ids", None)
    if thing_ids is not None:
        things = {int(i) for i in thing_ids}
    elif len(ids) == COCO_PANOPTIC_CLASSES:
        things = set(range(COCO_PANOPTIC_THINGS))
    elif len(ids) == CITYSCAPES_CLASSES:
        things = set(CITYSCAPES_THINGS)
    else:
        things = set()
    return tuple(SemanticClass(i, id2label[i], i in things) for i in ids)


def universal_class_map(
    class_logits: torch.Tensor, mask_logits: torch.Tensor, min_score: float, ignore_value: int
) -> torch.Tensor:
    """Per-pixel class of one image from query predictions, at the mask logits' resolution.

    class_logits: (Q, C+1) with the last column "no object"; mask_logits: (Q, h, w).
    Returns (h, w) int64: argmax_c sum_q softmax(class)_qc * sigmoid(mask)_q.
    """
    probs = class_logits.float().softmax(-1)[:, :-1]  # (Q, C)
    scores = torch.einsum("qc,qhw->chw", probs, mask_logits.float().sigmoid())  # (C, h, w)
    return _argmax(scores, min_score, ignore_value)


def _argmax(scores: torch.Tensor, min_score: float, ignore_value: int) -> torch.Tensor:
    best, classes = scores.max(0)  # (h, w)
    if min_score > 0:
        classes[best < min_score] = ignore_value
    return classes.long()


def _shrink(image: np.ndarray, max_side: int) -> np.ndarray:
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _pad_to_aspect(image: np.ndarray, max_aspect: float) -> tuple[np.ndarray, tuple[float, float]]:
    """Zero-pad the short side so that long / short <= max_aspect (processors would resize a 2 x 700
    strip to a zero-height image); returns the image and the share of each axis that is real."""
    h, w = image.shape[:2]
    ph, pw = max(h, math.ceil(w / max_aspect)), max(w, math.ceil(h / max_aspect))
    if (ph, pw) == (h, w):
        return image, (1.0, 1.0)
    padded = np.zeros((ph, pw, 3), np.uint8)
    padded[:h, :w] = image
    return padded, (h / ph, w / pw)


def _check_image(image: np.ndarray, index: int) -> None:
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"Image {index} must be an (H, W, 3) uint8 array, got shape {shape} and dtype {dtype}.")


class SemanticLabeler:
    """Loads the model once; `labeler(images)` maps RGB uint8 images to class maps (see module doc)."""

    def __init__(self, model_name_or_path: str = DEFAULT_SEMANTIC_MODEL, cfg: SemanticLabelerConfig | None = None,
                 device: str | torch.device = "cpu"):
        from transformers import (
            AutoConfig,
            AutoImageProcessor,
            AutoModelForSemanticSegmentation,
            AutoModelForUniversalSegmentation,
            AutoProcessor,
        )
        from transformers.models.auto.modeling_auto import MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES

        self.cfg = cfg or SemanticLabelerConfig()
        self.device = torch.device(device)
        self.source = model_name_or_path
        try:
            config = AutoConfig.from_pretrained(model_name_or_path)
            self.universal = config.model_type in MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES
            auto = AutoModelForUniversalSegmentation if self.universal else AutoModelForSemanticSegmentation
            model = auto.from_pretrained(model_name_or_path)
            self.is_oneformer = config.model_type == "oneformer"
            loader = AutoProcessor if self.is_oneformer else AutoImageProcessor
            self.processor = loader.from_pretrained(model_name_or_path)
        except (OSError, ValueError, KeyError) as err:
            raise RuntimeError(
                f"Could not load the semantic model {model_name_or_path!r} ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); pass a local folder with config.json, weights and "
                "preprocessor_config.json, or a hub id while online."
            ) from err
        self.dtype = torch.float16 if (self.cfg.half and self.device.type == "cuda") else torch.float32
        self.model = model.to(self.device, self.dtype).eval()
        self.classes = class_taxonomy(model.config)
        self.ignore_value = semantic_ignore_value(len(self.classes))
        self._kwargs = {}
        if self.cfg.shortest_edge is not None:
            size = dict(getattr(self.processor, "size", None) or {})
            if "shortest_edge" not in size:
                raise ValueError(f"The image processor of {model_name_or_path} has no shorter-side size to override.")
            scale = self.cfg.shortest_edge / size["shortest_edge"]
            size = {"shortest_edge": self.cfg.shortest_edge, **{k: math.ceil(v * scale) for k, v in size.items()
                                                                  if k == "longest_edge"}}
            self._kwargs["size"] = size

    def __call__(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        for i, image in enumerate(images):
            _check_image(image, i)
        out = []
        for start in range(0, len(images), self.cfg.batch_size):
            out.extend(self._batch(images[start : start + self.cfg.batch_size]))
        return out

    @torch.inference_mode()
    def _batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        padded = [_pad_to_aspect(_shrink(image, self.cfg.max_input_side), self.cfg.max_aspect) for image in images]
        tensors = [torch.from_numpy(image).permute(2, 0, 1) for image, _ in padded]  # (3, H, W) uint8
        extra = {"task_inputs": ["semantic"] * len(images)} if self.is_oneformer else {}
        inputs = self.processor(images=tensors, return_tensors="pt", input_data_format="channels_first", **extra,
                                **self._kwargs)
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        kwargs = {}
        if "pixel_mask" in inputs and self.universal:
            kwargs["pixel_mask"] = inputs["pixel_mask"].to(self.device)
        if "task_inputs" in inputs:
            kwargs["task_inputs"] = inputs["task_inputs"].to(self.device)
        outputs = self.model(pixel_values=pixels, **kwargs)
        maps = []
        for i in range(len(images)):
            if self.universal:
                masks = outputs.masks_queries_logits[i]
                masks = masks[:, : self._valid(inputs, i, masks.shape[-2], 0), : self._valid(inputs, i, masks.shape[-1], 1)]
                classes = universal_class_map(outputs.class_queries_logits[i], masks, self.cfg.min_score,
                                              self.ignore_value)
            else:
                classes = _argmax(outputs.logits[i].float(), self.cfg.min_score, self.ignore_value)
            (fh, fw), (h, w) = padded[i][1], classes.shape
            maps.append(classes[: max(1, math.ceil(fh * h)), : max(1, math.ceil(fw * w))].cpu().numpy())
        return maps

    @staticmethod
    def _valid(inputs, index: int, out_len: int, axis: int) -> int:
        """Rows (axis 0) or columns (axis 1) of the output that cover the image rather than padding."""
        if "pixel_mask" not in inputs:
            return out_len
        mask = inputs["pixel_mask"][index]
        padded = mask.shape[axis]
        valid = int(mask.any(dim=1 - axis).sum())
        return max(1, math.ceil(valid * out_len / padded))
