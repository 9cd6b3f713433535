"""Where the model actors run and how many there are: no silent CPU (an actor given a GPU it cannot
use stops the run in one sentence; real models never go to CPUs unasked; a cluster without GPUs is
waited on when GPUs can come, else refused), and the pool that grows and shrinks with the cluster."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from test_labeling_pipeline import assert_exactly_once
from test_labeling_processes import RUN, env, free_port_block, free_ports, random_images, stop_group

from labeling.pipeline import cluster, environment
from labeling.pipeline.predictors import GPUUnavailable, ModelPredictor


def one_sentence(text: str) -> bool:
    return "\n" not in text and text.count(". ") == 0


def test_an_actor_given_a_gpu_without_cuda_fails_at_start_naming_driver_and_cuda_build(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the GPU is off the bus, or the driver too old
    monkeypatch.setattr(environment, "_nvidia_driver", lambda: "470.57.02")
    with pytest.raises(GPUUnavailable) as err:
        ModelPredictor(choice=None, device="cuda")  # fails before touching a model
    message = str(err.value)
    assert one_sentence(message)
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
    assert "NVIDIA driver 470.57.02" in message and f"torch {torch.__version__} {build}" in message
    assert "--device cpu" in message

    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build of torch on a GPU node (nothing imported after)
    monkeypatch.setattr(environment, "_nvidia_driver", lambda: None)
    message = environment.no_cuda_sentence()
    assert one_sentence(message) and "built without CUDA" in message and "no NVIDIA driver readable" in message


def test_the_actors_sentence_reaches_the_driver_through_rays_error():
    sentence = environment.no_cuda_sentence()
    # How Ray reports an actor whose constructor raised: its traceback as text, under its own first line.
    ray_text = ("The actor died because of an error raised in its creation task, ray::MapWorker(...).__init__() "
                "(pid=1, ip=10.0.0.2)\n  File \"predictors.py\", line 93, in _device\n"
                f"labeling.pipeline.predictors.GPUUnavailable: {sentence}\n")
    wrapped = RuntimeError("the dataset failed")
    wrapped.__cause__ = RuntimeError(ray_text)
    assert cluster.actor_start_failure(wrapped) == sentence
    assert cluster.actor_start_failure(RuntimeError("disk full")) is None


def fixed_cluster(monkeypatch, cpus: float, gpus: float, autoscaler: bool = False):
    monkeypatch.setattr(cluster, "cluster_cpus_gpus", lambda: (cpus, gpus))
    monkeypatch.setattr(cluster, "can_add_gpus", lambda: autoscaler)


def test_a_fixed_cluster_without_gpus_is_refused_unless_cpus_are_asked_for(monkeypatch):
    fixed_cluster(monkeypatch, cpus=8, gpus=0)
    with pytest.raises(cluster.ClusterError) as err:  # real models, no --device: never CPUs
        cluster.plan_actors("auto", cpu_allowed=False, wait_for_gpus_s=None, log=print)
    assert one_sentence(str(err.value)) and "--device cpu" in str(err.value) and "add GPU nodes" in str(err.value)
    with pytest.raises(cluster.ClusterError):  # the tiny twins too, when GPUs are asked for
        cluster.plan_actors("cuda", cpu_allowed=True, wait_for_gpus_s=None, log=print)
    asked = cluster.plan_actors("cpu", cpu_allowed=False, wait_for_gpus_s=None, log=print)
    assert (asked.device, asked.gpus_per_actor, asked.model_actors) == ("cpu", 0.0, 8)
    tiny = cluster.plan_actors("auto", cpu_allowed=True, wait_for_gpus_s=None, log=print)
    assert tiny.device == "cpu"
    with pytest.raises(cluster.ClusterError, match="no GPUs"):  # GPUs asked for by --gpus-per-actor
        cluster.plan_actors("auto", cpu_allowed=True, wait_for_gpus_s=None, log=print, gpus_per_actor=1.0)
    with pytest.raises(cluster.ClusterError, match="drop one"):
        cluster.plan_actors("cpu", cpu_allowed=True, wait_for_gpus_s=None, log=print, gpus_per_actor=1.0)
    fixed_cluster(monkeypatch, cpus=8, gpus=2)  # GPUs present: the tiny twins use them too
    assert cluster.plan_actors("auto", cpu_allowed=True, wait_for_gpus_s=None, log=print).device == "cuda"
    assert cluster.plan_actors("cpu", cpu_allowed=True, wait_for_gpus_s=None, log=print).device == "cpu"
    with pytest.raises(cluster.ClusterError, match="--device cpu"):
        cluster.plan_layout(8, 2, gpus_per_actor=0, device="cuda")


@pytest.mark.slow
@pytest.mark.ray
def test_a_run_of_real_models_on_a_fixed_cluster_without_gpus_is_refused_before_any_work(tmp_path, ray_session):
    import dataclasses

    from labeling.pipeline.config import LabelingConfig, model_choice
    from labeling.pipeline.driver import run_labeling

    random_images(tmp_path / "train", 4)
    cfg = LabelingConfig(input=str(tmp_path / "train"), output=str(tmp_path / "out"), models="default",
                         progress=False)
    tiny = model_choice(dataclasses.replace(cfg, models="tiny-random"))  # stands in for the real models' weights
    assert not cluster.can_add_gpus()  # a local Ray: no autoscaler, no node type to launch
    with pytest.raises(cluster.ClusterError) as err:
        run_labeling(cfg, log=lambda m: None, choice=tiny)
    assert one_sentence(str(err.value)) and "--device cpu" in str(err.value) and "add GPU nodes" in str(err.value)
    assert not list((tmp_path / "out").glob("data/*"))
    assert not (tmp_path / "out" / ".lease.json").exists()  # the lease is given back: the next run may start


def test_a_cluster_that_can_add_gpus_is_waited_on_with_a_message(monkeypatch):
    import ray.autoscaler.sdk

    requests = []
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda bundles: requests.append(bundles))
    seen = iter([(4, 0), (4, 0), (12, 1), (12, 1)])  # a GPU node joins on the third look
    monkeypatch.setattr(cluster, "cluster_cpus_gpus", lambda: next(seen))
    monkeypatch.setattr(cluster, "can_add_gpus", lambda: True)
    monkeypatch.setattr(cluster.time, "sleep", lambda s: None)
    lines = []
    layout = cluster.plan_actors("auto", cpu_allowed=False, wait_for_gpus_s=None, log=lines.append)
    # One actor per GPU after a wait, not the one-GPU machine's two halves: GPUs joining later get one each.
    assert layout.device == "cuda" and layout.model_actors == 1 and layout.gpus_per_actor == 1.0
    assert "waiting up to 1800 s for the first GPU" in lines[0] and "1 GPUs joined" in lines[1]
    assert requests == [[{"GPU": 1.0, "CPU": 1.0}], []]  # asked the autoscaler for a GPU, then withdrew

    fixed_cluster(monkeypatch, cpus=4, gpus=0, autoscaler=False)  # a fixed cluster, told GPUs are coming
    clock = iter(range(0, 1000, 5))
    monkeypatch.setattr(cluster.time, "monotonic", lambda: next(clock))
    with pytest.raises(cluster.ClusterError) as err:
        cluster.plan_actors("auto", cpu_allowed=False, wait_for_gpus_s=20, log=lines.append)
    assert one_sentence(str(err.value)) and "within 20 s" in str(err.value) and "--device cpu" in str(err.value)


def test_the_model_actor_pool_grows_with_the_cluster_between_a_minimum_and_a_maximum():
    elastic = cluster.plan_layout(cpus=64, gpus=8)
    assert (elastic.model_actors, elastic.min_actors, elastic.max_actors) == (8, 1, None)
    pool = elastic.pool()
    assert (pool.min_size, pool.max_size, pool.initial_size) == (1, float("inf"), 8)
    capped = cluster.plan_layout(cpus=64, gpus=8, min_actors=2, max_actors=4)
    assert (capped.model_actors, capped.min_actors, capped.max_actors) == (4, 2, 4)
    grows = cluster.plan_layout(cpus=64, gpus=2, max_actors=16)  # starts on what is there, grows to 16
    assert (grows.model_actors, grows.max_actors) == (2, 16)
    fixed = cluster.plan_layout(cpus=64, gpus=8, model_actors=3).pool()
    assert fixed.min_size == fixed.max_size == 3
    assert "growing with the cluster" in elastic.describe() and "growing" not in cluster.plan_layout(
        cpus=64, gpus=8, model_actors=3).describe()


def test_stats_report_billed_gpu_time_beside_model_time(monkeypatch):
    import ray
    import ray._private.state

    from dataset_card.contract import layout
    from labeling.pipeline import finish

    hour = 3600.0
    table = {  # Ray's actor table (times in ms): two model actors of this job, one of another job, one other class
        "a": {"JobID": "01000000", "ActorClassName": "MapWorker(MapBatches(ModelPredictor))", "StartTime": hour * 500,
              "EndTime": 2.5 * hour * 1000},
        "b": {"JobID": "01000000", "ActorClassName": "MapWorker(MapBatches(ModelPredictor))",
              "StartTime": hour * 1000, "EndTime": 0},  # still alive: counted up to now
        "c": {"JobID": "02000000", "ActorClassName": "MapWorker(MapBatches(ModelPredictor))", "StartTime": 0,
              "EndTime": 9 * hour * 1000},
        "d": {"JobID": "01000000", "ActorClassName": "MapWorker(MapBatches(read_stage))", "StartTime": 1,
              "EndTime": 9 * hour * 1000},
        "e": {"JobID": "01000000", "ActorClassName": "MapWorker(MapBatches(ModelPredictor))", "StartTime": 1,
              "EndTime": hour * 100},  # an earlier run of this driver
    }
    monkeypatch.setattr(ray._private.state, "actors", lambda: table)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: type("Ctx", (), {"get_job_id": lambda self: "01000000"})())
    lifetime = cluster.model_actor_seconds(since_s=hour / 4, now_s=4 * hour)
    assert lifetime == 2 * hour + 3 * hour

    # 5 actor-hours at half a GPU each held 2.5 GPU-hours; the models computed for 0.5 of them.
    stats = finish.run_stats(layout.ShardStats(shard=-1), 10, [], wall_time_s=10.0, commit_time_s=0.0,
                             gpus_per_actor=0.5, actor_lifetime_s=lifetime)
    assert (stats["gpu_hours"], stats["billed_gpu_hours"]) == (0.0, 2.5)
    assert finish.gpu_time(model_s=hour, gpus_per_actor=0.5, actor_lifetime_s=lifetime) == {
        "gpu_hours": 0.5, "billed_gpu_hours": 2.5}
    assert finish.gpu_time(hour, 1.0, None)["billed_gpu_hours"] is None  # Ray could not say: unknown, not zero
    again = finish.run_stats(layout.ShardStats(shard=-1), 10, [], 10.0, 0.0, 0.5, previous=stats)
    assert again["previous_runs"][-1]["billed_gpu_hours"] == 2.5


# --- a two-node Ray cluster on this host: two `ray start` processes, each in its own process group ---

COUNT_NODES = """
import sys, time
from ray._private.gcs_utils import GcsNodeInfo
from ray._raylet import GcsClient

