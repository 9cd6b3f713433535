"""Instance labeler: SAM automatic masks over a point grid, fast and equal to the stock generator.

Same masks as `segment_anything.SamAutomaticMaskGenerator(..., output_mode="coco_rle")` with the
same parameters, computed with less work:

- the image encoder runs on batches of crops (`encoder_batch_size`, several images at once);
- the prompt decoder runs `points_per_batch` prompts per call, under bf16 autocast on a GPU;
- predicted-IoU filtering happens on the decoder outputs, before anything is upsampled;
- the stability score and box of a candidate are computed exactly (to float rounding), but only
  inside the window that can hold its pixels (`mask_postprocess.windows_above`), never on the
  1024 x 1024 intermediate or the full canvas; candidates that fail are dropped there;
- only masks that survive box NMS are upsampled again, inside their boxes, and encoded to COCO RLE
  straight from that window; everything stays on the device until then.

With `encoder_batch_size=1` and fp32 (`bf16=False`, or any CPU run) the kept masks, their order,
scores and boxes are the stock generator's (see tests/test_instance_labeler.py); the defaults
(encoder batches of 4, bf16 on CUDA) trade that bit-exactness for speed, within the tolerances
tested there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pycocotools import mask as mask_utils
from segment_anything.modeling import Sam
from segment_anything.utils.amg import (
    batched_mask_to_box,
    box_xyxy_to_xywh,
    build_all_layer_point_grids,
    generate_crop_boxes,
    is_box_near_crop_edge,
    remove_small_regions,
    uncrop_boxes_xyxy,
)
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.ops.boxes import batched_nms, box_area

from dataset_card import codecs
from labeling.labelers.mask_postprocess import (
    axis_taps,
    tile_stats,
    upsample_windows,
    window_rle,
    windows_above,
)


@dataclass(frozen=True)
class InstanceLabelerConfig:
    points_per_side: int = 32
    points_per_batch: int = 128  # prompts per decoder call (stock: 64); results do not depend on it
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0  # holes and islands smaller than this are removed (SA-1B: 100)
    max_mask_fraction: float | None = None  # masks covering this share of the image or more are dropped (SA-1B: 0.95)
    encoder_batch_size: int = 4  # crops per image-encoder call (1 reproduces the stock generator exactly)
    bf16: bool = True  # bf16 autocast for encoder and decoder, on CUDA only (unless bf16_on_cpu)
    bf16_on_cpu: bool = False  # tests use it to check the bf16 path without a GPU
    window_pixels: int = 1 << 22  # upsampled pixels per post-processing chunk (bounds memory)


@dataclass
class _Candidates:
    """Masks of one crop that passed every filter so far (tensors on the device)."""

    low: torch.Tensor  # (N, h, w) float32 low-resolution logits
    iou: torch.Tensor  # (N,)
    stability: torch.Tensor  # (N,)
    boxes: torch.Tensor  # (N, 4) XYXY in the crop, inclusive max


class InstanceLabeler:
    """`labeler(images)` -> per image, a list of mask records (see INTERFACES.md)."""

    def __init__(self, sam: Sam, cfg: InstanceLabelerConfig | None = None, device: str | torch.device = "cpu"):
        self.cfg = cfg or InstanceLabelerConfig()
        self.device = torch.device(device)
        self.sam = sam.to(self.device).eval()
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        self.point_grids = build_all_layer_point_grids(
            self.cfg.points_per_side, self.cfg.crop_n_layers, self.cfg.crop_n_points_downscale_factor
        )
        use_bf16 = self.cfg.bf16 and (self.device.type == "cuda" or self.cfg.bf16_on_cpu)
        self._autocast = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=use_bf16)

    @torch.inference_mode()
    def __call__(self, images: Sequence[np.ndarray]) -> list[list[dict]]:
        for i, image in enumerate(images):
            if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
                raise ValueError(f"Image {i} must be an (H, W, 3) uint8 array, got {getattr(image, 'shape', image)!r}.")
        jobs = []  # (image index, crop box, layer) for every crop of every image
        for i, image in enumerate(images):
            boxes, layers = generate_crop_boxes(image.shape[:2], self.cfg.crop_n_layers, self.cfg.crop_overlap_ratio)
            jobs += [(i, box, layer) for box, layer in zip(boxes, layers)]
        per_image: list[list[tuple[list[int], list[dict]]]] = [[] for _ in images]
        for start in range(0, len(jobs), self.cfg.encoder_batch_size):
            chunk = jobs[start : start + self.cfg.encoder_batch_size]
            crops = [images[i][y0:y1, x0:x1] for i, (x0, y0, x1, y1), _ in chunk]
            features, input_sizes = self._encode(crops)
            for (i, box, layer), crop, feature, input_size in zip(chunk, crops, features, input_sizes):
                records = self._crop_masks(feature[None], crop.shape[:2], input_size, box, layer, images[i].shape[:2])
                per_image[i].append((box, records))
        return [self._merge(crops, image.shape[:2]) for crops, image in zip(per_image, images)]

    def _encode(self, crops: list[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Image embeddings (B, C, h, w) of crops, resized and padded exactly as SamPredictor does."""
        batch, sizes = [], []
        for crop in crops:
            resized = torch.as_tensor(self.transform.apply_image(crop), device=self.device).permute(2, 0, 1)
            sizes.append(tuple(resized.shape[-2:]))
            batch.append(self.sam.preprocess(resized[None])[0])
        with torch.autocast(**self._autocast):
            features = self.sam.image_encoder(torch.stack(batch))
        return features.float(), sizes

    def _crop_masks(self, features, crop_size, input_size, crop_box, layer, image_size) -> list[dict]:
        """Candidates of one crop: decode, filter by IoU, stability and crop edge, box NMS, then RLE."""
        cfg, sam = self.cfg, self.sam
        h, w = crop_size
        model_len = sam.image_encoder.img_size
        points = self.point_grids[layer] * np.array(crop_size)[None, ::-1]
        kept: list[_Candidates] = []
        taps_y = taps_x = None
        for start in range(0, len(points), cfg.points_per_batch):
            batch = points[start : start + cfg.points_per_batch]
            coords = torch.as_tensor(self.transform.apply_coords(batch, crop_size), device=self.device)
            labels = torch.ones(coords.shape[0], dtype=torch.int, device=self.device)
            with torch.autocast(**self._autocast):
                sparse, dense = sam.prompt_encoder(points=(coords[:, None, :], labels[:, None]), boxes=None, masks=None)
                low, iou = sam.mask_decoder(
                    image_embeddings=features, image_pe=sam.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True,
                )
            low, iou = low.flatten(0, 1).float(), iou.flatten(0, 1).float()  # (B*3, h, w), (B*3,)
            if cfg.pred_iou_thresh > 0.0:
                keep = iou > cfg.pred_iou_thresh
                low, iou = low[keep], iou[keep]
            if taps_y is None:
                taps_y = [t.to(self.device) for t in axis_taps(low.shape[-2], model_len, input_size[0], h)]
                taps_x = [t.to(self.device) for t in axis_taps(low.shape[-1], model_len, input_size[1], w)]
            if len(low):
                kept.append(self._filter(low, iou, taps_y, taps_x, crop_box, image_size))
        if not kept:
            return []
        c = _Candidates(*(torch.cat([getattr(k, f) for k in kept]) for f in ("low", "iou", "stability", "boxes")))
        keep = batched_nms(c.boxes.float(), c.iou, torch.zeros_like(c.iou), iou_threshold=cfg.box_nms_thresh)
        c = _Candidates(c.low[keep], c.iou[keep], c.stability[keep], c.boxes[keep])
        return self._encode_masks(c, taps_y, taps_x, crop_box, image_size)

    def _chunks(self, windows: torch.Tensor):
        """Index ranges whose padded windows stay within `window_pixels` (at least one mask each)."""
        heights = (windows[:, 2] - windows[:, 0]).clamp_min(1).tolist()
        widths = (windows[:, 3] - windows[:, 1]).clamp_min(1).tolist()
        start, tallest, widest = 0, 0, 0
        for i, (h, w) in enumerate(zip(heights, widths)):
            tallest, widest = max(tallest, h), max(widest, w)
            if i > start and tallest * widest * (i + 1 - start) > self.cfg.window_pixels:
                yield start, i
                start, tallest, widest = i, h, w
        if heights:
            yield start, len(heights)

    def _filter(self, low, iou, taps_y, taps_x, crop_box, image_size) -> _Candidates:
        """Exact stability scores and boxes of candidates, evaluated only inside their windows."""
        cfg, threshold = self.cfg, self.sam.mask_threshold
        offset = cfg.stability_score_offset
        counts, boxes = tile_stats(low, taps_y, taps_x, (threshold + offset, threshold - offset), threshold,
                                   max_pixels=cfg.window_pixels)
        stability = counts[0] / counts[1]  # NaN for an empty mask, as in the stock generator
        keep = torch.ones_like(iou, dtype=torch.bool)
        if cfg.stability_score_thresh > 0.0:
            keep &= stability >= cfg.stability_score_thresh
        keep &= ~is_box_near_crop_edge(boxes, crop_box, [0, 0, image_size[1], image_size[0]])
        return _Candidates(low[keep], iou[keep], stability[keep], boxes[keep])

    def _encode_masks(self, c: _Candidates, taps_y, taps_x, crop_box, image_size) -> list[dict]:
        """Upsample each kept mask once, inside its box, and encode it in the full image frame."""
        height, width = image_size
        x0, y0 = crop_box[0], crop_box[1]
        empty = c.boxes.sum(1) == 0  # batched_mask_to_box's [0, 0, 0, 0]; may still be a one-pixel mask
        windows = torch.stack([c.boxes[:, 1], c.boxes[:, 0], c.boxes[:, 3] + 1, c.boxes[:, 2] + 1], 1)
        if empty.any():  # an empty box is ambiguous: look at the whole window above the threshold
            full = windows_above(c.low[empty], self.sam.mask_threshold, taps_y[0], taps_x[0])
            windows[empty] = full
        records = []
        boxes_full = uncrop_boxes_xyxy(c.boxes, crop_box).cpu()
        for i, window in enumerate(windows.tolist()):
            binary = self._binary_window(c.low[i : i + 1], taps_y, taps_x, window)
            records.append({
                "rle": window_rle(binary, window[0] + y0, window[1] + x0, height, width),
                "bbox": [float(v) for v in box_xyxy_to_xywh(boxes_full[i]).tolist()],
                "area": int(binary.sum()),
                "predicted_iou": float(c.iou[i]),
                "stability_score": float(c.stability[i]),
            })
        return records

    def _binary_window(self, low, taps_y, taps_x, window: list[int]) -> torch.Tensor:
        """One mask thresholded inside window [r0, c0, r1, c1), in row strips of `window_pixels`."""
        r0, c0, r1, c1 = window
        rows = max(1, self.cfg.window_pixels // max(1, c1 - c0))
        strips = []
        for top in range(r0, r1, rows):
            strip = torch.tensor([[top, c0, min(top + rows, r1), c1]], device=self.device)
            values, valid = upsample_windows(low, taps_y, taps_x, strip)
            strips.append(((values > self.sam.mask_threshold) & valid)[0])
        return torch.cat(strips) if strips else torch.zeros(0, max(0, c1 - c0), dtype=torch.bool, device=self.device)

    def _merge(self, crops: list[tuple[list[int], list[dict]]], image_size: tuple[int, int]) -> list[dict]:
        """Cross-crop NMS (prefer smaller crops) and small-region cleanup, as the stock generator."""
        records = [r for _, rs in crops for r in rs]
        if len(crops) > 1 and records:
            boxes = torch.tensor([_xyxy(r["bbox"]) for r in records], dtype=torch.float32)
            crop_boxes = torch.tensor([box for box, rs in crops for _ in rs], dtype=torch.float32)
            keep = batched_nms(boxes, 1 / box_area(crop_boxes), torch.zeros(len(boxes)), self.cfg.crop_nms_thresh)
            records = [records[i] for i in keep.tolist()]
        if self.cfg.min_mask_region_area > 0 and records:
            records = remove_small_regions_records(records, self.cfg.min_mask_region_area,
                                                   max(self.cfg.box_nms_thresh, self.cfg.crop_nms_thresh))
        if self.cfg.max_mask_fraction is not None:
            limit = self.cfg.max_mask_fraction * image_size[0] * image_size[1]
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
