"""`labeling/run.py` as users run it, in subprocesses: killed with SIGKILL mid-run and rerun
(exactly once), submitted as a Ray job to a private head, labeling an 8000x8000 image under 4 GB,
and failing offline with one sentence. Each subprocess gets its own process group, and only that
group is ever stopped."""

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_labeling_pipeline import assert_exactly_once, check_rows, encode

from labeling.pipeline.driver import run_labeling
from labeling.run import config_from_args, parser

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "labeling" / "run.py")]
SMALL_FLAGS = ["--models", "tiny-random", "--model-actors", "2", "--actor-cpus", "0.5",
               "--task-cpus", "0.5", "--read-batch-size", "2", "--model-batch-size", "2",
               "--postprocess-batch-size", "2", "--no-progress"]


def env(**extra) -> dict:
    out = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", RAY_ADDRESS="")
    out.update(extra)
    return out


def stop_group(proc: subprocess.Popen) -> None:
    """End `proc`'s own process group (never anything else), politely then firmly."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            time.sleep(0.5)  # let the group's other members go too
        except subprocess.TimeoutExpired:
            continue


def random_images(root: Path, count: int, classes: int = 2) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{i:03d}.jpg").write_bytes(encode(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), "JPEG"))


def committed(output: Path) -> list[str]:
    return sorted(p.name for p in (output / "data").glob("train-*.parquet")) if (output / "data").exists() else []


@pytest.mark.ray
def test_sigkill_mid_run_then_rerun_labels_every_input_exactly_once(tmp_path, ray_session):
    images, output = tmp_path / "train", tmp_path / "out"
    random_images(images, 48)  # after start-up, labeling takes seconds: enough shards to land a kill between
    flags = ["--input", str(images), "--output", str(output), "--shard-size", "4"] + SMALL_FLAGS
    proc = subprocess.Popen(RUN + flags + ["--num-cpus", "2", "--object-store-memory", str(200 * 2**20)], env=env(),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not committed(output) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        stop_group(proc)
    at_kill = committed(output)
    assert 1 <= len(at_kill) < 12, f"the kill must land after the first commit and before the last: {at_kill}"
    assert (output / ".lease.json").exists()  # the killed run could not give its lease back
    # The same command again (in this process, on the session's Ray: it saves starting another).
    messages = []
    run_labeling(config_from_args(parser().parse_args(flags)), log=messages.append)
    assert any("taking over the lease" in m and "what it committed is kept" in m for m in messages)
    assert any(f"resuming: {len(at_kill)} shards already committed" in m for m in messages)
    assert len(committed(output)) == 12
    rows, errors = assert_exactly_once(output, images)
    assert len(rows) == 48 and not errors
    assert len({r["image_id"] for r in rows}) == 48
    check_rows(rows, output)


# Lines a healthy run must not print: Ray's error-level core-worker lines and warnings that ask
# nothing of the user.
NOISE = re.compile(r"^\S*\[[^]]* E \d+ \d+\] core_worker\.cc|WARNING|UserWarning|minimum number of concurrent actors")


@pytest.mark.ray
def test_a_second_run_on_one_output_refuses_and_the_healthy_first_prints_no_noise(tmp_path):
    images, output = tmp_path / "train", tmp_path / "out"
    random_images(images, 16)
    flags = ["--input", str(images), "--output", str(output), "--shard-size", "4"] + SMALL_FLAGS
    first = subprocess.Popen(RUN + flags + ["--num-cpus", "2", "--object-store-memory", str(200 * 2**20)], env=env(),
                             start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (output / ".lease.json").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        second = subprocess.run(RUN + flags, env=env(), capture_output=True, text=True, timeout=300)
        out, err = first.communicate(timeout=400)
    finally:
        stop_group(first)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
    refusal = second.stderr.strip().splitlines()[-1]
    assert refusal.startswith(f"error: {output} is being written by another run (host {socket.gethostname()}, "
                              f"pid {first.pid}, started ") and "stop it first" in refusal
    assert first.returncode == 0 and "labeled 16 of 16 inputs, 0 failed" in out, err[-3000:]
    rows, errors = assert_exactly_once(output, images)
    assert len(rows) == 16 and not errors
    noise = [line for line in err.splitlines() if NOISE.search(line)]
    assert not noise, noise


def tmpfs(path: Path, size: str) -> bool:
    """Mount a small tmpfs at `path` where this process may (root in a container), else False."""
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.ray
def test_a_full_disk_ends_in_one_sentence_leaves_no_temporary_file_and_the_rerun_finishes(tmp_path, ray_session):
    from dataset_card.contract.shards import OutputWriteError

    images, disk = tmp_path / "train", tmp_path / "disk"
    rng = np.random.default_rng(0)
    (images / "noise").mkdir(parents=True)
    for i in range(24):  # incompressible: each labeled row is ~100 KB
        (images / "noise" / f"{i:02d}.png").write_bytes(encode(rng.integers(0, 255, (160, 200, 3), np.uint8), "PNG"))
    if not tmpfs(disk, "1600k"):
        pytest.skip("cannot mount a small tmpfs here (the simulated ENOSPC of test_labeling_faults still runs)")
    try:
        output = disk / "out"
        cfg = config_from_args(parser().parse_args(["--input", str(images), "--output", str(output), "--shard-size",
                                                    "2"] + SMALL_FLAGS))
        with pytest.raises(OutputWriteError) as err:
            run_labeling(cfg, log=lambda m: None)
        text = str(err.value)
        assert text.startswith(f"cannot write {output}/") and "(No space left on device): free space there" in text
        assert not [p for p in output.rglob(".*") if p.name != ".lease.json" or p.parent != output]
        assert not (output / ".lease.json").exists()
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        run_labeling(cfg, log=lambda m: None)  # the same command, after freeing space
        rows, errors = assert_exactly_once(output, images)
        assert len(rows) == 24 and not errors
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def free_ports(count: int) -> list[int]:
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def free_port_block(size: int) -> int:
    """The first of `size` consecutive free ports, for a Ray node's worker ports. Taken below the kernel's
    ephemeral range, where `free_ports` draws from: a block that held one of the node's other ports, or
    another node's, makes Ray refuse to start ("... is trying to use a port number ... that is used by
    other components") and the node never joins."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        base = random.randrange(20000, low - size)  # above Ray's defaults (6379, 8265, 10001-19999)
        sockets = []
        try:
            for port in range(base, base + size):
                s = socket.socket()
                sockets.append(s)
                s.bind(("", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {size} consecutive free ports between 20000 and {low}")


@pytest.mark.ray
def test_ray_job_submit_against_a_private_head(tmp_path):
    images, output = tmp_path / "train", tmp_path / "out"
    random_images(images, 6)
    ray_bin = str(Path(sys.executable).parent / "ray")
    gcs, dashboard, client, agent, agent_grpc, node, objects, metrics, runtime_env = free_ports(9)
    workers = free_port_block(61)
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    # A private token for this private head; the job must work from its uploaded working dir alone.
    head_env = env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex,
                   PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    head_env.pop("PYTHONPATH")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--node-manager-port={node}", f"--object-manager-port={objects}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={runtime_env}", f"--min-worker-port={workers}",
         f"--max-worker-port={workers + 60}", f"--temp-dir={temp_dir}", "--num-cpus=2",
         f"--object-store-memory={200 * 2**20}"],
        env=head_env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 300  # a loaded 2-core machine has taken over 120 s
        while time.time() < deadline and head.poll() is None:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2).close()
                break
            except urllib.error.HTTPError:  # it answers (token authentication may refuse us): it is up
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail(f"the private Ray head did not come up (exit status {head.poll()}; else 300 s passed)")
        job = subprocess.run(
            [ray_bin, "job", "submit", f"--address={address}", f"--working-dir={ROOT}", "--",
             "python", "labeling/run.py", "--input", str(images), "--output", str(output), "--shard-size", "4"]
            + SMALL_FLAGS, env=head_env, capture_output=True, text=True, timeout=400, cwd=tmp_path)
        assert "labeled 6 of 6 inputs, 0 failed" in job.stdout, job.stdout[-4000:] + job.stderr[-2000:]
    finally:
        stop_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
    rows, errors = assert_exactly_once(output, images)
    assert len(rows) == 6 and not errors
    check_rows(rows, output)


