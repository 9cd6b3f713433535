"""Detection: COCO read through pycocotools, COCOeval AP on known cases, ViTDet's backbone and Mask R-CNN,
large-scale jitter, the `detect` CLI end to end on a synthetic COCO."""

import json

import pytest
import timm
import torch
import torch.nn as nn
from pycocotools.coco import COCO
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import save_for_hf
from torchvision.ops import MultiScaleRoIAlign, masks_to_boxes

from pretraining.evaluate import main
from pretraining.evaluation import detect, loop
from pretraining.evaluation.coco import DetectionSet, coco_ap, load_coco, to_coco_results
from pretraining.evaluation.folders import EvalDataError
from pretraining.evaluation.maskrcnn import LEVELS, LevelRoIAlign, windowed_vit
from pretraining.evaluation.synthetic_layouts import COCO_CATEGORY_IDS, write_coco_layout
from pretraining.evaluation.transforms import detection_transform

MEAN, STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def tiny_vit(img_size=64, patch_size=8, depth=2, **kwargs):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=img_size, patch_size=patch_size,
                             depth=depth, embed_dim=32, num_heads=2, **kwargs)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """A tiny COCO release folder (24 train with one empty image and one crowd, 6 val) and a random encoder."""
    root = tmp_path_factory.mktemp("coco")
    write_coco_layout(str(root / "data"), num_train=24, num_val=6, size=(64, 64), seed=0)
    model = tiny_vit()
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": MEAN, "std": STD}
    save_for_hf(model, str(root / "encoder"), safe_serialization=True)
    return root


# --- COCO through pycocotools ---------------------------------------------------------------------------


def test_coco_reader_maps_categories_and_skips_crowds_and_empty_images(coco):
    data = load_coco(str(coco / "data"))
    raw = json.loads((coco / "data" / "annotations" / "instances_train2017.json").read_text())
    assert data.class_names == ("red ellipse", "green rectangle", "blue ellipse")
    assert data.train.cat_ids == sorted(COCO_CATEGORY_IDS.values()) and len(data.val) == 6
    assert len(data.train) == 23  # the image without objects is no training sample
    crowd = [a for a in raw["annotations"] if a["iscrowd"]]
    assert len(crowd) == 1 and any(isinstance(a["segmentation"], list) for a in raw["annotations"])
    objects = 0
    for i in range(len(data.train)):
        sample = data.train.load(i)
        anns = [a for a in raw["annotations"] if a["image_id"] == sample.image_id and not a["iscrowd"]]
        assert sorted(sample.labels.tolist()) == sorted(data.train.label_of[a["category_id"]] for a in anns)
        assert sample.masks.shape == (len(anns), 64, 64) and sample.image.shape == (64, 64, 3)
        assert sorted(sample.masks.sum((1, 2)).tolist()) == sorted(int(a["area"]) for a in anns)
        objects += len(anns)
    assert objects == len(raw["annotations"]) - len(crowd)  # every object but the crowd region


def test_large_scale_jitter_keeps_boxes_masks_and_pixels_together(coco):
    data = load_coco(str(coco / "data"))
    colours = {1: (200, 40, 40), 2: (40, 180, 60), 3: (50, 70, 210)}  # dataset_card.synthetic.shapes's shape colours
    dataset = DetectionSet(data.train, detection_transform(48, (0.5, 1.5)))
    torch.manual_seed(0)
    for i in range(6):
        image, target = dataset[i]
        assert image.dtype == torch.float32 and max(image.shape[1:]) <= 48 and image.max() <= 1.0
        masks, boxes = target["masks"], target["boxes"]
        assert masks.shape[1:] == image.shape[1:] and len(masks) == len(boxes) == len(target["labels"])
        torch.testing.assert_close(boxes, masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0]))
        for mask, label in zip(masks.bool(), target["labels"].tolist()):
            if mask.sum() > 20:  # the pixels under a mask have its class colour: the image moved with it
                mean = image[:, mask].mean(1) * 255
                assert (mean - torch.tensor(colours[label], dtype=torch.float32)).abs().max() < 40


def test_coco_folder_mistakes_are_one_sentence(tmp_path):
    with pytest.raises(EvalDataError, match="no annotations/instances_train"):
        load_coco(str(tmp_path))
    (tmp_path / "annotations").mkdir()
    for split in ("train", "val"):
        (tmp_path / "annotations" / f"instances_{split}2017.json").write_text("{}")
    with pytest.raises(EvalDataError, match="no image folder train2017/"):
        load_coco(str(tmp_path))


# --- box and mask AP ----------------------------------------------------------------------------------


