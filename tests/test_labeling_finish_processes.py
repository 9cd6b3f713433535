"""SAM's CPU half in the model actor's own processes (`child_pool.FinishPool`): the same records as
in the actor's threads, and a child that crashes or raises on one image costs that image only."""

import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pytest
import skimage.data
import torch

from labeling.labelers.child_pool import FINISH_CRASH_MESSAGE, FinishCrashed, FinishPool
from labeling.labelers.instance import InstanceLabeler, InstanceLabelerConfig
from labeling.labelers.instance_finish import finish_image
from labeling.labelers.tiny_models import build_tiny_sam_random

CRASH_SIZE, RAISE_SIZE = (36, 20), (20, 44)  # (h, w) at model resolution of the images a test child fails on


def finish_or_die(cfg, result):
    """`instance_finish.finish_image`, except that its process exits mid-image on an image of CRASH_SIZE
    and raises on one of RAISE_SIZE."""
    if tuple(result.size) == CRASH_SIZE:
        os._exit(3)
    if tuple(result.size) == RAISE_SIZE:
        raise ValueError(f"no masks for an image of {result.size}")
    return finish_image(cfg, result)


def photos() -> list[np.ndarray]:
    """Five small distinct RGB images (crops of skimage's photos)."""
    astronaut, chelsea, coffee = skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()
    return [np.ascontiguousarray(im) for im in
            (astronaut[::4, ::4], chelsea[::3, ::3], coffee[::4, ::4], astronaut[100:260:2, 150:300:2],
             chelsea[::-4, ::4])]


@pytest.fixture(scope="module")
def device_results():
    """Crop layers, cross-crop NMS and the small-region cleanup all take part in `finish`."""
    torch.manual_seed(0)
    cfg = InstanceLabelerConfig(points_per_side=8, pred_iou_thresh=0.65, stability_score_thresh=0.8, crop_n_layers=1,
                                min_mask_region_area=30, max_mask_fraction=0.95)
    labeler = InstanceLabeler(build_tiny_sam_random(), cfg)
    return cfg, list(labeler.device_pass(labeler.prepare(im) for im in photos()[:3]))


def test_the_finish_processes_give_the_threads_records_and_a_child_dying_mid_image_fails_only_that_image(
        device_results):
    cfg, results = device_results
    in_thread = [finish_image(cfg, r) for r in results]
    assert min(map(len, in_thread)) >= 20  # masks to compare, not empty lists
    crash = dataclass_replace_size(results[0], CRASH_SIZE)
    pool = FinishPool(2, cfg, finish=finish_or_die)
    with ThreadPoolExecutor(3) as threads:  # as the paired labeler calls it: from several threads at once
        futures = [threads.submit(pool, r) for r in (results[0], crash, results[1], results[2])]
    with pytest.raises(FinishCrashed) as died:
        futures[1].result()
    assert str(died.value) == FINISH_CRASH_MESSAGE.format(how="exit code 3")
    assert [futures[0].result(), futures[2].result(), futures[3].result()] == in_thread
    with pytest.raises(ValueError, match="no masks for an image of"):  # an exception travels back as itself
        pool(dataclass_replace_size(results[0], RAISE_SIZE))
    assert pool(results[1]) == in_thread[1]  # the dead process was replaced
    assert len(pool._all) <= 2
    pool.close()


def dataclass_replace_size(result, size):
    """`result` claiming another image size (what `finish_or_die` reads; its masks stay valid inside it)."""
    import dataclasses

    return dataclasses.replace(result, size=size, packed=result.packed[: 0], count=0)


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _row(i: int, data: bytes, h: int, w: int) -> dict:
    return {"index": i, "shard": 0, "path": f"p{i}", "image_id": f"p{i}", "label": 0, "image_path": f"p{i}",
            "error_stage": "", "error_type": "", "error_message": "", "image_bytes": data, "width": w, "height": h,
            "time_read": 0.0, "started_at": 0.0}


def test_the_model_actor_with_finish_processes_labels_as_with_threads_and_survives_a_crash():
    from labeling.pipeline import failures
    from labeling.pipeline.config import LabelingConfig, model_choice, model_max_side
    from labeling.pipeline.predictors import ModelPredictor
    from labeling.pipeline.preprocess import DECODED_SCHEMA

    images = [im[: 48, : 64] for im in photos()[:3]]
    images += [photos()[3][: CRASH_SIZE[0], : CRASH_SIZE[1]], photos()[4][: RAISE_SIZE[0], : RAISE_SIZE[1]]]
    rows = [_row(i, _png(im), *im.shape[:2]) for i, im in enumerate(images)]
    batch = pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)
    cfg = LabelingConfig(input="unused", output="unused", models="tiny-random", points_per_side=8)
    choice = model_choice(cfg)
    threads = ModelPredictor(choice, threads=1, max_side=model_max_side(cfg), cpu_threads=2, finish_processes=False)
    want = threads(batch.slice(0, 3)).to_pylist()
    threads.labeler.close()
    processes = ModelPredictor(choice, threads=1, max_side=model_max_side(cfg), cpu_threads=2, finish_processes=True,
                               finish=finish_or_die)
    got = processes(batch).to_pylist()
    assert [r["error_type"] for r in got] == ["", "", "", failures.MODEL_FAILED, failures.MODEL_FAILED]
    assert [r["error_stage"] for r in got[3:]] == [failures.MODEL] * 2
    assert got[3]["error_message"] == "FinishCrashed: " + FINISH_CRASH_MESSAGE.format(how="exit code 3")
    assert got[4]["error_message"].startswith("ValueError: no masks for an image of")
    assert sum(len(r["instances_json"]) > 2 for r in want) >= 2  # records to compare, not empty lists
    for a, b in zip(got[:3], want):
        assert not b["error_type"]
        assert (a["instances_json"], a["semantic"], a["pixels_h"]) == (b["instances_json"], b["semantic"], b["pixels_h"])
    assert processes(batch.slice(0, 1)).to_pylist()[0]["instances_json"] == want[0]["instances_json"]  # it goes on
    processes.labeler.close()


@pytest.mark.slow
def test_the_finish_processes_benchmark_reports_both_paths_on_the_same_records():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "finish_processes.py"), "--side", "128",
                           "--images", "1", "--points-per-side", "6", "--workers", "1", "--repeats", "1",
                           "--seconds", "0.2", "--rounds", "1"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-3000:]  # it also checks that the child's records are the thread's
    figures = {k: float(v) for k, v in (item.split("=") for item in done.stdout.strip().splitlines()[-1].split())}
    assert set(figures) == {"thread_ms", "process_ms", "round_trip_ms", "overhead_ratio", "launcher_threads",
                            "launcher_processes"}
    assert figures["thread_ms"] > 0 and figures["process_ms"] > figures["round_trip_ms"] > 0
    assert figures["overhead_ratio"] == pytest.approx(figures["process_ms"] / figures["thread_ms"], rel=0.05)
