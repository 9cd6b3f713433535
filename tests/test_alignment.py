"""Alignment of automatic masks with a semantic map, on hand-made masks whose answers are known.

Most tests paint with the "parts" rule (every mask, smaller on top), which shows each mask's
numbering and category; the object-level rule itself is tested in test_painting.py.
"""

import numpy as np
import pytest

from dataset_card.contract import codecs, painting
from labeling.labelers import alignment

PARTS = painting.RULES["parts"]


def align(masks, semantic, min_area=1, ignore_value=255, rule=PARTS, things=range(8), num_classes=8):
    """`alignment.align` with a taxonomy where every class id below 8 is a thing."""
    return alignment.align(masks, semantic, things=set(things), num_classes=num_classes, rule=rule,
                           min_area=min_area, ignore_value=ignore_value)


def paint(instances, semantic, rule=PARTS, things=range(8)):
    return painting.paint_instances([dict(i) for i in instances], semantic, set(things), rule, 8)


def auto_mask(mask: np.ndarray, iou: float = 0.9, stability: float = 0.95) -> dict:
    return {"rle": codecs.encode_rle(mask), "predicted_iou": iou, "stability_score": stability}


def box(h, w, y0, x0, y1, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_nested_masks_parts_on_top_and_categories():
    h, w = 20, 30
    semantic = np.zeros((h, w), np.uint8)
    semantic[:, 15:] = 3  # right half is class 3
    whole = box(h, w, 2, 2, 18, 28)  # 16 x 26 = 416 px, 208 of class 0 and 208 of class 3
    part = box(h, w, 4, 20, 10, 26)  # 36 px, all class 3
    semantic[0, 0] = 7  # outside every mask: votes for nothing
    instances, painted = align([auto_mask(part, 0.5), auto_mask(whole, 0.8)], semantic)
    assert [inst["id"] for inst in instances] == [1, 2]
    big, small = instances
    assert big["area"] == 416 and small["area"] == 36
    assert big["visible_area"] == 416 - 36 and small["visible_area"] == 36
    assert big["score"] == pytest.approx(0.8) and small["score"] == pytest.approx(0.5)
    assert big["category_id"] == 0 and big["category_purity"] == pytest.approx(0.5)  # tie -> lower id
    assert small["category_id"] == 3 and small["category_purity"] == 1.0
    assert big["bbox"] == [2.0, 2.0, 26.0, 16.0] and small["bbox"] == [20.0, 4.0, 6.0, 6.0]
    assert painted.dtype == np.uint16
    np.testing.assert_array_equal(painted, paint(instances, semantic))
    assert (painted[part] == 2).all() and (painted[whole & ~part] == 1).all() and (painted[~whole] == 0).all()


def test_whole_covered_by_its_parts_stays_in_list_but_not_in_map():
    h, w = 10, 10
    left, right = box(h, w, 0, 0, 10, 5), box(h, w, 0, 5, 10, 10)
    whole = left | right
    instances, painted = align([auto_mask(left), auto_mask(whole), auto_mask(right)],
                                         np.zeros((h, w), np.uint8))
    assert [inst["area"] for inst in instances] == [100, 50, 50]
    assert instances[0]["visible_area"] == 0
    assert 1 not in painted
    # Equal areas keep their input order: left (given first) gets id 2, right id 3.
    assert (painted[left] == 2).all() and (painted[right] == 3).all()


def test_min_area_drops_small_and_empty_masks_and_ids_stay_dense():
    h, w = 12, 12
    masks = [box(h, w, 0, 0, 2, 2), box(h, w, 0, 0, 0, 0), box(h, w, 3, 3, 9, 9), box(h, w, 5, 5, 8, 8)]
    instances, painted = align([auto_mask(m) for m in masks], np.zeros((h, w), np.uint8), min_area=5)
    assert [inst["id"] for inst in instances] == [1, 2]
    assert [inst["area"] for inst in instances] == [36, 9]
    assert painted[0, 0] == 0 and painted.max() == 2


def test_ignore_pixels_do_not_vote_but_count_in_purity():
    h, w = 4, 10
    semantic = np.full((h, w), 255, np.uint8)
    semantic[:, :3] = 4  # 12 of the mask's 40 pixels are class 4, the rest ignore
    instances, _ = align([auto_mask(np.ones((h, w), bool))], semantic, ignore_value=255)
    assert instances[0]["category_id"] == 4
    assert instances[0]["category_purity"] == pytest.approx(12 / 40)
    only_ignore, _ = align([auto_mask(box(h, w, 0, 5, 4, 10))], semantic, ignore_value=255)
    assert only_ignore[0]["category_id"] == 255 and only_ignore[0]["category_purity"] == 1.0


def test_sixteen_bit_semantic_map_with_65535_ignore():
    h, w = 6, 6
    semantic = np.full((h, w), 65535, np.uint16)
    semantic[:2] = 300
    instances, _ = align([auto_mask(np.ones((h, w), bool))], semantic, ignore_value=65535, things=[300],
                         num_classes=400)
    assert instances[0]["category_id"] == 300 and instances[0]["category_purity"] == pytest.approx(1 / 3)


def test_random_masks_match_paint_and_brute_force_majority():
    rng = np.random.default_rng(0)
    h, w = 37, 53
    semantic = rng.integers(0, 5, size=(h, w)).astype(np.uint8)
    masks = []
    for _ in range(25):
        y0, x0 = rng.integers(0, h - 1), rng.integers(0, w - 1)
        m = box(h, w, y0, x0, y0 + rng.integers(1, 15), x0 + rng.integers(1, 20)) & (rng.random((h, w)) < 0.8)
        masks.append(m)
    instances, painted = align([auto_mask(m) for m in masks], semantic, min_area=3)
    np.testing.assert_array_equal(painted, paint(instances, semantic))
    areas = [inst["area"] for inst in instances]
    assert areas == sorted(areas, reverse=True) and min(areas) >= 3
    assert [inst["id"] for inst in instances] == list(range(1, len(instances) + 1))
    for inst in instances:
        m = codecs.decode_rle(inst["rle"])
        counts = np.bincount(semantic[m], minlength=5)
        assert inst["category_id"] == int(counts.argmax())
        assert inst["category_purity"] == pytest.approx(counts.max() / m.sum())
        assert inst["visible_area"] == int((painted == inst["id"]).sum())
        ys, xs = np.nonzero(m)
        assert inst["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_no_masks_gives_an_empty_map():
    instances, painted = align([], np.zeros((3, 4), np.uint8))
    assert instances == [] and painted.shape == (3, 4) and not painted.any()


def test_mask_of_another_size_is_refused():
    with pytest.raises(ValueError, match="RLE size"):
        align([auto_mask(np.ones((4, 4), bool))], np.zeros((5, 4), np.uint8))


def test_crop_rle_equals_encoding_the_full_mask():
    rng = np.random.default_rng(1)
    for _ in range(500):
        h, w = int(rng.integers(1, 25)), int(rng.integers(1, 25))
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        crop = rng.random((int(rng.integers(1, h - y0 + 1)), int(rng.integers(1, w - x0 + 1)))) < rng.random()
        full = np.zeros((h, w), bool)
        full[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
        assert codecs.crop_rle(crop, y0, x0, h, w) == codecs.encode_rle(full)


def test_masks_given_as_crops_align_like_decoded_ones():
    rng = np.random.default_rng(2)
    h, w = 30, 40
    semantic = rng.integers(0, 4, size=(h, w)).astype(np.uint8)
    masks, with_crops = [], []
    for _ in range(12):
        m = np.zeros((h, w), bool)
        y0, x0 = int(rng.integers(0, h - 5)), int(rng.integers(0, w - 5))
        m[y0 : y0 + int(rng.integers(1, 12)), x0 : x0 + int(rng.integers(1, 15))] = True
        masks.append(auto_mask(m))
        y1, x1, y2, x2 = codecs.tight_box(masks[-1]["rle"])
        with_crops.append({**masks[-1], "crop": (y1, x1, m[y1:y2, x1:x2])})
    for rule in (PARTS, painting.RULES["objects"]):
        plain, plain_map = align(masks, semantic, rule=rule, things=[1, 2])
        cropped, cropped_map = align(with_crops, semantic, rule=rule, things=[1, 2])
        assert plain == cropped
        np.testing.assert_array_equal(plain_map, cropped_map)
    plain, plain_map = align(masks, semantic)
    cropped, cropped_map = align(with_crops, semantic)
    assert plain == cropped
    np.testing.assert_array_equal(plain_map, cropped_map)
