"""Exact SAM mask upsampling inside windows, and RLE straight from a window.

SAM's stock generator upsamples every low-resolution mask (256 x 256 for SAM) twice over the whole
canvas: bilinearly to the encoder's square input (1024 x 1024), crops away the padding, then
bilinearly to the image size. Each output pixel is therefore a fixed convex combination of at most
4 x 4 low-resolution values. `axis_taps` precomputes, per axis, those (index, weight) pairs with
PyTorch's own `align_corners=False` arithmetic, and `upsample_windows` evaluates the composition only
inside a window per mask: the same values up to float rounding, without the 1024 x 1024
intermediate or the full canvas. Because the result is a convex combination of its taps, a pixel
can exceed a threshold only where one of its low-resolution taps does; `windows_above` turns that
into a window that provably holds every such pixel.

Every function here also runs in fixed shapes, so that a GPU never has to tell the host a size
before an image is done: given a `capacity` (or a fixed window `shape`), `compact` stands in for
`nonzero` and boolean indexing (a buffer of that size, which slots are filled, and the count that
was needed: the caller grows the capacity and runs again when it did not fit), and `nms_superset`
for torchvision's NMS (whose CUDA kernel reads its overlap mask back to the host). Given None, the
size is read instead: free on a CPU, where the host is the device, and no work is spent on padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import box_iou

TILE = 16  # output pixels per tile side in `tile_stats`


def linear_taps(in_len: int, out_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's bilinear (align_corners=False) source indices (out_len, 2) and weights (out_len, 2)."""
    dst = torch.arange(out_len, dtype=torch.int64)
    if in_len == out_len:
        return torch.stack([dst, dst], 1), torch.tensor([[1.0, 0.0]]).expand(out_len, 2).clone()
    ratio = torch.tensor(in_len, dtype=torch.float32) / out_len  # float32 as in the CPU/CUDA kernels
    src = (ratio * (dst.float() + 0.5) - 0.5).clamp_min(0)
    i0 = src.long().clamp_max(in_len - 1)
    lam1 = (src - i0.float()).clamp(0, 1)
    i1 = i0 + (i0 < in_len - 1).long()
    return torch.stack([i0, i1], 1), torch.stack([1 - lam1, lam1], 1)


