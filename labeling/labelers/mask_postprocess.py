"""Exact SAM mask upsampling on output tiles, stability, boxes, box NMS and RLE, in fixed shapes.

SAM's stock generator upsamples every low-resolution mask (256 x 256 for SAM) twice over the whole
canvas: bilinearly to the encoder's square input (1024 x 1024), crops away the padding, then
bilinearly to the image size. Each output pixel is therefore a fixed convex combination of at most
4 x 4 low-resolution values. `axis_taps` precomputes, per axis, those (index, weight) pairs with
PyTorch's own `align_corners=False` arithmetic, and `tile_values` evaluates the composition on
16 x 16 output tiles only: the same values up to float rounding, without the 1024 x 1024
intermediate or the full canvas. Because the result is a convex combination of its taps, a pixel
can exceed a threshold only where one of its low-resolution taps does: `tile_stats` evaluates only
such tiles (stability counts and boxes), `windows_above` bounds the pixels above a threshold.

Everything a labeler runs on the device here has shapes fixed by its arguments, never by the data,
so a GPU never has to tell the host a size: `compact` replaces `nonzero` and boolean indexing with
buffers of a given capacity plus the count they needed (the caller grows the capacity and runs
again when a count exceeds it), `nms_superset` replaces torchvision's NMS (whose CUDA kernel reads
its overlap mask back to the host), and `tile_changes` finds the RLE run boundaries of the kept
masks into a buffer of change slots.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import box_iou


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


TILE = 16  # output pixels per tile side


def compact(flags: torch.Tensor, capacity: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The positions of the first `capacity` True entries of a 1-D bool tensor, in order.

    Returns index (capacity,) int64 padded with 0, filled (capacity,) bool (which slots hold one)
    and need, a 0-dim int64: how many entries are True (above `capacity` when some did not fit).
    Fixed shapes: `torch.nonzero` or boolean indexing make the host wait to learn the size.
    capacity None: exactly the True entries' count, read on the host (for a CPU, where reading
    costs nothing and padding would be wasted work).
    """
    capacity = int(flags.sum()) if capacity is None else capacity
    rank = flags.long().cumsum(0) - 1
    slot = torch.where(flags & (rank < capacity), rank, capacity)  # the others land in a spare slot
    index = torch.zeros(capacity + 1, dtype=torch.int64, device=flags.device)
    index.scatter_(0, slot, torch.arange(flags.shape[0], device=flags.device))
    need = flags.sum()
    return index[:capacity], torch.arange(capacity, device=flags.device) < need, need


def tile_band(index: torch.Tensor, first: int = 0, rows: int = TILE) -> int:
    """The most low-resolution rows that the taps of `rows` output rows starting at TILE * k + first
    read, over k. index: (out_len, 4) from `axis_taps`, on the CPU (the labeler computes it once
    per size, so the device never has to report it)."""
    n = index.shape[0]
    starts = torch.arange(0, n, TILE) + first
    lo, hi = index[starts.clamp(0, n - 1), 0], index[(starts + rows - 1).clamp(0, n - 1), -1]
    return int((hi - lo).max()) + 1


def tile_values(flat: torch.Tensor, h: int, m: torch.Tensor, top: torch.Tensor, left: torch.Tensor,
                taps_y: tuple[torch.Tensor, torch.Tensor], taps_x: tuple[torch.Tensor, torch.Tensor], band: int,
                rows: int) -> torch.Tensor:
    """Upsampled logits of K tiles: output rows top..top + rows - 1, columns left..left + TILE - 1 of
    mask m, through the taps in the stock order (along x, then y).

    flat: (N * h, w) float32 low-resolution logits; m, top, left: (K,) int64; band: `tile_band` for
    these rows. Returns (K, rows, TILE) float32, -inf at rows or columns outside the output.
    """
    (iy_all, wy_all), (ix_all, wx_all) = taps_y, taps_x
    k, w, device = m.shape[0], flat.shape[1], flat.device
    out_h, out_w = iy_all.shape[0], ix_all.shape[0]
    row = top[:, None] + torch.arange(rows, device=device)  # (K, rows)
    col = left[:, None] + torch.arange(TILE, device=device)  # (K, TILE)
    inside = ((row >= 0) & (row < out_h))[:, :, None] & ((col >= 0) & (col < out_w))[:, None, :]
    row, col = row.clamp(0, out_h - 1), col.clamp(0, out_w - 1)
    lo = iy_all[row[:, 0], 0]  # the first low row the tile reads (taps are monotone)
    band_rows = (lo[:, None] + torch.arange(band, device=device)).clamp_max(h - 1)  # (K, band)
    strip = flat.index_select(0, (m[:, None] * h + band_rows).flatten()).view(k, band, w)
    ix, wx = ix_all[col], wx_all[col]  # (K, TILE, 4)
    across = torch.zeros(k, band, TILE, device=device)
    for t in range(4):
        across += wx[:, None, :, t] * torch.gather(strip, 2, ix[:, None, :, t].expand(k, band, TILE))
    iy, wy = iy_all[row] - lo[:, None, None], wy_all[row]  # (K, rows, 4), rows relative to the band
    values = torch.zeros(k, rows, TILE, device=device)
    for t in range(4):
        values += wy[:, :, t, None] * torch.gather(across, 1, iy[:, :, t, None].expand(k, rows, TILE))
    return values.masked_fill_(~inside, -torch.inf)


