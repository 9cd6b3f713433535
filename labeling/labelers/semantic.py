"""Semantic labeler: any `transformers` universal or semantic segmentation checkpoint -> class maps
at the image's own resolution.

`SemanticLabeler(model_name_or_path, cfg, device)(images, sizes)` returns, per image, an (H, W)
class map in the contract's dtype (uint8 below 255 classes, else uint16) at `sizes[i]` (default:
the image's size; the pipeline passes the original size of an image the models saw shrunk).

1. Model input (`model_input_size`): the image keeps its aspect ratio; its shorter side goes to
   `cfg.shortest_edge` (640 by default, see docs/DESIGN.md), the longer side at most
   `longest_edge`, both rounded to a multiple of the processor's `size_divisor` (32 for
   Mask2Former). The checkpoint's processor config is not asked for a size: the published
   Mask2Former configs say a fixed `{"height": 384, "width": 384}`, which squashes every image.
   The processor still does the resize, rescale and normalisation at the size we give it.
2. `prepare` (CPU, thread-safe) runs the processor on one image; `label` batches only images
   of the same input size, in forward passes of exactly `batch_size` images (the first image of
   a short pass fills its empty places), so nothing is padded, kernel shapes never depend on which
   images share a call, and an image's map is the same alone or in any batch, bit for bit on one
   machine. The default, one image a pass, never computes a filler.
3. `class_map`, per image, on the device: the low-resolution outputs (1/4 of the input) are
   upsampled bilinearly (PyTorch's `align_corners=False` arithmetic) straight to the output size,
   a band of rows at a time, and turned into class scores there: for universal models
   (Mask2Former, MaskFormer, EoMT; OneFormer with its "semantic" task input)
   `sum_q softmax(class_q)[c] * sigmoid(mask_q)`, the combination of transformers'
   `post_process_semantic_segmentation` and of Mask2Former's own inference, with the sigmoid after
   the upsampling as both do; semantic models (SegFormer, UperNet, DPT, ...) give class logits
   directly. Then argmax. Neither a (C, H, W) volume nor a (Q, H, W) one ever exists: an
   8000 x 8000 map costs `upsample_chunk` values at once.

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

from dataset_card.contract.layout import SemanticClass  # imports without `datasets` (a GPU box may lack it)
from dataset_card.contract.schema import semantic_ignore_value, semantic_mask_dtype
from labeling.labelers.mask_postprocess import linear_taps
from labeling.labelers.timing import StageClock

DEFAULT_SEMANTIC_MODEL = "facebook/mask2former-swin-large-coco-panoptic"
COCO_PANOPTIC_CLASSES, COCO_PANOPTIC_THINGS = 133, 80  # ids 0..79 are things, 80..132 stuff
CITYSCAPES_CLASSES, CITYSCAPES_THINGS = 19, range(11, 19)  # person .. bicycle
# ADE20K's 150 classes (SceneParsing order) have no thing/stuff split of their own; the ADE20K
# panoptic benchmark's (Mask2Former, register_ade20k_panoptic.py: 100 things, 50 stuff) is used.
ADE20K_CLASSES = 150
ADE20K_STUFF = frozenset((0, 1, 2, 3, 4, 5, 6, 9, 11, 13, 16, 17, 21, 25, 26, 28, 29, 34, 40, 46, 48, 51, 52, 54, 59,
                          60, 61, 63, 68, 77, 79, 84, 91, 94, 96, 99, 100, 101, 105, 106, 109, 113, 114, 117, 122,
                          128, 131, 140, 141, 145))  # wall, building, sky, floor, tree, ..., pier, crt screen, shower
# Detectron2's test-time ratio of the longer to the shorter side limit (800 / 1333).
LONGEST_PER_SHORTEST = 1333 / 800


@dataclass(frozen=True)
class SemanticLabelerConfig:
    batch_size: int = 1  # images per forward pass, always (only images of one input size share a pass)
    half: bool = True  # float16 weights and inputs on a GPU (always float32 on CPU)
    shortest_edge: int = 640  # the model input's shorter side (see docs/DESIGN.md for the choice)
    longest_edge: int | None = None  # the longer side's limit; None: shortest_edge * 1333 / 800
    size_divisor: int | None = None  # None: the processor's own (32 for Mask2Former), else 32
    max_input_side: int = 2048  # larger images are area-downscaled to this longer side first
    min_score: float = 0.0  # pixels whose best class score is below this get the ignore value
    upsample_chunk: int = 1 << 25  # score elements (classes x rows x width) upsampled at once


def class_taxonomy(config) -> tuple[SemanticClass, ...]:
    """(id, name, isthing) for every class of a transformers model config, ordered by id.

    isthing: the config's `thing_ids` when it has them; else the COCO-panoptic rule (133 classes:
    ids < 80 are things), the ADE20K rule (150 classes: all but ADE20K_STUFF) or the Cityscapes rule
    (19 classes: ids 11-18); else unknown -> False.
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
    elif len(ids) == ADE20K_CLASSES:
        things = set(ids) - ADE20K_STUFF
    elif len(ids) == CITYSCAPES_CLASSES:
        things = set(CITYSCAPES_THINGS)
    else:
        things = set()
    return tuple(SemanticClass(i, id2label[i], i in things) for i in ids)


