"""The Ray cluster a run uses: join one (a Ray job, `--address`, `RAY_ADDRESS`) or start a local one,
and refuse paths that only one node of a multi-node cluster can see.
"""

from __future__ import annotations

import os
import posixpath
import uuid

import ray

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ClusterError(RuntimeError):
    """The cluster cannot run this job as asked; the message says what to change."""


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
    ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})  # workers import this checkout
    return "local"


def alive_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def total_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


@ray.remote(num_cpus=0)
def _exists(path: str) -> bool:
    return os.path.exists(path)


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
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        refs = [_exists.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(probe) for n in nodes]
        blind = [n.get("NodeManagerAddress", n["NodeID"]) for n, seen in zip(nodes, ray.get(refs)) if not seen]
    finally:
        if probe_write:
            os.remove(probe)
    if blind:
        raise ClusterError(
            f"{flag} {path} is local to this node: nodes {', '.join(blind)} of this {len(nodes)}-node cluster cannot "
            "see it. Use a filesystem every node mounts at the same path, or a URL such as s3://bucket/prefix.")