LABEL_ONE_IMAGE = """
import json, resource, sys
import pyarrow as pa
from labeling.inputs.folder import FolderSource
from labeling.pipeline.config import LabelingConfig, model_choice, model_max_side
from labeling.pipeline.postprocess import PostprocessConfig, postprocess_stage, staged_schema
from labeling.pipeline.predictors import ModelPredictor
from labeling.pipeline.preprocess import WORK_SCHEMA, read_stage

folder, name = sys.argv[1], sys.argv[2]
cfg = LabelingConfig(input=folder, output="unused", models="tiny-random")
choice = model_choice(cfg)
models = ModelPredictor(choice, threads=2, max_side=model_max_side(cfg))
classes = choice.materialize().semantic_classes()
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
work = pa.Table.from_pylist([{"index": 0, "shard": 0, "path": name, "image_id": name, "label": 0,
                              "image_path": name, "error_stage": "", "error_type": "", "error_message": ""}],
                            schema=WORK_SCHEMA)
batch = models(read_stage(work, FolderSource(folder), max_pixels=100_000_000))
post = PostprocessConfig(len(classes), 255, cfg.min_instance_area, tuple(c.id for c in classes if c.isthing))
row = postprocess_stage(batch, post, staged_schema(["c"], [c.name for c in classes])).to_pylist()[0]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
models.labeler.close()  # the decoding processes end, so their peak is counted below
decoder_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"peak_kb": peak, "decoder_peak_kb": decoder_peak, "after_models_kb": baseline, "error": row["error_message"],
                  "instances": row["stat_instances"], "size": [row["width"], row["height"]]}))
"""


