"""Segmentation probe: mIoU on hand-made cases, sliding-window inference, mask sources, the CLI end to end."""

import os

import datasets
import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import save_for_hf

from dataset_card.synthetic import write_synthetic_dataset
from pretraining.evaluation import segment
from pretraining.evaluation.cli import main
from pretraining.evaluation.folders import EvalDataError, class_ids, load_eval_data
from pretraining.evaluation.segment import (
    SegmentationProbe,
    class_iou,
    confusion_matrix,
    mean_iou,
    pixel_accuracy,
    slide_logits,
    window_starts,
)


def t(rows):
    return torch.tensor(rows)


# --- mIoU -------------------------------------------------------------------------------------------


def test_perfect_prediction_scores_100():
    target = t([[0, 1], [2, 2]])
    conf = confusion_matrix(target, target, 3)
    assert mean_iou(conf) == pytest.approx(100.0)
    assert pixel_accuracy(conf) == pytest.approx(100.0)


def test_hand_computed_iou():
    pred, target = t([[0, 0], [1, 1]]), t([[0, 1], [1, 1]])
    conf = confusion_matrix(pred, target, 2)
    assert conf.tolist() == [[1, 0], [1, 2]]  # rows truth, columns prediction
    # class 0: TP 1, FP 1, FN 0 -> 1/2; class 1: TP 2, FP 0, FN 1 -> 2/3
    assert class_iou(conf).tolist() == pytest.approx([0.5, 2 / 3])
    assert mean_iou(conf) == pytest.approx(100 * (0.5 + 2 / 3) / 2)
    assert pixel_accuracy(conf) == pytest.approx(75.0)


def test_ignored_pixels_do_not_count_whatever_is_predicted():
    pred, target = t([[0, 0, 1, 1]]), t([[0, -1, -1, 1]])
    conf = confusion_matrix(pred, target, 2)
    assert conf.sum() == 2
    assert mean_iou(conf) == pytest.approx(100.0)


def test_class_absent_from_truth_and_prediction_is_left_out_of_the_mean():
    pred, target = t([[0, 0], [1, 1]]), t([[0, 1], [1, 1]])
    with_unused = confusion_matrix(pred, target, 5)  # classes 2..4 never appear
    assert class_iou(with_unused)[2:].isnan().all()
    assert mean_iou(with_unused) == pytest.approx(mean_iou(confusion_matrix(pred, target, 2)))


def test_class_predicted_but_absent_from_truth_counts_as_zero():
    pred, target = t([[0, 2]]), t([[0, 0]])
    iou = class_iou(confusion_matrix(pred, target, 3))
    assert iou[0] == pytest.approx(0.5) and iou[2] == 0.0 and iou[1].isnan()
    assert mean_iou(confusion_matrix(pred, target, 3)) == pytest.approx(25.0)


def test_confusion_accumulates_over_images_like_one_big_image():
    g = torch.Generator().manual_seed(0)
    preds = [torch.randint(0, 4, (5, 7), generator=g) for _ in range(3)]
    targets = [torch.randint(-1, 4, (5, 7), generator=g) for _ in range(3)]
    summed = sum(confusion_matrix(p, q, 4) for p, q in zip(preds, targets))
    assert torch.equal(summed, confusion_matrix(torch.cat(preds), torch.cat(targets), 4))


def test_out_of_range_class_is_an_error_not_a_silent_miscount():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        confusion_matrix(t([[0, 1]]), t([[0, 3]]), 3)


# --- sliding windows ---------------------------------------------------------------------------------


def test_window_starts_cover_the_length_and_end_flush():
    for length, crop, stride in [(64, 64, 42), (80, 64, 42), (200, 64, 42), (129, 64, 64)]:
        starts = window_starts(length, crop, stride)
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s:s + crop] = True
        assert covered.all() and starts[0] == 0 and starts[-1] == length - crop


def test_sliding_windows_equal_a_full_image_pass_for_a_per_pixel_model():
    conv = nn.Conv2d(3, 5, kernel_size=1)  # per-pixel, so windows must agree with one full pass
    image = torch.randn(1, 3, 50, 90)
    logits = slide_logits(conv, image, crop=32, stride=20)
    resized = F.interpolate(image, size=(32, 58), mode="bilinear", align_corners=False)
    expected = F.interpolate(conv(resized), size=(50, 90), mode="bilinear", align_corners=False)
    assert logits.shape == (1, 5, 50, 90)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


# --- the probe module --------------------------------------------------------------------------------


def tiny_vit(img_size=32):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=img_size, depth=2, embed_dim=32,
                             num_heads=2)


@pytest.mark.parametrize("frozen", [True, False])
def test_probe_shapes_and_where_gradients_go(frozen):
    probe = SegmentationProbe(tiny_vit(), num_classes=4, layers=2, frozen=frozen).train()
    logits = probe(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 4, 32, 32)
    logits.sum().backward()
    assert probe.head[1].weight.grad is not None
    encoder_grads = [p.grad is not None for p in probe.encoder.parameters()]
    assert not any(encoder_grads) if frozen else all(encoder_grads[:-2])  # final norm may be unused
    assert probe.encoder.training is not frozen  # a frozen encoder stays in eval mode


