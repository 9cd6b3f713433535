"""Faults a long labeling run meets, without Ray: the output's lease, write errors as sentences,
the failure policy (fatal device errors, the failure-rate window), odd input trees, and images of a
labels-only release that are missing or changed."""

import errno
import json
import os
import socket
import subprocess
import sys
import time
import types

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from dataset_card.contract import images, layout, shards
from dataset_card.contract.lease import Holder, Lease, LeaseHeld, holder_of, process_start
from dataset_card.contract.output_folder import OutputFolder
from labeling.inputs.folder import list_image_folder
from labeling.pipeline import failures


def dead_process() -> tuple[int, str | None]:
    """(pid, start token) of a process that has exited."""
    proc = subprocess.Popen(["sleep", "30"])
    started = process_start(proc.pid)
    proc.kill()
    proc.wait()
    return proc.pid, started


def write_lease(output, **fields) -> None:
    holder = {"run_id": "old-run", "host": socket.gethostname(), "pid": os.getpid(),
              "pid_started": process_start(os.getpid()), "started": "2026-01-01T00:00:00+00:00",
              "renewed": time.time(), "ttl_s": 300.0, **fields}
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, layout.LEASE_FILE), "w") as f:
        json.dump(holder, f)


def test_one_lease_per_output_live_holders_refuse_dead_ones_are_taken_over(tmp_path):
    out = OutputFolder.open(tmp_path / "out")
    messages = []
    first = Lease(out, "run-1", log=messages.append).take()
    assert holder_of(out).run_id == "run-1" and holder_of(out).pid == os.getpid()
    with pytest.raises(LeaseHeld) as refused:  # this process is alive: a second run refuses
        Lease(out, "run-2").take()
    text = str(refused.value)
    assert f"host {socket.gethostname()}, pid {os.getpid()}" in text and "--overwrite" in text and "\n" not in text
    first.release()
    assert holder_of(out) is None

    pid, started = dead_process()  # killed on this host: taken over at once, so a rerun resumes
    write_lease(str(out), pid=pid, pid_started=started)
    with Lease(out, "run-3", log=messages.append):
        assert holder_of(out).run_id == "run-3"
    assert any("taking over the lease" in m and f"pid {pid}" in m for m in messages)

    write_lease(str(out), host="elsewhere", renewed=time.time() - 30)  # another host, renewed lately: live
    with pytest.raises(LeaseHeld, match=r"host elsewhere.*rerun after its lease expires \(in 270 s\)"):
        Lease(out, "run-4").take()
    write_lease(str(out), host="elsewhere", renewed=time.time() - 301)  # not renewed within its ttl: gone
    with Lease(out, "run-5", log=messages.append):
        assert holder_of(out).run_id == "run-5"


def test_a_lease_taken_over_is_noticed_by_its_renewal(tmp_path):
    out = OutputFolder.open(tmp_path / "out")
    lease = Lease(out, "run-1", ttl_s=300).take()
    lease.renew()
    assert lease.lost is None and holder_of(out).renewed >= lease._renewed - 1
    write_lease(str(out), run_id="intruder", host="elsewhere")
    lease.renew()
    assert lease.lost and "another run took over" in lease.lost and "host elsewhere" in lease.lost
    lease.release()
    assert holder_of(out).run_id == "intruder"  # release deletes only its own lease
    assert Holder.from_json(Holder("r", "h", 1, "0", "s", 0.0, 1.0).to_json()).run_id == "r"
    in_memory = OutputFolder.open("memory://c2fmae-lease/out")
    with Lease(in_memory, "run-a"):  # a store without conditional writes: checked, then written (one warning)
        with pytest.raises(LeaseHeld):
            Lease(in_memory, "run-b").take()
    assert holder_of(in_memory) is None


class FailingFs:
    """A local filesystem whose writes fail with `code` (the disk is full, the folder read-only...)."""

    def __init__(self, code: int, fail_after: int = 0):
        self.inner, self.code, self.calls = pafs.LocalFileSystem(), code, 0
        self.fail_after = fail_after

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def open_output_stream(self, path, *args, **kwargs):
        self.calls += 1
        if self.calls > self.fail_after:
            raise OSError(self.code, f"Failed to open local file '{path}'. Detail: [errno {self.code}]")
        return self.inner.open_output_stream(path, *args, **kwargs)


@pytest.mark.parametrize("code, advice", [(errno.ENOSPC, "free space there"), (errno.EACCES, "writable"),
                                          (errno.ELOOP, "symbolic link")])
