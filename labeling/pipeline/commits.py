"""The driver's side of writing: it only coordinates.

`ShardTracker` reads the write stage's small results (`writer.PART_SCHEMA`: shard, part file name,
input indices) and says when a shard has every input it owes; `Commits` then starts that shard's
commit as a Ray task on the cluster (`writer.commit`), collects the results (a few hundred bytes a
shard) and stops the run, with one sentence, when a commit cannot be written, when another run took
the folder's lease, or when too many recent images failed (`failures.FailureWindow`).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import ray

from dataset_card.contract.shards import OutputWriteError
from labeling.pipeline import failures, writer


class ShardTracker:
    """Which part files hold the inputs each open shard owes (bit arrays over the input indices,
    so a run over millions of images keeps a few MB here)."""

    def __init__(self, num_inputs: int, owed: Mapping[int, Sequence[int]]):
        self.owed = np.zeros(num_inputs, bool)
        self.arrived = np.zeros(num_inputs, bool)
        self.todo: dict[int, np.ndarray] = {}
        self.remaining: dict[int, int] = {}
        self.parts: dict[int, list[str]] = {}
        for shard, indices in owed.items():
            indices = np.asarray(indices, np.int64)
            self.owed[indices] = True
            self.todo[shard], self.remaining[shard], self.parts[shard] = indices, len(indices), []

    def add(self, results: pa.Table) -> list[int]:
        """Take the write stage's results; return the shards they completed."""
        done = []
        for shard, part, indices in zip(*results.select(["shard", "part", "indices"]).to_pydict().values()):
            if shard not in self.remaining:
                continue  # committed already this run
            indices = np.asarray(indices, np.int64)
            new = indices[self.owed[indices] & ~self.arrived[indices]]
            if not new.size:
                continue  # a retried task's copy of rows that are here already
            self.arrived[new] = True
            self.parts[shard].append(part)
            self.remaining[shard] -= len(np.unique(new))
            if self.remaining[shard] == 0:
                done.append(shard)
        return done

    def take(self, shard: int) -> tuple[list[str], np.ndarray]:
        """(part names, owed indices) of a complete shard, which is closed."""
        del self.remaining[shard]
        return self.parts.pop(shard), self.todo.pop(shard)

    def missing(self) -> dict[int, np.ndarray]:
        """Indices still owed, per open shard."""
        return {s: todo[~self.arrived[todo]] for s, todo in self.todo.items()}

    def open_shards(self) -> list[int]:
        return sorted(self.remaining)


def cause(err: BaseException) -> BaseException:
    """The exception a Ray task raised, out of Ray's wrapper."""
    return getattr(err, "cause", None) or err


class Commits:
    """Commit tasks in flight; their results as they finish; the checks that stop the run.

    make_job(shard, parts, todo, lost) -> writer.CommitJob.
    """

    def __init__(self, make_job: Callable[..., writer.CommitJob], task_cpus: float, window: failures.FailureWindow,
                 on_result: Callable[[writer.ShardResult], None] = lambda result: None, max_in_flight: int = 4):
        self.make_job, self.window, self.on_result = make_job, window, on_result
        self.max_in_flight = max_in_flight  # a bound on commit tasks (memory; and a stop stops soon)
        self.task = ray.remote(writer.commit).options(num_cpus=task_cpus, max_retries=2)
        self.pending: dict[ray.ObjectRef, int] = {}
        self.results: list[writer.ShardResult] = []
        self.bytes_received = 0

    def submit(self, shard: int, parts: Sequence[str], todo: Sequence[int], lost: pa.Table | None = None) -> None:
        while len(self.pending) >= self.max_in_flight:
            self.poll(wait=True, one=True)
        self.pending[self.task.remote(self.make_job(shard, parts, todo, lost))] = shard

    def poll(self, wait: bool = False, one: bool = False) -> list[writer.ShardResult]:
        """Results of finished commits (all of them when `wait`, at least one when `one` too); raises
        what stops the run."""
        if not self.pending:
            return []
        count = 1 if one else len(self.pending)
        ready, _ = ray.wait(list(self.pending), num_returns=count, timeout=None if wait else 0)
        new = []
        for ref in ready:
            self.pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as err:
                inner = cause(err)
                if isinstance(inner, (OutputWriteError, writer.LeaseLost)):
                    raise inner from None
                raise
            self.bytes_received += len(pickle.dumps(result))
            self.results.append(result)
            self.on_result(result)
            new.append(result)
            stop = self.window.add(result.processed, result.errors_by_type)
            if stop:
                raise failures.FailureRateExceeded(stop)
        return new

    def drain(self) -> None:
        """Wait for every commit in flight, ignoring their outcome (the run is stopping)."""
        if self.pending:
            ray.wait(list(self.pending), num_returns=len(self.pending), timeout=600)
            self.pending.clear()
