"""The Ray cluster a run uses: join one (a Ray job, `--address`, `RAY_ADDRESS`) or start a local one,
and refuse paths that only one node of a multi-node cluster can see.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import sys
import threading
import time
import uuid
from dataclasses import dataclass

import ray

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ClusterError(RuntimeError):
    """The cluster cannot run this job as asked; the message says what to change."""


AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
# Ray Data starts every actor pool with its constructor arguments in the object store and restarts
# allowed, and Ray's core worker then logs an error-level line for each actor (ray-project/ray#57733),
# harmless here (the arguments live as long as the run). No setting silences that one line (the
# C++ log level would hide every driver error, and announces itself on every process), so the
# driver's stderr is filtered while the pipeline runs (`filtered_stderr`).
KNOWN_FALSE_ALARMS = ("has constructor arguments in the object store and max_restarts > 0",)


@contextlib.contextmanager
def filtered_stderr(drop: tuple[str, ...] = KNOWN_FALSE_ALARMS):
    """Within the block, lines written to this process's stderr (by Python or by Ray's C++ core)
    that contain one of `drop` are removed; everything else passes through unchanged."""
    try:
        original = os.dup(2)
    except OSError:  # no usable stderr: nothing to filter
        yield
        return
    read_end, write_end = os.pipe()
    sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        pending = b""
        while True:
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            out = b"".join(line + b"\n" for line in lines if not any(d.encode() in line for d in drop))
            if pending and not pending.startswith(b"["):  # a progress bar's partial line: pass it on now
                out, pending = out + pending, b""
            if out:
                os.write(original, out)
        if pending:
            os.write(original, pending)

    def guarded_pump() -> None:
        """The pump, which must never leave the process writing into a pipe nobody reads (a full
        pipe would block the driver's next write to stderr): if it fails, stderr is given back
        unfiltered and what is still in the pipe is passed on as it is."""
        try:
            pump()
        except BaseException as err:
            os.dup2(original, 2)  # new writes go straight to stderr; the pipe's write end closes
            _pass_on(read_end, original, f"(the stderr filter stopped: {err!r}; stderr is unfiltered now)\n")

    thread = threading.Thread(target=guarded_pump, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(original, 2)  # closes the pipe's last write end: the pump drains and stops
        thread.join(timeout=5)
        os.close(read_end)
        os.close(original)


def _pass_on(read_end: int, original: int, note: str) -> None:
    """Copy the pipe at `read_end` to `original` until it closes, after `note`; write errors are ignored
    (draining is what matters: a writer must never block on a full pipe)."""
    data = note.encode()
    while True:
        try:
            if data:
                os.write(original, data)
        except OSError:
            pass
        try:
            data = os.read(read_end, 65536)
        except OSError:
            return
        if not data:
            return


def connect(address: str | None = None, num_cpus: int | None = None, object_store_memory: int | None = None) -> str:
    """Join the cluster at `address` or $RAY_ADDRESS (set for Ray jobs), else start Ray on this machine.

    A plain `ray.init()` would also join the last cluster `ray start` made on this machine; a run
    without an address starts its own instead. Returns "joined", "local" or "existing".
    """
    if ray.is_initialized():
        return "existing"
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
        return "joined"
    pythonpath = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    # A private local cluster gets Ray's default token authentication; Ray's warning that it chose
    # it asks nothing of the user (RAY_AUTH_MODE still chooses otherwise).
    auth_log = logging.getLogger(AUTH_LOGGER)
    level = auth_log.level
    auth_log.setLevel(logging.ERROR)
    try:
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory, include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})  # workers import this checkout
    finally:
        auth_log.setLevel(level)
    return "local"


def alive_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


@ray.remote(num_cpus=0)
def _exists(path: str) -> bool:
    return os.path.exists(path)


def nodes_see(nodes: list[dict], path: str) -> list[bool]:
    """Whether each node finds `path` on its own filesystem (one tiny task pinned to each)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return ray.get([_exists.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                    .remote(path) for n in nodes])


def check_shared(path: str, flag: str, probe_write: bool) -> None:
    """Raise ClusterError unless every alive node sees the local `path` (URLs are always shared).

    probe_write: create a probe file under `path` first (for outputs), and look for it on every node.
    """
    nodes = alive_nodes()
    if is_url(path) or len(nodes) < 2:
        return
    target = os.path.abspath(path.removeprefix("file://"))
    probe = posixpath.join(target, f".probe-{uuid.uuid4().hex}") if probe_write else target
    if probe_write:
        os.makedirs(target, exist_ok=True)
        open(probe, "w").close()
    try:
        blind = [n.get("NodeManagerAddress", n["NodeID"]) for n, seen in zip(nodes, nodes_see(nodes, probe))
                 if not seen]
    finally:
        if probe_write:
            os.remove(probe)
    if blind:
        raise ClusterError(
            f"{flag} {path} is local to this node: nodes {', '.join(blind)} of this {len(nodes)}-node cluster cannot "
            "see it. Use a filesystem every node mounts at the same path, or a URL such as s3://bucket/prefix.")


# Where the model actors run: "auto" is a GPU, or the CPUs for models small enough to run there
# (the tiny twins) on a cluster without GPUs; real models never go to CPUs unless asked.
DEVICES = ("auto", "cuda", "cpu")
# How often a run waiting for its first GPU looks at the cluster again.
GPU_POLL_S = 5.0


@dataclass(frozen=True)
class Layout:
    """How the model actors and CPU tasks of a run use the cluster.

    The model actors form one pool that starts at `model_actors` (what fits the cluster when the run
    starts) and grows, as nodes join, up to `max_actors` (None: as many as the cluster fits), or
    shrinks to `min_actors` when there is no work for them."""

    gpus_per_actor: float
    model_actors: int  # each holds SAM and the semantic model; the pool's initial size
    actor_cpus: float  # CPUs Ray reserves per model actor
    task_cpus: float  # CPUs per read / post-process task
    threads: int  # torch threads per model actor
    device: str = "cpu"  # "cuda" or "cpu"
    min_actors: int = 1
    max_actors: int | None = None

    def pool(self):
        """Ray Data's actor pool for the model actors: fixed, or autoscaling between min and max.

        Each actor takes two batches at once, in two threads: one batch's decoding and CPU halves
        run while the other's device passes hold the device (`labelers.paired`)."""
        overlap = {"max_concurrent_calls_per_actor": 2, "enable_true_multi_threading": True}
        if self.min_actors == self.max_actors:
            return ray.data.ActorPoolStrategy(size=self.model_actors, **overlap)
        return ray.data.ActorPoolStrategy(min_size=self.min_actors, max_size=self.max_actors,
                                          initial_size=self.model_actors, **overlap)

    def describe(self) -> str:
        size = (f"{self.model_actors}" if self.min_actors == self.max_actors else
                f"{self.model_actors} (growing with the cluster up to {self.max_actors or 'what it fits'}, "
                f"at least {self.min_actors})")
        where = f"{self.gpus_per_actor:g} GPU" if self.device == "cuda" else "the CPU (no GPU)"
        return (f"model actors: {size}, each with SAM and the semantic model, on {where} and "
                f"{self.actor_cpus:g} CPU each")


def model_device(requested: str, cpu_allowed: bool, gpus: float, gpus_per_actor: float | None = None) -> str:
    """"cuda" or "cpu" for the model actors. `requested` is --device; `cpu_allowed`: the models are small
    enough for CPUs (the tiny twins), which "auto" then uses on a cluster without GPUs, unless
    --gpus-per-actor asks for GPUs."""
    if requested not in DEVICES:
        raise ClusterError(f"--device {requested!r} is not one of {', '.join(DEVICES)}")
    if requested == "cpu" and gpus_per_actor:
        raise ClusterError(f"--gpus-per-actor {gpus_per_actor:g} asks for GPUs but --device cpu for CPUs: drop one")
    if requested == "auto":
        return "cuda" if gpus > 0 or not cpu_allowed or gpus_per_actor else "cpu"
    return requested


def plan_layout(cpus: float, gpus: float, gpus_per_actor: float | None = None, model_actors: int | None = None,
                actor_cpus: float | None = None, task_cpus: float | None = None, device: str | None = None,
                min_actors: int | None = None, max_actors: int | None = None) -> Layout:
    """Actor count and resources for a cluster of `cpus` CPUs and `gpus` GPUs; given values win.

    Every model actor holds both models, so no GPU waits for another's model. GPUs ("cuda", the
    default when the cluster has some): one actor per GPU (two per GPU, half each, on a one-GPU
    machine, so one actor's CPU work overlaps the other's device work). CPUs ("cpu", asked for): one
    single-threaded actor per CPU, each reserving half a CPU, so CPU tasks always find room.
    `model_actors` fixes the pool's size; otherwise it starts at what fits and scales between
    `min_actors` (default 1) and `max_actors` (default: what the cluster fits as it grows). Raises
    ClusterError when the actors cannot all start.
    """
    device = device or ("cuda" if gpus > 0 or (gpus_per_actor or 0) > 0 else "cpu")
    if device == "cuda":
        if gpus_per_actor is not None and gpus_per_actor <= 0:
            raise ClusterError("--gpus-per-actor must be above 0 for GPU model actors; to run the models on CPUs "
                               "say so with --device cpu")
        if gpus <= 0:
            raise ClusterError(
                "this Ray cluster has no GPUs and no autoscaler that can add GPU nodes: add GPU nodes (or pass "
                "--wait-for-gpus SECONDS while they join), or run the models on CPUs with --device cpu")
        per_actor = gpus_per_actor if gpus_per_actor is not None else (1.0 if gpus >= 2 else 0.5)
        slots = int(gpus / per_actor + 1e-9)
        actors = model_actors or max(1, slots)
        actor = actor_cpus if actor_cpus is not None else 1.0
        task = task_cpus if task_cpus is not None else 1.0
        if actors * per_actor > gpus + 1e-9:
            raise ClusterError(
                f"{actors} model actors at {per_actor:g} GPU each need {actors * per_actor:g} GPUs but the cluster "
                f"has {gpus:g}: lower --gpus-per-actor (e.g. 0.5 puts two actors on one GPU) or --model-actors")
    else:
        per_actor = 0.0
        actors = model_actors or max(1, int(cpus))
        actor = actor_cpus if actor_cpus is not None else 0.5
        task = task_cpus if task_cpus is not None else 0.25
    if max_actors is not None and not model_actors:
        actors = min(actors, max_actors)
    if actors * actor + task > cpus + 1e-9:
        raise ClusterError(
            f"{actors} model actors at {actor:g} CPU each leave no room for a {task:g}-CPU task on a cluster of "
            f"{cpus:g} CPUs: lower --actor-cpus, --task-cpus or --model-actors")
    if model_actors:  # a fixed pool, as asked
        low, high = actors, actors
    else:
        low = min(min_actors or 1, actors)
        high = max(max_actors, actors) if max_actors is not None else None
    return Layout(per_actor, actors, actor, task, max(1, int(actor)), device, low, high)


def cluster_cpus_gpus() -> tuple[float, float]:
    resources = ray.cluster_resources()
    return float(resources.get("CPU", 1.0)), float(resources.get("GPU", 0.0))


def can_add_gpus() -> bool:
    """Whether this cluster's autoscaler can launch a node type with GPUs (Ray's cluster config; a
    cluster started by hand with `ray start` has none)."""
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception:  # no config published, or an older Ray: a fixed cluster
        return False
    groups = getattr(config, "node_group_configs", None) or []
    return any(g.resources.get("GPU", 0) > 0 and g.max_count != 0 for g in groups)


def wait_for_gpus(timeout_s: float, bundle: dict[str, float], log, poll_s: float = GPU_POLL_S) -> float:
    """Wait up to `timeout_s` for the cluster's first GPU, asking its autoscaler for `bundle` (one
    model actor's resources) meanwhile; returns the GPUs then seen. Raises ClusterError on timeout."""
    from ray.autoscaler.sdk import request_resources

    log(f"waiting up to {timeout_s:g} s for the first GPU node to join the cluster (--wait-for-gpus); "
        "no model runs on CPUs meanwhile")
    request_resources(bundles=[bundle])  # what an autoscaler launches a node for
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            gpus = cluster_cpus_gpus()[1]
            if gpus > 0:
                log(f"{gpus:g} GPUs joined; starting the model actors")
                return gpus
            if time.monotonic() >= deadline:
                raise ClusterError(
                    f"no GPU joined the cluster within {timeout_s:g} s: check that the cluster can launch GPU nodes, "
                    "raise --wait-for-gpus, or run the models on CPUs with --device cpu")
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
    finally:
        request_resources(bundles=[])  # the model actors' own demand drives the autoscaler from here


def plan_actors(device: str, cpu_allowed: bool, wait_for_gpus_s: float | None, log, **overrides) -> Layout:
    """The run's layout on the cluster it joined: the device (`model_device`); for GPU actors on a
    cluster without GPUs yet, the wait for the first one when the cluster can add GPU nodes (its
    autoscaler, or `wait_for_gpus_s` given; None: 30 minutes with an autoscaler, else no wait), else
    the refusal; then `plan_layout` (after a wait, one GPU per actor unless `gpus_per_actor` is given:
    the first GPU is rarely the last to join)."""
    cpus, gpus = cluster_cpus_gpus()
    device = model_device(device, cpu_allowed, gpus, overrides.get("gpus_per_actor"))
    if device == "cuda" and gpus <= 0:
        timeout = wait_for_gpus_s if wait_for_gpus_s is not None else (DEFAULT_GPU_WAIT_S if can_add_gpus() else 0)
        if timeout > 0:
            bundle = {"GPU": overrides.get("gpus_per_actor") or 1.0, "CPU": overrides.get("actor_cpus") or 1.0}
            wait_for_gpus(timeout, bundle, log)
            cpus, gpus = cluster_cpus_gpus()
            if overrides.get("gpus_per_actor") is None:  # half a GPU suits a one-GPU machine, not the
                overrides = {**overrides, "gpus_per_actor": 1.0}  # GPU nodes still joining: one actor each
    return plan_layout(cpus, gpus, device=device, **overrides)


def model_actor_seconds(since_s: float = 0.0, now_s: float | None = None) -> float | None:
    """The summed lifetimes (seconds) of this job's model actors started after `since_s` (this run's
    start: a driver may run several), from Ray's actor table: each from its start to its end (or
    `now_s`), loading and idle time included. None when Ray's table cannot be read."""
    try:
        import ray._private.state

        job = ray.get_runtime_context().get_job_id()
        actors = ray._private.state.actors().values()
    except Exception:  # an older or newer Ray without this table: unknown, not zero
        return None
    now_ms = (now_s if now_s is not None else time.time()) * 1000.0
    mine = [a for a in actors if a.get("JobID") == job and "ModelPredictor" in a.get("ActorClassName", "")
            and a.get("StartTime") and a["StartTime"] >= since_s * 1000.0]  # no start time: never started
    return sum(((a.get("EndTime") or now_ms) - a["StartTime"]) / 1000.0 for a in mine)


def actor_start_failure(err: BaseException) -> str | None:
    """The one sentence a model actor gave for not starting on its device (`predictors.GPUUnavailable`),
    found in the error Ray raised on the driver (which carries the actor's traceback as text)."""
    marker = "GPUUnavailable: "
    for text in (str(err), *(str(a) for a in getattr(err, "args", ()))):
        if marker in text:
            return text.split(marker, 1)[1].splitlines()[0].strip()
    cause = err.__cause__ or err.__context__
    return actor_start_failure(cause) if cause is not None else None


# How long a run on an autoscaling cluster waits for its first GPU node by default (cloud GPU nodes
# take minutes to boot; some hours to be granted).
DEFAULT_GPU_WAIT_S = 1800.0