def test_write_errors_are_one_sentence_naming_the_path_and_leave_no_temporary_file(tmp_path, code, advice):
    fs = FailingFs(code, fail_after=1)  # the errors table is written, the statistics fail
    errors = layout.ERRORS_SCHEMA.empty_table()
    with pytest.raises(shards.OutputWriteError) as err:
        shards.commit_shard(OutputFolder(str(tmp_path), fs, str(tmp_path)), 0, 1, pa.table({"a": [1]}), errors,
                            layout.ShardStats(0))
    text = str(err.value)
    assert text.startswith(f"cannot write {tmp_path}/{layout.stats_path(0, 1)} ({os.strerror(code)}): ")
    assert advice in text and "\n" not in text and err.value.errno == code
    assert fs.calls == 2  # no retry for an error a retry cannot fix
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]


def test_a_lease_that_cannot_be_written_is_one_sentence_and_leaves_no_file(tmp_path, monkeypatch):
    import builtins

    import dataset_card.contract.lease as lease_module

    class Full:
        """A file on a full disk: it is created, nothing can be written into it."""

        def __init__(self, file, mode):
            self.file = builtins.open(file, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(lease_module.os, "fdopen", Full)
    with pytest.raises(shards.OutputWriteError) as err:
        Lease(OutputFolder.open(tmp_path), "run").take()
    assert str(err.value).startswith(f"cannot write {tmp_path}/{layout.LEASE_FILE} (No space left on device): free "
                                     "space there")
    assert not list(tmp_path.iterdir())  # the lease file it created is gone again
    monkeypatch.undo()
    lease = Lease(OutputFolder.open(tmp_path), "run").take()
    monkeypatch.setattr(lease_module, "open", Full, raising=False)  # the renewal's temporary file cannot be filled
    with pytest.raises(OSError, match="No space left"):
        lease.files.overwrite(lease.path, b"{}")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [layout.LEASE_FILE]  # no temporary file left
    lease.release()


def test_a_rewrite_that_cannot_be_renamed_is_one_sentence_and_the_next_run_finishes_it(tmp_path):
    class NoRename(FailingFs):
        def move(self, src, dst):
            raise OSError(errno.EACCES, f"Failed to rename '{src}'. Detail: [errno {errno.EACCES}]")

    target = tmp_path / layout.stats_path(0, 1)
    target.parent.mkdir(parents=True)
    target.write_text("old")
    staging = target.parent / f".{target.name}.abc.rewrite"
    staging.write_text("new")
    journal = tmp_path / shards.JOURNAL_DIR / "shard-00000.json"
    journal.parent.mkdir()
    journal.write_text(json.dumps([[str(staging), str(target)]]))
    with pytest.raises(shards.OutputWriteError, match=rf"^cannot write {target} \(Permission denied\): make the "):
        shards.recover(OutputFolder(str(tmp_path), NoRename(errno.EACCES), str(tmp_path)))
    assert journal.exists() and target.read_text() == "old"  # nothing half done: the journal stays
    assert shards.recover(OutputFolder(str(tmp_path), pafs.LocalFileSystem(), str(tmp_path))) == 1
    assert target.read_text() == "new" and not journal.exists() and not staging.exists()


def test_transient_write_errors_are_retried_with_backoff(tmp_path, monkeypatch):
    attempts, waits = [], []
    clock = types.SimpleNamespace(now=0.0)

    def sleep(seconds):  # asked for, not timed
        waits.append(seconds)
        clock.now += seconds

    monkeypatch.setattr(shards, "time", types.SimpleNamespace(sleep=sleep, monotonic=lambda: clock.now))

    def flaky():
        attempts.append(len(waits))
        if len(attempts) < 3:
            raise OSError(errno.EIO, "connection reset")
        return "written"

    assert shards.retrying(flaky, "somewhere", backoff_s=0.01) == "written"
    assert attempts == [0, 1, 2] and waits == [0.01, 0.02]  # a wait before each retry, doubled
    waits.clear()
    with pytest.raises(shards.OutputWriteError, match="check the path"):
        shards.retrying(lambda: (_ for _ in ()).throw(OSError(errno.EIO, "down")), "somewhere", retry_s=100.0,
                        backoff_s=1.0)
    assert waits == [1, 2, 4, 8, 16, 30, 30] and sum(waits) <= 100  # doubled up to 30 s, within the window


def test_an_unwritable_output_is_refused_before_anything_starts(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(shards.OutputWriteError, match=r"cannot write .*file/out.*: a file stands where a folder"):
        shards.probe_output(OutputFolder.open(blocker / "out"))
    assert shards.probe_output(OutputFolder.open(tmp_path / "fine")) > 0 and not list((tmp_path / "fine").iterdir())


def test_fatal_device_errors_restart_the_actor_oom_does_not():
    assert failures.is_fatal_device_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert failures.is_fatal_device_error(RuntimeError("CUDA error: device-side assert triggered"))
    wrapped = ValueError("the batch failed")
    wrapped.__cause__ = RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasSgemm")
    assert failures.is_fatal_device_error(wrapped)
    assert not failures.is_fatal_device_error(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not failures.is_fatal_device_error(ValueError("cannot reshape array"))
    code = ("from labeling.pipeline import failures, predictors\n"
            "def model(images):\n"
            "    raise RuntimeError('CUDA error: an illegal memory access was encountered')\n"
            "predictors.run_each(model, [1, 2])\n"
            "print('not reached')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == failures.DEVICE_ERROR_EXIT_CODE and "not reached" not in done.stdout
    assert "restarting this model actor" in done.stderr


def test_the_failure_window_stops_on_a_systematic_fault_not_on_a_bad_shard():
    window = failures.FailureWindow(max_rate=0.1, window=100)
    assert window.add(20, {"undecodable": 10}) is None  # half of them, but too few images to judge
    assert window.add(100, {"undecodable": 5}) is None  # the last 100 (this shard) are fine
    assert window.add(50, {"duplicate_id": 50}) is None  # listing failures never count
    stop = window.add(100, {failures.MODEL_FAILED: 40, "undecodable": 1})
    assert stop and stop.startswith("41 of the last 100 images failed (41%: model_failed 40, undecodable 1)")
    assert "--max-failure-rate 0.1" in stop
    assert failures.FailureWindow(max_rate=1.0, window=1).add(10, {"x": 10}) is None


def test_error_messages_carry_no_memory_address():
    err = OSError("cannot identify image file <_io.BytesIO object at 0x7f3a2b5c9e40>")
    assert failures.from_exception(failures.READ, err).message == "OSError: cannot identify image file <BytesIO>"
    assert failures.clean_message("<function f at 0x10> failed") == "<function f> failed"


def test_symlink_loops_and_aliases_are_listed_once_by_their_real_path(tmp_path):
    for cls in ("a_cls", "b_cls"):
        (tmp_path / cls / "sub").mkdir(parents=True)
        (tmp_path / cls / "sub" / f"{cls}.jpg").write_bytes(b"x")
    (tmp_path / "a_cls" / "alias").symlink_to("../b_cls")  # b_cls's images again, under a_cls
    (tmp_path / "a_cls" / "sub" / "loop").symlink_to("..")  # a loop
    (tmp_path / "b_cls" / "x").symlink_to("y")  # links in a circle
    (tmp_path / "b_cls" / "y").symlink_to("x")
    outside = tmp_path.parent / f"{tmp_path.name}-shared"
    outside.mkdir()
    (outside / "shared.jpg").write_bytes(b"x")
    (tmp_path / "a_cls" / "one").symlink_to(outside)
    (tmp_path / "b_cls" / "two").symlink_to(outside)  # the same outside folder from two classes
    listed = list_image_folder(str(tmp_path))
    assert listed.table.column("path").to_pylist() == ["a_cls/one/shared.jpg", "a_cls/sub/a_cls.jpg",
                                                        "b_cls/sub/b_cls.jpg"]
    notes = "\n".join(listed.notes)
    assert "a_cls/alias is a link to class folder b_cls" in notes
    assert "a_cls/sub/loop is a link to a folder above it (a symbolic-link loop)" in notes
    assert "b_cls/x cannot be followed (Too many levels of symbolic links)" in notes
    assert f"b_cls/two is a link to {outside}, listed already as a_cls/one" in notes
    (tmp_path / "c_cls").symlink_to(tmp_path / "a_cls")
    with pytest.raises(Exception, match="class folders a_cls and c_cls .* are the same folder"):
        list_image_folder(str(tmp_path))


def test_a_labels_only_row_finds_its_image_and_refuses_a_changed_one(tmp_path):
    (tmp_path / "cls").mkdir()
    data = b"\xff\xd8 the original bytes"
    (tmp_path / "cls" / "a.jpg").write_bytes(data)
    table = pa.table({"image": [{"bytes": None, "path": "cls/a.jpg"}], "image_sha256": [images.digest(data)],
                      "image_nbytes": [len(data)]})
    source = images.ImageSource(str(tmp_path))
    assert images.row_images(table, source) == [data]
    with pytest.raises(images.ImageReferenceError, match="labels-only release.*--images"):
        images.row_images(table, None)
    (tmp_path / "cls" / "a.jpg").write_bytes(data[:-1] + b"?")  # same size, other content
    with pytest.raises(images.ImageReferenceError, match=r"cls/a.jpg is not the file that was labeled"):
        images.row_images(table, source)
    (tmp_path / "cls" / "a.jpg").write_bytes(data + b"more")
    with pytest.raises(images.ImageReferenceError, match=r"has \d+ bytes but the labeled file had"):
        images.row_images(table, source)
    (tmp_path / "cls" / "a.jpg").unlink()
    with pytest.raises(images.ImageReferenceError, match=r"image .*cls/a.jpg is missing"):
        images.row_images(table, source)


def test_overwrite_refuses_while_a_live_run_holds_the_output(tmp_path):
    from labeling.pipeline.config import LabelingConfig
    from labeling.pipeline.driver import run_labeling

    (tmp_path / "train" / "cls").mkdir(parents=True)
    (tmp_path / "train" / "cls" / "a.png").write_bytes(b"not read: the run stops before")
    output = tmp_path / "out"
    (output / "data").mkdir(parents=True)
    (output / "data" / "train-00000-of-00001.parquet").write_bytes(b"a live run's shard")
    write_lease(str(output), run_id="live-run")  # held by this (live) process
    cfg = LabelingConfig(input=str(tmp_path / "train"), output=str(output), models="tiny-random", overwrite=True,
                         progress=False)
    with pytest.raises(LeaseHeld, match="--overwrite cannot delete a folder a live run is writing"):
        run_labeling(cfg, log=lambda m: None)
    assert (output / "data" / "train-00000-of-00001.parquet").read_bytes() == b"a live run's shard"
    assert holder_of(OutputFolder.open(output)).run_id == "live-run"


def test_the_labeling_command_refuses_an_unwritable_output_before_ray_starts(tmp_path, monkeypatch, capsys):
    from labeling import run
    from labeling.pipeline import cluster

    (tmp_path / "train" / "cls").mkdir(parents=True)
    (tmp_path / "train" / "cls" / "a.png").write_bytes(b"not read: the run stops before")
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setattr(cluster, "connect", lambda *a, **k: pytest.fail("Ray started before the output was probed"))
    assert run.main(["--input", str(tmp_path / "train"), "--output", str(tmp_path / "file" / "out"),
                     "--models", "tiny-random", "--no-progress"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the listing's progress bar
    assert err.startswith(f"error: cannot write {tmp_path}/file/out/.probe-")
    assert err.endswith("(Not a directory): a file stands where a folder must be: move it away")


def test_a_failed_card_build_keeps_the_previous_full_card_and_says_so(tmp_path, monkeypatch):
    import dataset_card.card.build
    from dataset_card.card.build import build_card
    from dataset_card.synthetic.shapes import write_synthetic_dataset
    from labeling.pipeline.finish import write_card

    metadata = write_synthetic_dataset(str(tmp_path), num_images=4, num_shards=1)
    build_card(str(tmp_path))
    full = (tmp_path / "README.md").read_text()

    def broken(output, cfg=None):
        raise shards.OutputWriteError(f"cannot write {output}/assets/gallery.png (No space left on device): free "
                                      "space there")

    monkeypatch.setattr(dataset_card.card.build, "build_card", broken)
    messages = []
    folder = OutputFolder.open(tmp_path)
    write_card(folder, metadata, has_errors=False, log=messages.append)
    assert (tmp_path / "README.md").read_text() == full  # never silently downgraded
    assert messages == [f"warning: the dataset card could not be rebuilt (cannot write {tmp_path}/assets/gallery.png "
                        "(No space left on device): free space there); the previous full card is kept and is out of "
                        f"date: rebuild it with: python -m dataset_card build {tmp_path}"]
    (tmp_path / "README.md").unlink()
    write_card(folder, metadata, has_errors=False, log=messages.append)
    assert "minimal card" in messages[-1] and (tmp_path / "README.md").read_text().startswith("---")
    assert "meaningless" not in (tmp_path / "README.md").read_text()
    (tmp_path / "README.md").unlink()
    write_card(folder, metadata, has_errors=False, log=messages.append, tiny_random=True)
    assert "these labels are meaningless" in (tmp_path / "README.md").read_text()  # the fallback says it too


def test_validate_names_a_shard_deleted_by_hand_and_the_closing_line_names_the_errors_table(tmp_path):
    from dataset_card.synthetic.shapes import write_synthetic_dataset
    from dataset_card.validate import validate
    from labeling.pipeline.finish import closing_line

    write_synthetic_dataset(str(tmp_path), num_images=4, num_shards=2)
    (tmp_path / layout.data_path(1, 2)).unlink()
    messages = [v.message for v in validate(str(tmp_path)).violations if v.file == layout.data_path(1, 2)]
    assert messages and messages[0].startswith("is missing, though its errors table or statistics are there: the "
                                               "data file was deleted")
    stats = {"written": 3, "inputs": 5, "failed": 2, "failed_by_type": {"undecodable": 2}, "processed": 5,
             "wall_time_s": 1.0, "images_per_s": 5.0}
    line = closing_line(stats, "/data/out")
    assert line.startswith("labeled 3 of 5 inputs, 2 failed (undecodable 2)")
    assert line.endswith("the failed inputs and why: /data/out/errors/ (datasets.load_dataset('/data/out', 'errors'))")
    assert "errors/" not in closing_line({**stats, "failed": 0, "failed_by_type": {}}, "/data/out")
