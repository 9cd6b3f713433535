"""Objects outside the semantic taxonomy (issue 29 item 3): procedural scenes labeled by a fake
semantic labeler that knows only the stuff classes, so no object has a thing class. Under the
default `objects` rule nothing is painted; under `salient` the objects are, as class-agnostic
objects, the folder validates, and the coverage statistics show it. Scenes inside the taxonomy
(the exact maps) get the same labels under both rules."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from dataset_card.contract import codecs, coverage, layout, painting
from dataset_card.synthetic import scenes
from dataset_card.synthetic.shapes import write_labeled_folder
from dataset_card.validate import row_check, validate
from labeling.pipeline import finish

NUM_IMAGES = 12
# The fake labeler's taxonomy: the scenes' stuff classes only (ids 0-2, as in the scenes).
STUFF_ONLY = tuple(c for c in scenes.SEMANTIC_CLASSES if not c.isthing)


def stuff_only_labeler(semantic: np.ndarray) -> np.ndarray:
    """What a semantic model without the objects' classes says: each object pixel gets the image's
    most common stuff class (an argmax always names some class of the taxonomy)."""
    stuff = semantic < len(scenes.STUFF)
    background = np.bincount(semantic[stuff], minlength=len(scenes.STUFF)).argmax()
    return np.where(stuff, semantic, background).astype(np.uint8)


def sam_masks(scene: scenes.Scene) -> list[np.ndarray]:
    """A fake instance model: every object, and every background region (as SAM segments sky or ground)."""
    regions = [scene.semantic == k for k in range(len(scenes.STUFF))]
    return [m for m in [*scene.masks, *regions] if m.any()]


def write(root, rule: str, taxonomy: str) -> layout.DatasetMetadata:
    """A labeled folder of the same scenes under `rule`, labeled by the fake labeler ("outside") or
    with the exact maps ("inside")."""
    rng = np.random.default_rng(0)
    drawn = [scenes.render_scene(rng, 64, target=i % len(scenes.SHAPES)) for i in range(NUM_IMAGES)]
    classes = STUFF_ONLY if taxonomy == "outside" else scenes.SEMANTIC_CLASSES
    metadata = layout.DatasetMetadata(scenes.SHAPES, classes, semantic_source=f"fake ({taxonomy})",
                                      painting=painting.RULES[rule])

    def example(i):
        scene = drawn[i]
        semantic = stuff_only_labeler(scene.semantic) if taxonomy == "outside" else scene.semantic
        return f"{scenes.SHAPES[scene.label]}/{i:06d}", scene.label, scene.rgb, semantic, sam_masks(scene)

    return write_labeled_folder(str(root), metadata, example, NUM_IMAGES, 1, {"source": "test"})


def rows(root) -> list[dict]:
    return pq.read_table(f"{root}/{layout.data_path(0, 1)}").to_pylist()


def stats(root) -> layout.ShardStats:
    with open(f"{root}/{layout.stats_path(0, 1)}") as f:
        return layout.ShardStats.from_json(f.read())


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    root = tmp_path_factory.mktemp("outside")
    return {rule: (write(root / rule, rule, "outside"), root / rule) for rule in ("objects", "salient")}


def test_salient_paints_the_objects_a_taxonomy_lacks_and_coverage_shows_it(outside):
    _, objects_root = outside["objects"]
    metadata, salient_root = outside["salient"]
    before, after = finish.coverage_stats(stats(objects_root)), finish.coverage_stats(stats(salient_root))
    assert before["painted_objects_per_image"]["0"] == NUM_IMAGES  # the default rule paints nothing here
    assert before["share_under_min_regions"] == 1.0
    assert after["painted_objects_per_image"]["0"] == 0  # every image's subject is painted
    assert after["share_under_min_regions"] < 0.5
    assert stats(salient_root).levels["object_agnostic"] >= NUM_IMAGES and stats(salient_root).painted_agnostic > 0
    assert "object_agnostic" not in stats(objects_root).levels
    for row in rows(salient_root):
        instance_map = codecs.decode_mask(row["instance_mask"]["bytes"])
        painted = {i["id"] for i in row["instances"] if i["level"] == "object_agnostic"}
        assert painted and set(np.unique(instance_map)) - {0} == painted  # only class-agnostic objects
        assert coverage.measure(row["instances"], instance_map).painted == len(painted)
    line = finish.coverage_line({**after, "largest_mask_level": {"object_agnostic": 3, "stuff": 9}})
    assert line.endswith("a class-agnostic object in 25.0%")  # where the largest mask is the painted subject
    assert "class-agnostic" not in finish.coverage_line(before)
    report = validate(str(salient_root), full=True)
    assert report.ok, report
    assert report.figures.agnostic == report.figures.painted > 0 and report.figures.not_thing == 0


def test_validator_rejects_a_broken_class_agnostic_level(outside):
    metadata, root = outside["salient"]
    row = rows(root)[0]
    assert row_check(row, metadata)[0] == []
    agnostic = next(i for i in row["instances"] if i["level"] == "object_agnostic")
    agnostic["level"] = "stuff"  # painted, yet said not to be an object
    problems = row_check(row, metadata)[0]
    assert any("level of instances" in p for p in problems)
    agnostic["level"] = "agnostic"  # no level of the schema
    assert any("are not levels of dataset schema" in p for p in row_check(row, metadata)[0])
    objects_metadata, _ = outside["objects"]  # the same row read under the objects rule: not what it paints
    agnostic["level"] = "object_agnostic"
    assert any("differs from what painting rule 'objects'" in p for p in row_check(row, objects_metadata)[0])


def test_inside_the_taxonomy_salient_labels_as_objects_does(tmp_path):
    write(tmp_path / "objects", "objects", "inside")
    write(tmp_path / "salient", "salient", "inside")
    for a, b in zip(rows(tmp_path / "objects"), rows(tmp_path / "salient")):
        assert a["instance_mask"] == b["instance_mask"] and a["instances"] == b["instances"]
    assert stats(tmp_path / "objects").painted == stats(tmp_path / "salient").painted > 0
    assert painting.DEFAULT_RULE == "objects"  # the default (docs/DESIGN.md says why)


def test_the_quality_gate_scores_a_class_agnostic_object_as_a_segment_without_a_class():
    from labeling.quality.metrics import panoptic_prediction

    semantic = np.zeros((4, 6), np.uint8)  # our class 0 everywhere (ground truth's stuff 7)
    instance_map = np.zeros((4, 6), np.uint16)
    instance_map[1:3, 1:3], instance_map[1:3, 4:6] = 1, 2
    instances = [{"id": 1, "category_id": 0, "level": "object_agnostic"}, {"id": 2, "category_id": 0, "level": "object"}]
    out = panoptic_prediction(semantic, instance_map, instances, np.array([7]), gt_things=(), unmatched=99)
    assert (out[1:3, 1:3, 0] == 99).all() and (out[1:3, 4:6, 0] == 7).all() and (out[..., 1] == instance_map).all()


def test_the_command_line_switch_is_a_label_shaping_field():
    from labeling import run
    from labeling.pipeline.driver import painting_rule

    cfg = run.config_from_args(run.parser().parse_args(
        ["--input", "in", "--output", "out", "--models", "tiny-random", "--painting-rule", "salient"]))
    assert cfg.arguments()["painting_rule"] == "salient"  # compared on resume, recorded in the manifest
    assert painting_rule(cfg) == painting.RULES["salient"]
    default = run.config_from_args(run.parser().parse_args(["--input", "in", "--output", "out", "--models", "default"]))
    assert painting_rule(default) == painting.RULES["objects"]
