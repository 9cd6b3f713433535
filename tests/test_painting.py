"""Painting rules (dataset_card.contract.painting) and the alignment invariants (dataset_card.contract.invariants), on
hand-made masks whose levels, parents and maps are known, and on random ones for the invariants."""

import numpy as np
import pytest

from dataset_card.contract import codecs, invariants, painting

OBJECTS, PARTS, SALIENT = painting.RULES["objects"], painting.RULES["parts"], painting.RULES["salient"]
PERSON, TIE, SKY = 0, 1, 5  # things 0-2, stuff 3-5 (6 classes); 255 = no class
THINGS, NUM_CLASSES = {0, 1, 2}, 6


def instances_for(masks, semantic, scores=None):
    """Contract instances of `masks` (already largest first) with their majority class and purity;
    `scores` their (predicted IoU, stability), by default confident ones."""
    out = []
    for k, m in enumerate(masks, start=1):
        counts = np.bincount(semantic[m], minlength=256)
        votes = counts.copy()
        votes[255] = 0
        category = int(votes.argmax()) if votes.any() else 255
        ys, xs = np.nonzero(m)
        out.append({"id": k, "rle": codecs.encode_rle(m), "area": int(m.sum()), "category_id": category,
                    "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)],
                    "category_purity": float(np.float32(counts[category] / m.sum())), "level": "", "parent": 0,
                    "score": scores[k - 1][0] if scores else 0.95,
                    "stability_score": scores[k - 1][1] if scores else 0.97})
    return out


def cols(h, w, x0, x1, y0=0, y1=None):
    m = np.zeros((h, w), bool)
    m[y0 : h if y1 is None else y1, x0:x1] = True
    return m


def paint(masks, semantic, rule=OBJECTS, scores=None):
    instances = instances_for(masks, semantic, scores)
    instance_map = painting.paint_instances(instances, semantic, THINGS, rule, NUM_CLASSES)
    return instances, instance_map


def fields(instances):
    return [(i["level"], i["parent"]) for i in instances]


def test_whole_object_wins_parts_stuff_and_impure_masks_are_not_painted():
    h, w = 20, 40
    semantic = np.full((h, w), SKY, np.uint8)
    semantic[4:20, 5:25] = PERSON
    semantic[8:14, 12:16] = TIE  # a tie on the person, a thing of another class
    person = cols(h, w, 5, 25, 4)  # SAM's person mask includes the tie (96 of its 320 px... well, 24)
    sky = cols(h, w, 25, 40)  # all sky
    head = cols(h, w, 8, 20, 4, 8)  # inside the person
    tie = cols(h, w, 12, 16, 8, 14)
    smear = cols(h, w, 20, 30, 10, 20)  # half person, half sky: purity 0.5
    masks = sorted([person, sky, head, tie, smear], key=lambda m: -m.sum())
    instances, instance_map = paint(masks, semantic)
    by_area = {int(i["area"]): i for i in instances}
    person_id, tie_id = by_area[int(person.sum())]["id"], by_area[int(tie.sum())]["id"]
    assert (by_area[int(person.sum())]["level"], by_area[int(person.sum())]["parent"]) == ("object", 0)
    assert (by_area[int(head.sum())]["level"], by_area[int(head.sum())]["parent"]) == ("part", person_id)
    assert by_area[int(sky.sum())]["level"] == "stuff"
    assert by_area[int(smear.sum())]["level"] == "dropped" and by_area[int(smear.sum())]["category_purity"] == 0.5
    assert (by_area[int(tie.sum())]["level"], by_area[int(tie.sum())]["parent"]) == ("object", 0)
    # The person is clipped to its class; the tie shows inside it; nothing else is painted.
    np.testing.assert_array_equal(instance_map == person_id, person & (semantic == PERSON))
    np.testing.assert_array_equal(instance_map == tie_id, tie)
    assert set(np.unique(instance_map)) == {0, person_id, tie_id}
    assert [i["visible_area"] for i in instances] == [int((instance_map == i["id"]).sum()) for i in instances]
    figures = invariants.map_figures(instances, semantic, instance_map, THINGS)
    assert figures.painted == 2 and not figures.not_thing and set(figures.agreement.values()) == {1.0}
    # The tie lies inside the person's full mask: a panoptic object of its own, not a part.
    assert figures.nested == [] and figures.nested_any == [tie_id]


