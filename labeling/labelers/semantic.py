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
2. Buckets (`canonical_shapes`, `bucket_of`): that input is padded at the bottom and right, with
   zeros after normalisation (the mean colour, as detectron2 pads), to the smallest of a few
   canonical shapes of its orientation that holds it: shorter side `shortest_edge`, longer side
   `shortest_edge` times one of `cfg.bucket_aspects` (1 and 4/3 by default) or the longest input
   there is (1056 at the defaults). Which bucket depends on the image's size alone, so its pixels
   in the pass, and so its map, do not depend on the other images. `bucket_aspects=None`: no
   padding, every input size is its own bucket.
3. `prepare` (CPU, thread-safe) runs the processor on one image and pads it; `label` batches the
   images of one bucket in forward passes of exactly `batch_size` images (2 on CUDA, 1 elsewhere,
   by default; zero images, "fillers", complete a short pass; `fillers` counts them), so kernel
   shapes never depend on which images share a call, and an image's map is the same alone or in
   any batch, bit for bit on one machine.
4. `class_map`, per image, on the device: the low-resolution outputs (1/4 of the input) are
   cropped to the image's part of the padded input, then upsampled bilinearly (PyTorch's
   `align_corners=False` arithmetic) straight to the output size, a band of rows at a time, and
   turned into class scores there: for universal models (Mask2Former, MaskFormer, EoMT; OneFormer
   with its "semantic" task input) `sum_q softmax(class_q)[c] * sigmoid(mask_q)`, the combination of transformers'
   `post_process_semantic_segmentation` and of Mask2Former's own inference, with the sigmoid after
   the upsampling as both do; semantic models (SegFormer, UperNet, DPT, ...) give class logits
   directly. Then argmax. Neither a (C, H, W) volume nor a (Q, H, W) one ever exists: an
   8000 x 8000 map costs `upsample_chunk` values at once.

Precision on CUDA (`cfg.dtype`, `cfg.autocast`): by default the whole model is cast to float16
(no weight casts per pass); `autocast=True` keeps float32 weights and runs the forward pass under
autocast to `dtype` instead (docs/labelers.md gives the measured agreement of both). On CPU
float32, unless `reduced_on_cpu` (tests).

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
import torch.nn.functional as F

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
DEFAULT_BATCH_SIZE = {"cuda": 2, "cpu": 1}  # images per forward pass, by device type
PRECISIONS = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class SemanticLabelerConfig:
    batch_size: int | None = None  # images per forward pass, fillers included (None: 2 on CUDA, 1 elsewhere)
    dtype: str = "float16"  # on CUDA: "float16", "bfloat16" or "float32"
    autocast: bool = False  # True: float32 weights, the forward pass under autocast to dtype; False: the model cast
    reduced_on_cpu: bool = False  # apply dtype / autocast on CPU too (tests); else float32 there
    shortest_edge: int = 640  # the model input's shorter side (see docs/DESIGN.md for the choice)
    longest_edge: int | None = None  # the longer side's limit; None: shortest_edge * 1333 / 800
    size_divisor: int | None = None  # None: the processor's own (32 for Mask2Former), else 32
    max_input_side: int = 2048  # larger images are area-downscaled to this longer side first
    min_score: float = 0.0  # pixels whose best class score is below this get the ignore value
    # Canonical longer / shorter sides of the buckets (the longest input is one too); None: no padding,
    # each input size its own bucket.
    bucket_aspects: tuple[float, ...] | None = (1.0, 4 / 3)
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


def canonical_shapes(shortest_edge: int, longest_edge: int, size_divisor: int,
                     aspects: Sequence[float]) -> tuple[tuple[int, int], ...]:
    """(shorter, longer) sides of the buckets, longer ascending: the shorter side of every
    `model_input_size` and, as longer side, `shortest_edge * aspect` for each aspect (at least 1)
    and the longest side `model_input_size` gives, all rounded to `size_divisor`."""
    def rounded(side: float) -> int:
        return max(size_divisor, round(side / size_divisor) * size_divisor)

    short, longest = rounded(shortest_edge), rounded(longest_edge)
    longs = {min(longest, max(short, rounded(shortest_edge * aspect))) for aspect in aspects} | {short, longest}
    return tuple((short, side) for side in sorted(longs))