def model_input_size(height: int, width: int, shortest_edge: int, longest_edge: int,
                     size_divisor: int) -> tuple[int, int]:
    """(h, w) the model sees: aspect kept, shorter side `shortest_edge`, longer side at most
    `longest_edge`, each rounded to the nearest multiple of `size_divisor` (at least one)."""
    scale = min(shortest_edge / min(height, width), longest_edge / max(height, width))
    return tuple(max(size_divisor, round(side * scale / size_divisor) * size_divisor) for side in (height, width))


def class_map(low: torch.Tensor, height: int, width: int, query_classes: torch.Tensor | None = None,
              min_score: float = 0.0, ignore_value: int = 255, max_elements: int = 1 << 25) -> np.ndarray:
    """The (height, width) class map of one image from the model's low-resolution outputs.

    low: (K, h, w) float, the mask logits of K queries (universal models; `query_classes` (K, C+1)
    are their class logits, the last column "no object") or K = C class logits (semantic models).
    Each band of output rows: `low` upsampled bilinearly (align_corners=False, as `F.interpolate`),
    then for queries sum_q softmax(class)_qc * sigmoid(mask)_q (Mask2Former's semantic inference,
    sigmoid after upsampling), then argmax. At most `max_elements` upsampled values exist at once.
    Returns uint8 when C < 255, else uint16 (the contract's dtype).
    """
    channels, h, w = low.shape
    device = low.device
    probs = None if query_classes is None else query_classes.float().softmax(-1)[:, :-1].T.contiguous()  # (C, K)
    num_classes = channels if probs is None else probs.shape[0]
    iy, wy = (t.to(device) for t in linear_taps(h, height))  # (H, 2) source rows and their weights
    ix, wx = (t.to(device) for t in linear_taps(w, width))  # (W, 2)
    out = np.empty((height, width), semantic_mask_dtype(num_classes))
    low = low.float()
    rows = max(1, max_elements // max(1, (channels + num_classes) * max(width, w)))
    for top in range(0, height, rows):
        band = slice(top, min(height, top + rows))
        across = low[:, iy[band, 0]] * wy[band, 0, None] + low[:, iy[band, 1]] * wy[band, 1, None]  # (K, r, w)
        up = across[:, :, ix[:, 0]] * wx[:, 0] + across[:, :, ix[:, 1]] * wx[:, 1]  # (K, r, W)
        if probs is not None:
            up = (probs @ up.sigmoid().flatten(1)).view(num_classes, *up.shape[1:])  # (C, r, W)
        best, classes = up.max(0)  # (r, W)
        if min_score > 0:
            classes[best < min_score] = ignore_value
        out[band] = classes.to(torch.uint8 if out.dtype == np.uint8 else torch.int32).cpu().numpy()
    return out


def _shrink(image: np.ndarray, max_side: int) -> np.ndarray:
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _check_image(image: np.ndarray, index: int) -> None:
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"Image {index} must be an (H, W, 3) uint8 array, got shape {shape} and dtype {dtype}.")


@dataclass
class SemanticInput:
    """An image made ready for the device by `SemanticLabeler.prepare` (CPU work)."""

    input_size: tuple[int, int]  # (h, w) the model sees
    inputs: dict  # the processor's tensors for this image, batch dimension 1
    size: tuple[int, int]  # (height, width) of the class map


