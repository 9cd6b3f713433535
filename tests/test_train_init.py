"""What training users expect beyond the loop: --init from another checkpoint (ours, our timm export, MAE's
format), every N-th epoch's checkpoint kept beside the rolling ones, and the step's health in TensorBoard."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import timm
import torch

from dataset_card.synthetic.shapes import write_synthetic_dataset
from pretraining.export import export_timm, load_run_model
from pretraining.models.adapters import sincos_pos_embed
from pretraining.models.factory import create_model
from pretraining.train import main
from pretraining.training import checkpoint as ckpt
from pretraining.training.init_weights import initialize
from pretraining.training.monitor import step_scalars
from pretraining.training.resume import RunError

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: one thread beats two here

# 16 rows / batch 8 = 2 optimizer steps an epoch; a 1-block encoder (as tests/test_train_resume.py).
SETS = ("epochs=1", "data.batch_size=8", "data.num_workers=0", "checkpoint_every=1", "keep_checkpoints=5",
        "log_every=1", "figure_every=0", "log_grad_share=false", "model.depth=1", "model.decoder_dim=64")
TINY = {"img_size": 64, "depth": 1, "decoder_dim": 64, "num_visible": 24}  # the model SETS gives
D = 192  # ViT-Ti width
CLASSES = 4  # the synthetic shapes' semantic classes


def _args(data, output, *extra_sets, flags=()) -> list[str]:
    return ["--data", str(data), "--output", str(output), "--no-progress", *flags,
            *[a for s in (*SETS, *extra_sets) for a in ("--set", s)]]


def _scalars(run: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("init")
    write_synthetic_dataset(str(root / "shapes"), num_images=16, num_shards=2, size=(64, 64), seed=0)
    return root


@pytest.fixture(scope="module")
def source(data):
    """A finished tiny C2FMAE run (seed 7) to start others from."""
    assert main(_args(data / "shapes", data / "source", "seed=7")) == 0
    return data / "source"


def _model(name: str = "c2fmae_vit_tiny_patch16", seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_semantic_classes=CLASSES, **{**TINY, **overrides}).eval()


def _mae_order() -> torch.Tensor:
    """MAE's sin-cos table orders its channels (sin x, cos x, sin y, cos y); timm's, which we use, (sin y, sin x,
    cos y, cos x): MAE's channel i is our channel order[i]."""
    q = D // 4
    return torch.cat([torch.arange(q, 2 * q), torch.arange(3 * q, 4 * q), torch.arange(q), torch.arange(2 * q, 3 * q)])


def _mae_pos_embed(grid: int) -> torch.Tensor:
    """(1, 1 + grid**2, D): MAE's fixed table, with its zero row for the class token."""
    return torch.cat([torch.zeros(1, D), sincos_pos_embed(grid, D)[:, _mae_order()]])[None]


def _vit(img_size: int, seed: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=img_size, depth=1, num_classes=0).eval()


def test_init_from_our_run_takes_its_encoder_and_leaves_the_decoders_new(source):
    trained = ckpt.load_checkpoint(ckpt.latest_checkpoint(source))["model"]
    model = _model()
    report = initialize(model, source)  # a run folder: its newest checkpoint
    state = model.state_dict()
    encoder = [k for k in state if k.startswith("encoder.")]
    assert all(torch.equal(state[k], trained[k]) for k in encoder)
    assert not any(torch.equal(state[k], trained[k]) for k in state if k.startswith("decoder.") and "norm" not in k)
    assert report.format == "run" and report.file == str(ckpt.latest_checkpoint(source))
    assert set(report.loaded) == set(encoder) - {"encoder.modality_embed"} | {
        f"encoder.modality_embed[{m}]" for m in ("semantic", "instance", "rgb")}
    assert report.new and all(k.startswith("decoder.") for k in report.new)
    assert report.unused == sorted(k for k in trained if k.startswith("decoder."))
    assert report.loaded_parameters + report.new_parameters == sum(v.numel() for v in state.values())

    # An RGB-only MAE takes the shared encoder: the RGB adapter and RGB's modality embedding, by name.
    mae = _model("mae_vit_tiny_patch16_dec512d8b")
    report = initialize(mae, source)
    assert torch.equal(mae.encoder.modality_embed[0], trained["encoder.modality_embed"][2])
    assert torch.equal(mae.encoder.blocks[0].attn.qkv.weight, trained["encoder.blocks.0.attn.qkv.weight"])
    assert "encoder.adapters.semantic.class_embed.weight" in report.unused


