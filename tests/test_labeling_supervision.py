"""Supervision of a long labeling run: a storage outage longer than a few retries is ridden out,
a transient out-of-memory is retried, only errors that poison the CUDA context restart an actor,
a decoder crash costs one file (the model actor labels the rest), one batch decodes while another
holds the device, the stderr filter cannot block the driver, and a killed driver is
restarted (`--max-restarts`)."""

import errno
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from dataset_card.contract import shards
from dataset_card.contract.output_folder import OutputFolder

SMALL = {"models": "tiny-random", "model_actors": 1, "actor_cpus": 0.5, "task_cpus": 0.5, "model_batch_size": 4,
         "read_batch_size": 4, "postprocess_batch_size": 4, "progress": False}


def random_images(root: Path, count: int, classes: int = 2) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(folder / f"img_{i:03d}.jpg")


class OutageFs:
    """A local filesystem whose writes all fail (EIO) for `outage_s` seconds from the first write of a
    part file, in every process that holds a copy (the outage's start is a file in `state`); each
    refused write adds a line to `state/faults`."""

    def __init__(self, state: str, outage_s: float):
        self.inner, self.state, self.outage_s = pafs.LocalFileSystem(), state, outage_s

    def __getattr__(self, name):
        if name.startswith("__") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _down(self, path: str) -> None:
        start = os.path.join(self.state, "outage")
        if "/.parts/" in path and not os.path.exists(start):
            try:
                with open(start, "x") as f:
                    f.write(repr(time.time()))
            except FileExistsError:
                pass
        try:
            with open(start) as f:
                began = float(f.read() or "0")
        except (FileNotFoundError, ValueError):
            return
        if began and time.time() < began + self.outage_s:
            with open(os.path.join(self.state, "faults"), "a") as f:
                f.write(path + "\n")
            raise OSError(errno.EIO, f"Failed to write '{path}'. Detail: [errno 5] storage unreachable")

    def open_output_stream(self, path, *args, **kwargs):
        self._down(path)
        return self.inner.open_output_stream(path, *args, **kwargs)

    def move(self, src, dst):
        self._down(dst)
        return self.inner.move(src, dst)

    def create_dir(self, path, *args, **kwargs):
        self._down(path)
        return self.inner.create_dir(path, *args, **kwargs)


@pytest.mark.slow
@pytest.mark.ray
def test_a_storage_outage_longer_than_a_few_retries_is_ridden_out(tmp_path, ray_session, monkeypatch):
    import ray.cloudpickle
    from test_labeling_pipeline import assert_exactly_once

    from labeling.pipeline import driver
    from labeling.pipeline.config import LabelingConfig
    from labeling.pipeline.driver import run_labeling

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers get OutageFs by value
    images, output, state = tmp_path / "train", tmp_path / "out", tmp_path / "state"
    random_images(images, 12)
    state.mkdir()
    outage_s = 6.0  # longer than the old window: 4 attempts, 0.5 + 1 + 2 s of waits

    class Outage:
        @staticmethod
        def open(uri, retry_s):
            return OutputFolder(uri, OutageFs(str(state), outage_s), os.path.abspath(uri), retry_s)

    monkeypatch.setattr(driver, "OutputFolder", Outage)
    cfg = LabelingConfig(input=str(images), output=str(output), shard_size=4, storage_retry_s=60.0, **SMALL)
    stats = run_labeling(cfg, log=lambda m: None)
    faults = (state / "faults").read_text().splitlines()
    assert len(faults) >= 3 and any("/.parts/" in f for f in faults)  # the outage happened, to the workers
    assert stats["written"] == 12 and stats["failed"] == 0  # nothing lost, nothing marked failed
    rows, errors = assert_exactly_once(output, images)
    assert len(rows) == 12 and not errors
    assert not (output / ".parts").exists()


def test_the_lease_outlives_the_write_retry_window():
    from dataset_card.contract.lease import TTL_S, ttl_for

    assert ttl_for(shards.RETRY_S) >= 2 * shards.RETRY_S and ttl_for(1.0) == TTL_S
    assert OutputFolder.open("/tmp/x", retry_s=7.0).retry_s == 7.0


# --- what restarts an actor, what is retried, what is the image's failure

