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


@dataclass(frozen=True)
class Layout:
    """How the model actors and CPU tasks of a run use the cluster."""

    gpus_per_actor: float
    model_actors: int  # each holds SAM and the semantic model
    actor_cpus: float  # CPUs Ray reserves per model actor
    task_cpus: float  # CPUs per read / post-process task
    threads: int  # torch threads per model actor


def plan_layout(cpus: float, gpus: float, gpus_per_actor: float | None = None, model_actors: int | None = None,
                actor_cpus: float | None = None, task_cpus: float | None = None) -> Layout:
    """Actor count and resources for a cluster of `cpus` CPUs and `gpus` GPUs; given values win.

    Every model actor holds both models, so no GPU waits for another's model. GPUs: one actor per
    GPU (two per GPU, half each, on a one-GPU machine, so one actor's CPU work overlaps the other's
    device work). CPUs only: one single-threaded actor per CPU, each reserving half a CPU, so CPU
    tasks always find room. Raises ClusterError when the actors cannot all start.
    """
    if gpus > 0 or (gpus_per_actor or 0) > 0:
        per_actor = gpus_per_actor if gpus_per_actor is not None else (1.0 if gpus >= 2 else 0.5)
        slots = int(gpus / per_actor + 1e-9) if per_actor > 0 else 0
        actors = model_actors or max(1, slots)
        actor = actor_cpus if actor_cpus is not None else 1.0
        task = task_cpus if task_cpus is not None else 1.0
        if per_actor > 0 and actors * per_actor > gpus + 1e-9:
            raise ClusterError(
                f"{actors} model actors at {per_actor:g} GPU each need {actors * per_actor:g} GPUs but the cluster "
                f"has {gpus:g}: lower --gpus-per-actor (e.g. 0.5 puts two actors on one GPU) or --model-actors")
    else:
        per_actor = 0.0
        actors = model_actors or max(1, int(cpus))
        actor = actor_cpus if actor_cpus is not None else 0.5
        task = task_cpus if task_cpus is not None else 0.25
    if actors * actor + task > cpus + 1e-9:
        raise ClusterError(
            f"{actors} model actors at {actor:g} CPU each leave no room for a {task:g}-CPU task on a cluster of "
            f"{cpus:g} CPUs: lower --actor-cpus, --task-cpus or --model-actors")
    return Layout(per_actor, actors, actor, task, max(1, int(actor)))


def current_layout(**overrides) -> Layout:
    resources = ray.cluster_resources()
    return plan_layout(float(resources.get("CPU", 1.0)), float(resources.get("GPU", 0.0)), **overrides)