def test_the_parts_rule_is_schema_v1s_map():
    h, w = 10, 30
    semantic = np.zeros((h, w), np.uint8)
    semantic[:, 20:] = SKY
    whole, part, sky = cols(h, w, 0, 20), cols(h, w, 5, 10), cols(h, w, 20, 30)
    instances, instance_map = paint([whole, sky, part], semantic, PARTS)
    assert fields(instances) == [("object", 0), ("stuff", 0), ("part", 1)]  # levels do not depend on the rule
    expected = np.zeros((h, w), np.uint16)
    for k, m in enumerate([whole, sky, part], start=1):  # id order, later on top
        expected[m] = k
    np.testing.assert_array_equal(instance_map, expected)
    figures = invariants.map_figures(instances, semantic, instance_map, THINGS)
    assert figures.not_thing == [2] and figures.nested == [3]


def test_overlapping_objects_of_one_class_the_larger_keeps_the_pixels():
    h, w = 10, 60
    semantic = np.zeros((h, w), np.uint8)
    big, small = cols(h, w, 0, 30), cols(h, w, 20, 45)  # 100 of small's 250 px inside big: 40 %
    instances, instance_map = paint([big, small], semantic)
    assert fields(instances) == [("object", 0), ("object", 0)]
    assert (instance_map[:, :30] == 1).all() and (instance_map[:, 30:45] == 2).all() and not instance_map[:, 45:].any()


def test_an_object_left_a_sliver_inside_a_smaller_one_becomes_its_part():
    h, w = 10, 100
    semantic = np.zeros((h, w), np.uint8)
    c, a, b = cols(h, w, 0, 60), cols(h, w, 40, 90), cols(h, w, 55, 95)  # 600, 500, 400 px
    # a: 40 % inside c, an object; b: 12.5 % inside c and 87.5 % inside a, an object. But c holds
    # a's pixels up to column 60, and the rest of a (60-90) lies wholly inside b: a part of b.
    instances, instance_map = paint([c, a, b], semantic)
    assert fields(instances) == [("object", 0), ("part", 3), ("object", 0)]
    assert (instance_map[:, :60] == 1).all() and (instance_map[:, 60:95] == 3).all() and not instance_map[:, 95:].any()
    assert invariants.map_figures(instances, semantic, instance_map, THINGS).nested_any == []


def test_an_object_without_a_pixel_becomes_part_of_the_one_holding_most_of_it():
    h, w = 10, 80
    semantic = np.zeros((h, w), np.uint8)
    c1, c2, a = cols(h, w, 0, 40), cols(h, w, 30, 70), cols(h, w, 20, 50)  # 400, 400, 300 px
    instances, instance_map = paint([c1, c2, a], semantic)  # a: 2/3 inside each, no single holder
    assert fields(instances) == [("object", 0), ("object", 0), ("part", 1)]
    assert instances[2]["visible_area"] == 0 and set(np.unique(instance_map)) == {0, 1, 2}


def test_ignore_class_and_thresholds():
    h, w = 4, 10
    semantic = np.full((h, w), 255, np.uint8)
    semantic[:, :8] = TIE
    unlabeled, mostly_tie = cols(h, w, 8, 10), cols(h, w, 0, 10)  # 8 px of no class; 80 % tie
    instances, _ = paint([mostly_tie, unlabeled], semantic)
    assert fields(instances) == [("object", 0), ("dropped", 0)]
    strict = painting.rule_named("objects", min_purity=0.9)
    assert strict.min_purity == 0.9 and strict != OBJECTS and painting.rule_named("objects", 0.75) == OBJECTS
    instances, instance_map = paint([mostly_tie, unlabeled], semantic, strict)
    assert fields(instances) == [("dropped", 0), ("dropped", 0)] and not instance_map.any()
    with pytest.raises(ValueError, match="unknown painting rule"):
        painting.rule_named("everything")
    with pytest.raises(ValueError, match="min_purity"):
        painting.rule_named("objects", min_purity=1.5)
    assert painting.PaintingRule.from_dict(OBJECTS.to_dict()) == OBJECTS


