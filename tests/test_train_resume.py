"""Resuming a training run: a finished run left untouched, the dataset's fingerprint, growing epochs,
a failed first attempt that blocks nothing, an unreadable newest checkpoint, TensorBoard without
repeated steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dataset_card.synthetic.shapes import write_synthetic_dataset
from pretraining.models.curriculum import CurriculumConfig, curriculum_weights
from pretraining.train import learning_rate, main
from pretraining.training import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: one thread beats two here

# 16 rows / batch 8 = 2 optimizer steps an epoch; checkpoints at 1 and 2 (the end). A 1-block encoder.
SETS = ("epochs=1", "data.batch_size=8", "data.num_workers=0", "checkpoint_every=1", "keep_checkpoints=5",
        "log_every=1", "figure_every=0", "log_grad_share=false", "model.depth=1", "model.decoder_dim=64")


def _args(data, output, *extra_sets, flags=()) -> list[str]:
    return ["--data", str(data), "--output", str(output), "--no-progress", *flags,
            *[a for s in (*SETS, *extra_sets) for a in ("--set", s)]]


def _scalars(run: Path, tag: str) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return events.Scalars(tag)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    write_synthetic_dataset(str(root / "shapes"), num_images=16, num_shards=2, size=(64, 64), seed=0)
    write_synthetic_dataset(str(root / "other"), num_images=8, num_shards=1, size=(64, 64), seed=1)
    return root


@pytest.fixture(scope="module")
def finished(data):
    assert main(_args(data / "shapes", data / "finished")) == 0
    return data / "finished"


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def _snapshot(run: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}


def test_rerun_of_a_finished_run_says_it_is_complete_and_changes_nothing(data, finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "run")
    before = _snapshot(run)
    capsys.readouterr()
    assert main(_args(data / "shapes", run)) == 0
    out = capsys.readouterr().out
    assert "is already complete (2 optimizer steps over 1 epochs, last loss" in out and "nan" not in out
    assert "--set epochs=N" in out
    assert _snapshot(run) == before  # summary.json, run.json, config, logs: not a byte nor a timestamp changed
    assert json.loads((run / "summary.json").read_text())["last"]["loss"] > 0
    # The same data read from another path (a copy on a local disk, say) is the same dataset.
    moved = _copy(data / "shapes", tmp_path / "moved")
    assert main(_args(moved, run)) == 0
    assert "already complete" in capsys.readouterr().out and _snapshot(run) == before


def test_resuming_on_other_data_is_refused_unless_new_data_says_so(data, finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "run")
    before = _snapshot(run)
    capsys.readouterr()
    assert main(_args(data / "other", run, "epochs=2")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "trained on other data" in err and "rows 16 -> 8" in err and "--new-data" in err
    assert _snapshot(run) == before
    assert main(_args(data / "other", run, "epochs=2", flags=["--new-data"])) == 0
    captured = capsys.readouterr()
    assert "continuing on new data on purpose" in captured.err and "done: 3 optimizer steps" in captured.out
    saved = json.loads((run / "run.json").read_text())
    assert saved["data"] == str(data / "other") and saved["dataset"]["rows"] == 8


def test_epochs_may_grow_on_resume_and_the_schedules_follow_the_new_total(data, finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "run")
    capsys.readouterr()
    assert main(_args(data / "shapes", run, "epochs=2")) == 0
    captured = capsys.readouterr()
    assert "extending the run from 1 to 2 epochs" in captured.err and "done: 4 optimizer steps" in captured.out
    # Steps 3 and 4 read progress (2 + k) / 4 of the new total: the lr is back at the cosine's start after warm-up.
    lr = {e.step: e.value for e in _scalars(run, "lr")}
    assert lr[3] == pytest.approx(learning_rate(1.0, 2e-3, 0.0, 1.0, 2), rel=1e-5)
    assert lr[2] == pytest.approx(learning_rate(0.5, 2e-3, 0.0, 1.0, 1), rel=1e-5)  # the first run's, kept
    semantic = {e.step: e.value for e in _scalars(run, "curriculum/semantic")}
    assert semantic[3] == pytest.approx(curriculum_weights(2 / 4, CurriculumConfig())[0])
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    # Fewer epochs, or any other change, is still refused in one sentence.
    assert main(_args(data / "shapes", run, "epochs=1")) == 2
    assert "may grow on resume but not shrink" in capsys.readouterr().err
    assert main(_args(data / "shapes", run, "epochs=3", "optim.lr=0.5")) == 2
    err = capsys.readouterr().err
    assert "another config (differing: optim.lr)" in err and err.count("\n") == 1


def test_a_start_that_took_no_step_blocks_no_corrected_retry(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(data / "other", run, "data.batch_size=64")) == 2  # 8 rows cannot fill a step of 64
    assert "lower data.batch_size" in capsys.readouterr().err
    assert not (run / "config.json").exists() and not (run / "run.json").exists()
    # Even a config.json an earlier attempt left behind (no checkpoint: no step was kept) does not block.
    run.mkdir(exist_ok=True)
    (run / "config.json").write_text(json.dumps({"epochs": 99, "data": {"batch_size": 64}}))
    assert main(_args(data / "other", run)) == 0
    assert json.loads((run / "config.json").read_text())["data"]["batch_size"] == 8


def test_an_unreadable_newest_checkpoint_falls_back_and_tensorboard_shows_each_step_once(data, finished, tmp_path,
                                                                                         capsys):
    run = _copy(finished, tmp_path / "run")
    (run / "summary.json").unlink()  # as if killed after its last checkpoint was (half) written
    newest = run / "checkpoints" / "step-00000002.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    capsys.readouterr()
    assert main(_args(data / "shapes", run)) == 0
    err = capsys.readouterr().err
    assert "warning: checkpoint" in err and "step-00000002.pt cannot be read" in err
    assert "resuming from" in err and "step-00000001.pt: optimizer step 1" in err
    assert (run / "checkpoints" / "step-00000002.pt.unreadable").is_file()  # kept aside, not deleted
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000001.pt", "step-00000002.pt"]
    # Step 2 was logged by both attempts; the resumed writer purged the first attempt's.
    assert [e.step for e in _scalars(run, "loss/loss")] == [1, 2]
    final = [ckpt.load_checkpoint(ckpt.latest_checkpoint(r))["model"] for r in (finished, run)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])  # the same result as never failing


def test_no_readable_checkpoint_is_one_sentence_and_moves_nothing(tmp_path):
    for step in (1, 2):
        ckpt.save_checkpoint({"w": torch.zeros(1)}, tmp_path, step, keep=3)
        ckpt.checkpoint_path(tmp_path, step).write_bytes(b"junk")
    with pytest.raises(ckpt.CheckpointError, match=r"no checkpoint in .* can be read .*step-00000002.pt") as err:
        ckpt.load_newest_readable(tmp_path, warn=print)
    assert "\n" not in str(err.value)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000001.pt", "step-00000002.pt"]


def test_a_resumed_runs_event_file_sorts_after_its_predecessors(tmp_path):
    """TensorBoard reads event files in name order (<second>.<host>.<pid>.<n>); a resume in the same
    second as the file before it waits for the next second rather than sort by pid or counter."""
    from pretraining.training.monitor import Monitor

    for purge_step in (None, 3, 5):
        Monitor(tmp_path, purge_step=purge_step).close()
    names = [p.name for p in (tmp_path / "tensorboard").iterdir()]
    seconds = sorted(int(n.split(".")[3]) for n in names)
    assert len(set(seconds)) == 3 and sorted(names) == sorted(names, key=lambda n: int(n.split(".")[3]))
