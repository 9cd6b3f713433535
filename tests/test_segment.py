"""Segmentation: mIoU on hand-made cases, the UperNet and linear segmenters, augmentation, sliding-window
evaluation, ADE20K sources (release folder, the Hub), the CLI end to end on a synthetic ADE20K."""

import json

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
from torchvision import tv_tensors

from pretraining.evaluate import main
from pretraining.evaluation import loop, segment
from pretraining.evaluation.finetune import RunError
from pretraining.evaluation.folders import EvalDataError, Sample, SegmentationSet, class_ids, load_eval_data
from pretraining.evaluation.segment import (
    class_iou,
    confusion_matrix,
    evaluate_segmentation,
    mean_iou,
    pixel_accuracy,
    slide_logits,
    window_starts,
)
from pretraining.evaluation.segmenters import LinearSegmenter, UperNetSegmenter, block_features
from pretraining.evaluation.synthetic_layouts import write_ade20k_layout
from pretraining.evaluation.transforms import RandomCropAtMost, segmentation_transform


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


# --- the segmenters ---------------------------------------------------------------------------------


def tiny_vit(img_size=32, depth=2):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=img_size, depth=depth, embed_dim=32,
                             num_heads=2)


@pytest.mark.parametrize("frozen", [True, False])
def test_linear_segmenter_shapes_and_where_gradients_go(frozen):
    model = LinearSegmenter(tiny_vit(), num_classes=4, blocks=[0, 1], frozen=frozen).train()
    images = torch.randn(2, 3, 32, 32)
    assert model(images).shape == (2, 4, 32, 32)
    model(images, torch.randint(-1, 4, (2, 32, 32))).backward()
    assert model.head[1].weight.grad is not None
    encoder_grads = [p.grad is not None for p in model.encoder.parameters()]
    assert not any(encoder_grads) if frozen else all(encoder_grads)
    assert model.encoder.training is not frozen  # a frozen encoder stays in eval mode


def test_upernet_pyramid_has_strides_4_to_32_and_every_parameter_learns():
    model = UperNetSegmenter(tiny_vit(img_size=64, depth=4), num_classes=5, blocks=[0, 1, 2, 3], channels=16,
                             aux_channels=8).train()
    images = torch.randn(2, 3, 64, 64)
    feats = model.head["neck"](block_features(model.encoder, images, model.blocks, norm=False))
    assert [tuple(f.shape[1:]) for f in feats] == [(32, 16, 16), (32, 8, 8), (32, 4, 4), (32, 2, 2)]
    assert model(images).shape == (2, 5, 64, 64)
    model(images, torch.randint(-1, 5, (2, 64, 64))).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []  # nothing unused: DDP-safe


def test_upernet_heads_start_as_mmsegmentations():
    torch.manual_seed(0)
    model = UperNetSegmenter(tiny_vit(), num_classes=16, blocks=[0, 0, 1, 1], channels=64, aux_channels=32)
    for name in ("decode", "aux"):
        convs = [m for m in model.head[name].modules() if isinstance(m, nn.Conv2d)]
        classifier = model.head[name].classifier[1]
        for conv in convs:
            fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
            expected = 0.01 if conv is classifier else (2 / fan_out) ** 0.5  # mmcv's kaiming_init: fan-out, ReLU
            assert conv.weight.std().item() == pytest.approx(expected, rel=0.1), (name, conv)
            assert conv.bias is None or not conv.bias.any()


def test_upernet_keeps_only_the_blocks_it_reads():
    model = UperNetSegmenter(tiny_vit(depth=4), num_classes=3, blocks=[0, 0, 1, 1], channels=8, aux_channels=8)
    assert len(model.encoder.blocks) == 2 and isinstance(model.encoder.norm, nn.Identity)
    with pytest.raises(RunError, match="blocks 3,5,7,11 do not exist"):
        segment.build_segmenter(tiny_vit(depth=4), 3, segment.segment_upernet())


def test_upernet_loss_ignores_unlabelled_pixels_and_weighs_the_auxiliary_head():
    model = UperNetSegmenter(tiny_vit(), num_classes=3, blocks=[0, 0, 1, 1], channels=8, aux_channels=8).eval()
    images = torch.randn(2, 3, 32, 32)
    masks = torch.randint(0, 3, (2, 32, 32))
    masks[:, :, :10] = -1
    feats = model.head["neck"](block_features(model.encoder, images, model.blocks, norm=False))
    up = lambda x: F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)  # noqa: E731
    expected = (F.cross_entropy(up(model.head["decode"](feats)), masks, ignore_index=-1)
                + 0.4 * F.cross_entropy(up(model.head["aux"](feats)), masks, ignore_index=-1))
    torch.testing.assert_close(model(images, masks), expected)
    assert model(images, torch.full_like(masks, -1)).item() == 0.0  # no labelled pixel: no loss, no NaN


