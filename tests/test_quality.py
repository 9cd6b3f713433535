"""Label-quality scoring against synthetic ground truth with known answers."""

import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from dataset_card.contract import codecs, layout, shards
from dataset_card.contract.output_folder import OutputFolder
from dataset_card.contract.schema import build_features, rows_to_table
from dataset_card.synthetic.shapes import synthetic_row
from labeling import evaluate as evaluate_command
from labeling.quality import ground_truth as gt_io
from labeling.quality import metrics, report

OURS = (layout.SemanticClass(0, "wall-other-merged", False), layout.SemanticClass(1, "person", True),
        layout.SemanticClass(2, "car", True))
GT_CATEGORIES = [{"id": 1, "name": "person", "isthing": 1}, {"id": 3, "name": "car", "isthing": 1},
                 {"id": 199, "name": "wall-other", "isthing": 0}]
THINGS = {c.id for c in OURS if c.isthing}
H, W = 40, 60


def _rect(y0, x0, h, w):
    m = np.zeros((H, W), bool)
    m[y0:y0 + h, x0:x0 + w] = True
    return m


PERSON, CAR = _rect(5, 5, 10, 10), _rect(20, 30, 10, 20)


def _semantic(person, car):
    sem = np.zeros((H, W), np.uint8)
    sem[person], sem[car] = 1, 2
    return sem


def _write_pred(root, masks, semantic):
    metadata = layout.DatasetMetadata(("c",), OURS)
    row, _ = synthetic_row("c/img0", 0, np.zeros((H, W, 3), np.uint8), semantic, masks, THINGS)
    shards.commit_shard(OutputFolder.open(root), 0, 1, rows_to_table([row], build_features(["c"], metadata.semantic_class_names)),
                        pa.Table.from_pylist([], schema=layout.ERRORS_SCHEMA), layout.ShardStats(0))
    (root / layout.METADATA_FILE).write_text(metadata.to_json())
    return root


@pytest.fixture
def ground_truth(tmp_path):
    """COCO instances JSON and COCO panoptic PNG + JSON for one image, img0.png."""
    anns = []
    for k, (mask, cat) in enumerate([(PERSON, 1), (CAR, 3)], start=1):
        rle = codecs.encode_rle(mask)
        anns.append({"id": k, "image_id": 7, "category_id": cat, "segmentation": rle, "area": int(mask.sum()),
                     "bbox": [0, 0, 1, 1], "iscrowd": 0})
    image = {"id": 7, "file_name": "img0.png", "height": H, "width": W}
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps({"images": [image], "annotations": anns, "categories": GT_CATEGORIES}))
    # panoptic: segment 1 = person, 2 = car, 3 = wall everywhere else
    ids = np.full((H, W), 3, np.int64)
    ids[PERSON], ids[CAR] = 1, 2
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
    (tmp_path / "panoptic").mkdir()
    Image.fromarray(rgb).save(tmp_path / "panoptic" / "img0.png")
    segments = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 3}, {"id": 3, "category_id": 199}]
    panoptic = tmp_path / "panoptic.json"
    panoptic.write_text(json.dumps({"categories": GT_CATEGORIES, "annotations": [
        {"file_name": "img0.png", "image_id": 7, "segments_info": segments}]}))
    return instances, gt_io.coco_panoptic(str(tmp_path / "panoptic"), str(panoptic))


def test_perfect_prediction_scores_one(tmp_path, ground_truth):
    instances, panoptic = ground_truth
    pred = _write_pred(tmp_path / "pred", [PERSON, CAR], _semantic(PERSON, CAR))
    scores = report.evaluate(str(pred), str(instances), panoptic)
    assert scores["instances"]["AR@100"] == pytest.approx(1.0)
    assert scores["instances"]["AR@1"] == pytest.approx(0.5)  # one detection cannot recall two objects
    assert scores["semantic"]["mIoU"] == pytest.approx(1.0)
    assert scores["alignment"]["accuracy"] == pytest.approx(1.0)
    assert scores["images_scored"] == 1
    assert scores["panoptic"] == {group: {"PQ": 1.0, "SQ": 1.0, "RQ": 1.0, "classes": n}
                                  for group, n in (("all", 3), ("things", 2), ("stuff", 1))}


def test_panoptic_quality_of_aligned_labels_by_hand(tmp_path, ground_truth):
    instances, panoptic = ground_truth
    # The car is in the semantic map but no instance covers it: void in the prediction (no
    # instance-less things), so the ground-truth car is a false negative. The person is shifted by
    # two columns: IoU 80 / 120, still a match.
    shifted_person = np.roll(PERSON, 2, axis=1)
    pred = _write_pred(tmp_path / "pred", [shifted_person], _semantic(shifted_person, CAR))
    scores = report.evaluate(str(pred), str(instances), panoptic)["panoptic"]
    wall = H * W - PERSON.sum() - CAR.sum()
    # The wall's prediction excludes the void car pixels and 20 px the person took; it gains 20 back.
    wall_iou = (wall - 20) / (wall + 20)
    # panopticapi's means: SQ is 0 for a class without a true positive (the car), over classes that occur
    assert scores["things"] == pytest.approx({"PQ": (80 / 120) / 2, "SQ": (80 / 120) / 2, "RQ": 0.5, "classes": 2})
    assert scores["stuff"] == pytest.approx({"PQ": wall_iou, "SQ": wall_iou, "RQ": 1.0, "classes": 1})
    assert scores["all"]["PQ"] == pytest.approx((80 / 120 + 0.0 + wall_iou) / 3)


