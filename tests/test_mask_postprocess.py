"""SAM's post-processing pieces, each against the computation it replaces, without a model: windowed
upsampling and its RLE (`mask_postprocess`) against F.interpolate over the whole canvas, the device's
NMS superset completed on the host against torchvision's NMS, and the small-region cleanup inside a
window (`instance_finish.cleanup_window`) against segment_anything's on the whole image."""

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from segment_anything.utils.amg import remove_small_regions

from labeling.labelers.instance_finish import cleanup_window
from labeling.labelers.mask_postprocess import (
    axis_taps,
    compact,
    nms_superset,
    rle_from_changes,
    upsample_windows,
    window_changes,
    window_rle,
    windows_above,
)


@pytest.mark.parametrize("sizes", [(64, 256, 171, 256, 342, 512), (64, 256, 256, 2, 300, 3), (256, 1024, 1024, 683, 300, 200)])
def test_windowed_upsampling_is_stock_upsampling(sizes):
    """Values, windows and RLE of the window path against F.interpolate twice over the canvas."""
    low_len, model_len, input_h, input_w, height, width = sizes
    generator = torch.Generator().manual_seed(0)
    low = torch.randn(4, low_len, low_len, generator=generator) * 4
    full = torch.nn.functional.interpolate(low[:, None], (model_len, model_len), mode="bilinear", align_corners=False)
    full = torch.nn.functional.interpolate(full[..., :input_h, :input_w], (height, width), mode="bilinear",
                                           align_corners=False)[:, 0]
    taps_y, taps_x = axis_taps(low_len, model_len, input_h, height), axis_taps(low_len, model_len, input_w, width)
    for threshold in (-1.0, 0.0, 2.0):
        windows = windows_above(low, threshold, taps_y[0], taps_x[0])
        values, valid = upsample_windows(low, taps_y, taps_x, windows)
        for n in range(len(low)):
            r0, c0, r1, c1 = windows[n].tolist()
            inside = torch.zeros(height, width, dtype=torch.bool)
            inside[r0:r1, c0:c1] = True
            assert not ((full[n] > threshold) & ~inside).any()
            torch.testing.assert_close(values[n, : r1 - r0, : c1 - c0], full[n, r0:r1, c0:c1], atol=1e-4, rtol=0)
            binary = ((values[n] > threshold) & valid[n])[: r1 - r0, : c1 - c0]
            reference = mask_utils.encode(np.asfortranarray((full[n] > threshold).numpy().astype(np.uint8)))
            assert window_rle(binary, r0, c0, height, width)["counts"] == reference["counts"].decode()
        # Fixed shapes: padded to the canvas, the same values; changes in slots of a given capacity.
        padded, padded_valid = upsample_windows(low, taps_y, taps_x, windows, (height, width))
        assert padded.shape == (4, height, width)
        _, h, w = values.shape
        assert torch.equal(padded[:, :h, :w][valid], values[valid]) and padded_valid.sum() == valid.sum()
        binary = (padded > threshold) & padded_valid
        owner, position, keep, need = window_changes(binary, windows[:, :2], height, width)
        slots = int(need) + 5
        fixed = window_changes(binary, windows[:, :2], height, width, slots)
        assert fixed[3] == need and len(fixed[0]) == slots and not fixed[2][int(need):].any()
        for n in range(4):
            mine = fixed[1][fixed[2] & (fixed[0] == n)].numpy()
            assert np.array_equal(mine, position[keep & (owner == n)].numpy())
            reference = mask_utils.encode(np.asfortranarray((full[n] > threshold).numpy().astype(np.uint8)))
            assert rle_from_changes(mine, height, width)["counts"] == reference["counts"].decode()
        if need > 1:
            assert window_changes(binary, windows[:, :2], height, width, 1)[3] == need  # reported, not dropped


def test_nms_superset_completed_on_the_host_is_torchvisions_nms():
    """Fixed-point rounds keep a superset of greedy NMS (ties in score included); NMS over that
    superset, in its order, is torchvision's NMS of all valid boxes."""
    from torchvision.ops import nms

    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(1, 200, (1,), generator=generator))
        xy = torch.randint(0, 60, (n, 2), generator=generator)
        boxes = torch.cat([xy, xy + torch.randint(1, 30, (n, 2), generator=generator)], 1)
        scores = torch.randint(0, 8, (n,), generator=generator).float() / 8  # many ties
        valid = torch.rand(n, generator=generator) < 0.8
        survivors = torch.nonzero(valid).squeeze(1)
        expected = survivors[nms(boxes[survivors].float(), scores[survivors], 0.7)]
        for rounds in (2, 8):
            order, keep = nms_superset(boxes, scores, valid, 0.7, rounds)
            superset = order[keep]
            assert set(expected.tolist()) <= set(superset.tolist())
            assert torch.equal(superset[nms(boxes[superset].float(), scores[superset], 0.7)], expected)
        index, filled, need = compact(valid, 64)
        assert need == len(survivors) and torch.equal(index[filled], survivors[:64])


def test_cleanup_in_a_window_equals_the_whole_image():
    """Holes and islands computed inside `cleanup_window` are segment_anything's on the whole image,
    for masks touching the image's edges, thin ones and speckled ones."""
    rng = np.random.default_rng(0)
    for trial in range(400):
        h, w = (int(v) for v in rng.integers(5, 60, 2))
        mask = rng.random((h, w)) < rng.uniform(0.2, 0.8)
        if trial % 2:
            mask = cv2.dilate(mask.astype(np.uint8), np.ones((2, 2), np.uint8)).astype(bool)
        if trial % 3 == 0:
            mask[: rng.integers(0, h)] = False
        if not mask.any():
            continue
        area = int(rng.integers(2, 30))
        whole, holes = remove_small_regions(mask, area, "holes")
        whole, islands = remove_small_regions(whole, area, "islands")
        ys, xs = np.nonzero(mask)
        y0, x0, y1, x1 = cleanup_window((ys.min(), xs.min(), ys.max() + 1, xs.max() + 1), h, w, area)
        window, w_holes = remove_small_regions(mask[y0:y1, x0:x1], area, "holes")
        window, w_islands = remove_small_regions(window, area, "islands")
        inside = np.zeros_like(mask)
        inside[y0:y1, x0:x1] = window
        np.testing.assert_array_equal(inside, whole)
        assert (w_holes or w_islands) == (holes or islands)