def one_image_gt(boxes: list[list[float]], category: int = 5) -> COCO:
    """A ground truth of one 100 x 100 image whose objects are the given xywh rectangles."""
    gt = COCO()
    gt.dataset = {"images": [{"id": 1, "height": 100, "width": 100}],
                  "categories": [{"id": category, "name": "thing"}, {"id": 9, "name": "other"}],
                  "annotations": [{"id": i + 1, "image_id": 1, "category_id": category, "bbox": b, "area": b[2] * b[3],
                                   "iscrowd": 0, "segmentation": [[b[0], b[1], b[0] + b[2], b[1], b[0] + b[2],
                                                                   b[1] + b[3], b[0], b[1] + b[3]]]}
                                  for i, b in enumerate(boxes)]}
    gt.createIndex()
    return gt


def detections(gt: COCO, boxes: list[list[float]], labels: list[int]) -> list[dict]:
    """COCO results for xywh `boxes` (label k -> the k-th category), masks filling the boxes."""
    masks = torch.zeros(len(boxes), 1, 100, 100)
    for m, (x, y, w, h) in zip(masks, boxes):
        m[0, int(y):int(y + h), int(x):int(x + w)] = 1
    xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in boxes])
    output = {"boxes": xyxy, "labels": torch.tensor(labels), "scores": torch.linspace(0.9, 0.5, len(boxes)),
              "masks": masks}
    return to_coco_results(output, 1, [5, 9])


def test_perfect_detections_score_100_box_and_mask_ap(coco):
    data = load_coco(str(coco / "data"))
    gt, results = data.val.coco, []
    for ann in gt.dataset["annotations"]:
        x, y, w, h = ann["bbox"]
        output = {"boxes": torch.tensor([[x, y, x + w, y + h]]), "scores": torch.tensor([1.0]),
                  "labels": torch.tensor([data.val.label_of[ann["category_id"]]]),
                  "masks": torch.from_numpy(gt.annToMask(ann))[None, None].float()}
        results += to_coco_results(output, ann["image_id"], data.val.cat_ids)
    assert coco_ap(gt, results, "bbox")["AP"] == pytest.approx(100.0)
    assert coco_ap(gt, results, "segm")["AP"] == pytest.approx(100.0)


def test_known_detection_mistakes_give_their_known_ap():
    gt = one_image_gt([[10, 10, 20, 20], [60, 60, 30, 30]])
    # One of two objects found exactly: precision 1 up to recall 0.5, i.e. 51 of COCO's 101 recall points.
    half = detections(gt, [[10, 10, 20, 20]], [1])
    assert coco_ap(gt, half, "bbox")["AP"] == pytest.approx(100 * 51 / 101)
    assert coco_ap(gt, half, "segm")["AP"] == pytest.approx(100 * 51 / 101)
    # Both found, the second with IoU 12.4 / 20 = 0.62: a true positive at thresholds 0.50, 0.55, 0.60 of ten;
    # above them it is a false positive ranked after the exact one, which leaves precision 1 up to recall 0.5.
    shifted = detections(gt, [[60, 60, 30, 30], [10, 10, 20, 12.4]], [1, 1])
    expected = (3 * 100.0 + 7 * 100 * 51 / 101) / 10
    assert coco_ap(gt, shifted, "bbox")["AP"] == pytest.approx(expected)
    # The right boxes with the wrong class find nothing.
    assert coco_ap(gt, detections(gt, [[10, 10, 20, 20], [60, 60, 30, 30]], [2, 2]), "bbox")["AP"] == 0.0


# --- ViTDet's backbone and Mask R-CNN -------------------------------------------------------------------


def test_windowed_vit_is_the_plain_vit_when_every_block_is_global():
    vit = tiny_vit(img_size=32, patch_size=16, class_token=False, global_pool="avg").eval()
    sam = windowed_vit(vit, img_size=32, window_size=1, global_blocks=(0, 1), rel_pos=False).eval()
    images = torch.randn(2, 3, 32, 32)
    plain = vit.forward_intermediates(images, indices=[1], norm=False, intermediates_only=True)[0]
    torch.testing.assert_close(sam.forward_intermediates(images, indices=[1], intermediates_only=True)[0], plain)