def test_init_from_our_timm_export_gives_the_exported_features(source, tmp_path):
    trained, _ = load_run_model(source)
    folder, _ = export_timm(trained, tmp_path / "timm")
    model = _model("mae_vit_tiny_patch16_dec512d8b", seed=1)
    report = initialize(model, folder)
    assert report.format == "timm" and report.file.endswith("model.safetensors") and report.unused == []
    assert "our channel order" in report.positions  # the table is ours plus RGB's modality embedding
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.encode_rgb(x), trained.encode_rgb(x), atol=1e-5)


def test_init_from_an_mae_checkpoint_of_another_grid_computes_maes_encoder(tmp_path):
    """MAE's released format at 128 px (an 8 x 8 grid) into our 64 px model: MAE's function at 64 px, exactly
    (MAE recomputes its sin-cos table for a grid), with our features a reordering of MAE's."""
    vit = _vit(128)
    weights = {**vit.state_dict(), "pos_embed": _mae_pos_embed(8), "decoder_embed.weight": torch.zeros(4, D),
               "mask_token": torch.zeros(1, 1, 4)}
    torch.save({"model": weights}, tmp_path / "mae_pretrain_vit_tiny.pth")
    model = _model()
    report = initialize(model, tmp_path / "mae_pretrain_vit_tiny.pth")
    assert report.format == "mae" and "another channel order" in report.positions and "8x8" in report.positions
    assert report.unused == ["decoder_embed.weight", "mask_token"]
    assert {"encoder.modality_embed[semantic]", "encoder.adapters.semantic.class_embed.weight"} <= set(report.new)
    assert torch.allclose(model.encoder.modality_embed[2], torch.zeros(D), atol=1e-6)  # MAE adds no constant

    mae_at_64 = _vit(64)
    mae_at_64.load_state_dict({**vit.state_dict(), "pos_embed": _mae_pos_embed(4)})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.encode_rgb(x)[..., _mae_order()], mae_at_64.forward_features(x), atol=1e-4)

    # A learned position table is no sin-cos: not loaded, and the report says so.
    torch.save({"model": vit.state_dict()}, tmp_path / "learned.pth")
    report = initialize(_model(), tmp_path / "learned.pth")
    assert "pos_embed" in report.unused and "not loaded" in report.positions
    assert "encoder.modality_embed[rgb]" in report.new and "encoder.blocks.0.attn.qkv.weight" in report.loaded


def test_init_errors_are_one_sentence(source, data, tmp_path, capsys):
    torch.manual_seed(0)
    small = timm.create_model("vit_small_patch16_224", img_size=64, depth=1, num_classes=0)
    torch.save({"model": small.state_dict()}, tmp_path / "small.pth")
    with pytest.raises(RunError, match=r"encoder.cls_token has shape \(1, 1, 384\) there but \(1, 1, 192\) in this "
                                       r"model \(and \d+ more\); start from a checkpoint of the same encoder size"):
        initialize(_model(), tmp_path / "small.pth")
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    for path, says in ((tmp_path / "missing.pth", "does not exist"),
                       (tmp_path / "empty", "neither checkpoints/step-N.pt (a run) nor model.safetensors"),
                       (tmp_path / "junk.pth", "cannot be read as a torch checkpoint of tensors")):
        capsys.readouterr()
        assert main(_args(data / "shapes", tmp_path / "run", flags=("--init", str(path)))) == 2
        err = capsys.readouterr().err
        assert says in err and err.startswith(f"error: --init {path}") and err.count("\n") == 1
        assert not (tmp_path / "run" / "config.json").exists()  # a refused start leaves nothing behind


