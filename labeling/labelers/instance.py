"""Instance labeler: SAM automatic masks over a point grid, fast and equal to the stock generator.

Same masks as `segment_anything.SamAutomaticMaskGenerator(..., output_mode="coco_rle")` with the
same parameters, computed with less work and few device round trips:

- `prepare` (CPU, thread-safe): crops resized for the encoder with segment_anything's own resize;
- the image encoder runs on `encoder_batch_size` crops per call (of any images), its attention
  through PyTorch's fused kernels (`sam_fast.fused_encoder`), under bf16 autocast on a GPU; its
  input goes to the device through page-locked memory without a host wait;
- the prompt decoder runs `points_per_batch` prompts per call, mixing the crops of an encoder call
  (`sam_fast.decode_points`), on a GPU a bf16 copy of the decoder with bf16 activations end to end;
  all calls of a wave are queued without a host wait;
- predicted-IoU filtering (one host wait per wave, for the survivors' counts), then the exact
  stability score and box of each candidate computed only
  on the output tiles that can hold its pixels (`mask_postprocess.tile_stats`), crop-edge filter
  and box NMS, all on the device;
- only NMS survivors are upsampled again, inside their boxes, and their COCO RLE run boundaries
  found on the device (`mask_postprocess.window_changes`); one device-to-host copy per image brings
  them back, and `finish` (CPU) writes the RLE strings, cross-crop NMS and the small-region cleanup.

Every encoder call holds exactly `encoder_batch_size` crops and every decoder call exactly
`points_per_batch` prompts (padding fills the last ones), so kernel shapes never depend on which
images share a call: an image's masks are the same alone or in any batch, bit for bit on one
machine (tests/test_instance_labeler.py). In fp32 they are the stock generator's masks, order,
scores and boxes (up to float rounding, which the tests bound); bf16 on a GPU trades that for
speed, within the tolerances tested there.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

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
)
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.ops.boxes import batched_nms, box_area

from dataset_card.contract import codecs
from labeling.labelers.mask_postprocess import (
    axis_taps,
    rle_from_changes,
    tile_stats,
    upsample_windows,
    window_changes,
    windows_above,
)
from labeling.labelers.sam_fast import bf16_decoder, decode_points, fused_encoder
from labeling.labelers.timing import StageClock

FILTER_BATCH = 1024  # candidates whose stability and boxes are computed together (bounds memory)
TAPS_CACHE = 256  # image sizes whose upsampling taps stay on the device


@dataclass(frozen=True)
class InstanceLabelerConfig:
    points_per_side: int = 32
    points_per_batch: int | None = None  # prompts per decoder call, padded (None: 256 on CUDA, 64 elsewhere)
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
    encoder_batch_size: int | None = None  # crops per image-encoder call, padded (None: 4 on CUDA, 1 elsewhere)
    bf16: bool = True  # on CUDA only (unless bf16_on_cpu): the encoder under bf16 autocast, the mask decoder in bf16
    bf16_on_cpu: bool = False  # tests use it to check the bf16 path without a GPU
    fused_attention: bool = True  # the encoder's attention through F.scaled_dot_product_attention
    compile: bool | None = None  # torch.compile the encoder and the decoder call (fixed shapes: one graph each);
    # None: on CUDA, off elsewhere (inductor's kernels change float rounding only: tests/test_instance_labeler.py)
    window_pixels: int = 1 << 22  # upsampled pixels per post-processing chunk (bounds memory)


@dataclass
class PreparedCrop:
    box: list[int]  # XYXY in the image
    layer: int
    pixels: np.ndarray  # (h, w, 3) uint8, resized so that the longest side is the encoder's size
    size: tuple[int, int]  # (h, w) of the crop before resizing


@dataclass
class PreparedImage:
    """An image made ready for the device by `InstanceLabeler.prepare` (CPU work)."""

    size: tuple[int, int]
    crops: list[PreparedCrop]


@dataclass
class _Candidates:
    """Masks of one crop that passed every filter so far (tensors on the device)."""

    low: torch.Tensor  # (N, h, w) float32 low-resolution logits
    iou: torch.Tensor  # (N,)
    stability: torch.Tensor  # (N,)
    boxes: torch.Tensor  # (N, 4) XYXY in the crop, inclusive max

    @staticmethod
    def cat(parts: list[_Candidates]) -> _Candidates:
        return _Candidates(*(torch.cat([getattr(p, f) for p in parts]) for f in ("low", "iou", "stability", "boxes")))

    def take(self, index: torch.Tensor) -> _Candidates:
        return _Candidates(self.low[index], self.iou[index], self.stability[index], self.boxes[index])


@dataclass
class DeviceResult:
    """One image's kept masks as they come back from the device, before `finish`."""

    size: tuple[int, int]
    crop_boxes: list[list[int]]
    packed: np.ndarray  # float64: per mask [crop, iou, stability, x0, y0, x1, y1, area, changes], then the changes
    count: int