class SemanticLabeler:
    """Loads the model once; `labeler(images, sizes)` maps RGB uint8 images to class maps (module doc).

    `revision` pins a hub checkpoint (a branch, tag or commit); ignored for a local folder.
    """

    def __init__(self, model_name_or_path: str = DEFAULT_SEMANTIC_MODEL, cfg: SemanticLabelerConfig | None = None,
                 device: str | torch.device = "cpu", revision: str | None = None):
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
        hub = {"revision": revision} if revision else {}
        try:
            config = AutoConfig.from_pretrained(model_name_or_path, **hub)
            self.universal = config.model_type in MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES
            auto = AutoModelForUniversalSegmentation if self.universal else AutoModelForSemanticSegmentation
            model = auto.from_pretrained(model_name_or_path, **hub)
            self.is_oneformer = config.model_type == "oneformer"
            loader = AutoProcessor if self.is_oneformer else AutoImageProcessor
            self.processor = loader.from_pretrained(model_name_or_path, **hub)
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
        image_processor = getattr(self.processor, "image_processor", self.processor)
        self.size_divisor = int(self.cfg.size_divisor or getattr(image_processor, "size_divisor", None) or 32)
        self.longest_edge = self.cfg.longest_edge or math.ceil(self.cfg.shortest_edge * LONGEST_PER_SHORTEST)
        self.clock = StageClock()  # seconds per stage; benchmarks swap in a syncing clock

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The model input size of an (height, width) image (after the `max_input_side` shrink)."""
        return model_input_size(height, width, self.cfg.shortest_edge, self.longest_edge, self.size_divisor)

    def __call__(self, images: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]] | None = None) -> list[np.ndarray]:
        sizes = [None] * len(images) if sizes is None else list(sizes)
        if len(sizes) != len(images):
            raise ValueError(f"{len(sizes)} output sizes for {len(images)} images")
        return self.label([self.prepare(image, size, i) for i, (image, size) in enumerate(zip(images, sizes))])

    def prepare(self, image: np.ndarray, size: tuple[int, int] | None = None, index: int = 0) -> SemanticInput:
        """The model's input for one image, whose map is wanted at `size` (default: its own; CPU work,
        safe in threads)."""
        _check_image(image, index)
        size = tuple(image.shape[:2]) if size is None else (int(size[0]), int(size[1]))
        shrunk = _shrink(image, self.cfg.max_input_side)
        input_size = self.input_size(*shrunk.shape[:2])
        return SemanticInput(input_size, self._inputs(shrunk, input_size), size)

    def _inputs(self, image: np.ndarray, input_size: tuple[int, int]) -> dict:
        """The processor's tensors for one image resized to `input_size` (h, w), batch dimension 1."""
        extra = {"task_inputs": ["semantic"]} if self.is_oneformer else {}
        inputs = self.processor(images=[np.ascontiguousarray(image)], return_tensors="pt",
                                input_data_format="channels_last",
                                size={"height": input_size[0], "width": input_size[1]}, **extra)
        return {key: value for key, value in inputs.items() if isinstance(value, torch.Tensor)}

    def label(self, prepared: Sequence[SemanticInput]) -> list[np.ndarray]:
        """Class maps of prepared images: same-size images share forward passes of `batch_size`."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, item in enumerate(prepared):
            groups.setdefault(item.input_size, []).append(i)
        out: list[np.ndarray | None] = [None] * len(prepared)
        size = self.cfg.batch_size
        for members in groups.values():
            for start in range(0, len(members), size):
                batch = members[start : start + size]
                fill = [batch[0]] * (size - len(batch))  # a short pass keeps the shape of a full one
                inputs = {key: torch.cat([prepared[i].inputs[key] for i in batch + fill])
                          for key in prepared[batch[0]].inputs}
                with self.clock("semantic model"):
                    outputs = self._run(inputs)
                with self.clock("class map"):
                    for j, i in enumerate(batch):
                        out[i] = self.class_map(outputs, j, *prepared[i].size)
        return out

    def forward(self, images: Sequence[np.ndarray], input_size: tuple[int, int]):
        """The model's raw outputs for images resized to one `input_size` (h, w): no padding."""
        inputs = [self._inputs(image, input_size) for image in images]
        return self._run({key: torch.cat([item[key] for item in inputs]) for key in inputs[0]})

    @torch.inference_mode()
    def _run(self, inputs: dict):
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        kwargs = {}
        if "pixel_mask" in inputs and self.universal:
            kwargs["pixel_mask"] = inputs["pixel_mask"].to(self.device)
        if "task_inputs" in inputs:
            kwargs["task_inputs"] = inputs["task_inputs"].to(self.device)
        return self.model(pixel_values=pixels, **kwargs)

    @torch.inference_mode()
    def class_map(self, outputs, index: int, height: int, width: int) -> np.ndarray:
        """Image `index` of a forward pass's outputs -> its (height, width) class map (`class_map`)."""
        if self.universal:
            return class_map(outputs.masks_queries_logits[index], height, width, outputs.class_queries_logits[index],
                             self.cfg.min_score, self.ignore_value, self.cfg.upsample_chunk)
        return class_map(outputs.logits[index], height, width, None, self.cfg.min_score, self.ignore_value,
                         self.cfg.upsample_chunk)