def bucket_of(input_size: tuple[int, int], shapes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """(h, w) of the smallest canonical shape (`canonical_shapes`) in `input_size`'s orientation
    that holds it: a landscape or square input gets (shorter, longer), a portrait one (longer, shorter)."""
    h, w = input_size
    short, long = min(h, w), max(h, w)
    for shape_short, shape_long in shapes:
        if short <= shape_short and long <= shape_long:
            return (shape_long, shape_short) if h > w else (shape_short, shape_long)
    raise ValueError(f"input size {input_size} is larger than every bucket {list(shapes)}")


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

    input_size: tuple[int, int]  # (h, w) the model sees: the image's bucket
    inputs: dict  # the processor's tensors for this image padded to input_size, batch dimension 1
    size: tuple[int, int]  # (height, width) of the class map
    content: tuple[int, int]  # (h, w) of the image inside input_size (top left), the rest padding


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
        if self.cfg.dtype not in PRECISIONS:
            raise ValueError(f"semantic dtype {self.cfg.dtype!r} is not one of {', '.join(PRECISIONS)}.")
        reduced = self.device.type == "cuda" or self.cfg.reduced_on_cpu
        compute = PRECISIONS[self.cfg.dtype] if reduced else torch.float32
        self.autocast = self.cfg.autocast and compute != torch.float32
        self.dtype = torch.float32 if self.autocast else compute  # of the weights and inputs
        self.compute_dtype = compute
        self.model = model.to(self.device, self.dtype).eval()
        self.batch_size = self.cfg.batch_size or DEFAULT_BATCH_SIZE.get(self.device.type, 1)
        self.fillers = 0  # filler images computed so far (`label`); the model actor reports the increase
        self.classes = class_taxonomy(model.config)
        self.ignore_value = semantic_ignore_value(len(self.classes))
        image_processor = getattr(self.processor, "image_processor", self.processor)
        self.size_divisor = int(self.cfg.size_divisor or getattr(image_processor, "size_divisor", None) or 32)
        self.longest_edge = self.cfg.longest_edge or math.ceil(self.cfg.shortest_edge * LONGEST_PER_SHORTEST)
        self.buckets = None if self.cfg.bucket_aspects is None else canonical_shapes(
            self.cfg.shortest_edge, self.longest_edge, self.size_divisor, self.cfg.bucket_aspects)
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
        """The model's input for one image, whose map is wanted at `size` (default: its own), padded
        to its bucket (CPU work, safe in threads)."""
        _check_image(image, index)
        size = tuple(image.shape[:2]) if size is None else (int(size[0]), int(size[1]))
        shrunk = _shrink(image, self.cfg.max_input_side)
        content = self.input_size(*shrunk.shape[:2])
        bucket = content if self.buckets is None else bucket_of(content, self.buckets)
        return SemanticInput(bucket, pad_inputs(self._inputs(shrunk, content), bucket), size, content)

    def _inputs(self, image: np.ndarray, input_size: tuple[int, int]) -> dict:
        """The processor's tensors for one image resized to `input_size` (h, w), batch dimension 1."""
        extra = {"task_inputs": ["semantic"]} if self.is_oneformer else {}
        inputs = self.processor(images=[np.ascontiguousarray(image)], return_tensors="pt",
                                input_data_format="channels_last",
                                size={"height": input_size[0], "width": input_size[1]}, **extra)
        return {key: value for key, value in inputs.items() if isinstance(value, torch.Tensor)}

    def label(self, prepared: Sequence[SemanticInput]) -> list[np.ndarray]:
        """Class maps of prepared images: the images of one bucket share forward passes of `batch_size`."""
        out: list[np.ndarray | None] = [None] * len(prepared)
        for members in bucket_passes([item.input_size for item in prepared], self.batch_size):
            fill = self.batch_size - len(members)
            self.fillers += fill
            inputs = {key: torch.cat([prepared[i].inputs[key] for i in members]
                                     + [filler(key, prepared[members[0]].inputs[key])] * fill)
                      for key in prepared[members[0]].inputs}
            with self.clock("semantic model"):
                outputs = self._run(inputs)
            with self.clock("class map"):
                for j, i in enumerate(members):
                    out[i] = self.class_map(outputs, j, prepared[i])
        return out

    def forward(self, prepared: Sequence[SemanticInput]):
        """The model's raw outputs for prepared images of one bucket, stacked as they come (no fillers)."""
        return self._run({key: torch.cat([item.inputs[key] for item in prepared]) for key in prepared[0].inputs})

    @torch.inference_mode()
    def _run(self, inputs: dict):
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        kwargs = {}
        if "pixel_mask" in inputs and self.universal:
            kwargs["pixel_mask"] = inputs["pixel_mask"].to(self.device)
        if "task_inputs" in inputs:
            kwargs["task_inputs"] = inputs["task_inputs"].to(self.device)
        with torch.autocast(self.device.type, self.compute_dtype, enabled=self.autocast):
            return self.model(pixel_values=pixels, **kwargs)

    def content_outputs(self, outputs, index: int, item: SemanticInput) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image `index` of a forward pass: its low-resolution mask (or class) logits cropped to the
        image's part of the padded input, (K, h, w), and its query class logits (K, C+1) or None."""
        low = outputs.masks_queries_logits[index] if self.universal else outputs.logits[index]
        (full_h, full_w), (h, w) = item.input_size, item.content
        low = low[:, : max(1, round(h * low.shape[1] / full_h)), : max(1, round(w * low.shape[2] / full_w))]
        return low, (outputs.class_queries_logits[index] if self.universal else None)

    @torch.inference_mode()
    def class_map(self, outputs, index: int, item: SemanticInput) -> np.ndarray:
        """Image `index` of a forward pass's outputs -> its class map at `item.size` (`class_map`)."""
        low, query_classes = self.content_outputs(outputs, index, item)
        return class_map(low, *item.size, query_classes, self.cfg.min_score, self.ignore_value, self.cfg.upsample_chunk)


def pad_inputs(inputs: dict, bucket: tuple[int, int]) -> dict:
    """The processor's tensors of one image with its pixels (and pixel mask) zero-padded at the
    bottom and right to `bucket` (h, w); zero is the mean colour after normalisation."""
    out = dict(inputs)
    for key in ("pixel_values", "pixel_mask"):
        if key in out:
            value = out[key]
            out[key] = F.pad(value, (0, bucket[1] - value.shape[-1], 0, bucket[0] - value.shape[-2]))
    return out


def filler(key: str, value: torch.Tensor) -> torch.Tensor:
    """What fills an empty place of a pass: zero pixels, an all-padding mask, other inputs as given."""
    return torch.zeros_like(value) if key in ("pixel_values", "pixel_mask") else value


def bucket_passes(buckets: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices of the images of each forward pass: each bucket's images in order, `batch_size` at a
    time, buckets in order of first appearance (the last pass of a bucket may be short)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, bucket in enumerate(buckets):
        groups.setdefault(bucket, []).append(i)
    return [members[start : start + batch_size] for members in groups.values()
            for start in range(0, len(members), batch_size)]