@pytest.mark.parametrize("message, kind", [
    ("CUDA error: an illegal memory access was encountered", "poisoned"),
    ("CUDA error: device-side assert triggered", "poisoned"),
    ("CUDA error: unspecified launch failure", "poisoned"),
    ("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, opb, m, n, k, ...)`", "poisoned"),
    ("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR", "poisoned"),
    ("CUDA error: misaligned address", "poisoned"),
    ("CUDA error: some error this code has never seen", "poisoned"),  # unknown CUDA errors: a new process
    ("CUDA out of memory. Tried to allocate 2.00 GiB", "out_of_memory"),
    ("CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", "out_of_memory"),
    ("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input.",
     "other"),
    ("cuDNN error: CUDNN_STATUS_BAD_PARAM", "other"),
    ("CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasGemmStridedBatchedEx(...)`", "other"),
    ("CUDA error: invalid configuration argument", "other"),
    ("CUDA error: no kernel image is available for execution on the device", "other"),
    ("cannot reshape array of size 12 into shape (5,)", "other"),
])
def test_only_errors_that_poison_the_cuda_context_restart_the_actor(message, kind):
    from labeling.pipeline import failures

    assert failures.classify(RuntimeError(message)) == kind
    wrapped = ValueError("the batch failed")
    wrapped.__cause__ = RuntimeError(message)
    assert failures.classify(wrapped) == kind  # found through the chain
    assert failures.is_fatal_device_error(RuntimeError(message)) == (kind == "poisoned")


def test_torch_out_of_memory_and_accelerator_errors_are_told_apart_by_type():
    import torch

    from labeling.pipeline import failures

    assert failures.classify(torch.OutOfMemoryError("Tried to allocate 20 MiB")) == failures.OUT_OF_MEMORY
    assert failures.classify(torch.AcceleratorError("CUDA error: an illegal memory access")) == failures.POISONED


def test_a_transient_out_of_memory_is_retried_with_smaller_batches_never_recorded():
    import torch

    from labeling.pipeline import failures

    calls, freed = [], []

    def model(images):  # out of memory once on a batch of more than two, then fine
        calls.append(list(images))
        if len(images) > 2 and len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        if "bad" in images:
            raise ValueError("a shape this model cannot take")
        return [f"labels of {i}" for i in images]

    out = failures.run_each(model, ["a", "b", "c", "d"], free=lambda: freed.append(1), wait_s=0.0)
    assert out == ["labels of a", "labels of b", "labels of c", "labels of d"]
    assert calls == [["a", "b", "c", "d"], ["a", "b"], ["c", "d"]] and freed  # halves, after freeing memory
    calls.clear()
    out = failures.run_each(model, ["x", "bad"], free=lambda: None, wait_s=0.0)
    assert out[0] == "labels of x" and isinstance(out[1], ValueError)  # a real failure is still recorded

    alone = {"n": 0}

    def tight(images):  # a single image out of memory twice (memory others held), then it fits
        alone["n"] += 1
        if alone["n"] <= 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return ["ok"] * len(images)

    assert failures.run_each(tight, ["big"], free=lambda: None, wait_s=0.0) == ["ok"]


def test_the_predictor_records_no_failure_for_a_simulated_oom(monkeypatch):
    import pyarrow as pa
    import torch

    from labeling.labelers.paired import ImageLabels
    from labeling.pipeline import environment, failures
    from labeling.pipeline.predictors import ModelPredictor
    from labeling.pipeline.preprocess import DECODED_SCHEMA

    monkeypatch.setattr(failures, "OOM_WAIT_S", 0.0)
    raised = []

    def labeler(images):  # a fake model: out of memory on its first call, then labels
        if not raised:
            raised.append(len(images))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return [ImageLabels([], np.zeros((6, 8), np.uint8), (6, 8), {"decode": 0.0, "instance": 0.1,
                                                                     "semantic": 0.1}) for _ in images]

    predictor = ModelPredictor.__new__(ModelPredictor)
    predictor.labeler = labeler
    predictor.environment = environment.encode(environment.collect("cpu", compiled=False))
    rows = [{"index": i, "shard": 0, "path": f"p{i}", "image_id": f"p{i}", "label": 0, "image_path": f"p{i}",
             "error_stage": "", "error_type": "", "error_message": "", "image_bytes": b"jpeg", "width": 8,
             "height": 6, "time_read": 0.0, "started_at": 0.0} for i in range(4)]
    out = predictor(pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)).to_pylist()
    assert raised == [4] and [r["error_type"] for r in out] == ["", "", "", ""]
    assert all(r["semantic_h"] == 6 for r in out)