def test_panoptic_crowd_regions_are_void():
    categories = np.array([[1, 1, 199, 199]])
    segments = np.array([[5, 5, 0, 6]])
    target = metrics.panoptic_target(categories, segments, {5}, void=200)
    assert target[..., 0].tolist() == [[200, 200, 200, 199]]


def test_missing_and_shifted_masks_lower_scores_by_the_expected_amount(tmp_path, ground_truth):
    instances, panoptic = ground_truth
    missing = _write_pred(tmp_path / "missing", [CAR], _semantic(PERSON, CAR))
    assert report.evaluate(str(missing), str(instances))["instances"]["AR@100"] == pytest.approx(0.5)

    shifted_person = np.roll(PERSON, 2, axis=1)  # IoU 80 / 120 = 0.667: recalled at 4 of 10 thresholds
    shifted = _write_pred(tmp_path / "shifted", [shifted_person, CAR], _semantic(shifted_person, CAR))
    scores = report.evaluate(str(shifted), str(instances), panoptic)
    assert scores["instances"]["AR@100"] == pytest.approx((1.0 + 0.4) / 2)
    # semantic: the person keeps 80 of its 100 px and takes 20 of the wall's; the wall takes 20 back
    wall = H * W - PERSON.sum() - CAR.sum()
    wall_iou = (wall - 20) / (wall + 20)
    assert scores["semantic"]["mIoU"] == pytest.approx((80 / 120 + 1.0 + wall_iou) / 3)
    assert scores["semantic"]["per_class_iou"]["person"] == pytest.approx(80 / 120)


def test_wrong_category_breaks_alignment(tmp_path, ground_truth):
    instances, _ = ground_truth
    sem = _semantic(PERSON, CAR)
    sem[PERSON] = 2  # the person's pixels are labeled car: its instance gets category car
    pred = _write_pred(tmp_path / "pred", [PERSON, CAR], sem)
    assert report.evaluate(str(pred), str(instances))["alignment"]["accuracy"] == pytest.approx(0.5)


def test_confusion_matrix_by_hand():
    gt = np.array([[0, 0, 1], [1, 255, 2]])
    pred = np.array([[0, 1, 1], [1, 0, 7]])  # 7 is outside the taxonomy: always wrong
    cm = metrics.confusion_matrix(gt, pred, 3, ignore_value=255)
    scores = metrics.semantic_scores(cm)
    # class 0: tp 1, gt 2, pred 1 -> 1/2; class 1: tp 2, gt 2, pred 3 -> 2/3; class 2: tp 0, gt 1 -> 0
    assert scores.per_class_iou == pytest.approx({0: 0.5, 1: 2 / 3, 2: 0.0})
    assert scores.miou == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    assert scores.pixel_accuracy == pytest.approx(3 / 5)


def test_taxonomy_mapping_by_name_and_errors():
    mapping = gt_io.taxonomy_mapping({0: "wall-other-merged", 1: "person", 2: "zebra"},
                                     {199: "wall-other", 1: "person"})
    assert mapping == {0: 199, 1: 1}
    with pytest.raises(gt_io.GroundTruthError, match="--class-map"):
        gt_io.taxonomy_mapping({0: "a"}, {1: "b"})
    with pytest.raises(gt_io.GroundTruthError, match=r"\[5\]"):
        gt_io.taxonomy_mapping({0: "a"}, {1: "b"}, explicit={0: 5})


def test_file_name_mismatch_is_reported(tmp_path, ground_truth):
    instances, _ = ground_truth
    data = json.loads(instances.read_text())
    data["images"][0]["file_name"] = "other.jpg"
    instances.write_text(json.dumps(data))
    pred = _write_pred(tmp_path / "pred", [PERSON, CAR], _semantic(PERSON, CAR))
    with pytest.raises(gt_io.GroundTruthError, match="no labeled image matches a ground-truth file name"):
        report.evaluate(str(pred), str(instances))


def test_cli_writes_quality_json_and_prints_table(tmp_path, ground_truth, capsys):
    instances, _ = ground_truth
    pred = _write_pred(tmp_path / "pred", [PERSON, CAR], _semantic(PERSON, CAR))
    assert evaluate_command.main(["--pred", str(pred), "--gt", str(instances)]) == 0
    assert "instances AR@100" in capsys.readouterr().out
    assert json.loads((pred / "quality.json").read_text())["instances"]["AR@100"] == pytest.approx(1.0)
    assert evaluate_command.main(["--pred", str(tmp_path / "nowhere"), "--gt", str(instances)]) == 2
    assert "error:" in capsys.readouterr().err
