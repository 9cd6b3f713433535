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
    assert "lower the global batch" in capsys.readouterr().err
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


# Amendments ------------------------------------------------------------------------------------------------


def test_a_changed_setting_is_refused_unless_amended_on_purpose_and_then_recorded(data, finished, tmp_path,
                                                                                    capsys):
    run = _copy(finished, tmp_path / "run")
    capsys.readouterr()
    assert main(_args(data / "shapes", run, "epochs=2", "optim.lr=0.001")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "differing: optim.lr" in err and "pass --amend KEY=VALUE instead of --set" in err
    # Without a global batch the per-process batch is the global batch: a cap it cannot be.
    assert main(_args(data / "shapes", run, "epochs=2", flags=["--amend", "data.batch_size=4"])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "global batch of 8, not 4" in err

    amendments = ["optim.lr=0.001", "optim.clip_grad=0.5", "model.lambda_rgb=2.0", "data.num_workers=1"]
    assert main(_args(data / "shapes", run, "epochs=2", flags=[a for x in amendments for a in ("--amend", x)])) == 0
    captured = capsys.readouterr()
    assert "amended from optimizer step 2 on: model.lambda_rgb 1.0 -> 2.0" in captured.err
    assert "done: 4 optimizer steps" in captured.out
    assert json.loads((run / "run.json").read_text())["amendments"] == [
        {"step": 2, "key": "data.num_workers", "from": 0, "to": 1},
        {"step": 2, "key": "model.lambda_rgb", "from": 1.0, "to": 2.0},
        {"step": 2, "key": "optim.clip_grad", "from": None, "to": 0.5},
        {"step": 2, "key": "optim.lr", "from": 0.002, "to": 0.001}]
    lr = {e.step: e.value for e in _scalars(run, "lr")}
    assert lr[2] == pytest.approx(learning_rate(0.5, 2e-3, 0.0, 1.0, 1), rel=1e-5)  # before: the run's own
    assert lr[3] == pytest.approx(learning_rate(1.0, 1e-3, 0.0, 1.0, 2), rel=1e-5)  # from step 3: the amended
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    assert json.loads(state["config"])["model"]["lambda_rgb"] == 2.0


def test_the_per_process_batch_may_be_amended_while_the_global_batch_stays(data, tmp_path, capsys):
    """A 2-epoch run at 8 x 1, resumed from its step-1 checkpoint at 4 x 2 (a smaller GPU, say): every later
    optimizer step takes the uninterrupted run's samples, and its loss to float rounding."""
    sets = ("epochs=2", "global_batch=8", "log_samples=true")
    whole = tmp_path / "whole"
    assert main(_args(data / "shapes", whole, *sets)) == 0
    run = _copy(whole, tmp_path / "run")
    (run / "summary.json").unlink()
    for path in ckpt.list_checkpoints(run)[1:]:  # as if stopped after optimizer step 1 (epoch 0, batch 1)
        path.unlink()
    capsys.readouterr()
    assert main(_args(data / "shapes", run, *sets, flags=["--amend", "data.batch_size=4"])) == 0
    captured = capsys.readouterr()
    assert "global batch     8 = 4 per process x 1 process x 2 accumulation steps" in captured.out
    assert "done: 4 optimizer steps" in captured.out
    saved = json.loads((run / "run.json").read_text())
    assert (saved["global_batch"], saved["per_gpu_batch"], saved["accum_steps"]) == (8, 4, 2)

    def by_step(folder: Path) -> dict[int, list[dict]]:
        out: dict[int, list[dict]] = {}
        for line in (folder / "samples-rank0.jsonl").read_text().splitlines():
            record = json.loads(line)
            out.setdefault(record["optimizer_step"], []).append(record)
        return out

    before, after = by_step(whole), by_step(run)
    assert sorted(after) == [1, 2, 3, 4] and len(after[1]) == 1 and all(len(after[k]) == 2 for k in (2, 3, 4))
    for k in (2, 3, 4):
        assert sorted(i for r in after[k] for i in r["index"]) == sorted(before[k][0]["index"])
        mean = sum(r["loss"]["loss"] for r in after[k]) / 2
        assert mean == pytest.approx(before[k][0]["loss"]["loss"], abs=1e-5)


# Checkpoint cadence ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_checkpoint_written_in_the_background_by_the_clock_exports_inits_and_resumes(data, finished, tmp_path,
                                                                                      capsys):
    """checkpoint_minutes (here: due at every log step) with the background writer, the step cadence off: the
    files are the synchronous writer's, bit for bit in every tensor; export, --init and resume read them, and
    the resumed run ends where the uninterrupted one does."""
    from pretraining.export import main as export

    timed = ("checkpoint_every=1000", "checkpoint_minutes=1e-9", "checkpoint_async=true")
    run, synchronous = tmp_path / "timed", tmp_path / "synchronous"
    assert main(_args(data / "shapes", run, *timed)) == 0
    assert main(_args(data / "shapes", synchronous, "checkpoint_async=false")) == 0  # by steps, in the loop
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000001.pt", "step-00000002.pt"]
    for name in ("step-00000001.pt", "step-00000002.pt"):
        ours, theirs = (ckpt.load_checkpoint(r / "checkpoints" / name) for r in (run, synchronous))
        assert ours["position"] == theirs["position"] and ours["global_step"] == theirs["global_step"]
        for part in ("model", "optimizer"):
            a, b = (torch.utils._pytree.tree_leaves(s[part]) for s in (ours, theirs))
            assert len(a) == len(b) and all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
                                            for x, y in zip(a, b))
    first = run / "checkpoints" / "step-00000001.pt"
    assert export([str(run), "--output", str(tmp_path / "timm"), "--checkpoint", str(first)]) == 0
    assert main(_args(data / "shapes", tmp_path / "init", flags=["--init", str(first)])) == 0
    (run / "summary.json").unlink()
    (run / "checkpoints" / "step-00000002.pt").unlink()
    capsys.readouterr()
    assert main(_args(data / "shapes", run, *timed)) == 0
    assert "resuming from" in capsys.readouterr().err
    final = [ckpt.load_checkpoint(ckpt.latest_checkpoint(r))["model"] for r in (finished, run)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_failed_background_write_is_one_sentence_and_the_previous_checkpoint_stays(tmp_path):
    from pretraining.training.storage import StorageError

    writer = ckpt.CheckpointWriter(asynchronous=True)
    state = {"w": torch.arange(4.0)}
    writer.save(state, tmp_path, 1, keep=3)
    state["w"].add_(1)  # training goes on writing its tensors: the checkpoint holds the copy
    writer.wait()
    (tmp_path / "checkpoints" / ".step-00000002.pt.tmp").symlink_to("/dev/full")  # every write fails: ENOSPC
    writer.save(state, tmp_path, 2, keep=3)
    with pytest.raises(StorageError, match=r"cannot write .*step-00000002.pt \(the disk is full"):
        writer.close()
    assert torch.equal(ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path, 1))["w"], torch.arange(4.0))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000001.pt"]
    assert not (tmp_path / "checkpoints" / ".step-00000002.pt.tmp").exists()