def random_scene(rng, h=48, w=64, n=30):
    """A map of 16 px blocks of things and stuff, and random rectangles and blobs over it, a third
    of them inside an earlier one (parts), many inside one block (pure)."""
    semantic = np.repeat(np.repeat(rng.integers(0, NUM_CLASSES, (h // 16, w // 16)), 16, 0), 16, 1).astype(np.uint8)
    masks = []
    for _ in range(n):
        if masks and rng.random() < 0.35:  # inside an earlier mask's box
            ys, xs = np.nonzero(masks[int(rng.integers(len(masks)))])
            y0, x0 = int(rng.integers(ys.min(), ys.max() + 1)), int(rng.integers(xs.min(), xs.max() + 1))
            m = cols(h, w, x0, min(xs.max() + 1, x0 + 8), y0, min(ys.max() + 1, y0 + 8))
        else:
            y0, x0 = 16 * rng.integers(0, h // 16) + rng.integers(0, 8), 16 * rng.integers(0, w // 16) + rng.integers(0, 8)
            size = rng.integers(4, 30, 2) if rng.random() < 0.3 else rng.integers(4, 16 - max(y0 % 16, x0 % 16), 2)
            m = cols(h, w, x0, x0 + size[1], y0, y0 + size[0])
        if rng.random() < 0.3:
            m &= rng.random((h, w)) < 0.9
        if m.any():
            masks.append(m)
    return semantic, sorted(masks, key=lambda m: -m.sum())


def test_random_scenes_keep_every_invariant_and_repaint_alike():
    rng = np.random.default_rng(0)
    totals = {level: 0 for level in painting.LEVELS if level != painting.AGNOSTIC}  # "salient" only
    for _ in range(40):
        semantic, masks = random_scene(rng)
        instances, instance_map = paint(masks, semantic)
        figures = invariants.map_figures(instances, semantic, instance_map, THINGS)
        assert not figures.not_thing and not figures.disagreeing and not figures.nested
        by_id = {i["id"]: i for i in instances}
        for inst in instances:
            totals[inst["level"]] += 1
            assert (inst["visible_area"] > 0) == (inst["level"] == "object")
            if inst["level"] == "part":
                assert by_id[inst["parent"]]["level"] == "object"
                assert by_id[inst["parent"]]["category_id"] == inst["category_id"]
            else:
                assert inst["parent"] == 0
        # What a repaint computes from the stored fields is what was stored.
        again = [dict(i, level="", parent=0, visible_area=0) for i in instances]
        np.testing.assert_array_equal(painting.paint_instances(again, semantic, THINGS, OBJECTS, NUM_CLASSES),
                                      instance_map)
        assert again == instances
    assert min(totals.values()) > 20, totals  # every level occurs often


def test_folder_level_invariants_are_judged_on_the_sums():
    figures = invariants.Figures(rows=10, painted=100, agreement_sum=97.0, nested=6, nested_any=9)
    problems = figures.problems(objects=True)
    assert len(problems) == 2 and "97.00%" in problems[0] and "6.0%" in problems[1]
    assert figures.problems(objects=False) == []  # the parts rule promises none of it
    assert invariants.Figures(rows=1, painted=20, agreement_sum=20.0, nested=1).problems(objects=True) == []


# The "salient" rule: whole, salient masks without a thing class become class-agnostic objects.


def test_salient_paints_a_subject_outside_the_taxonomy_and_not_its_background_parts_or_specks():
    h, w = 40, 60
    semantic = np.full((h, w), SKY, np.uint8)  # the semantic model has no class for the fish: "sky" all over
    sky_band = cols(h, w, 0, 60, 0, 12)  # the full width along the top edge: 0.25 + 0.2 of the border
    fish = cols(h, w, 10, 40, 15, 35)  # 600 px (25%), off the border
    fin = cols(h, w, 12, 20, 17, 25)  # inside the fish
    speck = cols(h, w, 50, 54, 30, 32)  # 8 px: 0.3% of the image
    doubtful = cols(h, w, 44, 56, 14, 26)  # salient in shape, but SAM is unsure of it
    masks = [sky_band, fish, doubtful, fin, speck]
    scores = [(0.95, 0.97), (0.95, 0.97), (0.5, 0.97), (0.95, 0.97), (0.95, 0.97)]
    before, objects_map = paint(masks, semantic, OBJECTS, scores)
    assert fields(before) == [("stuff", 0)] * 5 and not objects_map.any()  # nothing: no thing class
    instances, instance_map = paint(masks, semantic, SALIENT, scores)
    assert fields(instances) == [("stuff", 0), ("object_agnostic", 0), ("stuff", 0), ("part", 2), ("stuff", 0)]
    np.testing.assert_array_equal(instance_map, np.where(fish, 2, 0))
    assert instances[1]["visible_area"] == int(fish.sum()) and instances[1]["category_id"] == SKY  # not its class
    figures = invariants.map_figures(instances, semantic, instance_map, THINGS)
    assert figures.painted == 1 and figures.agnostic == [2] and not figures.not_thing and figures.agreement == {}
    assert painting.border_share((0, 0, sky_band[:12]), h, w) == (60 + 12 + 12) / (2 * (h + w))


def test_salient_keeps_class_objects_first_and_paints_agnostic_ones_on_free_pixels_only():
    h, w = 40, 80
    semantic = np.full((h, w), SKY, np.uint8)
    semantic[5:35, 5:35] = PERSON
    person = cols(h, w, 5, 35, 5, 35)  # 900 px, a class object
    merged = cols(h, w, 5, 45, 5, 35)  # the person and a strip of sky: purity 0.75 -> object; use 0.8 below
    bag = cols(h, w, 30, 50, 10, 30)  # 400 px: a quarter on the person, the rest sky (a stuff majority)
    rule = painting.rule_named("salient", min_purity=0.8)  # `merged` is then dropped
    instances, instance_map = paint([merged, person, bag], semantic, rule)
    assert fields(instances) == [("dropped", 0), ("object", 0), ("object_agnostic", 0)]
    # `merged`: 75% of it is the painted person, under the 50% of its own it needs: not painted.
    np.testing.assert_array_equal(instance_map == 2, person)
    np.testing.assert_array_equal(instance_map == 3, bag & ~person)
    figures = invariants.map_figures(instances, semantic, instance_map, THINGS)
    assert figures.agnostic == [3] and list(figures.agreement) == [2] and figures.nested_any == []


def test_salient_rule_round_trips_and_is_checked():
    assert painting.PaintingRule.from_dict(SALIENT.to_dict()) == SALIENT
    assert "salience" not in OBJECTS.to_dict()  # what the objects rule wrote before salience existed
    strict = painting.rule_named("salient", min_purity=0.9)
    assert strict.salience == SALIENT.salience and strict.min_purity == 0.9
    with pytest.raises(ValueError, match="must paint 'objects'"):
        painting.PaintingRule.from_dict({**PARTS.to_dict(), "salience": SALIENT.to_dict()["salience"]})


def test_random_scenes_under_salient_keep_the_invariants_and_repaint_alike():
    rng = np.random.default_rng(1)
    agnostic = 0
    for _ in range(30):
        semantic, masks = random_scene(rng)
        objects_instances, objects_map = paint(masks, semantic, OBJECTS)
        instances, instance_map = paint(masks, semantic, SALIENT)
        figures = invariants.map_figures(instances, semantic, instance_map, THINGS)
        assert not figures.not_thing and not figures.disagreeing and not figures.nested
        # The class objects are the objects rule's, pixel for pixel; the agnostic ones only add.
        classed = np.isin(instance_map, [i["id"] for i in instances if i["level"] == "object"])
        np.testing.assert_array_equal(np.where(classed, instance_map, 0), objects_map)
        for inst, before in zip(instances, objects_instances):
            assert inst["level"] == before["level"] or before["level"] in ("stuff", "dropped")
            assert (inst["visible_area"] > 0) == (inst["level"] in ("object", painting.AGNOSTIC))
        agnostic += len(figures.agnostic)
        again = [dict(i, level="", parent=0, visible_area=0) for i in instances]
        np.testing.assert_array_equal(painting.paint_instances(again, semantic, THINGS, SALIENT, NUM_CLASSES),
                                      instance_map)
        assert again == instances
    assert agnostic > 10
