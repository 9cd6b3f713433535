"""Fine-tuning: loading exported / checkpointed timm encoders, the new head, exact resumption, ViTDet key
conversion."""

import dataclasses
import json
import os
import re

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.models import save_for_hf

from dataset_card.synthetic.shapes import write_synthetic_dataset
from pretraining.evaluate import main
from pretraining.evaluation import detect, finetune
from pretraining.evaluation.backbones import UserError, load_timm_model
from pretraining.evaluation.vitdet import ConversionError, save_vitdet_checkpoint, timm_to_vitdet

ARGS = dict(depth=2, embed_dim=32, num_heads=2)


def tiny_vit(img_size=32, **kw):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=img_size, **{**ARGS, **kw})


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoder")
    model = tiny_vit()
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD}
    save_for_hf(model, str(root / "timm"), safe_serialization=True)
    save_file(model.state_dict(), str(root / "weights.safetensors"))
    torch.save({"model": model.state_dict()}, root / "weights.pth")
    return root


# --- loading the encoder -----------------------------------------------------------------------------


def test_export_folder_loads_into_a_classifier_with_the_same_encoder(encoder_dir):
    original = tiny_vit()
    model = load_timm_model(f"local-dir:{encoder_dir / 'timm'}", num_classes=7, global_pool="avg")
    assert model.head.out_features == 7
    for name, tensor in original.state_dict().items():
        if not name.startswith("norm."):  # average pooling uses a fresh fc_norm instead
            assert torch.equal(model.state_dict()[name], tensor), name


@pytest.mark.parametrize("file", ["weights.safetensors", "weights.pth"])
def test_architecture_plus_checkpoint_resamples_position_embedding(encoder_dir, file):
    model = load_timm_model("vit_tiny_patch16_224", str(encoder_dir / file), num_classes=3, img_size=64, **ARGS)
    assert model.pos_embed.shape == (1, 1 + 16, 32)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, tiny_vit().blocks[1].mlp.fc2.weight)
    assert model.pretrained_cfg["mean"] == IMAGENET_DEFAULT_MEAN  # our pretraining's normalisation


def test_weights_of_another_architecture_are_refused_in_one_sentence(encoder_dir):
    with pytest.raises(UserError, match="does not fit .*pass the architecture"):
        load_timm_model("vit_tiny_patch16_224", str(encoder_dir / "weights.safetensors"), depth=2, embed_dim=48,
                        num_heads=2)
    with pytest.raises(UserError, match="lacks blocks.2"):  # timm itself would load this silently
        load_timm_model("vit_tiny_patch16_224", str(encoder_dir / "weights.safetensors"), depth=3, embed_dim=32,
                        num_heads=2)


def test_model_spec_mistakes_say_what_to_do(tmp_path):
    with pytest.raises(UserError, match="--checkpoint FILE .* or --random-init"):
        load_timm_model("vit_tiny_patch16_224")
    with pytest.raises(UserError, match="neither a folder nor a timm architecture"):
        load_timm_model("no_such_model")
    with pytest.raises(UserError, match="no config.json"):
        load_timm_model(f"local-dir:{tmp_path}")
    with pytest.raises(UserError, match="does not exist"):
        load_timm_model("vit_tiny_patch16_224", str(tmp_path / "missing.safetensors"))


def test_a_new_head_starts_as_maes_and_a_head_the_weights_carry_is_kept(encoder_dir, tmp_path):
    spec = f"local-dir:{encoder_dir / 'timm'}"
    torch.manual_seed(0)
    new = load_timm_model(spec, head_init_std=2e-5, num_classes=1000, global_pool="avg").head
    assert 1.9e-5 < new.weight.std().item() < 2.1e-5 and not new.bias.any()  # MAE's trunc_normal_(std=2e-5)
    torch.manual_seed(0)
    assert 0.019 < load_timm_model(spec, num_classes=1000, global_pool="avg").head.weight.std().item() < 0.021  # timm's
    # A fine-tuned classifier evaluated or fine-tuned again keeps the head it learned.
    classifier = timm.create_model("vit_tiny_patch16_224", num_classes=7, img_size=32, global_pool="avg", **ARGS)
    save_for_hf(classifier, str(tmp_path / "classifier"), safe_serialization=True)
    kept = load_timm_model(f"local-dir:{tmp_path / 'classifier'}", head_init_std=2e-5, num_classes=7, global_pool="avg")
    assert torch.equal(kept.head.weight, classifier.head.weight)


