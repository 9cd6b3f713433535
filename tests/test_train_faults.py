"""What a training run meets on bad data and bad disks: one sentence each, from the main process,
naming the file (and row and image_id), and no temporary file left behind; figures that explain
themselves."""

from __future__ import annotations

import errno
import json
import os
import shlex
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dataset_card.contract import codecs, layout
from dataset_card.synthetic.shapes import write_synthetic_dataset
from pretraining.data.loader import DataError, check_taxonomy, open_labeled_dataset
from pretraining.train import main
from pretraining.training import checkpoint as ckpt
from pretraining.training import monitor, storage

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: one thread beats two here

SETS = ("epochs=1", "data.batch_size=8", "data.num_workers=1", "checkpoint_every=1", "log_every=1",
        "figure_every=0", "log_grad_share=false", "model.depth=1", "model.decoder_dim=64")
full_disk = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")


def _args(data, output, *extra, flags=()) -> list[str]:
    return ["--data", str(data), "--output", str(output), "--no-progress", *flags,
            *[a for s in (*SETS, *extra) for a in ("--set", s)]]


def _one_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.fixture
def labeled(tmp_path) -> Path:
    write_synthetic_dataset(str(tmp_path / "data"), num_images=16, num_shards=2, size=(64, 64), seed=0)
    return tmp_path / "data"


def _edit_row(root: Path, row: int, column: str, mask: np.ndarray) -> tuple[str, str]:
    """Replace one row's mask in shard 0; returns (file, image_id)."""
    path = str(root / layout.data_path(0, 2))
    table = pq.read_table(path)
    masks = table.column(column).to_pylist()
    masks[row] = {"bytes": codecs.encode_mask(mask), "path": None}
    field = table.schema.field(column)
    table = table.set_column(table.schema.get_field_index(column), field, pa.array(masks, type=field.type))
    pq.write_table(table, path)
    return path, table.column("image_id")[row].as_py()


# Bad data -----------------------------------------------------------------------------------------


def test_an_unreadable_data_file_is_named_when_the_dataset_opens(labeled):
    path = labeled / layout.data_path(1, 2)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a truncated copy
    with pytest.raises(DataError) as err:
        open_labeled_dataset(str(labeled))
    message = str(err.value)
    assert f"{path} cannot be read as Parquet" in message and "rerun the labeling command" in message
    assert "\n" not in message


def test_missing_metadata_beside_data_says_the_labeling_command_restores_it(labeled, tmp_path, capsys):
    (labeled / layout.METADATA_FILE).unlink()
    assert main(_args(labeled, tmp_path / "run")) == 2
    err = _one_line(capsys.readouterr().err)
    assert "metadata.json is missing" in err and "rerun the labeling command" in err
    assert "not a labeled dataset folder" not in err


@pytest.mark.parametrize("fault", ["mask_size", "taxonomy"])
def test_a_bad_sample_is_one_sentence_naming_file_row_and_image_id(labeled, tmp_path, capsys, fault):
    """From a DataLoader worker (data.num_workers=1), surfaced by the main process without the worker's traceback."""
    if fault == "mask_size":
        path, image_id = _edit_row(labeled, 2, "instance_mask", np.zeros((32, 64), np.uint8))
        expected = "masks are (64, 64) and (32, 64)"
    else:  # an id beyond metadata's 4 classes, beside ignore pixels (255) that are allowed
        semantic = np.zeros((64, 64), np.uint8)
        semantic[:8] = 255
        semantic[10:12, 10:12] = 7
        path, image_id = _edit_row(labeled, 2, "semantic_mask", semantic)
        expected = "semantic ids [7] lie outside metadata.json's 4 classes"
    assert main(_args(labeled, tmp_path / "run")) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"{path} row 2 (image_id {image_id}): " in err and expected in err, err


def test_the_taxonomy_check_allows_classes_and_the_ignore_value():
    semantic = np.array([[0, 3], [255, 1]], np.uint8)
    check_taxonomy(semantic, 4, 255)
    check_taxonomy(semantic[:1], 4, 255)
    with pytest.raises(DataError, match=r"semantic ids \[4\]"):
        check_taxonomy(np.array([[4, 255]], np.uint8), 4, 255)
    with pytest.raises(DataError, match=r"semantic ids \[300\]"):
        check_taxonomy(np.array([[300, 65535]], np.uint16), 260, 65535)


# Bad disks -----------------------------------------------------------------------------------------