def test_windowed_blocks_see_only_their_window_and_global_blocks_see_everything():
    images = torch.randn(1, 3, 64, 64)
    changed = images.clone()
    changed[..., :32, :32] += 1.0  # the top-left window of 4 x 4 patches (patch 8)

    def moved(global_blocks):
        sam = windowed_vit(tiny_vit(), img_size=64, window_size=4, global_blocks=global_blocks).eval()
        out = [sam.forward_intermediates(x, indices=[1], intermediates_only=True)[0] for x in (images, changed)]
        return (out[0] - out[1]).abs().sum(1)[0] > 1e-6  # (8, 8) patches whose output changed

    local = moved(())
    assert local[:4, :4].all() and not local[4:].any() and not local[:, 4:].any()
    assert moved((1,)).all()


def test_windowed_vit_resamples_position_embeddings_and_refuses_register_tokens():
    vit = tiny_vit(img_size=32, patch_size=16)
    sam = windowed_vit(vit, img_size=64, window_size=2, global_blocks=(1,))
    assert sam.pos_embed.shape == (1, 4, 4, 32)  # 2 x 2 grid (class row dropped) -> 4 x 4
    assert torch.equal(sam.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight)
    assert sam.blocks[0].attn.rel_pos_h.abs().sum() == 0  # ViTDet's relative positions start at zero
    with pytest.raises(ValueError, match="register tokens"):
        windowed_vit(tiny_vit(reg_tokens=2), img_size=64)


def test_mask_rcnn_trains_every_parameter_and_returns_coco_outputs():
    cfg = detect.DetectConfig(image_size=64, window_size=4, global_blocks="1", fpn_channels=16, box_fc=32,
                              anchor_sizes="8,16,32,64,128", proposals=50, rois_per_image=32)  # ViTDet's 4-conv heads
    model = detect.build_detector(tiny_vit(), 3, cfg, MEAN, STD).train()
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 8:30, 10:40], masks[1, 40:60, 5:25] = 1, 1
    target = {"boxes": masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0]), "labels": torch.tensor([1, 3]),
              "masks": masks}
    losses = model([torch.rand(3, 64, 64), torch.rand(3, 48, 56)], [target, {**target, "boxes": target["boxes"] * 0.7,
                                                                               "masks": masks[:, :48, :56]}])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 40, 64)])[0]
    assert out["masks"].shape[1:] == (1, 40, 64) and out["boxes"].shape[1] == 4  # in the input image's pixels


def test_roi_align_pools_the_features_each_box_covers_from_torchvisions_level():
    # Features that read their own coordinates: channel 0 is the column index, channel 1 the row index
    # (image 1 adds 1000). Bilinear sampling of a ramp is exact, so a box's pooled mean is the feature
    # coordinate of its centre: aligned, pixel centres sit at half-integers (x * scale - 0.5).
    size, strides = 512, (4, 8, 16, 32)  # a patch-16 ViT's pyramid
    features = {}
    for name, stride in zip(LEVELS, strides):
        n = size // stride
        ramp = torch.stack(torch.meshgrid(torch.arange(float(n)), torch.arange(float(n)), indexing="xy"))
        features[name] = torch.stack([ramp, ramp + 1000])  # (2, 2, n, n)
    features["pool"] = torch.zeros(2, 2, 4, 4)  # the RPN's extra level: never pooled
    # Sides 20, 150, 300, 460 fall on levels 2, 3, 4, 5 by torchvision's rule floor(4 + log2(side / 224)).
    boxes = [torch.tensor([[40.0, 50, 60, 70], [150, 120, 300, 270]]), torch.tensor([[100.0, 100, 400, 400],
                                                                                     [26, 26, 486, 486]])]
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    aligned = LevelRoIAlign(LEVELS, 7, strides)(features, boxes, [(size, size)] * 2)
    assert aligned.shape == (4, 2, 7, 7)
    centres = torch.cat(boxes).view(4, 2, 2).mean(1)  # (R, 2) box centres x, y in pixels
    offset = torch.tensor([0.0, 0.0, 1000.0, 1000.0])[:, None]  # each box reads its own image
    torch.testing.assert_close(aligned.mean((2, 3)), centres * torch.tensor(scales)[:, None] - 0.5 + offset)
    # torchvision's pooler assigns the same levels, and samples half a feature cell off.
    legacy = MultiScaleRoIAlign(list(LEVELS), 7, sampling_ratio=0)(features, boxes, [(size, size)] * 2)
    torch.testing.assert_close(legacy, aligned + 0.5)
    torch.testing.assert_close(LevelRoIAlign(LEVELS, 7, strides, aligned=False)(features, boxes, [(size, size)] * 2),
                               legacy)
    with pytest.raises(ValueError, match="not one power of two per level"):  # a patch-14 encoder's pyramid
        LevelRoIAlign(LEVELS, 7, (3.5, 7, 14, 28))