def test_layer_decay_follows_beit_mmsegmentation_and_detectron2():
    model = segment.build_segmenter(tiny_vit(depth=4), 3, segment.segment_tiny())  # blocks 0,0,1,1: 2 kept
    groups = segment.optimizer_groups(model, 0.05, 0.5)
    scale = {id(p): g.get("lr_scale", 1.0) for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["encoder.pos_embed"])] == 0.5 ** 3 and decay[id(named["encoder.pos_embed"])] == 0
    assert scale[id(named["encoder.blocks.0.attn.qkv.weight"])] == 0.5 ** 2
    assert scale[id(named["encoder.blocks.1.attn.qkv.weight"])] == 0.5  # the last block is decayed once
    assert decay[id(named["encoder.blocks.1.attn.qkv.weight"])] == 0.05 and decay[id(named["encoder.blocks.1.norm1.weight"])] == 0
    assert all(scale[id(p)] == 1.0 for n, p in named.items() if n.startswith("head."))
    assert len(scale) == len(named)  # every parameter is optimised exactly once
    frozen = segment.optimizer_groups(model, 0.05, None)
    assert sum(len(g["params"]) for g in frozen) == sum(1 for n in named if n.startswith("head."))


# --- augmentation ------------------------------------------------------------------------------------


def test_crops_are_redrawn_while_one_class_fills_them():
    mask = torch.zeros(40, 40, dtype=torch.int64)
    mask[:, :20] = 1  # left half class 1, right half class 0

    def balanced_share(ratio, seed):
        torch.manual_seed(seed)
        crop = RandomCropAtMost(16, cat_max_ratio=ratio)
        hits = 0
        for _ in range(50):
            window = crop(tv_tensors.Mask(mask))
            hits += bool(window.float().mean().item() < 0.75 and window.float().mean().item() > 0.25)
            assert window.shape == (16, 16)
        return hits / 50

    assert balanced_share(0.75, 0) > 0.9 > 0.5 > balanced_share(1.0, 0)


def test_training_transform_keeps_image_and_mask_aligned_and_pads_with_ignore():
    mask = torch.zeros(48, 60, dtype=torch.int64)
    mask[:24] = 1
    mask[:, 30:] += 2  # four quadrants, classes 0..3
    image = tv_tensors.Image((mask * 60).to(torch.uint8).expand(3, -1, -1).clone())
    transform = segmentation_transform(64, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), train=True, scale=(0.8, 0.9))
    torch.manual_seed(0)
    for _ in range(5):
        out_image, out_mask = transform(image, tv_tensors.Mask(mask))
        assert out_image.shape == (3, 64, 64) and out_mask.shape == (64, 64)
        padded = out_mask == -1
        assert padded.any() and (out_image[:, padded] == 0).all()  # rescaled to ~54 x 67: padded to 64
        from_colour = (out_image[0] * 255 / 60).round().long()
        agree = (from_colour == out_mask)[~padded].float().mean()
        assert agree > 0.95  # only pixels on the resized class borders may differ


# --- the evaluation -----------------------------------------------------------------------------------


class ColourOracle(nn.Module):
    """Predicts the class an image's red channel encodes (value 60 x class), optionally mislabelling one."""

    def __init__(self, num_classes, swap=None):
        super().__init__()
        self.num_classes, self.swap = num_classes, swap

    def forward(self, images):
        cls = (images[:, 0] * 255 / 60).round().long().clamp(0, self.num_classes - 1)
        if self.swap is not None:
            cls = torch.where(cls == self.swap[0], self.swap[1], cls)
        return F.one_hot(cls, self.num_classes).permute(0, 3, 1, 2).float()


class MemorySource:
    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def load(self, index):
        return self.samples[index]


def test_sliding_window_evaluation_scores_a_perfect_segmenter_100_and_a_known_confusion_exactly():
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(3):
        mask = np.zeros((32, 48), np.int64)
        mask[rng.integers(0, 16):, : rng.integers(16, 40)] = 1
        mask[: rng.integers(4, 12), rng.integers(20, 40):] = 2
        mask[0, 0] = -1
        samples.append(Sample(np.repeat((np.maximum(mask, 0) * 60).astype(np.uint8)[..., None], 3, 2), -1, mask))
    loader = torch.utils.data.DataLoader(
        SegmentationSet(MemorySource(samples), segmentation_transform(32, (0, 0, 0), (1, 1, 1), train=False)), 1)
    conf = evaluate_segmentation(ColourOracle(3), loader, 3, crop=32, device=torch.device("cpu"))
    assert mean_iou(conf) == pytest.approx(100.0) and conf.sum() == 3 * (32 * 48 - 1)
    # Calling every class-2 pixel class 1: IoU(0) = 1, IoU(1) = n1 / (n1 + n2), IoU(2) = 0.
    n1, n2 = (sum(int((s.mask == c).sum()) for s in samples) for c in (1, 2))
    conf = evaluate_segmentation(ColourOracle(3, swap=(2, 1)), loader, 3, crop=32, device=torch.device("cpu"))
    assert mean_iou(conf) == pytest.approx(100 * (1 + n1 / (n1 + n2) + 0) / 3)


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