address, count, timeout_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline, alive, error = time.time() + timeout_s, 0, None
while time.time() < deadline:
    try:
        infos = GcsClient(address=address).get_all_node_info(timeout=5)
        alive, error = sum(info.state == GcsNodeInfo.ALIVE for info in infos.values()), None
    except Exception as e:  # the head's GCS is not answering yet
        alive, error = 0, e
    if alive >= count:
        sys.exit(0)
    time.sleep(0.5)
print(f"{alive} of {count} Ray nodes joined within {timeout_s:g} s (last error: {error!r})")
sys.exit(1)
"""


class NodesMissing(Exception):
    """Not every node of a LocalCluster joined its head in time."""


class LocalCluster:
    """Ray nodes started by this test (a head, then workers), each `ray start --block` in its own process
    group with its own ports and temporary folder; only those groups are ever stopped."""

    def __init__(self, env: dict):
        self.env, self.nodes, self.temp_dirs = env, [], []
        self.ray_bin = str(Path(sys.executable).parent / "ray")
        self.address = None

    def add_node(self, num_cpus: int) -> subprocess.Popen:
        gcs, client, agent, agent_grpc, node, objects, metrics, runtime_env = free_ports(8)
        workers = free_port_block(41)
        temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.temp_dirs.append(temp_dir)
        where = (["--head", f"--port={gcs}", "--include-dashboard=false", f"--ray-client-server-port={client}"]
                 if self.address is None else [f"--address={self.address}"])
        with open(Path(temp_dir) / "ray_start.log", "wb") as log:  # read back when a node fails to join
            proc = subprocess.Popen(
                [self.ray_bin, "start", "--block", *where, f"--num-cpus={num_cpus}",
                 "--num-gpus=0", f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                 f"--node-manager-port={node}", f"--object-manager-port={objects}", f"--metrics-export-port={metrics}",
                 f"--runtime-env-agent-port={runtime_env}", f"--min-worker-port={workers}",
                 f"--max-worker-port={workers + 40}", f"--temp-dir={temp_dir}", f"--object-store-memory={150 * 2**20}"],
                env=self.env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        self.nodes.append(proc)
        if self.address is None:  # the address Ray itself resolves for this host (a driver joining 127.0.0.1 would too)
            from ray._private.services import get_node_ip_address

            self.address = f"{get_node_ip_address()}:{gcs}"
        return proc

    def wait_for_nodes(self, count: int, timeout_s: float = 120) -> None:
        """Until the head lists `count` live nodes: a worker's `ray start` returns before it has joined, and a
        run started in between plans its actors on the head alone (on a loaded machine the gap is many seconds).

        Asked from a child with the nodes' environment, as the run will ask: this test process may hold a Ray
        session of its own (the `ray_session` fixture), whose state is no concern of this cluster's."""
        asked = subprocess.run([sys.executable, "-c", COUNT_NODES, self.address, str(count), str(timeout_s)],
                               env=self.env, capture_output=True, text=True, timeout=timeout_s + 120)
        if asked.returncode != 0:
            raise NodesMissing(f"{asked.stdout.strip() or asked.stderr[-2000:]}; the nodes' `ray start` said:\n"
                               f"{self.logs()}")

    def start(self, cpus: list[int], tries: int = 2) -> list[subprocess.Popen]:
        """A head and workers with these CPU counts, all joined. A cluster whose nodes do not all join is
        stopped and started again on fresh ports, once: ports chosen free here can still be taken by another
        process before Ray binds them, and a node that loses one never joins."""
        for attempt in range(1, tries + 1):
            nodes = [self.add_node(num_cpus=n) for n in cpus]
            try:
                self.wait_for_nodes(len(cpus))
                return nodes
            except NodesMissing as e:
                if attempt == tries:
                    pytest.fail(str(e))
                print(f"cluster start {attempt} of {tries} failed, starting again: {e}", file=sys.stderr)
                self.stop()
                self.nodes, self.temp_dirs, self.address = [], [], None

    def logs(self) -> str:
        """Each node's exit status and the tail of what its `ray start` printed."""
        return "\n".join(f"node {i} (exit status {node.poll()}): "
                         + (Path(temp_dir) / "ray_start.log").read_text(errors="replace")[-2000:]
                         for i, (node, temp_dir) in enumerate(zip(self.nodes, self.temp_dirs)))

    def kill(self, node: subprocess.Popen) -> None:
        """The node dies at once, as a lost machine does: its whole process group, SIGKILL."""
        os.killpg(node.pid, signal.SIGKILL)
        node.wait(30)

    def stop(self) -> None:
        for node in reversed(self.nodes):  # workers first, the head last
            stop_group(node)
        for temp_dir in self.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def descendants_running(root_pid: int, marker: str) -> list[int]:
    """Processes below `root_pid` whose command line (Ray's process title) contains `marker`."""
    parent, title = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue

    def below(pid: int) -> bool:
        while pid > 1:
            pid = parent.get(pid, 0)
            if pid == root_pid:
                return True
        return False

    return [pid for pid, text in title.items() if marker in text and below(pid)]