def test_an_8000_by_8000_image_labels_under_4_gb(tmp_path):
    rng = np.random.default_rng(0)
    field = cv2.resize(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8), (8000, 8000),
                       interpolation=cv2.INTER_CUBIC)
    ok, data = cv2.imencode(".jpg", field, [cv2.IMWRITE_JPEG_QUALITY, 85])
    del field
    (tmp_path / "big.jpg").write_bytes(data.tobytes())
    done = subprocess.run([sys.executable, "-c", LABEL_ONE_IMAGE, str(tmp_path), "big.jpg"], env=env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["error"] == "" and result["size"] == [8000, 8000]
    assert result["instances"] > 0  # masks were really upsampled to full size
    assert result["peak_kb"] < 4 * 2**20, f"peak RSS {result['peak_kb'] / 2**20:.2f} GB"
    # The decoding happens in the model actor's decode process, which holds the full-size pixels for a moment.
    assert 0 < result["decoder_peak_kb"] < 2**20, f"the decoder's peak RSS {result['decoder_peak_kb'] / 2**20:.2f} GB"


def test_default_models_offline_fail_with_one_sentence(tmp_path):
    random_images(tmp_path / "train", 2)
    done = subprocess.run(RUN + ["--input", str(tmp_path / "train"), "--output", str(tmp_path / "out"),
                                 "--models", "default", "--no-progress"],
                          env=env(TORCH_HOME=str(tmp_path / "torch"), HF_HOME=str(tmp_path / "hf")),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "vit_h" in last and "put it at" in last and "--sam-checkpoint" in last


def test_help_explains_every_flag():
    done = subprocess.run(RUN + ["--help"], env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for flag in ("--input", "--output", "--models", "--shard-size", "--limit", "--overwrite", "--retry-errors",
                 "--max-pixels", "--gpus-per-actor", "--model-actors", "--model-batch-size", "--semantic-revision",
                 "--semantic-shortest-edge", "--painting-rule", "--min-purity", "--image-storage",
                 "--max-failure-rate", "--no-repair", "--compile", "--storage-retry-seconds", "--max-restarts",
                 "--staged-models"):
        assert flag in done.stdout