# --- the Hub's ADE20K -------------------------------------------------------------------------------


def scene_parse_150_like(n_train=4, n_val=2):
    """What `load_dataset("scene_parse_150")` returns: image, annotation (ADE20K's convention), scene_category."""
    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image(),
                                  "scene_category": datasets.ClassLabel(names=["a", "b"])})

    def split(n):
        return datasets.Dataset.from_dict(
            {"image": [Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)) for _ in range(n)],
             "annotation": [Image.fromarray(np.array([[0, 1, 150, 7] * 2] * 6, np.uint8)) for _ in range(n)],
             "scene_category": [i % 2 for i in range(n)]}, features=features)

    return datasets.DatasetDict({"train": split(n_train), "validation": split(n_val), "test": split(1)})


def test_scene_parse_150_from_the_hub_is_read_as_ade20k(monkeypatch):
    calls = []

    def fake_load_dataset(repo, revision=None, **kwargs):
        calls.append((repo, revision))
        return scene_parse_150_like()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_eval_data("hub:zhoubolei/scene_parse_150@refs/convert/parquet")
    assert calls == [("zhoubolei/scene_parse_150", "refs/convert/parquet")]
    assert (len(data.train), len(data.val), data.num_semantic_classes, data.class_names) == (4, 2, 150, ())
    assert data.val.load(1).mask[0].tolist() == [-1, 0, 149, 6] * 2  # 0 ignored, k -> class k - 1


def test_the_hub_offline_fails_in_one_sentence():
    with pytest.raises(EvalDataError, match=r"online, or download the data \(ADE20K: ADEChallengeData2016\)") as err:
        load_eval_data("hub:scene_parse_150")
    assert "\n" not in str(err.value)


# --- end to end --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    """A tiny ADE20K release folder and a random tiny encoder at 64 px."""
    root = tmp_path_factory.mktemp("ade")
    write_ade20k_layout(str(root / "data"), num_train=16, num_val=4, size=(64, 80), seed=1)
    model = tiny_vit(img_size=64)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD}
    save_for_hf(model, str(root / "encoder"), safe_serialization=True)
    return root


def run_segment(root, output, config="tiny", *extra):
    return main(["segment", "--model", f"local-dir:{root / 'encoder'}", "--data", str(root / "data"),
                 "--config", config, "--output", str(output), *extra])


@pytest.mark.slow
def test_upernet_tiny_twin_on_ade20k_beats_an_untrained_head(ade, tmp_path, capsys, one_thread):
    trained = run_segment(ade, tmp_path / "trained")
    assert "segment: mIoU" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "trained" / "metrics.json").read_text())
    assert metrics["mIoU"] == trained["mIoU"] and len(metrics["class_iou"]) == 150
    untrained = run_segment(ade, tmp_path / "untrained", "tiny", "--set", "iterations=0")
    assert trained["mIoU"] > untrained["mIoU"] + 20.0, (trained["mIoU"], untrained["mIoU"])


@pytest.mark.slow
@pytest.mark.parametrize("config", ["tiny", "linear_tiny"])
def test_segment_resumes_to_the_same_weights(ade, tmp_path, monkeypatch, one_thread, config):
    short = ["--set", "iterations=12", "--set", "checkpoint_every=6", "--set", "batch_size=4"]
    straight = run_segment(ade, tmp_path / "straight", config, *short)
    real_save = loop.save_checkpoint

    def save_then_stop(path, state):  # preempted right after the first checkpoint
        real_save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_segment(ade, tmp_path / "resumed", config, *short)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    resumed = run_segment(ade, tmp_path / "resumed", config, *short)
    assert resumed["mIoU"] == pytest.approx(straight["mIoU"], abs=1e-6)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_segment_cli_needs_masks(ade, tmp_path):
    (tmp_path / "cls" / "a").mkdir(parents=True)
    (tmp_path / "cls" / "b").mkdir(parents=True)
    for name in ("a", "b"):
        for i in range(4):
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "cls" / name / f"{i}.png")
    with pytest.raises(SystemExit, match="no semantic masks"):
        main(["segment", "--model", f"local-dir:{ade / 'encoder'}", "--data", str(tmp_path / "cls"),
              "--output", str(tmp_path / "out"), "--val-fraction", "0.5"])
