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
- per crop, on the device (`_crop_masks`): the predicted-IoU filter, the exact stability score and
  box of each candidate computed only on the output tiles that can hold its pixels
  (`mask_postprocess.tile_stats`), the stability and crop-edge filters and box NMS; then only the
  kept masks are upsampled again, inside their boxes, and their COCO RLE run boundaries found
  (`mask_postprocess.window_changes`);
- one device-to-host copy per image brings them back as a `DeviceResult`, and `finish` (CPU,
  `instance_finish.finish_image`) writes the RLE strings, cross-crop NMS and the small-region cleanup.

On CUDA (`fixed_shapes`) every post-processing buffer has a size fixed by the configuration and
the image size (`Capacities`, grown when a crop needed more: it is then redone), box NMS keeps a
superset that `finish` completes, and an image's copy is started without a wait and read a wave
later: the host never waits inside a wave. On a CPU, where reading a size is free, sizes are read
(`nonzero`, torchvision's NMS, windows padded to the largest): the same records, less work.

Every encoder call holds exactly `encoder_batch_size` crops and every decoder call exactly
`points_per_batch` prompts (padding fills the last ones), so kernel shapes never depend on which
images share a call: an image's masks are the same alone or in any batch, bit for bit on one
machine (tests/test_instance_labeler.py). In fp32 they are the stock generator's masks, order,
scores and boxes (up to float rounding, which the tests bound); bf16 on a GPU trades that for
speed, within the tolerances tested there.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.amg import build_all_layer_point_grids, generate_crop_boxes
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.ops.boxes import batched_nms

from labeling.labelers.instance_finish import DeviceResult, finish_image
from labeling.labelers.mask_postprocess import (
    axis_taps,
    compact,
    near_crop_edge,
    nms_superset,
    tile_band,
    tile_stats,
    upsample_windows,
    window_changes,
    windows_above,
)
from labeling.labelers.sam_fast import bf16_decoder, decode_points, fused_encoder
from labeling.labelers.timing import StageClock

FILTER_BATCH = 1024  # candidates whose stability and boxes are computed together (bounds memory)
TAPS_CACHE = 256  # image sizes whose upsampling taps stay on the device
NMS_ROUNDS = 8  # fixed-point rounds of the device's box NMS in fixed shapes (even; `finish` completes it).
# On the tests' first 8 images (fp32, bf16), 4 rounds left 3 % and 11 % extra masks for `finish`; 8 none.


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
    fixed_shapes: bool | None = None  # post-processing in buffers of fixed sizes (`Capacities`), so that
    # the host waits once an image; None: on CUDA. On a CPU, where the host reading a size costs nothing,
    # sizes are read instead and no work goes into padding. The labels are the same either way.


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


@dataclass(frozen=True)
class Capacities:
    """Sizes of a crop's post-processing buffers when they are fixed (`InstanceLabeler.fixed_shapes`),
    one set per crop layer (deeper layers' crops are smaller). A crop that needs more is redone with
    the sizes grown (powers of two), which stay grown: no label depends on them, only the work does."""

    candidates: int = 1 << 10  # candidates past the predicted-IoU filter, per crop
    tiles: int = 1 << 16  # output tiles whose stability and box are evaluated, per FILTER_BATCH candidates
    masks: int = 128  # masks kept by the device's box NMS (`nms_superset`), per crop
    changes: int = 1 << 15  # RLE run boundaries, per chunk of masks (`window_pixels`)

    def grown(self, needs: np.ndarray) -> Capacities | None:
        """Capacities that hold `needs` (one per field, maxima over crops), or None when these do."""
        have = dataclasses.astuple(self)
        if all(int(n) <= c for n, c in zip(needs, have)):
            return None
        return Capacities(*(max(c, 1 << (int(n) - 1).bit_length()) for n, c in zip(needs, have)))


@dataclass
class _CropWork:
    """A crop's decoder outputs on the device and its post-processed buffers (`_crop_masks`)."""

    crop: PreparedCrop
    low: torch.Tensor  # (M, h, w) low-resolution logits of all its candidates, in the decoder's dtype
    iou: torch.Tensor  # (M,) float32 predicted IoUs
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # meta, changes, needs
    caps: Capacities | None = None  # the buffer sizes `out` was computed with (None: sizes read)


_NEEDS = 4  # capacities a crop needed, one per Capacities field


@dataclass
class _Pending:
    """An image whose crops are partly through the device."""

    image: PreparedImage
    crops: list[_CropWork] = field(default_factory=list)


@dataclass
class _Copy:
    """An image's buffers on their way to the host (`InstanceLabeler._copy`)."""

    image: _Pending
    host: torch.Tensor  # (total,) float64: every crop's meta, changes and needs, flattened
    done: torch.cuda.Event | None  # recorded after the copy on CUDA; None on a CPU


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
        self.fixed_shapes = cuda if self.cfg.fixed_shapes is None else self.cfg.fixed_shapes
        # Buffer sizes per crop layer, grown by `_collect`; None: sizes read on the host.
        self.capacities = {layer: Capacities() for layer in range(len(self.point_grids))} if self.fixed_shapes else None

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
        """The device's work for each image, yielded in order.

        `images` is read lazily, `encoder_batch_size` crops at a time, so its preparation can run
        in other threads while the device works on earlier crops. A wave (one encoder call, its
        decoder calls and its crops' post-processing) is queued whole; then each image it completes
        starts its one copy back to the host, which is read once the next wave's encoder and
        decoder calls are queued: the device has work while the host waits.
        """
        pending: dict[int, _Pending] = {}
        copies: deque[_Copy] = deque()
        for wave in self._waves(images, pending):
            crops = [crop for _, crop in wave]
            with self.clock("encoder"):
                features = self._encode(crops)
            with self.clock("decoder"):
                low, iou, bounds = self._decode_calls(features, crops)
            while copies:
                yield self._collect(copies.popleft())
            for (i, crop), a, b in zip(wave, bounds[:-1], bounds[1:]):
                work = _CropWork(crop, low[a:b], iou[a:b])
                image = pending[i]
                self._crop_masks(work, len(image.crops), image.image.size)
                image.crops.append(work)
                if len(image.crops) == len(image.image.crops):
                    copies.append(self._copy(pending.pop(i)))
        while copies:
            yield self._collect(copies.popleft())

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

    def _axis_taps(self, *sizes: int) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
        """`axis_taps(*sizes)` on the device and its `tile_band` (taken on the host), kept for the
        last TAPS_CACHE sizes (images share sizes)."""
        if sizes not in self._taps:
            if len(self._taps) >= TAPS_CACHE:
                del self._taps[next(iter(self._taps))]
            taps = axis_taps(*sizes)
            self._taps[sizes] = tuple(self._to_device(t) for t in taps), tile_band(taps[0])
        return self._taps[sizes]

    def _crop_taps(self, crop: PreparedCrop, low_size: torch.Size) -> tuple[tuple, tuple, int]:
        """The crop's upsampling taps along y and x (`axis_taps`) and the y taps' `tile_band`."""
        model_len, input_size = self.sam.image_encoder.img_size, crop.pixels.shape[:2]
        taps_y, band = self._axis_taps(low_size[0], model_len, input_size[0], crop.size[0])
        taps_x, _ = self._axis_taps(low_size[1], model_len, input_size[1], crop.size[1])
        return taps_y, taps_x, band

    def _crop_masks(self, work: _CropWork, index: int, image_size: tuple[int, int]) -> None:
        """One crop's masks from its decoder outputs (the crop is the image's `index`-th): the
        filters and box NMS (`_kept`), then the kept masks' RLE run boundaries (`_runs`). In fixed
        shapes (`fixed_shapes`), all on the device without a host wait, in buffers of the crop
        layer's `capacities` (recorded in `work.caps`).

        Sets work.out: meta (K, 9), changes (C,) and needs (_NEEDS,) float64: per mask slot [crop, iou,
        stability, x0, y0, x1, y1, area, changes] (crop -1 in a slot that holds none; the filled
        slots first), the masks' run boundaries in their order (C at least their total), and the
        capacities the crop needed (`Capacities`; zeros when sizes are read).
        """
        work.caps = self.capacities[work.crop.layer] if self.fixed_shapes else None
        caps = work.caps or Capacities(None, None, None, None)
        with self.clock("filter"):
            kept = self._kept(work, image_size, caps)
        with self.clock("masks"):
            work.out = self._runs(work.crop, index, image_size, caps, *kept)

    def _kept(self, work: _CropWork, image_size: tuple[int, int], caps: Capacities) -> tuple[torch.Tensor, ...]:
        """The predicted-IoU filter, exact stability scores and boxes evaluated only on the output
        tiles that can hold a candidate's pixels (`tile_stats`), the stability and crop-edge filters
        and box NMS. Returns the kept slots' filled flags (K,), logits (K, h, w) float32, IoUs,
        stability scores, boxes (K, 4) XYXY in the crop, and the capacities needed so far (3,)."""
        cfg, crop, threshold = self.cfg, work.crop, self.sam.mask_threshold
        taps_y, taps_x, band = self._crop_taps(crop, work.low.shape[-2:])
        passed = work.iou > cfg.pred_iou_thresh if cfg.pred_iou_thresh > 0.0 else torch.ones_like(work.iou, dtype=torch.bool)
        index, valid, candidates_need = compact(passed, caps.candidates)
        iou, offset = work.iou[index], cfg.stability_score_offset
        stats = [tile_stats(work.low[index[lo : lo + FILTER_BATCH]].float(), valid[lo : lo + FILTER_BATCH], taps_y,
                            taps_x, band, (threshold + offset, threshold - offset), threshold, caps.tiles,
                            cfg.window_pixels) for lo in range(0, max(len(index), 1), FILTER_BATCH)]
        counts, boxes = torch.cat([c for c, _, _ in stats], 1), torch.cat([b for _, b, _ in stats])
        stability = counts[0] / counts[1]  # NaN for an empty mask, as in the stock generator
        if cfg.stability_score_thresh > 0.0:
            valid = valid & (stability >= cfg.stability_score_thresh)
        valid = valid & ~near_crop_edge(boxes, crop.box, image_size)
        if caps.masks is None:  # torchvision's NMS, exact (its CUDA kernel would wait for the host)
            survivors = torch.nonzero(valid).squeeze(1)
            kept = survivors[batched_nms(boxes[survivors].float(), iou[survivors], torch.zeros_like(survivors),
                                         iou_threshold=cfg.box_nms_thresh)]
            filled, masks_need = torch.ones_like(kept, dtype=torch.bool), torch.tensor(len(kept), device=self.device)
        else:  # a superset of its result, as NMS orders it (`finish` completes it)
            order, superset = nms_superset(boxes, iou, valid, cfg.box_nms_thresh, NMS_ROUNDS)
            slot, filled, masks_need = compact(superset, caps.masks)
            kept = order[slot]
        needs = torch.stack([candidates_need, torch.stack([n for _, _, n in stats]).max(), masks_need])
        return filled, work.low[index[kept]].float(), iou[kept], stability[kept], boxes[kept], needs

    def _runs(self, crop: PreparedCrop, index: int, image_size: tuple[int, int], caps: Capacities,
              filled: torch.Tensor, low: torch.Tensor, iou: torch.Tensor, stability: torch.Tensor, boxes: torch.Tensor,
              needs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The kept masks (`_kept`) upsampled again inside their boxes, their areas and COCO RLE run
        boundaries (`window_changes`), and `_crop_masks`'s buffers."""
        height, width = image_size
        x0, y0 = crop.box[0], crop.box[1]
        taps_y, taps_x, _ = self._crop_taps(crop, low.shape[-2:])
        windows = torch.stack([boxes[:, 1], boxes[:, 0], boxes[:, 3] + 1, boxes[:, 2] + 1], 1)
        # An empty box (batched_mask_to_box's [0, 0, 0, 0]) may still be a one-pixel mask: it is
        # ambiguous, so such a mask gets the whole window above the threshold instead (computed for
        # all masks, cheap at low resolution: no host wait to pick them). A slot without a mask
        # gets an empty window.
        above = windows_above(low, self.sam.mask_threshold, taps_y[0], taps_x[0])
        windows = torch.where((boxes.sum(1) == 0)[:, None], above, windows)
        windows = torch.where(filled[:, None], windows, torch.zeros_like(windows))
        n = len(windows)
        if caps.changes is None:
            # Masks of similar window sizes share a chunk (padded to its largest window): little waste.
            order = torch.argsort((windows[:, 2:] - windows[:, :2]).clamp_min(1).prod(1))
            chunks, shape = list(self._chunks(windows[order])), None
        else:  # every window padded to the crop (the largest it can be), a fixed number per chunk
            order, step = torch.arange(n, device=self.device), max(1, self.cfg.window_pixels // (crop.size[0] * crop.size[1]))
            chunks, shape = [(lo, min(lo + step, n)) for lo in range(0, n, step)], crop.size
        areas = torch.zeros(n, dtype=torch.int64, device=self.device)
        owners, positions, keeps, changes_need = [], [], [], [torch.zeros((), dtype=torch.int64, device=self.device)]
        for lo, hi in chunks:
            chunk = order[lo:hi]
            binary = self._binary_windows(low[chunk], taps_y, taps_x, windows[chunk], shape)
            areas.index_copy_(0, chunk, binary.flatten(1).sum(1))
            origins = windows[chunk, :2].clone()
            origins[:, 0] += y0
            origins[:, 1] += x0
            owner, position, keep, need = window_changes(binary, origins, height, width, caps.changes)
            owners.append(chunk[owner])
            positions.append(position)
            keeps.append(keep)
            changes_need.append(need)
        owner, keep = torch.cat(owners) if owners else areas[:0], torch.cat(keeps) if keeps else filled[:0]
        # The kept changes first, by mask (stable: each mask's positions stay in order).
        by_mask = torch.sort(torch.where(keep, owner, n), stable=True).indices
        changes = torch.cat(positions)[by_mask] if positions else areas[:0]
        count = torch.zeros(n, dtype=torch.int64, device=self.device).index_add_(0, owner, keep.long())
        boxes = boxes.clone()  # uncropped XYXY (scalar adds: no host-to-device copy)
        boxes[:, 0::2] += x0
        boxes[:, 1::2] += y0
        which = torch.full_like(iou, index, dtype=torch.float64).masked_fill_(~filled, -1)  # no host-to-device copy
        meta = torch.cat([which[:, None], iou[:, None].double(),
                          stability[:, None].double(), boxes.double(), areas[:, None].double(),
                          count[:, None].double()], 1)
        needs = torch.cat([needs, torch.stack(changes_need).max()[None]])
        return meta, changes.double(), needs.double()

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

    def _binary_windows(self, low, taps_y, taps_x, windows: torch.Tensor, shape: tuple[int, int] | None) -> torch.Tensor:
        """Masks (N, H, W) bool thresholded inside windows [r0, c0, r1, c1), (H, W) = `shape` or,
        given None, the largest window's; upsampled in row strips of at most `window_pixels` values."""
        n = len(windows)
        if shape is None:
            shape = (int((windows[:, 2] - windows[:, 0]).max().clamp_min(0)),
                     int((windows[:, 3] - windows[:, 1]).max().clamp_min(0)))
        H, W = shape
        if H == 0 or W == 0:
            return torch.zeros(n, H, W, dtype=torch.bool, device=self.device)
        rows = max(1, self.cfg.window_pixels // (n * W))
        strips = []
        for top in range(0, H, rows):
            strip = windows.clone()
            strip[:, 0] = windows[:, 0] + top
            strip[:, 2] = torch.maximum(torch.minimum(windows[:, 2], strip[:, 0] + rows), strip[:, 0])
            values, valid = upsample_windows(low, taps_y, taps_x, strip, (min(rows, H - top), W))
            strips.append((values > self.sam.mask_threshold) & valid)
        return torch.cat(strips, 1)

    def _copy(self, image: _Pending) -> _Copy:
        """Start the one copy of an image's buffers to the host (on CUDA into page-locked memory,
        without a wait); `_collect` reads it."""
        with self.clock("masks"):
            packed = torch.cat([t.flatten() for work in image.crops for t in work.out])
            if self.device.type != "cuda":
                return _Copy(image, packed, None)
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        return _Copy(image, host, done)

    def _collect(self, copy: _Copy) -> DeviceResult:
        """An image's buffers on the host (the wait), as a `DeviceResult`. If a crop needed larger
        buffers than it was computed with, its layer's `capacities` grow (and stay grown), the crop
        is redone and the image copied again."""
        image = copy.image
        with self.clock("masks"):
            if copy.done is not None:
                copy.done.synchronize()
            crops = self._unpack(image, copy.host.numpy())
            # A crop that needed more than the buffers it was computed with (the layer's capacities
            # then, which an earlier image may have grown since) is redone with the capacities grown.
            redo = [j for j, (work, (_, _, needs)) in enumerate(zip(image.crops, crops))
                    if work.caps is not None and work.caps.grown(needs) is not None]
            while redo:
                for j in redo:
                    work, needs = image.crops[j], crops[j][2]
                    layer = work.crop.layer
                    self.capacities[layer] = self.capacities[layer].grown(needs) or self.capacities[layer]
                    self._crop_masks(work, j, image.image.size)
                crops = self._unpack(image, torch.cat([t.flatten() for w in image.crops for t in w.out]).cpu().numpy())
                redo = [j for j in redo if image.crops[j].caps.grown(crops[j][2]) is not None]
        metas, changes = [], []
        for meta, change, _ in crops:
            meta = meta[meta[:, 0] >= 0]  # the filled slots (they come first)
            metas.append(meta)
            changes.append(change[: int(meta[:, 8].sum())])
        meta = np.concatenate(metas)
        return DeviceResult(image.image.size, [work.crop.box for work in image.crops],
                            np.concatenate([meta.ravel()] + changes), len(meta))

    @staticmethod
    def _unpack(image: _Pending, packed: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per crop (meta, changes, needs) from an image's packed buffers (`_copy`)."""
        out, at = [], 0
        for work in image.crops:
            parts = []
            for t in work.out:
                parts.append(packed[at : at + t.numel()].reshape(t.shape))
                at += t.numel()
            out.append(tuple(parts))
        return out

    def finish(self, result: DeviceResult) -> list[dict]:
        """The CPU half of an image (`finish_image`)."""
        return finish_image(self.cfg, result)