def test_a_run_without_a_global_batch_resumes_on_other_processes_once_it_states_its_batch(finished):
    """The tiny twin's batch is data.batch_size per process: on another number of processes the refusal names
    the global batch to state, and stating it resumes (the split changes, the batch does not)."""
    import dataclasses

    from pretraining.training.config import to_dict
    from pretraining.training.resume import RunError, check_resume
    from pretraining.training.run_folder import stored_config

    path = ckpt.latest_checkpoint(finished)
    stored, saved_run = stored_config(ckpt.load_checkpoint(path))
    saved_run = {**saved_run, "world_size": 2, "global_batch": 16, "per_gpu_batch": 8, "accum_steps": 1}
    here = {**saved_run, "world_size": 1, "global_batch": 8}
    with pytest.raises(RunError) as err:
        check_resume(path, to_dict(stored), saved_run, stored, here, (0, 1))
    assert "add --set global_batch=16 to resume it on 1 processes" in str(err.value) and "\n" not in str(err.value)
    stated = dataclasses.replace(stored, global_batch=16)
    plan = check_resume(path, to_dict(stored), saved_run, stated,
                        {**here, "global_batch": 16, "per_gpu_batch": 8, "accum_steps": 2}, (0, 1))
    assert plan.amendments == [] and plan.notes[0].startswith(
        "resuming on 1 processes (8 per process x 2 accumulation steps; the run trained on 2, 8 x 1): the same "
        "global batch of 16; the rest of epoch 0 takes the samples each optimizer step would have taken")