def _tiles(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output tiles along one axis: first output index, and the low-resolution range [lo, hi] that
    the tile's taps read (monotone taps: the first output's lowest tap, the last output's highest)."""
    n_out = index.shape[0]
    starts = torch.arange(0, n_out, TILE, device=index.device)
    ends = (starts + TILE).clamp_max(n_out) - 1
    return starts, index[starts, 0], index[ends, -1]


def tile_stats(low: torch.Tensor, valid: torch.Tensor, taps_y: tuple[torch.Tensor, torch.Tensor],
               taps_x: tuple[torch.Tensor, torch.Tensor], band: int, thresholds: Sequence[float],
               box_threshold: float, capacity: int | None, step: int = 1 << 14) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact pixel counts above each threshold and the box above `box_threshold` of every valid
    upsampled mask, evaluating only the output tiles whose low-resolution taps exceed the smallest
    threshold, at most `capacity` of them (fixed shapes: no host wait).

    low: (N, h, w) float32 logits; valid: (N,) bool; taps_*: (index, weight) from `axis_taps`;
    band: `tile_band(taps_y[0])`. Returns counts (len(thresholds), N) int64, boxes (N, 4) XYXY int64
    (inclusive max, zeros when nothing is above `box_threshold`, as segment_anything's
    batched_mask_to_box; zeros for invalid masks) and need (0-dim int64), the tiles to evaluate:
    above `capacity`, the results are incomplete and the caller runs again with more.
    """
    n, h, w = low.shape
    device = low.device
    start_y, lo_y, hi_y = _tiles(taps_y[0])
    start_x, lo_x, hi_x = _tiles(taps_x[0])
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
    ar_t = torch.arange(TILE, device=device)
    flat = low.reshape(n * h, w)
    for s in range(0, len(index), step):
        m, ty, tx = mask_i[s : s + step], tile_y[s : s + step], tile_x[s : s + step]
        values = tile_values(flat, h, m, start_y[ty], start_x[tx], taps_y, taps_x, band, TILE)
        values.masked_fill_(~filled[s : s + step, None, None], -torch.inf)  # an empty slot counts nothing
        for j, threshold in enumerate(thresholds):  # a tile's count is <= 256: exact in float32, faster to sum
            counts[j].index_add_(0, m, (values > threshold).flatten(1).float().sum(1).long())
        positive = values > box_threshold
        any_r, any_c = positive.any(2), positive.any(1)  # (K, TILE)
        rows, cols = start_y[ty][:, None] + ar_t, start_x[tx][:, None] + ar_t  # (K, TILE)
        # A tile without a positive pixel gives the reductions' identities (big, -1).
        top.scatter_reduce_(0, m, torch.where(any_r, rows, big).amin(1), "amin")
        bottom.scatter_reduce_(0, m, torch.where(any_r, rows, -1).amax(1), "amax")
        left.scatter_reduce_(0, m, torch.where(any_c, cols, big).amin(1), "amin")
        right.scatter_reduce_(0, m, torch.where(any_c, cols, -1).amax(1), "amax")
    boxes = torch.stack([left, top, right, bottom], 1)
    return counts, torch.where((bottom >= 0)[:, None], boxes, torch.zeros_like(boxes)), need


def tile_changes(low: torch.Tensor, filled: torch.Tensor, windows: torch.Tensor, taps_y: tuple[torch.Tensor, torch.Tensor],
                 taps_x: tuple[torch.Tensor, torch.Tensor], band: int, threshold: float, origin: tuple[int, int],
                 canvas: tuple[int, int], capacity_tiles: int | None, capacity_changes: int | None,
                 step: int = 1 << 14) -> tuple[torch.Tensor, ...]:
    """COCO RLE run boundaries of K masks upsampled inside their windows, in fixed shapes.

    low: (K, h, w) float32 logits; filled: (K,) bool, the masks to encode; windows: (K, 4) int64
    [r0, c0, r1, c1) in the taps' output frame, outside which each mask is at or below `threshold`;
    band: `tile_band(taps_y[0], -1, TILE + 2)`; origin: (row, column) of the output frame in the
    (height, width) canvas. A change is a column-major canvas index where a mask differs from the
    pixel before it (the first pixel is preceded by a 0); the RLE counts are the differences of
    [0, changes..., height * width] (`rle_from_changes`). Nothing canvas-sized is allocated.

    Returns owner (C,) and position (C,) int64, sorted by owner then position, position -1 in the
    slots that hold no change; areas (K,) and changes per mask (K,) int64; and needs (2,) int64, the
    tiles and change slots used, above the capacities when results are incomplete.
    """
    k, h, w = low.shape
    device = low.device
    height, width = canvas
    out_h, out_w = taps_y[0].shape[0], taps_x[0].shape[0]
    r0, c0, r1, c1 = windows.unbind(1)
    start_y = torch.arange(0, out_h, TILE, device=device)
    start_x = torch.arange(0, out_w, TILE, device=device)
    hit_y = (start_y + TILE > r0[:, None]) & (start_y < r1[:, None])  # (K, Ty): tiles the window meets
    hit_x = (start_x + TILE > c0[:, None]) & (start_x < c1[:, None])
    index, slot_filled, tiles_need = compact((hit_y[:, :, None] & hit_x[:, None, :] & filled[:, None, None]).flatten(),
                                             capacity_tiles)
    m, ty, tx = index // (len(start_y) * len(start_x)), index // len(start_x) % len(start_y), index % len(start_x)
    ar_rows, ar_t = torch.arange(-1, TILE + 1, device=device), torch.arange(TILE, device=device)
    flat = low.reshape(k * h, w)
    areas = torch.zeros(k, dtype=torch.int64, device=device)
    read = capacity_changes is None  # sizes read on the host (`compact`): collected per chunk
    # Each slot holds a change's index into the (tiles, TILE, TILE, 2) grid of candidate changes:
    # a tile's pixel, a run's start (0) or end (1) at it.
    spots = torch.zeros(0 if read else capacity_changes + 1, dtype=torch.int64, device=device)  # + a spare slot
    found = torch.zeros((), dtype=torch.int64, device=device)
    for s in range(0, len(index), step):  # each tile with the row above and the row below it
        ms, top, left = m[s : s + step], start_y[ty[s : s + step]], start_x[tx[s : s + step]]
        values = tile_values(flat, h, ms, top - 1, left, taps_y, taps_x, band, TILE + 2)  # (K', TILE + 2, TILE)
        rows, cols = top[:, None] + ar_rows, left[:, None] + ar_t
        inside = (((rows >= r0[ms, None]) & (rows < r1[ms, None]))[:, :, None]
                  & ((cols >= c0[ms, None]) & (cols < c1[ms, None]))[:, None, :])
        binary = (values > threshold) & inside & slot_filled[s : s + step, None, None]
        pixel = binary[:, 1:-1]  # (K', TILE, TILE)
        areas.index_add_(0, ms, pixel.flatten(1).sum(1))
        # A run starts on a pixel whose upper neighbour is 0 and ends below a pixel whose lower one is.
        flags = torch.stack([pixel & ~binary[:, :-2], pixel & ~binary[:, 2:]], -1).flatten()  # (K' * TILE * TILE * 2,)
        if read:
            spots = torch.cat([spots, compact(flags, None)[0] + s * 2 * TILE * TILE])
        else:
            rank = found + flags.long().cumsum(0) - 1  # slots follow the ones earlier chunks filled
            slot = torch.where(flags & (rank < capacity_changes), rank, capacity_changes)
            spots.scatter_(0, slot, torch.arange(len(flags), device=device) + s * 2 * TILE * TILE)
        found = found + flags.sum()
    capacity_changes = len(spots) if read else capacity_changes
    spots = spots[:capacity_changes]
    ok = torch.arange(capacity_changes, device=device) < found
    tile, row, col, end = spots // (2 * TILE * TILE), spots // (2 * TILE) % TILE, spots // 2 % TILE, spots % 2
    owner = m[tile]
    position = (origin[1] + start_x[tx[tile]] + col) * height + origin[0] + start_y[ty[tile]] + row + end
    big = torch.iinfo(torch.int64).max
    key, order = torch.sort(torch.where(ok, owner * (height * width + 1) + position, big))
    owner, position, ok = owner[order], position[order], ok[order]
    # A run that reaches a column's bottom ends where the next column's top starts: if a run starts
    # there too, the two cancel. A run that ends with the canvas needs no end.
    same = (key[1:] == key[:-1]) & ok[1:]
    cancelled = torch.cat([same, same.new_zeros(1)]) | torch.cat([same.new_zeros(1), same])
    keep = ok & ~cancelled & (position < height * width)
    counts = torch.zeros(k, dtype=torch.int64, device=device).index_add_(0, owner, keep.long())
    return owner, torch.where(keep, position, -1), areas, counts, torch.stack([tiles_need, found])


def rle_from_changes(positions: np.ndarray, height: int, width: int) -> dict:
    """COCO RLE ({"size": [h, w], "counts": str}) from a mask's change positions (`window_changes`)."""
    counts = np.diff(np.concatenate([[0], positions, [height * width]])).tolist()
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("utf-8")}


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
    exceed the longest chain of suppressions. NMS over any such superset gives greedy's result
    again: `InstanceLabeler.finish` completes it on the host, where it is cheap.

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