def test_a_failing_stderr_filter_never_blocks_the_driver():
    import subprocess

    code = ("import os\n"
            "from labeling.pipeline.cluster import filtered_stderr\n"
            "with filtered_stderr(drop=(None,)):  # a filter that fails on its first line\n"
            "    for i in range(20000):  # ~1 MB: far more than a pipe holds\n"
            "        os.write(2, b'line %06d of what Ray writes to stderr\\n' % i)\n"
            "    os.write(2, b'last line\\n')\n"
            "print('the driver went on', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0 and "the driver went on" in done.stdout
    assert "the stderr filter stopped" in done.stderr and "stderr is unfiltered now" in done.stderr
    assert "line 019999 of what Ray writes" in done.stderr and "last line" in done.stderr  # nothing lost


def _stop_group(proc) -> None:
    """End `proc`'s own process group (never anything else)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(15)
        except Exception:
            continue


@pytest.mark.slow
@pytest.mark.ray
def test_a_driver_killed_mid_run_is_restarted_and_the_run_ends_complete(tmp_path):
    import json
    import signal
    import subprocess

    from test_labeling_pipeline import assert_exactly_once

    root = Path(__file__).resolve().parents[1]
    images, output = tmp_path / "train", tmp_path / "out"
    random_images(images, 24)
    command = [sys.executable, str(root / "labeling" / "run.py"), "--input", str(images), "--output", str(output),
               "--shard-size", "4", "--models", "tiny-random", "--model-actors", "1", "--actor-cpus", "0.5",
               "--task-cpus", "0.5", "--read-batch-size", "2", "--model-batch-size", "2",
               "--postprocess-batch-size", "2", "--no-progress", "--num-cpus", "2",
               "--object-store-memory", str(200 * 2**20), "--max-restarts", "1"]
    env = dict(os.environ, PYTHONPATH=str(root), HF_HUB_OFFLINE="1", RAY_ADDRESS="")
    proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        data = output / "data"
        while not (data.exists() and any(data.iterdir())) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        driver_pid = json.loads((output / ".lease.json").read_text())["pid"]
        assert driver_pid != proc.pid  # the supervisor runs the driver as its child
        killed_with = len(list(data.iterdir()))
        os.kill(driver_pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=400)
    finally:
        _stop_group(proc)
    assert proc.returncode == 0, err[-3000:]
    assert 1 <= killed_with < 6
    assert "the labeling driver was killed by SIGKILL; restarting it (1 of 1): the run resumes" in err
    assert f"driver restart 1 of 1: resuming {output}" in out and "labeled 24 of 24 inputs, 0 failed" in out
    stats = json.loads((output / "stats.json").read_text())
    assert stats["driver_restarts"] == 1 and stats["written"] == 24
    rows, errors = assert_exactly_once(output, images)
    assert len(rows) == 24 and not errors


def test_a_driver_that_explains_its_error_is_not_restarted(tmp_path, capsys):
    from labeling import run

    # A missing input is a sentence, exit status 2: restarting would repeat it.
    code = run.main(["--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out"), "--models",
                     "tiny-random", "--max-restarts", "3", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "restarting" not in err


# --- a decoder crash costs one file

def decode_or_die(data: bytes, max_pixels: int, max_side: int):
    """`model_input.decode`, except that the file b"crash" kills the process decoding it."""
    import signal

    from labeling.labelers import model_input

    if data == b"crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if data == b"hang":
        signal.pause()  # a decoder looping on a crafted file
    return model_input.decode(data, max_pixels, max_side)


def test_a_decoder_crash_on_one_file_is_that_files_failure_and_the_caller_goes_on():
    import io
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from dataset_card.contract.codecs import DecodeError
    from labeling.labelers.child_pool import DECODE_CRASH_MESSAGE, DecodePool
    from labeling.pipeline import failures

    def png(h, w):
        buf = io.BytesIO()
        Image.fromarray(np.full((h, w, 3), 7, np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    files = [png(20, 30), b"crash", png(40, 10), png(300, 100), png(8, 8)]
    pool = DecodePool(2, max_pixels=1_000_000, max_side=64, decode=decode_or_die)

    def decode(data):
        try:
            return pool(data)
        except DecodeError as err:
            return err

    with ThreadPoolExecutor(4) as threads:  # as the paired labeler calls it: from several threads at once
        out = list(threads.map(decode, files))
    assert isinstance(out[1], DecodeError) and str(out[1]) == DECODE_CRASH_MESSAGE.format(how="killed by SIGKILL")
    assert [o[0].shape for i, o in enumerate(out) if i != 1] == [(20, 30, 3), (40, 10, 3), (64, 21, 3), (8, 8, 3)]
    assert out[3][1:] == (100, 300)  # the original size, the pixels shrunk to 64
    assert failures.from_exception(failures.DECODE, out[1]).error_type == failures.UNDECODABLE
    assert pool(files[4])[0].shape == (8, 8, 3)  # the dead process was replaced
    with pytest.raises(DecodeError, match="cannot read image header"):
        pool(b"not an image")  # an ordinary decode error travels back as itself
    pool.close()

    watched = DecodePool(1, max_pixels=1_000_000, max_side=64, decode=decode_or_die, timeout_s=3)
    with pytest.raises(DecodeError) as hung:  # a child that never answers is killed: the file fails, the pool goes on
        watched(b"hang")
    assert str(hung.value) == DECODE_CRASH_MESSAGE.format(how="no answer within 3 s, killed")
    assert watched(files[0])[0].shape == (20, 30, 3)
    watched.close()


def test_a_decoder_crash_in_the_model_actor_fails_that_file_and_labels_the_rest_as_without_it():
    import io

    import pyarrow as pa
    from PIL import Image

    from labeling.pipeline import failures
    from labeling.pipeline.config import LabelingConfig, model_choice, model_max_side
    from labeling.pipeline.predictors import ModelPredictor
    from labeling.pipeline.preprocess import DECODED_SCHEMA

    def row(i: int, data: bytes, h: int, w: int) -> dict:
        return {"index": i, "shard": 0, "path": f"p{i}", "image_id": f"p{i}", "label": 0, "image_path": f"p{i}",
                "error_stage": "", "error_type": "", "error_message": "", "image_bytes": data, "width": w,
                "height": h, "time_read": 0.0, "started_at": 0.0}

    rng = np.random.default_rng(0)
    images = []
    for h, w in ((24, 32), (40, 28), (24, 32)):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
        images.append((buf.getvalue(), h, w))
    cfg = LabelingConfig(input="unused", output="unused", models="tiny-random", points_per_side=4)
    predictor = ModelPredictor(model_choice(cfg), threads=1, max_side=model_max_side(cfg), cpu_threads=2,
                               decode=decode_or_die)
    with_crash = [row(0, *images[0]), row(1, b"crash", 16, 16), row(2, *images[1]), row(3, *images[2])]
    out = predictor(pa.Table.from_pylist(with_crash, schema=DECODED_SCHEMA)).to_pylist()
    assert [r["error_type"] for r in out] == ["", failures.UNDECODABLE, "", ""]
    assert out[1]["error_stage"] == failures.DECODE
    assert out[1]["error_message"].startswith("the image decoder's process died on this file (killed by SIGKILL")
    # The same actor, models loaded, labels the healthy files exactly as it does without the crash beside them.
    alone = predictor(pa.Table.from_pylist([row(0, *images[0]), row(2, *images[1]), row(3, *images[2])],
                                           schema=DECODED_SCHEMA)).to_pylist()
    for got, want in zip([out[0], out[2], out[3]], alone):
        assert not want["error_type"] and want["semantic_h"] == want["height"]
        assert (got["instances_json"], got["semantic"]) == (want["instances_json"], want["semantic"])
    predictor.labeler.close()


def test_one_batch_decodes_while_another_holds_the_device_and_device_passes_never_overlap():
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from labeling.labelers.paired import PairedLabeler

    first_on_device, second_decoding = threading.Event(), threading.Event()
    on_device, most_on_device, saw_second_decode = [], [], []

    def decoder(data: bytes):
        if data == b"second":
            second_decoding.set()
        return np.full((2, 3, 3), len(data), np.uint8), 3, 2

    class Instance:  # the device half of a labeler, recording who is on the device
        def prepare(self, pixels):
            return pixels

        def device_pass(self, images):
            on_device.append(1)
            most_on_device.append(len(on_device))
            images = list(images)
            if not first_on_device.is_set():  # the first batch waits on the device for the second to decode
                first_on_device.set()
                saw_second_decode.append(second_decoding.wait(10))
            on_device.pop()
            yield from images

        def finish(self, pixels):
            return [{"value": int(pixels[0, 0, 0])}]

    class Semantic:
        fillers = 0  # copies padding a pass (none here)

        def prepare(self, pixels, size):
            return pixels

        def label(self, prepared):
            return [p[:, :, 0] for p in prepared]

    labeler = PairedLabeler(Instance(), Semantic(), max_side=8, threads=2, decoder=decoder)
    with ThreadPoolExecutor(2) as calls:  # the model actor's two concurrent calls
        first = calls.submit(labeler, [b"first"])
        assert first_on_device.wait(10)
        second = calls.submit(labeler, [b"second"])
        out = first.result(timeout=20) + second.result(timeout=20)
    assert saw_second_decode == [True]  # decoding overlapped the other batch's device work
    assert max(most_on_device) == 1  # device passes took turns
    assert [labels.masks for labels in out] == [[{"value": 5}], [{"value": 6}]]
    labeler.close()