@full_disk
def test_a_full_disk_while_checkpointing_is_one_sentence_and_leaves_no_temporary_file(labeled, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    # The first checkpoint's temporary file is a link to /dev/full: every write to it fails with ENOSPC.
    tmp = run / "checkpoints" / ".step-00000001.pt.tmp"
    tmp.symlink_to("/dev/full")
    assert main(_args(labeled, run, "data.num_workers=0")) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"cannot write {run / 'checkpoints' / 'step-00000001.pt'} (the disk is full: free space there" in err
    assert "rerun the same command" in err
    assert not os.path.lexists(tmp) and os.listdir(run / "checkpoints") == []


@full_disk
def test_run_files_are_written_atomically_or_not_at_all(tmp_path, monkeypatch):
    (tmp_path / ".summary.json.tmp").symlink_to("/dev/full")
    with pytest.raises(storage.StorageError, match=r"cannot write .*summary.json \(the disk is full"):
        storage.write_json(tmp_path / "summary.json", {"global_step": 3})
    assert os.listdir(tmp_path) == []  # neither the temporary file nor a half-written summary

    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_text", denied)
    with pytest.raises(storage.StorageError, match=r"cannot write .*run.json \(permission denied: make it writable"):
        storage.write_json(tmp_path / "run.json", {})
    monkeypatch.setattr(monitor, "SummaryWriter", denied)
    with pytest.raises(storage.StorageError, match=r"cannot write .*tensorboard \(permission denied"):
        monitor.Monitor(tmp_path)
    with pytest.raises(ValueError, match="not a disk error"):  # other errors pass through unchanged
        with storage.writing(tmp_path / "x"):
            raise ValueError("not a disk error")


# Divergence ----------------------------------------------------------------------------------------


def test_after_a_nan_the_printed_command_resumes_at_half_the_lr_in_fp32(labeled, tmp_path, monkeypatch, capsys,
                                                                        nan_at_third_instance_loss):
    """A NaN at optimizer step 3 (of 4) stops the run after its step-2 checkpoint; the one-line error ends in the
    command that resumes it with the amendments, which run.json then records with their step."""
    run = tmp_path / "run"
    assert main(_args(labeled, run, "epochs=2", "data.num_workers=0")) == 2
    err = _one_line(capsys.readouterr().err)
    assert "not finite at optimizer step 3" in err and "resume with: python -m pretraining.train " in err
    command = shlex.split(err.split("resume with: ")[1])
    assert command[-4:] == ["--amend", "optim.lr=0.001", "--amend", "precision=fp32"]  # the tiny recipe's lr, halved
    assert [p.name for p in ckpt.list_checkpoints(run)][-1] == "step-00000002.pt"

    monkeypatch.undo()  # the cause is gone; the printed command goes on from the checkpoint
    assert main(command[3:]) == 0
    captured = capsys.readouterr()
    assert "amended from optimizer step 2 on: optim.lr 0.002 -> 0.001" in captured.err
    assert "done: 4 optimizer steps" in captured.out
    saved = json.loads((run / "run.json").read_text())
    assert saved["amendments"] == [{"step": 2, "key": "optim.lr", "from": 0.002, "to": 0.001},
                                   {"step": 2, "key": "precision", "from": "bf16", "to": "fp32"}]
    assert saved["lr"] == 0.001 and json.loads((run / "config.json").read_text())["precision"] == "fp32"
    # The amended config is the run's now: the same command again finds it complete, a plain rerun too.
    assert main(command[3:]) == 0 and "already complete" in capsys.readouterr().out
    assert main(_args(labeled, run, "epochs=2", "data.num_workers=0")) == 0
    assert "already complete" in capsys.readouterr().out


def test_an_amendment_of_the_models_shape_is_refused_in_one_sentence(labeled, tmp_path, capsys):
    assert main(_args(labeled, tmp_path / "run", flags=("--amend", "model.depth=3"))) == 2
    err = _one_line(capsys.readouterr().err)
    assert err.startswith("error: --amend model.depth: only ") and "never the model's shape" in err
    assert not (tmp_path / "run").exists()


# Figures -------------------------------------------------------------------------------------------


def test_reconstruction_figures_carry_a_legend_and_say_why_a_panel_is_flat():
    torch.manual_seed(0)
    B, S, N = 2, 32, 16
    batch = {"rgb": torch.randn(B, 3, S, S), "semantic": torch.randint(0, 4, (B, S, S)),
             "instance": torch.rand(B, 3, S, S)}
    batch["semantic"][1] = -1  # no labelled pixel
    batch["instance"][1] = 0  # no instance
    visible = {"semantic": torch.arange(N).repeat(B, 1) < 8, "instance": torch.zeros(B, N, dtype=torch.bool),
               "rgb": torch.ones(B, N, dtype=torch.bool)}
    reconstruction = {m: batch[m] for m in ("semantic", "instance", "rgb")}  # rows in this order, per sample
    fig = monitor.reconstruction_figure(batch, reconstruction, visible)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:4] == ["input", "masked input", "prediction", "target"]
    assert titles.count("(all masked)") == 2  # both instance maps: every patch hidden
    assert titles.count("(nothing masked: no loss)") == 2  # both samples' RGB targets
    assert titles.count("(all ignore)") == 3 and titles.count("(no instances)") == 2
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any(t.startswith("grey: masked") for t in legend) and any("semantic: ignore" in t for t in legend)
    assert any("instance: boundaries" in t for t in legend)
    # Each swatch is the colour the panels draw: a boundary without offset, several classes, no offset.
    swatches = {label: [p.get_facecolor()[:3] for p in handles] for handles, label in monitor.legend_entries(
        ["semantic", "instance", "rgb"])}
    drawn = monitor._instance(torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1))[0, 0]
    assert swatches["instance: boundaries"] == [pytest.approx(tuple(drawn))] and tuple(drawn) == (1.0, 0.5, 0.5)
    classes = next(v for k, v in swatches.items() if k.startswith("semantic: one colour per class"))
    assert len(classes) >= 4 and classes == [pytest.approx(tuple(c)) for c in monitor._semantic(
        torch.arange(len(classes))[None])[0]]
    offsets = next(v for k, v in swatches.items() if "teal = no offset" in k)
    assert offsets[0] == pytest.approx(tuple(monitor._instance(torch.zeros(3, 1, 1))[0, 0]))