_META = 9  # values per mask at the head of DeviceResult.packed


@dataclass
class _Pending:
    """An image whose crops are partly through the device."""

    image: PreparedImage
    crops: list[tuple[PreparedCrop, _Candidates, tuple]] = field(default_factory=list)


class InstanceLabeler:
    """`labeler(images)` -> per image, a list of mask records (module docstring)."""

    def __init__(self, sam: Sam, cfg: InstanceLabelerConfig | None = None, device: str | torch.device = "cpu"):
        self.cfg = cfg or InstanceLabelerConfig()
        self.device = torch.device(device)
        self.sam = sam.to(self.device).eval()
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        # A call's memory is about 40 MB a prompt at SAM's size in fp32 (the decoder repeats the image
        # embedding per prompt): 256 prompts suit a GPU, the stock 64 a CPU.
        cuda = self.device.type == "cuda"
        self.points_per_batch = self.cfg.points_per_batch or (256 if cuda else 64)
        self.encoder_batch_size = self.cfg.encoder_batch_size or (4 if cuda else 1)
        self.point_grids = build_all_layer_point_grids(
            self.cfg.points_per_side, self.cfg.crop_n_layers, self.cfg.crop_n_points_downscale_factor
        )
        use_bf16 = self.cfg.bf16 and (cuda or self.cfg.bf16_on_cpu)
        self._autocast = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=use_bf16)
        # The decoder's activations are bf16 end to end (its per-prompt copies of the image embedding are
        # most of its memory traffic): a bf16 copy of its weights, fed bf16 embeddings.
        self.dtype = torch.bfloat16 if use_bf16 else torch.float32
        self.decoder = bf16_decoder(self.sam.mask_decoder) if use_bf16 else self.sam.mask_decoder
        self.compiled = cuda if self.cfg.compile is None else self.cfg.compile
        encoder = fused_encoder(self.sam.image_encoder) if self.cfg.fused_attention else self.sam.image_encoder
        self._encoder = torch.compile(encoder) if self.compiled else encoder
        self._decode = torch.compile(decode_points) if self.compiled else decode_points
        self._pin = cuda  # host buffers copied to the device without waiting (page-locked, non_blocking)
        self._taps: dict[tuple[int, ...], tuple] = {}  # axis_taps on the device, by sizes
        self.clock = StageClock()  # seconds per stage; benchmarks swap in a syncing clock

    def __call__(self, images: Sequence[np.ndarray]) -> list[list[dict]]:
        prepared = [self.prepare(image, i) for i, image in enumerate(images)]
        return [self.finish(result) for result in self.device_pass(prepared)]

    def prepare(self, image: np.ndarray, index: int = 0) -> PreparedImage:
        """The crops of an (H, W, 3) uint8 image resized for the encoder (CPU; safe in threads)."""
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
            raise ValueError(f"Image {index} must be an (H, W, 3) uint8 array, got {getattr(image, 'shape', image)!r}.")
        boxes, layers = generate_crop_boxes(image.shape[:2], self.cfg.crop_n_layers, self.cfg.crop_overlap_ratio)
        crops = []
        for (x0, y0, x1, y1), layer in zip(boxes, layers):
            crop = image[y0:y1, x0:x1]
            crops.append(PreparedCrop([x0, y0, x1, y1], layer, self.transform.apply_image(crop), crop.shape[:2]))
        return PreparedImage(image.shape[:2], crops)

    @torch.inference_mode()
    def device_pass(self, images: Iterable[PreparedImage]) -> Iterator[DeviceResult]:
        """The device's work for each image, yielded in order as soon as an image's crops are done.

        `images` is read lazily, `encoder_batch_size` crops at a time, so its preparation can run
        in other threads while the device works on earlier crops.
        """
        pending: dict[int, _Pending] = {}
        for wave in self._waves(images, pending):
            crops = [crop for _, crop in wave]
            with self.clock("encoder"):
                features = self._encode(crops)
            with self.clock("decoder"):
                candidates = self._decode_wave(features, crops)
            for (i, crop), (low, iou) in zip(wave, candidates):
                with self.clock("filter"):
                    kept, taps = self._crop_candidates(low, iou, crop, pending[i].image.size)
                pending[i].crops.append((crop, kept, taps))
                if len(pending[i].crops) == len(pending[i].image.crops):
                    with self.clock("masks"):
                        result = self._image_result(pending.pop(i))
                    yield result

    def _waves(self, images: Iterable[PreparedImage], pending: dict) -> Iterator[list[tuple[int, PreparedCrop]]]:
        """Lists of `encoder_batch_size` (image index, crop), the crops of all images in order."""
        wave = []
        for i, image in enumerate(images):
            pending[i] = _Pending(image)
            for crop in image.crops:
                wave.append((i, crop))
                if len(wave) == self.encoder_batch_size:
                    yield wave
                    wave = []
        if wave:
            yield wave

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device; on CUDA through page-locked memory, so the host does not wait."""
        if self._pin and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def _encode(self, crops: list[PreparedCrop]) -> torch.Tensor:
        """Image embeddings (encoder_batch_size, C, h, w) in the decoder's dtype; rows past len(crops)
        embed blank inputs."""
        size = self.sam.image_encoder.img_size
        pixels = torch.zeros(self.encoder_batch_size, size, size, 3, dtype=torch.uint8, pin_memory=self._pin)
        extent = torch.zeros(self.encoder_batch_size, 2, dtype=torch.int64, pin_memory=self._pin)
        for k, crop in enumerate(crops):
            h, w = crop.pixels.shape[:2]
            pixels[k, :h, :w] = torch.from_numpy(crop.pixels)
            extent[k, 0], extent[k, 1] = h, w
        x = self._to_device(pixels).permute(0, 3, 1, 2).float()  # (B, 3, size, size)
        extent = self._to_device(extent)
        # Normalised, and zero past each crop, exactly as SamPredictor's preprocess and padding do.
        x = (x - self.sam.pixel_mean) / self.sam.pixel_std
        ar = torch.arange(size, device=self.device)
        inside = (ar[None, :, None] < extent[:, 0, None, None]) & (ar[None, None, :] < extent[:, 1, None, None])
        batch = torch.where(inside[:, None], x, 0.0)
        with torch.autocast(**self._autocast):
            return self._encoder(batch).to(self.dtype)

    def _decode_wave(self, features: torch.Tensor, crops: list[PreparedCrop]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every point prompt of the wave's crops through the decoder (`_decode_calls`), then the
        predicted-IoU filter, which waits once for the number of survivors of each crop.

        Returns per crop its candidates' low-resolution logits (n, h, w) in the decoder's dtype and
        predicted IoUs (n,) float32, in the stock generator's order (prompt-major, three per prompt).
        """
        low, iou, bounds = self._decode_calls(features, crops)
        keep = iou > self.cfg.pred_iou_thresh if self.cfg.pred_iou_thresh > 0.0 else torch.ones_like(iou, dtype=torch.bool)
        counts = torch.stack([keep[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])]).tolist()  # the host waits
        out = []
        for a, b, count in zip(bounds[:-1], bounds[1:], counts):
            # The survivors' positions, in order, without another wait: a stable sort puts them first.
            index = torch.sort((~keep[a:b]).to(torch.uint8), stable=True).indices[:count] + a
            out.append((low.index_select(0, index), iou.index_select(0, index)))
        return out

    def _decode_calls(self, features: torch.Tensor, crops: list[PreparedCrop]) -> tuple[torch.Tensor, torch.Tensor, list]:
        """The decoder over every point prompt of the wave's crops, `points_per_batch` per call (the
        last padded), in the decoder's dtype (bf16 end to end on a GPU); queued without a host wait.

        Returns low-resolution logits (M, h, w), predicted IoUs (M,) float32 of all M = 3 x prompts
        candidates, prompt-major, and the bounds [0, ..., M] of each crop's candidates in them.
        """
        coords, owner = [], []
        for j, crop in enumerate(crops):
            points = self.point_grids[crop.layer] * np.array(crop.size)[None, ::-1]
            coords.append(self.transform.apply_coords(points, crop.size))
            owner.append(np.full(len(points), j))
        total, step = sum(map(len, coords)), self.points_per_batch
        padded = -(-total // step) * step
        all_coords = torch.zeros(padded, 2, dtype=torch.float64)  # float64, as the stock generator's
        all_owner = torch.zeros(padded, dtype=torch.int64)
        all_coords[:total] = torch.from_numpy(np.concatenate(coords))
        all_owner[:total] = torch.from_numpy(np.concatenate(owner))
        all_coords, all_owner = self._to_device(all_coords), self._to_device(all_owner)
        lows, ious = [], []
        for start in range(0, padded, step):
            low, iou = self._decode(self.sam, features, all_owner[start : start + step],
                                    all_coords[start : start + step], self.decoder)
            lows.append(low)
            ious.append(iou)
        low = torch.cat(lows)[:total].flatten(0, 1)  # (total * 3, h, w)
        iou = torch.cat(ious)[:total].flatten(0, 1).float()  # (total * 3,)
        return low, iou, [int(b) for b in np.cumsum([0] + [3 * len(c) for c in coords])]

    def _axis_taps(self, *sizes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`axis_taps(*sizes)` on the device, kept for the last TAPS_CACHE sizes (images share sizes)."""
        if sizes not in self._taps:
            if len(self._taps) >= TAPS_CACHE:
                del self._taps[next(iter(self._taps))]
            self._taps[sizes] = tuple(self._to_device(t) for t in axis_taps(*sizes))
        return self._taps[sizes]

    def _crop_candidates(self, low, iou, crop: PreparedCrop, image_size) -> tuple[_Candidates, tuple]:
        """A crop's candidates through the stability and crop-edge filters and box NMS."""
        cfg, model_len = self.cfg, self.sam.image_encoder.img_size
        input_size = crop.pixels.shape[:2]
        taps_y = self._axis_taps(low.shape[-2], model_len, input_size[0], crop.size[0])
        taps_x = self._axis_taps(low.shape[-1], model_len, input_size[1], crop.size[1])
        parts = [self._filter(low[lo : lo + FILTER_BATCH].float(), iou[lo : lo + FILTER_BATCH], taps_y, taps_x,
                              crop.box, image_size) for lo in range(0, len(iou), FILTER_BATCH)]
        if not parts:
            empty = torch.zeros(0, device=self.device)
            none = torch.zeros(0, 4, dtype=torch.int64, device=self.device)
            return _Candidates(low[:0].float(), empty, empty, none), (taps_y, taps_x)
        c = _Candidates.cat(parts)
        keep = batched_nms(c.boxes.float(), c.iou, torch.zeros_like(c.iou), iou_threshold=cfg.box_nms_thresh)
        return c.take(keep), (taps_y, taps_x)

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
        index = torch.nonzero(keep).squeeze(1)  # one host wait (a boolean index per tensor would be four)
        return _Candidates(low[index], iou[index], stability[index], boxes[index])

    def _image_result(self, image: _Pending) -> DeviceResult:
        """Upsample every kept mask of an image inside its box, find its RLE run boundaries, and
        bring everything back in one copy."""
        height, width = image.image.size
        metas, changes = [], []
        for j, (crop, c, (taps_y, taps_x)) in enumerate(image.crops):
            if not len(c.iou):
                continue
            x0, y0 = crop.box[0], crop.box[1]
            windows = torch.stack([c.boxes[:, 1], c.boxes[:, 0], c.boxes[:, 3] + 1, c.boxes[:, 2] + 1], 1)
            # An empty box (batched_mask_to_box's [0, 0, 0, 0]) may still be a one-pixel mask: it is
            # ambiguous, so such a mask gets the whole window above the threshold instead (computed for
            # all masks, cheap at low resolution: no host wait to pick them).
            empty = c.boxes.sum(1) == 0
            above = windows_above(c.low, self.sam.mask_threshold, taps_y[0], taps_x[0])
            windows = torch.where(empty[:, None], above, windows)
            # Masks of similar window sizes share a chunk (padded to its largest window): little waste.
            order = torch.argsort((windows[:, 2:] - windows[:, :2]).clamp_min(1).prod(1))
            areas = torch.zeros(len(windows), dtype=torch.int64, device=self.device)
            owners, positions = [], []
            for lo, hi in self._chunks(windows[order]):
                index = order[lo:hi]
                binary = self._binary_windows(c.low[index], taps_y, taps_x, windows[index])
                areas[index] = binary.flatten(1).sum(1)
                origins = windows[index, :2].clone()
                origins[:, 0] += y0
                origins[:, 1] += x0
                owner, position = window_changes(binary, origins, height, width)
                owners.append(index[owner])
                positions.append(position)
            owner, by_mask = torch.sort(torch.cat(owners), stable=True)  # back to the masks' order
            changes.append(torch.cat(positions)[by_mask])
            count = torch.bincount(owner, minlength=len(windows))
            boxes = c.boxes.clone()  # uncropped XYXY (scalar adds: no host-to-device copy)
            boxes[:, 0::2] += x0
            boxes[:, 1::2] += y0
            metas.append(torch.cat([torch.full_like(c.iou, j)[:, None], c.iou[:, None], c.stability[:, None],
                                    boxes.double(), areas[:, None].double(), count[:, None].double()], 1).double())
        meta = torch.cat(metas) if metas else torch.zeros(0, _META, dtype=torch.float64, device=self.device)
        packed = torch.cat([meta.flatten()] + [p.double() for p in changes])
        return DeviceResult((height, width), [crop.box for crop, _, _ in image.crops], packed.cpu().numpy(), len(meta))

    def _chunks(self, windows: torch.Tensor):
        """Index ranges whose padded windows hold at most `window_pixels` (at least one mask each)."""
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

    def _binary_windows(self, low, taps_y, taps_x, windows: torch.Tensor) -> torch.Tensor:
        """Masks (N, H, W) bool thresholded inside windows [r0, c0, r1, c1), H x W the largest,
        upsampled in row strips of at most `window_pixels` values."""
        n = len(windows)
        H = int((windows[:, 2] - windows[:, 0]).max().clamp_min(0))
        W = int((windows[:, 3] - windows[:, 1]).max().clamp_min(0))
        if H == 0 or W == 0:
            return torch.zeros(n, H, W, dtype=torch.bool, device=self.device)
        rows = max(1, self.cfg.window_pixels // (n * W))
        strips = []
        for top in range(0, H, rows):
            strip = windows.clone()
            strip[:, 0] = windows[:, 0] + top
            strip[:, 2] = torch.maximum(torch.minimum(windows[:, 2], strip[:, 0] + rows), strip[:, 0])
            values, valid = upsample_windows(low, taps_y, taps_x, strip)
            strips.append(((values > self.sam.mask_threshold) & valid)[:, :, :W])
        return torch.cat(strips, 1)

    def finish(self, result: DeviceResult) -> list[dict]:
        """The CPU half of an image (`finish_image`)."""
        return finish_image(self.cfg, result)


def finish_image(cfg: InstanceLabelerConfig, result: DeviceResult) -> list[dict]:
    """The CPU half of an image: RLE strings, cross-crop NMS (prefer smaller crops) and the
    small-region cleanup, as the stock generator orders them. A module-level function of picklable
    values, so the model actor can run it in processes of its own (`labelers.child_pool.FinishPool`)."""
    height, width = result.size
    meta = result.packed[: result.count * _META].reshape(result.count, _META)
    changes = result.packed[result.count * _META :].astype(np.int64)
    ends = np.cumsum(meta[:, 8].astype(np.int64))
    crops: list[tuple[list[int], list[dict]]] = [(box, []) for box in result.crop_boxes]
    for row, end in zip(meta, ends):
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
