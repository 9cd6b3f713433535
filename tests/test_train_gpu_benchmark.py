"""benchmarks/train_gpu.py --smoke: the whole GPU benchmark on a CPU, in a process that cannot import
ray, datasets or pycocotools (a bare CUDA box has torch, torchvision, timm, pyarrow and pillow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Any import of these names fails, as on a box without them.
BLOCKED = """
import importlib.abc, runpy, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('ray', 'datasets', 'pycocotools'):
            raise ModuleNotFoundError(f'No module named {name!r} (blocked by the test)')
sys.meta_path.insert(0, Blocked())
sys.argv = ['benchmarks/train_gpu.py', '--smoke']
runpy.run_path('benchmarks/train_gpu.py', run_name='__main__')
"""


@pytest.mark.slow  # an end-to-end run in a subprocess: 8.5 s on 2 cores at load ~3, 28 s at load ~20
def test_smoke_mode_runs_on_cpu_without_ray_datasets_or_pycocotools():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", BLOCKED], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    rows = [r for r in (line.split() for line in lines) if len(r) == 11 and r[0] in ("c2fmae", "multimae", "mae")]
    sources = ("synthetic", "loader")
    assert {(r[0], r[1]) for r in rows} == {(m, s) for m in ("c2fmae", "multimae", "mae") for s in sources}
    assert all(float(r[4]) > 0 for r in rows)  # images/s
    figures = dict(item.split("=") for item in lines[-1].split())
    assert float(figures["c2fmae_images_per_s"]) > 0 and 0 <= float(figures["data_wait_share"]) < 1
    assert float(figures["c2fmae_mfu"]) > 0 and "c2fmae_over_mae_step_time" in figures


def test_the_removed_decode_flag_is_refused_in_one_sentence(capsys):
    from benchmarks import train_gpu

    with pytest.raises(SystemExit) as exited:
        train_gpu.main(["--decode", "device"])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.endswith("error: --decode was removed: the loader decodes every image in its workers "
                          "(docs/training.md says why); drop the flag, and set --workers for more of them.")
