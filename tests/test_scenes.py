"""Procedural scenes: written through the contract, exact labels, classes by shape or appearance, label variants."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from dataset_card.contract import codecs
from dataset_card.synthetic.scenes import (
    APPEARANCE_FILE,
    APPEARANCES,
    SHAPES,
    STUFF,
    noisy_labels,
    render_scene,
    write_scenes,
)
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
    # Rate 0: boundaries only, no splits or merges (a sliver of a few pixels may shrink away).
    assert sum(int(m.sum()) > 8 for m in scene.masks) <= len(clean) <= len(scene.masks)


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


def test_appearance_maps_are_a_function_of_geometry_alone_so_they_cannot_tell_the_class():
    # The same geometry generator with any paint generator and any target gives the same maps, while
    # the image class takes every value: no classifier on the maps alone can beat chance.
    for geometry_seed in range(5):
        scenes = [render_scene(np.random.default_rng(geometry_seed), 32, target=t, task="appearance",
                               paint_rng=np.random.default_rng(100 + t)) for t in range(len(APPEARANCES))]
        assert [s.label for s in scenes] == list(range(len(APPEARANCES)))
        for scene in scenes[1:]:
            assert (scene.semantic == scenes[0].semantic).all() and scene.shape == scenes[0].shape
            assert all((a == b).all() for a, b in zip(scene.masks, scenes[0].masks))
        assert len({s.rgb.tobytes() for s in scenes}) == len(APPEARANCES)  # ...and the RGB differs


def _texture_features(rgb, mask):
    """Share of neighbouring pixel pairs inside `mask` that differ, at a few offsets: a texture's signature."""
    x = rgb.astype(float).mean(-1)
    features = []
    for dy, dx in ((0, 1), (1, 0), (1, 1), (0, 2), (2, 0), (0, 3), (3, 0)):
        h, w = x.shape[0] - dy, x.shape[1] - dx
        both = mask[dy:, dx:] & mask[:h, :w]
        features.append((np.abs(x[dy:, dx:] - x[:h, :w])[both] > 12).mean() if both.any() else 0.0)
    return features


def test_appearance_class_is_readable_from_the_rgb_and_the_shape_probe_is_not_the_class():
    rng = np.random.default_rng(0)
    scenes = [render_scene(rng, 32, target=i % len(APPEARANCES), task="appearance") for i in range(360)]
    x = np.array([_texture_features(s.rgb, max(s.masks, key=lambda m: m.sum())) for s in scenes])
    y = np.array([s.label for s in scenes])
    centroids = np.stack([x[:240][y[:240] == k].mean(0) for k in range(len(APPEARANCES))])
    predicted = np.argmin(((x[240:, None] - centroids) ** 2).sum(-1), 1)
    assert (predicted == y[240:]).mean() > 0.5  # chance 1/6: the largest object's pixels show the class
    for s in scenes[:40]:
        largest = max(s.masks, key=lambda m: m.sum())
        assert (s.appearance[largest] == s.label).all() and (s.appearance[~np.any(s.masks, 0)] == -1).all()
        assert (s.semantic[largest] == len(STUFF) + s.shape).all()
    shapes = np.bincount([s.shape for s in scenes], minlength=len(SHAPES))
    assert shapes.min() > 0  # the label-informed class varies independently of the task's class


def test_appearance_folder_is_valid_and_writes_the_texture_maps(tmp_path):
    write_scenes(str(tmp_path), num_images=12, size=32, seed=5, task="appearance")
    assert validate(str(tmp_path), full=True).ok
    rows = _rows(tmp_path)
    appearance = np.load(tmp_path / APPEARANCE_FILE)
    assert appearance.shape == (12, 32, 32)
    for row, texture in zip(rows, appearance):
        ids = codecs.decode_mask(row["instance_mask"]["bytes"])
        largest = max(row["instances"], key=lambda inst: inst["area"])
        assert row["label"] == int(np.bincount(texture[ids == largest["id"]]).argmax())
        assert ((texture >= 0) == (ids > 0)).all()
    with pytest.raises(ValueError, match="scene task"):
        write_scenes(str(tmp_path / "x"), 4, task="colour")
