"""Procedural scenes: written through the contract, exact labels, classes by shape, label variants."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from dataset_card.contract import codecs
from dataset_card.synthetic.scenes import SHAPES, STUFF, noisy_labels, render_scene, write_scenes
from dataset_card.validate import validate
from pretraining.data.loader import open_labeled_dataset


def _rows(root):
    return pq.read_table(f"{root}/data/train-00000-of-00001.parquet").to_pylist()


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    roots = {}
    for labels in ("clean", "noisy", "shuffled"):
        roots[labels] = str(tmp_path_factory.mktemp(labels))
        write_scenes(roots[labels], num_images=48, size=32, seed=3, labels=labels, noise_rate=0.5)
    return roots


def test_clean_scenes_are_valid_exact_and_classed_by_the_largest_objects_shape(variants):
    report = validate(variants["clean"], full=True)
    assert report.ok, report.format()
    assert open_labeled_dataset(variants["clean"]).metadata.num_semantic_classes == len(STUFF) + len(SHAPES)
    rows = _rows(variants["clean"])
    assert np.bincount([r["label"] for r in rows], minlength=len(SHAPES)).tolist() == [8] * len(SHAPES)
    for row in rows:
        semantic = codecs.decode_mask(row["semantic_mask"]["bytes"])
        ids = codecs.decode_mask(row["instance_mask"]["bytes"])
        assert 1 <= len(row["instances"]) <= 5
        assert (semantic[ids == 0] < len(STUFF)).all()  # every non-object pixel is stuff...
        for inst in row["instances"]:
            pixels = semantic[ids == inst["id"]]
            assert inst["category_purity"] == 1.0 and (pixels == inst["category_id"]).all()  # ...and objects exact
            assert inst["category_id"] >= len(STUFF) and inst["visible_area"] == inst["area"] > 0
        largest = max(row["instances"], key=lambda inst: inst["area"])
        assert row["label"] == largest["category_id"] - len(STUFF)


def test_colour_does_not_give_the_class_away():
    rng = np.random.default_rng(0)
    colours = {s: [] for s in range(len(SHAPES))}
    for i in range(120):
        scene = render_scene(rng, 32, target=i % len(SHAPES))
        for mask in scene.masks:
            colours[int(np.bincount(scene.semantic[mask]).argmax()) - len(STUFF)].append(scene.rgb[mask].mean(0))
    means = np.array([np.mean(c, 0) for c in colours.values()])  # (shapes, 3) mean colour of each class
    spread = np.array([np.std(c, 0).mean() for c in colours.values()])
    assert np.ptp(means, axis=0).max() < 40 and spread.min() > 40  # classes share colours; each varies widely


def test_noisy_labels_move_boundaries_merge_and_split_at_the_rate():
    rng = np.random.default_rng(1)
    changed, counts = [], []
    for i in range(60):
        scene = render_scene(rng, 32, target=i % len(SHAPES))
        semantic, masks = noisy_labels(rng, scene, noise_rate=0.5)
        changed.append((semantic != scene.semantic).mean())
        counts.append(len(masks) - len(scene.masks))
        owner = np.zeros(semantic.shape, int)
        for k, m in enumerate(masks, start=1):
            assert not (owner[m] > 0).any()  # still disjoint
            owner[m] = k
    assert 0.01 < np.mean(changed) < 0.3  # boundaries moved, most pixels kept
    assert any(c > 0 for c in counts) and any(c < 0 for c in counts)  # splits and merges both happen
    clean = noisy_labels(np.random.default_rng(0), scene, noise_rate=0.0)[1]
    assert len(clean) == len(scene.masks)  # rate 0: boundaries only


def test_variants_share_images_and_shuffled_labels_belong_to_the_next_image(variants):
    clean, noisy, shuffled = (_rows(variants[k]) for k in ("clean", "noisy", "shuffled"))
    assert [r["image"]["bytes"] for r in clean] == [r["image"]["bytes"] for r in shuffled] \
        == [r["image"]["bytes"] for r in noisy]
    assert [r["label"] for r in clean] == [r["label"] for r in shuffled]  # the image class stays true
    for i, row in enumerate(shuffled):
        nxt = clean[(i + 1) % len(clean)]
        assert row["semantic_mask"]["bytes"] == nxt["semantic_mask"]["bytes"]
        assert row["instance_mask"]["bytes"] == nxt["instance_mask"]["bytes"]
    assert any(a["semantic_mask"]["bytes"] != b["semantic_mask"]["bytes"] for a, b in zip(clean, noisy))
    with pytest.raises(ValueError, match="label variant"):
        write_scenes("/nonexistent", 4, labels="wrong")