def wait_for(condition, timeout_s: float, what: str, run: subprocess.Popen) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        if run.poll() is not None:
            pytest.fail(f"the run ended before {what}: {run.stdout.read()[-3000:] if run.stdout else ''}")
        if time.time() > deadline:
            pytest.fail(f"no {what} within {timeout_s} s")
        time.sleep(0.2)


MODEL_ACTOR = "ModelPredictor"  # in the title Ray gives each model actor's process
TWO_NODE_FLAGS = ["--models", "tiny-random", "--actor-cpus", "0.5", "--task-cpus", "0.25", "--read-batch-size", "2",
                  "--model-batch-size", "2", "--postprocess-batch-size", "2", "--shard-size", "4", "--no-progress"]


@pytest.fixture
def local_cluster():
    cluster_env = env(RAY_AUTH_MODE="disabled", RAY_health_check_period_ms="1000",
                      RAY_health_check_failure_threshold="3",
                      PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    made = LocalCluster(cluster_env)
    yield made
    made.stop()


def start_run(local_cluster: LocalCluster, images: Path, output: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(RUN + ["--input", str(images), "--output", str(output), "--address",
                                   local_cluster.address, *TWO_NODE_FLAGS, *extra],
                            env=local_cluster.env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def parts_written(output: Path) -> bool:
    return any((output / ".parts").rglob("*.parquet")) if (output / ".parts").exists() else False


def finish(run: subprocess.Popen, timeout_s: float) -> str:
    try:
        out, _ = run.communicate(timeout=timeout_s)
    finally:
        stop_group(run)
    assert run.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.ray
def test_a_node_killed_mid_run_and_the_run_still_labels_every_input_exactly_once(tmp_path, local_cluster):
    images, output = tmp_path / "train", tmp_path / "out"
    random_images(images, 24)
    # The head has 1 CPU: once half full it sends the second actor to the doomed node. Both must have joined
    # before the run starts, else it may plan, and finish, on the head alone.
    _, doomed = local_cluster.start([1, 2])
    run = start_run(local_cluster, images, output)
    try:
        # The kill lands while the doomed node holds a model actor and labels are being written.
        wait_for(lambda: descendants_running(doomed.pid, MODEL_ACTOR), 180, "model actor on the second node", run)
        wait_for(lambda: parts_written(output), 180, "labeled part", run)
        local_cluster.kill(doomed)
        out = finish(run, 180)
    finally:
        stop_group(run)
    assert "labeled 24 of 24 inputs, 0 failed" in out, out[-4000:]
    rows, errors = assert_exactly_once(output, images)
    assert len(rows) == 24 and not errors
    assert len({r["image_id"] for r in rows}) == 24


@pytest.mark.slow
@pytest.mark.ray
def test_a_node_added_mid_run_receives_model_actors(tmp_path, local_cluster):
    images, output = tmp_path / "train", tmp_path / "out"
    random_images(images, 48)
    head, = local_cluster.start([1])  # room for one model actor: the pool starts at one
    run = start_run(local_cluster, images, output, "--max-model-actors", "4")
    frozen = []
    try:
        wait_for(lambda: descendants_running(head.pid, MODEL_ACTOR), 180, "model actor on the head", run)
        wait_for(lambda: parts_written(output), 180, "labeled part", run)
        # The head's actor is stopped while the node joins, so the backlog cannot run out before the new
        # node's actor starts (on a loaded machine a node takes tens of seconds to join): the pool is full
        # and has work queued, which is what makes it grow.
        frozen = descendants_running(head.pid, MODEL_ACTOR)
        signal_all(frozen, signal.SIGSTOP)
        joined = local_cluster.add_node(num_cpus=2)
        wait_for(lambda: descendants_running(joined.pid, MODEL_ACTOR), 180, "model actor on the node that joined", run)
        signal_all(frozen, signal.SIGCONT)
        out = finish(run, 180)
    finally:
        signal_all(frozen, signal.SIGCONT)
        stop_group(run)
    assert "model actors: 1 (growing with the cluster up to 4, at least 1)" in out, out[-4000:]
    rows, errors = assert_exactly_once(output, images)
    assert len(rows) == 48 and not errors
