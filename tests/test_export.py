"""timm export: the hub layout loads both ways and its features equal our encoder's RGB-only features."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from skimage import data as skdata
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from dataset_card.synthetic.shapes import write_synthetic_dataset
from pretraining.export import export_timm, load_run_model, main
from pretraining.models.factory import create_model
from pretraining.train import train
from pretraining.training.config import apply_overrides
from pretraining.training.recipes import tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: one thread beats two here


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    write_synthetic_dataset(str(root / "shapes"), num_images=32, num_shards=2, size=(64, 64), seed=0)
    cfg = apply_overrides(tiny(), ["epochs=1", "data.batch_size=8", "data.num_workers=0", "figure_every=0"])
    train(cfg, str(root / "shapes"), str(root / "run"), progress=False)
    return root / "run"


def _images(size: int) -> torch.Tensor:
    """Two normalised photos (astronaut, coffee) at size x size, as the loader would give them."""
    photos = [torch.from_numpy(np.ascontiguousarray(p)).permute(2, 0, 1).float() / 255
              for p in (skdata.astronaut(), skdata.coffee())]
    x = torch.stack([F.interpolate(p[None], size=(size, size), mode="bilinear", antialias=True)[0] for p in photos])
    return (x - torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)


def test_export_loads_in_timm_both_ways_with_equal_features(run_dir, tmp_path, capsys):
    out = tmp_path / "timm"
    assert main([str(run_dir), "--to", "timm", "--output", str(out)]) == 0
    assert "local-dir:" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    model, _ = load_run_model(run_dir)
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == model.cfg.timm_arch == "vit_tiny_patch16_224"
    assert config["num_classes"] == 0
    assert config["pretrained_cfg"]["mean"] == list(IMAGENET_DEFAULT_MEAN)
    assert config["pretrained_cfg"]["std"] == list(IMAGENET_DEFAULT_STD)
    assert config["pretrained_cfg"]["input_size"] == [3, 64, 64]

    x = _images(64)
    with torch.no_grad():
        ours = model.encode_rgb(x)  # (B, 1 + N, D)
        hub = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0).eval()
        assert torch.allclose(hub.forward_features(x), ours, atol=1e-5)
        plain = timm.create_model(config["architecture"], **config["model_args"]).eval()
        plain.load_state_dict(safetensors.torch.load_file(out / "model.safetensors"), strict=True)
        assert torch.allclose(plain.forward_features(x), ours, atol=1e-5)
        assert plain(x).shape == (2, model.cfg.embed_dim)  # num_classes=0: pooled features


@pytest.mark.parametrize("name", ["mae_vit_tiny_patch16_dec512d8b", "c2fmae_vit_tiny_patch16"])
def test_standard_size_export_loads_into_the_plain_architecture(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, num_semantic_classes=4, decoder_dim=64, decoder_depth=1).eval()
    out, _ = export_timm(model, tmp_path / name)
    encoder = timm.create_model(model.cfg.timm_arch, num_classes=0).eval()  # 224 px: no extra arguments
    encoder.load_state_dict(safetensors.torch.load_file(out / "model.safetensors"), strict=True)
    x = _images(224)
    with torch.no_grad():
        assert torch.allclose(encoder.forward_features(x), model.encode_rgb(x), atol=1e-5)


def test_export_of_a_folder_that_is_not_a_run_is_one_clear_error(tmp_path, capsys):
    assert main([str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert "not a training run folder" in capsys.readouterr().err


def _tampered(run_dir, to, key, value):
    import shutil

    shutil.copytree(run_dir, to)
    config = json.loads((to / "config.json").read_text())
    config["model"][key] = value
    (to / "config.json").write_text(json.dumps(config))
    return to


@pytest.mark.parametrize("key, value", [("num_heads", 6), ("depth", 4)])
def test_export_refuses_a_config_json_that_disagrees_with_the_checkpoint(run_dir, tmp_path, capsys, key, value):
    """The model is rebuilt from the checkpoint's own config: an edited config.json cannot ship an encoder
    whose timm config disagrees with its weights, and is named, in one sentence, not exported."""
    run = _tampered(run_dir, tmp_path / "run", key, value)
    assert main([str(run), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "disagrees with the config stored in checkpoint step-" in err and f"model.{key}" in err
    assert err.count("\n") == 1 and "Traceback" not in err and not (tmp_path / "out").exists()


def test_a_checkpoint_that_does_not_fit_its_own_config_is_one_sentence(run_dir, tmp_path, capsys):
    import shutil

    from pretraining.training import checkpoint as ckpt

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    path = ckpt.latest_checkpoint(run)
    state = ckpt.load_checkpoint(path)
    state["model"] = {k: v for k, v in state["model"].items() if "blocks.1." not in k}  # a damaged state dict
    torch.save(state, path)
    assert main([str(run), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {path} does not load into c2fmae_vit_tiny_patch16 built from its own config" in err
    assert re.search(r"missing key\(s\) in state_dict: \d+ keys, e.g. \S*blocks\.1\.", err) and err.count("\n") == 1 and "Traceback" not in err
