"""The labeling benchmarks that a GPU box runs: their smoke modes run here, and stay importable
without `ray` or `datasets` (a bare CUDA machine has neither)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs a benchmark's main() as `python benchmarks/X.py ARGS` would, then fails if it pulled in a
# module the bare box lacks.
_RUN_BARE = """
import runpy, sys
sys.argv = [sys.argv[1], *sys.argv[2:]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as done:
    if done.code:
        raise
leaked = sorted({"ray", "datasets"} & {name.split(".")[0] for name in sys.modules})
assert not leaked, f"imports {leaked}"
"""


@pytest.mark.slow
def test_labeling_gpu_smoke_runs_on_cpu_without_ray_or_datasets(tmp_path):
    done = subprocess.run([sys.executable, "-c", _RUN_BARE, str(ROOT / "benchmarks" / "labeling_gpu.py"), "--smoke"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    figures = dict(item.split("=") for item in last.split())
    assert set(figures) == {"images_per_s", "sam_share", "semantic_share", "masks_per_image"}
    assert float(figures["images_per_s"]) > 0 and float(figures["masks_per_image"]) > 0
    assert 0.8 < float(figures["sam_share"]) + float(figures["semantic_share"]) <= 1.001  # the rest: decoding