# --- mask sources ------------------------------------------------------------------------------------


def test_class_ids_map_ignore_and_ade20k_zero_label():
    mask = np.array([[0, 1, 255], [150, 2, 0]])
    assert class_ids(mask, 255).tolist() == [[0, 1, -1], [150, 2, 0]]
    assert class_ids(mask, None, reduce_zero_label=True).tolist() == [[-1, 0, 254], [149, 1, -1]]


def test_ade20k_layout_is_read_with_its_150_classes(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    for split, n in (("training", 3), ("validation", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 10, 3), 100, np.uint8)).save(root / "images" / split / f"ADE_{i}.jpg")
            Image.fromarray(np.array([[0, 1, 150] * 3 + [5]] * 8, np.uint8)).save(
                root / "annotations" / split / f"ADE_{i}.png")
    data = load_eval_data(str(tmp_path))
    assert (len(data.train), len(data.val), data.num_semantic_classes, data.layout) == (3, 2, 150, "ade20k")
    sample = data.val.load(1)
    assert sample.image.shape == (8, 10, 3) and sample.mask.tolist()[0] == [-1, 0, 149] * 3 + [4]


def test_datasets_folder_masks_need_their_class_count(tmp_path):
    rng = np.random.default_rng(0)
    masks = [rng.integers(0, 3, (6, 9)).astype(np.uint8) for _ in range(8)]
    masks[0][0, 0] = 255
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(np.zeros((6, 9, 3), np.uint8)) for _ in masks],
         "annotation": [Image.fromarray(m) for m in masks], "image_id": [f"img{i}" for i in range(8)]},
        features=datasets.Features({"image": datasets.Image(), "annotation": datasets.Image(),
                                    "image_id": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path))
    with pytest.raises(EvalDataError, match="--num-classes"):
        load_eval_data(str(tmp_path))
    data = load_eval_data(str(tmp_path), val_fraction=0.5, num_semantic_classes=3)
    assert data.num_semantic_classes == 3 and len(data.train) + len(data.val) == 8
    loaded = [split.load(i).mask for split in (data.train, data.val) for i in range(len(split))]
    assert sum(int((m == -1).sum()) for m in loaded) == 1  # 255 (the default ignore value) became -1
    assert all(m.max() <= 2 for m in loaded)


# --- end to end --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg_data")
    write_synthetic_dataset(str(root / "data"), num_images=24, num_shards=2, size=(32, 40), seed=1)
    model = tiny_vit()
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD}
    save_for_hf(model, str(root / "encoder"), safe_serialization=True)
    return root


def run_segment(root, output, *extra):
    return main(["segment", "--model", f"local-dir:{root / 'encoder'}", "--data", str(root / "data"),
                 "--config", "tiny", "--val-fraction", "0.3", "--output", str(output), "--set", "crop_size=32",
                 "--set", "batch_size=4", "--set", "iterations=48", "--set", "checkpoint_every=24", *extra])


@pytest.mark.slow
def test_segment_cli_trains_resumes_and_reports_miou(synthetic, tmp_path, capsys, monkeypatch):
    straight = run_segment(synthetic, tmp_path / "straight")
    out = capsys.readouterr().out
    assert "segment: mIoU" in out and os.path.isfile(tmp_path / "straight" / "metrics.json")
    # The head must clearly beat always predicting background on the same held-out split.
    val = load_eval_data(str(synthetic / "data"), val_fraction=0.3).val
    masks = [torch.from_numpy(val.load(i).mask) for i in range(len(val))]
    background = mean_iou(sum(confusion_matrix(torch.zeros_like(m), m, 4) for m in masks))
    assert straight["mIoU"] > background + 10.0

    # Stop after the first checkpoint (as a preemption would), then rerun the same command.
    real_save = segment.save_checkpoint

    def save_then_stop(path, state):
        real_save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(segment, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_segment(synthetic, tmp_path / "resumed")
    monkeypatch.setattr(segment, "save_checkpoint", real_save)
    resumed = run_segment(synthetic, tmp_path / "resumed")
    assert resumed["mIoU"] == pytest.approx(straight["mIoU"], abs=1e-6)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_segment_cli_needs_masks(synthetic, tmp_path):
    (tmp_path / "cls" / "a").mkdir(parents=True)
    (tmp_path / "cls" / "b").mkdir(parents=True)
    for name in ("a", "b"):
        for i in range(4):
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "cls" / name / f"{i}.png")
    with pytest.raises(SystemExit, match="no semantic masks"):
        main(["segment", "--model", f"local-dir:{synthetic / 'encoder'}", "--data", str(tmp_path / "cls"),
              "--output", str(tmp_path / "out"), "--val-fraction", "0.5"])
