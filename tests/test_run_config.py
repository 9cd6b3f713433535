"""The run config holds the whole resolved model config: `--set model.*` (derived fields follow through the
factory), a run folder written before it did (tests/data/run_v1) still exports, initialises and resumes, and a
factory default changed after a run changes neither what it resumes with nor what it exports."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from dataset_card.synthetic.shapes import write_synthetic_dataset
from pretraining.export import load_run_model
from pretraining.export import main as export_main
from pretraining.models.autoencoder import ModelConfig
from pretraining.models.factory import FAMILIES, create_model, model_config
from pretraining.train import main as train_main
from pretraining.training import checkpoint as ckpt
from pretraining.training.config import ConfigError, apply_overrides, from_dict, to_dict
from pretraining.training.init_weights import initialize
from pretraining.training.recipes import get_recipe, tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: one thread beats two here

RUN_V1 = Path(__file__).parent / "data" / "run_v1"  # see its HOW.md
# The model run_v1 was trained with, in today's spelling, and a cadence that checkpoints every step.
V1_MODEL = ("model.depth=1", "model.embed_dim=16", "model.num_heads=2", "model.decoder_dim=16", "model.decoder_depth=1")
SETS = ("epochs=1", "data.batch_size=8", "data.num_workers=0", "checkpoint_every=1000", "keep_checkpoints=1",
        "log_every=1", "figure_every=0", *V1_MODEL)


def _args(data, output, *extra_sets, flags=()) -> list[str]:
    return ["--data", str(data), "--output", str(output), "--no-progress", *flags,
            *[a for s in (*SETS, *extra_sets) for a in ("--set", s)]]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """The rows run_v1 was trained on (the same writer's call)."""
    root = tmp_path_factory.mktemp("run_config") / "shapes"
    write_synthetic_dataset(str(root), num_images=16, num_shards=2, size=(64, 64), seed=0)
    return root


# --set model.* ---------------------------------------------------------------------------------------


def test_set_model_fields_rederives_token_counts_as_the_factory_does():
    recipe = tiny().model  # 64 px: 16 positions x 3 modalities, 24 of the 48 tokens visible
    wider = apply_overrides(tiny(), ["model.img_size=96"]).model
    assert wider.masking.num_positions == 36 and wider.masking.num_visible == 54  # still half of the tokens
    assert wider == model_config("c2fmae_vit_tiny_patch16", img_size=96, depth=2, decoder_dim=128, num_visible=54)
    assert apply_overrides(tiny(), ["model.masking.num_visible=10", "model.img_size=96"]).model.masking.num_visible == 10
    # Labels as targets only: the factory's rule, MAE's share of the positions the encoder reads.
    rgb = apply_overrides(tiny(), ["model.input_modalities=('rgb',)"]).model
    assert rgb == model_config("c2fmae_vit_tiny_patch16", img_size=64, depth=2, decoder_dim=128,
                               input_modalities=("rgb",))
    assert rgb.masking.inputs == (2,) and rgb.masking.num_visible == 4
    # Where the recipe's count is the family's share, a --set gives what the factory gives at that size.
    for recipe_name, name in (("c2fmae_base_400ep", "c2fmae_vit_base_patch16"),
                              ("mae_base", "mae_vit_base_patch16_dec512d8b")):
        assert get_recipe(recipe_name).model == model_config(name)
        assert apply_overrides(get_recipe(recipe_name), ["model.img_size=128"]).model == model_config(name, img_size=128)
    # Fields no count follows change alone; nested fields are set by their path.
    assert apply_overrides(tiny(), ["model.depth=1"]).model == dataclasses.replace(recipe, depth=1)
    nested = apply_overrides(tiny(), ["model.masking.curriculum.first_until=0.2", "model.masking.strategy=random"])
    assert nested.model.masking.curriculum.first_until == 0.2 and nested.model.masking.strategy == "random"


@pytest.mark.parametrize("bad, says", [
    ("model_args.depth=1", "now set as model.depth=1"),
    ("model_args.first_until=0.2", "now set as model.masking.curriculum.first_until=0.2"),
    ("model_args.curriculum.mode=adaptive", "now set as model.masking.curriculum.mode=adaptive"),
    ("model_args.masking=random", "now set as model.masking.strategy=random"),
    ("model_args.num_visible=9", "now set as model.masking.num_visible=9"),
    ("model.masking=random", "masking is a group; set one of its fields"),
    ("model.depth=two", "expected a int"),
    ("model.decoder=serial", "Unknown decoder 'serial'"),
    ("model.masking.num_positions=5", "masking.num_positions is 5 but 64 px images with patch 16 have 16"),
    ("model.arch=mae_vit_tiny_patch16_dec512d8b", "arch records the factory the config came from"),
])
def test_bad_model_overrides_are_one_sentence(bad, says):
    with pytest.raises(ConfigError, match=re.escape(says)) as err:
        apply_overrides(tiny(), [bad])
    assert "\n" not in str(err.value) and str(err.value).startswith(f"--set {bad.partition('=')[0]}")


# A run folder written before the model config was stored whole ------------------------------------------


def test_an_old_run_folder_exports_initialises_and_resumes(shapes, tmp_path, capsys):
    run = shutil.copytree(RUN_V1, tmp_path / "run")
    old = json.loads((run / "config.json").read_text())
    assert old["model"] == "c2fmae_vit_tiny_patch16" and "model_args" in old  # the old format
    model, _ = load_run_model(run)
    # Resolved through today's factory, with what that run trained with where a switch came later.
    assert model.cfg == model_config(old["model"], num_semantic_classes=4, semantic_head_fp32=False,
                                     instance_offset_loss="l1", **old["model_args"])
    assert model.cfg.instance_offset_loss == "l1"  # what it trained with, whatever the factory's default
    assert export_main([str(run), "--output", str(tmp_path / "timm")]) == 0
    assert (tmp_path / "timm" / "model.safetensors").is_file()

    torch.manual_seed(0)
    fresh = create_model("c2fmae_vit_tiny_patch16", num_semantic_classes=4, img_size=64, depth=1, embed_dim=16,
                         num_heads=2, decoder_dim=16, decoder_depth=1, num_visible=24)
    report = initialize(fresh, RUN_V1)
    assert report.format == "run" and "encoder.modality_embed[semantic]" in report.loaded
    assert torch.equal(fresh.encoder.blocks[0].attn.qkv.weight, model.encoder.blocks[0].attn.qkv.weight)

    # Resumed with today's spelling for another epoch. The synthetic writer's manifest has changed since
    # the fixture was made (its rows have not), so the data is declared new on purpose.
    capsys.readouterr()
    assert train_main(_args(shapes, run, "epochs=2", flags=["--new-data"])) == 0
    captured = capsys.readouterr()
    assert "resuming from" in captured.err and "optimizer step 2" in captured.err
    assert "extending the run from 1 to 2 epochs" in captured.err and "done: 4 optimizer steps" in captured.out
    config = json.loads((run / "config.json").read_text())
    assert "model_args" not in config and config["model"] == to_dict(model.cfg)  # now stored whole
    resumed, path = load_run_model(run)
    assert path.name == "step-00000004.pt" and resumed.cfg == model.cfg


# A factory default that changes after a run ------------------------------------------------------------------


def test_a_changed_factory_default_changes_neither_resume_nor_export(shapes, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert train_main(_args(shapes, run)) == 0
    same = shutil.copytree(run, tmp_path / "same")
    before, _ = load_run_model(run)
    x = torch.randn(2, 3, 64, 64)

    monkeypatch.setitem(FAMILIES["c2fmae"]["recipe"], "lambda_rgb", 2.0)  # a loss weight, changed in the code
    assert tiny().model.lambda_rgb == 2.0 and before.cfg.lambda_rgb == 1.0
    after, _ = load_run_model(run)
    assert after.cfg == before.cfg
    with torch.no_grad():
        assert torch.equal(after.encode_rgb(x), before.encode_rgb(x))

    # The same command resumes with the run's stored config, not today's default; so does the run as if
    # nothing had changed.
    assert train_main(_args(shapes, run, "epochs=2")) == 0
    assert json.loads((run / "config.json").read_text())["model"]["lambda_rgb"] == 1.0
    monkeypatch.undo()
    assert train_main(_args(shapes, same, "epochs=2")) == 0
    final = [ckpt.load_checkpoint(ckpt.latest_checkpoint(r)) for r in (run, same)]
    assert final[0]["config"] == final[1]["config"] and final[0]["global_step"] == 4
    assert all(torch.equal(final[0]["model"][k], final[1]["model"][k]) for k in final[1]["model"])


def test_a_rerun_continues_the_stored_config_and_names_its_recipe(shapes, tmp_path, capsys):
    """A rerun starts from RUN/config.json: its --set overrides apply to what the run stored (a changed
    setting is still refused), and --config, when given, must name the run's recipe."""
    run = tmp_path / "run"
    assert train_main(_args(shapes, run)) == 0
    assert train_main(["--data", str(shapes), "--output", str(run), "--no-progress", "--set", "epochs=2"]) == 0
    assert json.loads((run / "summary.json").read_text())["global_step"] == 4
    capsys.readouterr()
    assert train_main(_args(shapes, run, "epochs=3", "model.lambda_rgb=2.0")) == 2
    assert "differing: model.lambda_rgb" in capsys.readouterr().err
    assert train_main(["--data", str(shapes), "--output", str(run), "--config", "mae_base", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "was started from --config tiny, not mae_base" in err and err.count("\n") == 1


def test_the_factories_train_squared_error_offsets_and_a_config_without_the_field_reads_l1():
    """The factories' default is squared error (docs/model.md, Losses); ModelConfig's own default stays L1,
    what a stored config written before the switch trained with."""
    for name in ("c2fmae_vit_tiny_patch16", "multimae_vit_tiny_patch16"):
        assert model_config(name).instance_offset_loss == "mse"
    assert tiny().model.instance_offset_loss == "mse"
    stored = to_dict(model_config("c2fmae_vit_tiny_patch16"))
    del stored["instance_offset_loss"]
    assert from_dict(ModelConfig, stored).instance_offset_loss == "l1"


def test_a_stored_model_config_without_a_later_switch_resumes_and_exports_as_it_trained(shapes, tmp_path):
    """A run whose stored model config predates `instance_offset_loss` trained with L1 offsets: export and
    resume read L1 back (ModelConfig's default) even where today's factory default differs, and the resumed
    run records it."""
    run = tmp_path / "run"
    assert train_main(_args(shapes, run, "model.instance_offset_loss=l1")) == 0
    config = json.loads((run / "config.json").read_text())
    del config["model"]["instance_offset_loss"]  # as written before the switch existed
    (run / "config.json").write_text(json.dumps(config))
    path = ckpt.latest_checkpoint(run)
    state = ckpt.load_checkpoint(path)
    state["config"] = json.dumps(config)
    torch.save(state, path)

    model, _ = load_run_model(run)
    assert model.cfg.instance_offset_loss == "l1"
    assert train_main(_args(shapes, run, "epochs=2")) == 0  # today's tiny recipe, resumed: not refused, still L1
    assert json.loads((run / "config.json").read_text())["model"]["instance_offset_loss"] == "l1"
    final = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    assert final["global_step"] == 4 and json.loads(final["config"])["model"]["instance_offset_loss"] == "l1"
