"""benchmarks/gpu_check.py: its smoke mode runs every part on the CPU, it imports neither `ray` nor
`datasets`, and the pipeline settings it states agree with the code that holds them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}

# Imports the check and runs the parts given as arguments in this process (the subprocess parts run
# beside it), then fails if `ray` or `datasets` reached sys.modules.
_RUN = """
import sys
sys.path.insert(0, {root!r})
from benchmarks import gpu_check
code = gpu_check.main(['--smoke', *[a for p in sys.argv[1:] for a in ('--part', p)]])
leaked = sorted({{'ray', 'datasets'}} & {{name.split('.')[0] for name in sys.modules}})
assert not leaked, f'gpu_check imports {{leaked}}'
sys.exit(code)
"""


def _run(*parts: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _RUN.format(root=str(ROOT)), *parts], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=900)


def _table(stdout: str) -> dict[str, list[str]]:
    """part letter -> the table's rows of that part (measure and value text)."""
    lines = stdout[stdout.index("\ngpu_check "):].strip().splitlines()[2:]
    rows: dict[str, list[str]] = {}
    part = None
    for line in lines:
        if line[:1].strip():
            part = line[0]
        rows.setdefault(part, []).append(line[18:].strip())
    return rows


def test_importing_the_check_pulls_in_neither_ray_nor_datasets():
    done = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                           "from benchmarks import gpu_check; "
                           "print(sorted({'ray', 'datasets'} & {n.split('.')[0] for n in sys.modules}))", str(ROOT)],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


# Every part end to end. Measured 2026-12-07 on the shared 2-core machine before part e's smoke ran
# three arms and one seed: parts a-d 83 s and the ablation's --smoke (every arm, 2 seeds) 55 s at a
# moderate load. Part e's three runs now take 0.1 CPU-minutes of training and probes.
@pytest.mark.slow
def test_smoke_runs_every_part_and_prints_one_table():
    done = _run()
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    rows = _table(done.stdout)
    assert set(rows) == {"a", "b", "c", "d", "e"}
    assert not any("FAILED" in row or "not run" in row for part in rows.values() for row in part)
    counts = next(r for r in rows["a"] if r.startswith("gpu tests passed / failed / skipped")).split()[-5::2]
    assert int(counts[1]) == 0 and int(counts[2]) >= 5  # no CUDA here: every GPU test is collected and skipped
    images_per_s = next(r for r in rows["b"] if r.startswith("compile=off images/s"))
    assert float(images_per_s.split()[-1]) > 0
    sources = {" ".join(r.split()[:2]) for r in rows["c"] if "images/s" in r and "batch" in r}
    assert sources == {f"{m} {s}" for m in ("c2fmae", "mae") for s in ("synthetic", "loader")}
    steps = next(r for r in rows["d"] if r.startswith("optimizer steps"))
    assert steps.split()[-3] == "6"  # the smoke run's 6 steps, each a real optimizer step
    shares = next(r for r in rows["d"] if r.startswith("gradient share"))
    assert {"semantic", "instance", "rgb"} <= set(shares.replace(",", " ").split())
    assert any(r.startswith("mode") and r.endswith("--smoke") for r in rows["e"])


def test_a_part_whose_packages_are_missing_says_what_to_install(monkeypatch):
    from benchmarks import gpu_check

    monkeypatch.setitem(gpu_check.NEEDS, "e", {"no_such_module_here": "no-such-package"})
    rows, ok, _ = gpu_check.run_part("e", smoke=True)
    assert not ok and rows == [("not run", "missing no-such-package: pip install no-such-package, then rerun --part e")]


def test_the_stated_pipeline_settings_are_the_pipelines():
    from benchmarks import gpu_check
    from labeling.pipeline.driver import LabelingConfig
    from labeling.pipeline.predictors import ModelPredictor
    from labeling.run import parser

    assert gpu_check.MODEL_BATCH_SIZE == LabelingConfig.model_batch_size
    assert gpu_check.MODEL_BATCH_SIZE == parser().get_default("model_batch_size")
    import inspect

    assert gpu_check.ACTOR_CPU_THREADS == inspect.signature(ModelPredictor).parameters["cpu_threads"].default


def test_the_trainer_part_runs_the_recipe_at_its_peak_lr_without_accumulation():
    from benchmarks import gpu_check
    from pretraining.training.recipes import get_recipe

    recipe = get_recipe("c2fmae_base_400ep")
    cfg = gpu_check.trainer_config(False, steps_per_epoch=25, epochs=6)
    assert cfg.global_batch is None and cfg.data.batch_size == recipe.data.batch_size == 256
    assert cfg.data.num_workers == recipe.data.num_workers
    assert cfg.optim.lr == cfg.optim.min_lr == pytest.approx(recipe.optim.base_lr * recipe.global_batch / 256)
    assert cfg.optim.warmup_epochs == 0 and cfg.model == recipe.model