def test_the_finetune_command_builds_its_head_at_the_recipes_std(encoder_dir, labeled, tmp_path, monkeypatch):
    heads = []

    def capture(model, data, cfg, output, device, progress=True):
        heads.append(model.head)
        return {"top1": 0.0, "top5": 0.0, "best_top1": 0.0, "epochs": cfg.epochs}

    monkeypatch.setattr(finetune, "finetune", capture)
    for std in ("2e-5", "0.5"):
        main(["finetune", "--model", f"local-dir:{encoder_dir / 'timm'}", "--data", str(labeled), "--config", "tiny",
              "--val-fraction", "0.3", "--output", str(tmp_path), "--set", f"head_init_std={std}"])
    assert finetune.FinetuneConfig().head_init_std == 2e-5
    assert heads[0].weight.abs().max() < 1e-4 < heads[1].weight.std()  # 5 std of 2e-5 and not heads[0].bias.any()


def test_layer_decay_and_weight_decay_are_maes():
    depth, decay = 3, 0.65
    model = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32, global_pool="avg",
                              **{**ARGS, "depth": depth})
    optimizer = finetune.make_optimizer(model, finetune.FinetuneConfig(layer_decay=decay))
    names = {id(p): n for n, p in model.named_parameters()}
    group = {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    assert set(group) == set(names.values())
    expected = {"cls_token": (decay ** (depth + 1), 0.0), "pos_embed": (decay ** (depth + 1), 0.0),
                "patch_embed.proj.weight": (decay ** (depth + 1), 0.05), "blocks.0.attn.qkv.weight": (decay**depth, 0.05),
                "blocks.2.norm1.weight": (decay, 0.0), "blocks.2.mlp.fc2.weight": (decay, 0.05),
                "fc_norm.weight": (1.0, 0.0), "head.weight": (1.0, 0.05), "head.bias": (1.0, 0.0)}
    for name, (scale, wd) in expected.items():
        assert group[name] == (pytest.approx(scale), wd), name


# --- augmentation --------------------------------------------------------------------------------------


def test_mae_randaugment_survives_posterize_to_zero_bits():
    transform = finetune.pillow13_safe(create_transform(32, is_training=True, auto_augment="rand-m9-mstd0.5-inc1"))
    posterize = next(op for t in transform.transforms for op in getattr(t, "ops", ()) if op.name.startswith("Post"))
    posterize.magnitude, posterize.magnitude_std, posterize.prob = 10, 0, 1.0  # asks Pillow for 0 bits
    image = Image.fromarray(np.full((32, 32, 3), 200, np.uint8))
    assert np.asarray(posterize(image)).max() == 0  # what Pillow < 13 returned
    assert transform(image).shape == (3, 32, 32)


# --- fine-tuning end to end ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft_data")
    write_synthetic_dataset(str(root), num_images=24, num_shards=2, size=(32, 32), seed=2)
    return root


def run_finetune(encoder_dir, data, output):
    return main(["finetune", "--model", f"local-dir:{encoder_dir / 'timm'}", "--data", str(data), "--config", "tiny",
                 "--val-fraction", "0.3", "--output", str(output), "--set", "batch_size=8", "--set", "epochs=2"])


@pytest.mark.slow
def test_finetune_resumes_to_the_same_weights(encoder_dir, labeled, tmp_path, capsys, monkeypatch):
    straight = run_finetune(encoder_dir, labeled, tmp_path / "straight")
    assert "finetune: top-1" in capsys.readouterr().out
    assert json.loads((tmp_path / "straight" / "metrics.json").read_text())["epochs"] == 2
    assert os.path.isfile(tmp_path / "straight" / "model" / "model.safetensors")  # a timm folder to reuse

    calls = []
    real_eval = finetune.evaluate_classifier

    def crash_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job is killed after epoch 1's checkpoint
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(finetune, "evaluate_classifier", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(encoder_dir, labeled, tmp_path / "resumed")
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(finetune, "evaluate_classifier", real_eval)
    resumed = run_finetune(encoder_dir, labeled, tmp_path / "resumed")

    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert b["epoch"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed["top1"] == straight["top1"]
    # The whole encoder is fine-tuned, not only the head.
    assert not torch.equal(a["model"]["blocks.0.attn.qkv.weight"], tiny_vit().blocks[0].attn.qkv.weight)


def test_resuming_with_other_settings_is_refused(encoder_dir, labeled, tmp_path):
    finetune.save_checkpoint(str(tmp_path / "checkpoint.pt"), {"config": {"epochs": 5}})
    with pytest.raises(SystemExit, match="written with epochs=5.*new --output"):
        run_finetune(encoder_dir, labeled, tmp_path)


@pytest.mark.parametrize("recipe, key, before", [(finetune.finetune_tiny, "head_init_std", 0.02),
                                                  (detect.detect_tiny, "roi_aligned", False)])
def test_a_checkpoint_older_than_a_setting_resumes_only_with_the_value_it_ran_with(tmp_path, recipe, key, before):
    path = str(tmp_path / "checkpoint.pt")
    config = dataclasses.asdict(recipe())
    old = {k: v for k, v in config.items() if k != key}  # written before the setting existed
    finetune.save_checkpoint(path, {"config": old})
    with pytest.raises(finetune.RunError, match=rf"{key}={before!r}, not {config[key]!r} .*--set {key}={before} resumes"):
        finetune.load_checkpoint(path, config)
    assert finetune.load_checkpoint(path, {**config, key: before})["config"] == old


# --- ViTDet --------------------------------------------------------------------------------------------


def detectron2_vit_keys(depth: int) -> set[str]:
    """Parameter names of detectron2's ViT (modeling/backbone/vit.py) with global attention, no rel-pos."""
    keys = {"pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    for i in range(depth):
        for layer in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{layer}.weight", f"blocks.{i}.{layer}.bias"}
    return {"backbone.net." + k for k in keys}


def test_vitdet_keys_and_shapes_match_detectron2_vit(tmp_path):
    model = tiny_vit(img_size=64)
    converted = timm_to_vitdet(model.state_dict())
    assert set(converted) == detectron2_vit_keys(depth=2)
    assert converted["backbone.net.pos_embed"].shape == (1, 1 + 16, 32)  # pretrain_use_cls_token=True
    assert converted["backbone.net.blocks.1.attn.qkv.weight"].shape == (96, 32)
    no_cls = timm_to_vitdet(model.state_dict(), pretrain_use_cls_token=False)
    assert torch.equal(no_cls["backbone.net.pos_embed"], model.pos_embed[:, 1:])
    # detectron2's layer-wise lr decay finds the block id in these names
    assert all(re.search(r"\.blocks\.\d+\.", k) for k in converted if "blocks" in k)

    path = tmp_path / "vitdet.pth"
    assert save_vitdet_checkpoint(model.state_dict(), str(path)) == len(converted)
    saved = torch.load(path, weights_only=True)["model"]
    assert all(torch.equal(saved[k], v) for k, v in converted.items())


def test_vitdet_refuses_weights_it_cannot_hold():
    layer_scale = timm.create_model("vit_tiny_patch16_224", num_classes=0, init_values=1e-5, **ARGS)
    with pytest.raises(ConversionError, match="ls1"):
        timm_to_vitdet(layer_scale.state_dict())


def test_vitdet_cli_writes_the_checkpoint(encoder_dir, tmp_path, capsys):
    main(["vitdet", "--model", f"local-dir:{encoder_dir / 'timm'}", "--output", str(tmp_path / "d2.pth")])
    assert "vitdet: wrote 27 backbone tensors" in capsys.readouterr().out