def axis_taps(low_len: int, model_len: int, input_len: int, out_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Composite taps of SAM's two-stage upsampling along one axis.

    low_len (mask decoder output, 256 for SAM) -> model_len (encoder input, 1024) -> crop to
    input_len (the resized image inside the padded input) -> out_len (the image).
    Returns indices (out_len, 4) into the low-resolution axis, non-decreasing along both dims, and
    float32 weights (out_len, 4).
    """
    i1, w1 = linear_taps(low_len, model_len)  # (model_len, 2)
    i2, w2 = linear_taps(input_len, out_len)  # (out_len, 2) into [0, input_len)
    index = i1[i2].reshape(out_len, 4)  # [stage-1 taps of i2[:, 0], stage-1 taps of i2[:, 1]]
    weight = (w2[:, :, None] * w1[i2]).reshape(out_len, 4)
    return index, weight


def windows_above(low: torch.Tensor, threshold: float, taps_y: torch.Tensor, taps_x: torch.Tensor) -> torch.Tensor:
    """Per mask, the output window [r0, c0, r1, c1) outside which the upsampled mask is <= threshold.

    low: (N, h, w) low-resolution logits; taps_*: index tensors from `axis_taps`.
    Returns (N, 4) int64; an empty window (r1 == r0) where no low-resolution value exceeds it.
    """
    above = low > threshold
    rows, cols = above.any(2), above.any(1)  # (N, h), (N, w)
    out = []
    for any_, taps in ((rows, taps_y), (cols, taps_x)):
        n_low = any_.shape[1]
        ar = torch.arange(n_low, device=low.device)
        first = torch.where(any_, ar, n_low).amin(1)  # (N,) first low index above, n_low if none
        last = torch.where(any_, ar, -1).amax(1)
        # An output position can see index range [taps.min, taps.max]; both bounds are monotone.
        start = torch.searchsorted(taps[:, -1].contiguous(), first.contiguous())
        stop = torch.searchsorted(taps[:, 0].contiguous(), last.contiguous(), right=True)
        stop = torch.where(last < 0, start, stop.clamp_min(start))
        out.append((start, stop))
    (r0, r1), (c0, c1) = out
    return torch.stack([r0, c0, r1, c1], 1)


def compact(flags: torch.Tensor, capacity: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The positions of the True entries of a 1-D bool tensor, in order, in `capacity` slots.

    Returns index (capacity,) int64 padded with 0, filled (capacity,) bool (which slots hold one)
    and need, a 0-dim int64: how many entries are True (above `capacity` when some did not fit).
    capacity None: exactly the True entries (`nonzero`: the size is read on the host).
    """
    if capacity is None:
        index = torch.nonzero(flags).squeeze(1)
        return index, torch.ones_like(index, dtype=torch.bool), torch.tensor(len(index), device=flags.device)
    rank = flags.long().cumsum(0) - 1
    slot = torch.where(flags & (rank < capacity), rank, capacity)  # the others land in a spare slot
    index = torch.zeros(capacity + 1, dtype=torch.int64, device=flags.device)
    index.scatter_(0, slot, torch.arange(flags.shape[0], device=flags.device))
    need = flags.sum()
    return index[:capacity], torch.arange(capacity, device=flags.device) < need, need


def tile_band(index: torch.Tensor) -> int:
    """The most low-resolution rows that the taps of one `TILE`-row band of output rows read.
    index: (out_len, 4) from `axis_taps`, on the CPU (computed once per size, so that the device
    never has to report it)."""
    starts, ends = _tile_ranges(index.shape[0], index.device)
    return int((index[ends, -1] - index[starts, 0]).max()) + 1


def _tile_ranges(n_out: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last output index of each tile along an axis of n_out outputs."""
    starts = torch.arange(0, n_out, TILE, device=device)
    return starts, (starts + TILE).clamp_max(n_out) - 1


def upsample_windows(low: torch.Tensor, taps_y: tuple[torch.Tensor, torch.Tensor],
                     taps_x: tuple[torch.Tensor, torch.Tensor], windows: torch.Tensor,
                     shape: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Upsampled logits of each mask inside its window, padded to `shape` (H, W) or, given None, to
    the largest window (its size read on the host).

    low: (N, h, w) float32; taps_*: (index, weight) from `axis_taps`; windows: (N, 4) [r0, c0, r1, c1),
    no larger than `shape`. Returns values (N, H, W) and a validity mask (N, H, W) bool. A pixel's
    value does not depend on the padding.
    """
    n, h_low, _ = low.shape
    r0, c0 = windows[:, 0], windows[:, 1]
    heights, widths = windows[:, 2] - r0, windows[:, 3] - c0
    if shape is None:
        shape = int(heights.max().clamp_min(1)), int(widths.max().clamp_min(1))
    H, W = shape
    ar_h, ar_w = torch.arange(H, device=low.device), torch.arange(W, device=low.device)
    rows = (r0[:, None] + ar_h).clamp_max(taps_y[0].shape[0] - 1)  # (N, H)
    cols = (c0[:, None] + ar_w).clamp_max(taps_x[0].shape[0] - 1)  # (N, W)
    iy, wy = taps_y[0][rows], taps_y[1][rows]  # (N, H, 4)
    ix, wx = taps_x[0][cols], taps_x[1][cols]  # (N, W, 4)
    # Whole-row copies (index_select) instead of per-element gathers: along x on the transposed
    # masks, then along y.
    w_low = low.shape[2]
    low_t = low.transpose(1, 2).reshape(n * w_low, h_low)
    base = torch.arange(n, device=low.device)[:, None]
    across = torch.zeros(n, W, h_low, device=low.device, dtype=torch.float32)
    for t in range(4):
        across += wx[:, :, t, None] * low_t.index_select(0, (base * w_low + ix[:, :, t]).flatten()).view(n, W, h_low)
    across = across.transpose(1, 2).reshape(n * h_low, W)
    values = torch.zeros(n, H, W, device=low.device, dtype=torch.float32)
    for t in range(4):
        values += wy[:, :, t, None] * across.index_select(0, (base * h_low + iy[:, :, t]).flatten()).view(n, H, W)
    valid = (ar_h[None, :, None] < heights[:, None, None]) & (ar_w[None, None, :] < widths[:, None, None])
    return values, valid


def _tiles(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output tiles along one axis: first output index, and the low-resolution range [lo, hi] that
    the tile's taps read (monotone taps: the first output's lowest tap, the last output's highest)."""
    starts, ends = _tile_ranges(index.shape[0], index.device)
    return starts, index[starts, 0], index[ends, -1]


def tile_stats(low: torch.Tensor, valid: torch.Tensor, taps_y: tuple[torch.Tensor, torch.Tensor],
               taps_x: tuple[torch.Tensor, torch.Tensor], band: int, thresholds: Sequence[float], box_threshold: float,
               capacity: int | None = None, max_pixels: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact pixel counts above each threshold and the box above `box_threshold` of every valid
    upsampled mask, evaluating only the output tiles whose low-resolution taps exceed the smallest
    threshold, in `capacity` tile slots (`compact`).

    low: (N, h, w) float32 logits; valid: (N,) bool; taps_*: (index, weight) from `axis_taps`;
    band: `tile_band(taps_y[0])`. Returns counts (len(thresholds), N) int64, boxes (N, 4) XYXY int64
    (inclusive max, zeros when nothing is above `box_threshold`, as segment_anything's
    batched_mask_to_box; zeros and no counts for invalid masks) and need (0-dim int64), the tiles
    to evaluate: above `capacity`, the results are incomplete and the caller runs again with more.
    """
    n, h, w = low.shape
    device = low.device
    tile = TILE
    (iy_all, wy_all), (ix_all, wx_all) = taps_y, taps_x
    start_y, lo_y, hi_y = _tiles(iy_all)
    start_x, lo_x, hi_x = _tiles(ix_all)
    n_y, n_x = start_y.shape[0], start_x.shape[0]
    floor = min(min(thresholds), box_threshold)
    above = torch.zeros(n, h + 1, w + 1, dtype=torch.int32, device=device)  # integral image of low > floor
    above[:, 1:, 1:] = (low > floor).int().cumsum(1).cumsum(2)
    a, b = above[:, hi_y + 1], above[:, lo_y]  # (N, Ty, w + 1)
    inside = a[:, :, hi_x + 1] - b[:, :, hi_x + 1] - a[:, :, lo_x] + b[:, :, lo_x]  # (N, Ty, Tx)
    index, filled, need = compact(((inside > 0) & valid[:, None, None]).flatten(), capacity)
    mask_i, tile_y, tile_x = index // (n_y * n_x), index // n_x % n_y, index % n_x
    counts = torch.zeros(len(thresholds), n, dtype=torch.int64, device=device)
    big = torch.iinfo(torch.int64).max
    top = torch.full((n,), big, dtype=torch.int64, device=device)
    left = torch.full((n,), big, dtype=torch.int64, device=device)
    bottom = torch.full((n,), -1, dtype=torch.int64, device=device)
    right = torch.full((n,), -1, dtype=torch.int64, device=device)
    ar_t, ar_band = torch.arange(tile, device=device), torch.arange(band, device=device)
    flat = low.reshape(n * h, w)
    step = max(1, max_pixels // (tile * tile))
    for s in range(0, len(mask_i), step):
        m, ty, tx = mask_i[s : s + step], tile_y[s : s + step], tile_x[s : s + step]
        k = len(m)
        rows, cols = start_y[ty][:, None] + ar_t, start_x[tx][:, None] + ar_t  # (K, tile)
        valid_r, valid_c = rows < iy_all.shape[0], cols < ix_all.shape[0]
        rows, cols = rows.clamp_max(iy_all.shape[0] - 1), cols.clamp_max(ix_all.shape[0] - 1)
        band_rows = (lo_y[ty][:, None] + ar_band).clamp_max(h - 1)  # (K, band)
        strip = flat.index_select(0, (m[:, None] * h + band_rows).flatten()).view(k, band, w)
        ix, wx = ix_all[cols], wx_all[cols]  # (K, tile, 4)
        across = torch.zeros(k, band, tile, device=device)
        for t in range(4):
            across += wx[:, None, :, t] * torch.gather(strip, 2, ix[:, None, :, t].expand(k, band, tile))
        iy, wy = iy_all[rows] - lo_y[ty][:, None, None], wy_all[rows]  # (K, tile, 4), rows relative to the band
        values = torch.zeros(k, tile, tile, device=device)
        for t in range(4):
            values += wy[:, :, t, None] * torch.gather(across, 1, iy[:, :, t, None].expand(k, tile, tile))
        inside = valid_r[:, :, None] & valid_c[:, None, :] & filled[s : s + step, None, None]
        values.masked_fill_(~inside, -torch.inf)  # past the image's edge, or an empty slot
        for j, threshold in enumerate(thresholds):  # a tile's count is <= 256: exact in float32, faster to sum
            counts[j].index_add_(0, m, (values > threshold).flatten(1).float().sum(1).long())
        positive = values > box_threshold
        any_r, any_c = positive.any(2), positive.any(1)  # (K, tile)
        # A tile without a positive pixel gives the reductions' identities (big, -1): no compaction
        # (a host wait on a GPU) is needed to leave it out.
        tile_top = torch.where(any_r, rows, big).amin(1)
        tile_bottom = torch.where(any_r, rows, -1).amax(1)
        tile_left = torch.where(any_c, cols, big).amin(1)
        tile_right = torch.where(any_c, cols, -1).amax(1)
        top.scatter_reduce_(0, m, tile_top, "amin")
        bottom.scatter_reduce_(0, m, tile_bottom, "amax")
        left.scatter_reduce_(0, m, tile_left, "amin")
        right.scatter_reduce_(0, m, tile_right, "amax")
    boxes = torch.stack([left, top, right, bottom], 1)
    return counts, torch.where((bottom >= 0)[:, None], boxes, torch.zeros_like(boxes)), need


def window_changes(binary: torch.Tensor, origins: torch.Tensor, height: int, width: int,
                   capacity: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each of N windowed masks changes value, as indices into its column-major canvas.

    binary: (N, H, W) bool, mask n in the top-left of its slot and False elsewhere; origins: (N, 2)
    int64 (row, column) of each slot's top-left in the (height, width) canvas, which is False
    outside the slot. A change is a flat index where mask `owner` differs from the pixel before it
    (the first pixel counts as preceded by a 0); COCO RLE counts are the differences of
    [0, positions..., height * width] (`rle_from_changes`). Nothing canvas-sized is allocated.

    Returns owner (C,), position (C,) int64 and keep (C,) bool: the changes are the kept slots, in
    order of owner then position; and need (0-dim int64), the slots used, above `capacity` when
    some did not fit (C = capacity; capacity None: C = need, `compact`).
    """
    n, h, w = binary.shape
    padded = torch.zeros(n, w, h + 2, dtype=torch.int8, device=binary.device)  # column-major, a 0 row at each end
    padded[:, :, 1:-1] = binary.transpose(1, 2).to(torch.int8)
    flat = padded.view(n, -1)
    length = flat.shape[1] - 1
    slot, filled, need = compact((flat[:, 1:] != flat[:, :-1]).flatten(), capacity)
    owner, index = slot // length, slot % length + 1  # the first position of each new run
    col, row = index // (h + 2), index % (h + 2)
    position = (origins[owner, 1] + col) * height + (origins[owner, 0] - 1 + row)
    # A run that reaches the canvas's bottom ends where the next column's top starts: if a run starts
    # there too, the two changes cancel. A run that ends with the canvas needs no end.
    same = (position[1:] == position[:-1]) & (owner[1:] == owner[:-1]) & filled[1:]
    cancelled = torch.cat([same, same.new_zeros(1)]) | torch.cat([same.new_zeros(1), same])
    return owner, position, filled & ~cancelled & (position < height * width), need


def rle_from_changes(positions: np.ndarray, height: int, width: int) -> dict:
    """COCO RLE ({"size": [h, w], "counts": str}) from a mask's change positions (`window_changes`)."""
    counts = np.diff(np.concatenate([[0], positions, [height * width]])).tolist()
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("utf-8")}


def window_rle(binary: torch.Tensor, r0: int, c0: int, height: int, width: int) -> dict:
    """COCO RLE of a (height, width) canvas that is zero outside the window binary (H, W) placed at
    row r0, column c0; never materialises the canvas."""
    origin = torch.tensor([[r0, c0]], device=binary.device)
    _, positions, keep, _ = window_changes(binary[None].bool(), origin, height, width)
    return rle_from_changes(positions[keep].cpu().numpy(), height, width)


def near_crop_edge(boxes: torch.Tensor, crop_box: Sequence[int], image_size: tuple[int, int],
                   atol: float = 20.0) -> torch.Tensor:
    """segment_anything's `is_box_near_crop_edge` for (N, 4) XYXY boxes in the crop's frame: near an
    edge of the crop that is not the image's. The same arithmetic with Python scalars where the
    stock builds small tensors from lists, each a blocking host-to-device copy on a GPU."""
    x0, y0 = crop_box[0], crop_box[1]
    image_box = (0, 0, image_size[1], image_size[0])
    near = []
    for i, offset in enumerate((x0, y0, x0, y0)):
        uncropped = (boxes[:, i] + offset).float()
        near.append(((uncropped - crop_box[i]).abs() <= atol) & ~((uncropped - image_box[i]).abs() <= atol))
    return torch.stack(near, 1).any(1)


def nms_superset(boxes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor, threshold: float,
                 rounds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy box NMS as torchvision's `nms` decides it (by descending score, ties in index order;
    IoU above `threshold` suppresses), run as `rounds` fixed-point steps on the device: no host wait.

    Greedy keeps i when i is valid and no kept box before i overlaps it. Iterating that rule from
    "every valid box" reverses inclusion at each step, and greedy's result is its fixed point, so
    after an even number of rounds the kept set holds greedy's result, and equals it once the rounds
    exceed the longest chain of suppressions. Greedy NMS over any such superset gives greedy's
    result again: `InstanceLabeler.finish` completes it on the host, where it is cheap.

    boxes: (N, 4) XYXY; scores, valid: (N,). Returns order (N,) int64, the boxes by descending
    score with the invalid ones last, and keep (N,) bool in that order.
    """
    if rounds % 2:
        raise ValueError(f"nms_superset needs an even number of rounds, got {rounds}.")
    order = torch.sort(torch.where(valid, scores, -torch.inf), descending=True, stable=True).indices
    ordered, ok = boxes[order].float(), valid[order]
    ar = torch.arange(len(order), device=boxes.device)
    suppresses = (box_iou(ordered, ordered) > _float32_below(threshold)) & (ar[:, None] < ar[None, :]) & ok[:, None]
    keep = ok
    for _ in range(rounds):
        keep = ok & ~(suppresses & keep[:, None]).any(0)
    return order, keep


def _float32_below(value: float) -> float:
    """The largest float32 <= value: a float32 x exceeds it exactly when x > value (torchvision's
    `nms` compares in double; a tensor compares with the scalar cast to float32)."""
    rounded = np.float32(value)
    return float(np.nextafter(rounded, np.float32(-np.inf)) if rounded > value else rounded)
