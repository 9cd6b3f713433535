"""Supervision of a long labeling run: a storage outage longer than a few retries is ridden out,
a transient out-of-memory is retried, only errors that poison the CUDA context restart an actor,
a decoder crash costs one file, the stderr filter cannot block the driver, and a killed driver is
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
from labeling.pipeline import driver
from labeling.pipeline.driver import LabelingConfig, run_labeling

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
