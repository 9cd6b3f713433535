"""The labeler sweep: one labeled output and one quality report per setting, side by side with speed."""

import json

import numpy as np
import pytest
from PIL import Image

from dataset_card.contract import codecs
from dataset_card.synthetic.shapes import shapes_image
from labeling.quality import sweep


def test_parse_setting_and_errors():
    assert sweep.parse_setting("points_per_side=32, pred_iou_thresh=0.88") == {
        "points_per_side": "32", "pred_iou_thresh": "0.88"}
    assert sweep.slug({"points_per_side": "8"}) == "points_per_side-8"
    with pytest.raises(ValueError, match="name=value"):
        sweep.parse_setting("points_per_side")


@pytest.mark.slow
@pytest.mark.ray
def test_sweep_labels_scores_and_tabulates_each_setting(tmp_path, capsys):
    rng = np.random.default_rng(0)
    images, annotations = [], []
    (tmp_path / "images" / "shapes").mkdir(parents=True)
    for i in range(3):
        rgb, _, shapes = shapes_image(rng, 96, 128)
        Image.fromarray(rgb).save(tmp_path / "images" / "shapes" / f"img{i}.png")
        images.append({"id": i + 1, "file_name": f"img{i}.png", "height": 96, "width": 128})
        for cls, mask in shapes:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cls,
                                "segmentation": codecs.encode_rle(mask), "area": int(mask.sum()),
                                "bbox": [0, 0, 1, 1], "iscrowd": 0})
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": images, "annotations": annotations,
                              "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "car"},
                                             {"id": 3, "name": "dog"}]}))
    code = sweep.main(["--input", str(tmp_path / "images"), "--output", str(tmp_path / "sweep"), "--gt", str(gt),
                       "--models", "tiny-random", "--setting", "points_per_side=4", "--setting", "points_per_side=8",
                       "--num-cpus", "2"])
    assert code == 0
    out = capsys.readouterr().out
    assert "points_per_side-4" in out and "points_per_side-8" in out and "AR@100" in out
    results = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [r["setting"] for r in results] == ["points_per_side-4", "points_per_side-8"]
    for r in results:
        assert r["images_per_s"] > 0 and r["quality"]["images_scored"] == 3
        assert 0.0 <= r["quality"]["instances"]["AR@100"] <= 1.0
        assert (tmp_path / "sweep" / r["setting"] / "quality.json").exists()