def test_cli_init_reports_records_and_is_ignored_on_resume(source, data, tmp_path, capsys):
    run, start = tmp_path / "run", ckpt.latest_checkpoint(source)
    capsys.readouterr()
    assert main(_args(data / "shapes", run, flags=("--init", str(start)))) == 0
    err = capsys.readouterr().err
    assert "init: loaded 25 tensors" in err and "init: new, left at their initialisation: decoder" in err
    assert "init: unused source keys: decoder" in err and f"the report is in {run / 'init.json'}" in err
    report = json.loads((run / "init.json").read_text())
    sha = hashlib.sha256(start.read_bytes()).hexdigest()
    assert report["sha256"] == sha and report["format"] == "run" and "encoder.blocks.0.mlp.fc1.weight" in report["loaded"]
    recorded = json.loads((run / "run.json").read_text())["init"]
    assert recorded == {"source": str(start), "file": str(start), "sha256": sha, "format": "run"}
    # Weights only: the optimizer started fresh (its first step is step 1 of this run).
    assert ckpt.load_checkpoint(ckpt.checkpoint_path(run, 1))["optimizer"]["state"][0]["step"] == 1

    assert main(_args(data / "shapes", run, "epochs=2", flags=("--init", str(tmp_path / "anything.pth")))) == 0
    err = capsys.readouterr().err
    assert f"--init {tmp_path / 'anything.pth'} ignored: resuming from" in err
    assert f"(the run started from {start})" in err and "init: loaded" not in err
    assert json.loads((run / "run.json").read_text())["init"] == recorded  # still traceable after the resume


def test_every_nth_epoch_is_kept_through_rolling_deletion_and_resume(data, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(_args(data / "shapes", run, "epochs=3", "keep_checkpoints=1", "keep_every_epochs=2")) == 0
    folder = run / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch-0002.pt", "step-00000006.pt"]
    kept = ckpt.load_checkpoint(folder / "epoch-0002.pt")
    assert kept["position"]["epoch"] == 2 and kept["position"]["step"] == kept["position"]["samples"] == 0
    assert kept["global_step"] == 4
    assert (folder / "epoch-0002.pt").stat().st_nlink == 1  # its step-4 name was rolled away; the file stays
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000006.pt"]
    assert load_run_model(run, folder / "epoch-0002.pt")[0] is not None  # export reads a kept one

    # Resume (keep_every_epochs may change then) reads the newest step checkpoint; 4 epochs keep epoch 4 too.
    capsys.readouterr()
    assert main(_args(data / "shapes", run, "epochs=4", "keep_checkpoints=1", "keep_every_epochs=2")) == 0
    assert "step-00000006.pt: optimizer step 6" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["epoch-0002.pt", "epoch-0004.pt", "step-00000008.pt"]
    assert os.path.samefile(folder / "epoch-0004.pt", folder / "step-00000008.pt")  # a link, not a second write

    # A run stopped between its epoch-end checkpoint and keeping it keeps it when resumed; where the file
    # system has no hard links, a copy.
    (folder / "epoch-0004.pt").unlink()
    monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(OSError(18, "Invalid cross-device link")))
    assert main(_args(data / "shapes", run, "epochs=5", "keep_checkpoints=1", "keep_every_epochs=2")) == 0
    assert ckpt.load_checkpoint(folder / "epoch-0004.pt")["global_step"] == 8
    assert not os.path.samefile(folder / "epoch-0004.pt", folder / "step-00000010.pt")


def test_gradient_norm_is_logged_at_log_steps_and_equals_the_clipping_norm(data, tmp_path):
    runs = {}
    for name, sets in (("plain", ()), ("clipped", ("optim.clip_grad=1e9",))):  # clipping that never clips
        assert main(_args(data / "shapes", tmp_path / name, "epochs=2", "log_every=2", *sets)) == 0
        runs[name] = _scalars(tmp_path / name)
    plain = runs["plain"]
    assert sorted(plain["grad_norm"]) == [2, 4] and all(0 < v < float("inf") for v in plain["grad_norm"].values())
    assert plain["grad_norm"] == pytest.approx(runs["clipped"]["grad_norm"], rel=1e-5)
    # On a CPU nothing is scaled (fp16 is GPU-only) and there is no GPU memory to report.
    assert not any(tag == "loss_scale" or tag.startswith("perf/gpu_mem") for tag in plain)
    assert "perf/images_per_s" in plain


def test_step_scalars_add_the_loss_scale_when_scaling():
    norm = torch.tensor(2.5)
    assert step_scalars(norm, torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu")) == {"grad_norm": 2.5}
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert step_scalars(norm, scaler, torch.device("cpu")) == {"grad_norm": 2.5, "loss_scale": 1024.0}


@pytest.mark.gpu
def test_fp16_logs_loss_scale_and_gpu_memory(data, tmp_path):
    assert main(_args(data / "shapes", tmp_path / "run", "precision=fp16")) == 0
    scalars = _scalars(tmp_path / "run")
    assert sorted(scalars["loss_scale"]) == [1, 2] and scalars["loss_scale"][1] > 1
    assert 0 < scalars["perf/gpu_mem_gib"][2] <= scalars["perf/gpu_mem_reserved_gib"][2]