def test_the_detector_pools_with_aligned_roi_align_on_its_own_pyramids_levels():
    images = torch.rand(2, 3, 64, 64)
    boxes = [torch.tensor([[3.0, 5, 20, 30], [10, 2, 60, 63]]), torch.tensor([[30.0, 30, 34, 35]])]
    for aligned in (True, False):
        cfg = detect.DetectConfig(**{**vars(detect.detect_tiny()), "roi_aligned": aligned})
        model = detect.build_detector(tiny_vit(), 3, cfg, MEAN, STD)  # patch 8: strides 2, 4, 8, 16
        heads = model.roi_heads
        assert isinstance(heads.box_roi_pool, LevelRoIAlign) and isinstance(heads.mask_roi_pool, LevelRoIAlign)
        assert heads.box_roi_pool.aligned is heads.mask_roi_pool.aligned is aligned
        assert (heads.box_roi_pool.output_size, heads.mask_roi_pool.output_size) == ((7, 7), (14, 14))
        with torch.no_grad():
            features = model.backbone(images)
        pooled = heads.box_roi_pool(features, boxes, [(64, 64)] * 2)
        # The legacy sampling is exactly torchvision's pooler, whose scales are inferred from the maps.
        torchvision_pooled = MultiScaleRoIAlign(list(LEVELS), 7, sampling_ratio=0)(features, boxes, [(64, 64)] * 2)
        assert torch.allclose(pooled, torchvision_pooled, atol=1e-6) is not aligned
    assert detect.DetectConfig().roi_aligned is detect.detect_tiny().roi_aligned is True


def test_detector_layer_decay_covers_every_parameter_once():
    cfg = detect.detect_tiny()
    model = detect.build_detector(tiny_vit(), 3, cfg, MEAN, STD)
    backbone = model.backbone.vit
    groups = loop.layer_decay_groups(backbone, 0.1, 0.7)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale[id(backbone.blocks[1].attn.qkv.weight)] == pytest.approx(0.7)
    assert scale[id(backbone.blocks[0].attn.rel_pos_h)] == pytest.approx(0.7 ** 2)
    assert scale[id(backbone.pos_embed)] == pytest.approx(0.7 ** 3)
    assert len(scale) == sum(1 for _ in backbone.parameters())


# --- the CLI end to end --------------------------------------------------------------------------------


def run_detect(coco, output, *extra):
    return main(["detect", "--model", f"local-dir:{coco / 'encoder'}", "--data", str(coco / "data"),
                 "--config", "tiny", "--output", str(output), *extra])


@pytest.mark.slow
def test_detect_tiny_twin_beats_an_untrained_detector(coco, tmp_path, capsys, one_thread):
    trained = run_detect(coco, tmp_path / "trained")
    assert "detect: box AP" in capsys.readouterr().out
    assert json.loads((tmp_path / "trained" / "metrics.json").read_text())["box_AP"] == trained["box_AP"]
    found = json.loads((tmp_path / "trained" / "detections.json").read_text())
    assert found and {d["category_id"] for d in found} <= set(COCO_CATEGORY_IDS.values())
    untrained = run_detect(coco, tmp_path / "untrained", "--set", "iterations=0")
    for key in ("box_AP50", "mask_AP50"):
        assert trained[key] > untrained[key] + 5.0, (key, trained, untrained)


@pytest.mark.slow
def test_detect_resumes_to_the_same_weights(coco, tmp_path, monkeypatch, one_thread):
    short = ["--set", "iterations=8", "--set", "checkpoint_every=4", "--set", "lr_steps=6"]
    straight = run_detect(coco, tmp_path / "straight", *short)
    real_save = loop.save_checkpoint

    def save_then_stop(path, state):
        real_save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_detect(coco, tmp_path / "resumed", *short)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    resumed = run_detect(coco, tmp_path / "resumed", *short)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["box_AP"] == straight["box_AP"]


def test_detect_cli_errors_are_one_line(coco, tmp_path):
    for argv, hint in [(["--data", str(tmp_path)], "annotations/instances_train"),
                       (["--data", str(coco / "data"), "--set", "global_blocks=7"], "blocks 0..1")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["detect", "--model", f"local-dir:{coco / 'encoder'}", "--output", str(tmp_path / "out"), *argv])
        message = str(exit_info.value.code)
        assert message.startswith("error: ") and "\n" not in message and hint in message


def test_unused_module_is_not_left_in_the_detector():
    model = detect.build_detector(tiny_vit(), 3, detect.detect_tiny(), MEAN, STD)
    assert isinstance(model.backbone.vit.neck, nn.Identity) and len(model.backbone.vit.blocks) == 2
