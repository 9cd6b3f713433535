"""One GPU check of both stages, in one table: the figures the README's GPU lines need.

    PYTHONPATH=. python benchmarks/gpu_check.py                # one H100: designed for <= 8 minutes (an estimate)
    PYTHONPATH=. python benchmarks/gpu_check.py --part b       # one part alone (repeat --part for several)
    PYTHONPATH=. python benchmarks/gpu_check.py --smoke        # every part on the CPU at tiny sizes (CI runs it)

Parts (each reuses the benchmark or entry point that owns the work; nothing is measured twice):
  a  the GPU-marked tests (`pytest -m gpu` over the test files that hold some), among them the SAM
     wave run under `torch.cuda.set_sync_debug_mode("error")`: no host sync inside a wave;
  b  labeling: SAM ViT-H at 32 x 32 points + Mask2Former Swin-L with random weights, at the
     pipeline's own batch settings (`--model-batch-size`, the semantic labeler's batch, the actor's
     CPU threads; SAM's prompt and encoder batches the labeler's defaults), compile off and on:
     images/s and each stage's ms per image (`benchmarks/labeling_gpu.py`);
  c  training speed: C2FMAE and MAE ViT-B, synthetic batches and loader-fed at the recipe's
     per-GPU batch and loader workers (which decode every image: the one decode path), 60 timed
     loader-fed steps each (`benchmarks/train_gpu.py`);
  d  about 150 steps of the real trainer (`pretraining.train.train_loop`) at the recipe's per-GPU
     batch and peak learning rate, held constant, without accumulation, on a written folder: loss
     at start and end, each loss term's share of the gradient, the data-wait share, peak memory,
     read back from the run's TensorBoard scalars;
  e  the science issue's mini-ablation (`python -m pretraining.study.ablations` in its `--mini`
     mode when that exists, else `--smoke`), its last line's figures.

It imports neither `ray` nor `datasets` (tests/test_gpu_check.py checks). What the parts need
beyond torch, torchvision, timm and transformers is in `NEEDS`; a part whose packages are missing
says which to install and the other parts still run. The test parts (a, e) run in subprocesses,
which need `datasets` to write their folders; part d opens its folder without the schema check
that needs `datasets` (this script wrote it).

Every part's failure is reported in its row and the others still run; the exit status is 1 if
any part failed. Output: each part's own log, then one table (part, measure, value) and the date,
device, torch version and seconds per part.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# Import name -> pip name of what each part needs beyond torch, torchvision, timm and transformers.
NEEDS = {
    "a": {"pytest": "pytest", "segment_anything": "segment-anything", "pycocotools": "pycocotools",
          "zstandard": "zstandard", "datasets": "datasets", "skimage": "scikit-image", "cv2": "opencv-python-headless",
          "tensorboard": "tensorboard"},
    "b": {"segment_anything": "segment-anything", "pycocotools": "pycocotools", "cv2": "opencv-python-headless",
          "zstandard": "zstandard"},
    "c": {"pyarrow": "pyarrow", "zstandard": "zstandard"},
    "d": {"pyarrow": "pyarrow", "zstandard": "zstandard", "tensorboard": "tensorboard"},
    "e": {"datasets": "datasets", "pyarrow": "pyarrow", "zstandard": "zstandard", "tensorboard": "tensorboard",
          "matplotlib": "matplotlib"},
}
PARTS = tuple(NEEDS)

# The labeling pipeline's own batch settings, as `labeling/run.py` sets them by default. They are
# stated here because the modules that hold them import `ray` (tests/test_gpu_check.py checks they agree):
MODEL_BATCH_SIZE = 8  # LabelingConfig.model_batch_size: images per model-actor call
ACTOR_CPU_THREADS = 4  # ModelPredictor's cpu_threads: the actor's decode / finish pool
LABELING_IMAGES = 32  # images per timed pass (two passes per compile setting, after a warm-up batch)
LOADER_STEPS = 60  # timed loader-fed steps per model
TRAINER_STEPS = 150  # part d's optimizer steps
TRAINER_LOG_EVERY = 25


class MissingPackages(RuntimeError):
    pass


def missing(part: str) -> list[str]:
    """The pip names of part's needs that this Python cannot import."""
    return [pip for name, pip in NEEDS[part].items() if importlib.util.find_spec(name) is None]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _release() -> None:
    """Free what a part left on the device and in dynamo's caches before the next one."""
    import gc

    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# a: the GPU-marked tests


def gpu_test_files() -> list[str]:
    """The test files that mark a test `gpu`."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "mark.gpu" in p.read_text(encoding="utf-8"))


def junit_counts(path: str) -> dict[str, int]:
    """passed / failed / skipped counts of a pytest --junitxml report."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome = {child.tag for child in case} & {"failure", "error", "skipped"}
        counts["failed" if outcome & {"failure", "error"} else "skipped" if outcome else "passed"] += 1
    return counts


def part_tests(smoke: bool) -> list[tuple[str, str]]:
    files = gpu_test_files()
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "junit.xml")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
        done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                               f"--junitxml={report}", *files], cwd=ROOT, env=env, capture_output=True, text=True)
        print(done.stdout[-6000:], done.stderr[-3000:], sep="\n", flush=True)
        if not os.path.exists(report):
            raise RuntimeError(f"pytest wrote no report (exit {done.returncode}): {done.stderr.strip()[-300:]}")
        counts = junit_counts(report)
    rows = [("gpu tests passed / failed / skipped", f"{counts['passed']} / {counts['failed']} / {counts['skipped']}"),
            ("files", f"{len(files)}: {', '.join(Path(f).stem.removeprefix('test_') for f in files)}")]
    if counts["failed"] or done.returncode not in (0, 5):  # 5: nothing selected
        raise RuntimeError(f"{counts['failed']} GPU tests failed (pytest exit {done.returncode}); see the log above")
    return rows


# ---------------------------------------------------------------------------------------------
# b: labeling throughput


def labeling_figures(output: str) -> tuple[dict[str, float], dict[str, float]]:
    """(key=value figures of the last line, ms/image per stage) from `labeling_gpu.main`'s output."""
    from benchmarks.labeling_gpu import STAGE_NAMES

    lines = output.strip().splitlines()
    figures = {k: float(v) for k, v in (item.split("=") for item in lines[-1].split())}
    stages = {}
    for key, name in STAGE_NAMES.items():
        row = next(line for line in lines if line.startswith(name))
        stages[key] = float(row[len(name):].split()[0])
    return figures, stages


def part_labeling(smoke: bool) -> list[tuple[str, str]]:
    from benchmarks import labeling_gpu
    rows = []
    for compiled in ((False,) if smoke else (False, True)):  # inductor on a CPU would take minutes
        argv = ["--smoke"] if smoke else [
            "--images", str(LABELING_IMAGES), "--batch-size", str(MODEL_BATCH_SIZE),
            "--threads", str(ACTOR_CPU_THREADS)]  # the semantic batch: the labeler's default for the device
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = labeling_gpu.main(argv + (["--compile"] if compiled else []))
        print(out.getvalue(), flush=True)
        if code:
            raise RuntimeError(f"benchmarks/labeling_gpu.py exited with {code}")
        figures, stages = labeling_figures(out.getvalue())
        tag = f"compile={'on' if compiled else 'off'}"
        rows.append((f"{tag} images/s (decode, both models, RLE)", f"{figures['images_per_s']:.2f}"))
        rows.append((f"{tag} masks per image", f"{figures['masks_per_image']:.1f}"))
        rows.append((f"{tag} ms/image per stage", ", ".join(f"{k} {v:.1f}" for k, v in stages.items())))
        _release()
    return rows


# ---------------------------------------------------------------------------------------------
# c: training speed


def part_training(smoke: bool) -> list[tuple[str, str]]:
    from benchmarks import train_gpu
    from pretraining.training.recipes import get_recipe

    data = get_recipe("c2fmae_base_400ep").data
    cuda = torch.cuda.is_available() and not smoke
    args = argparse.Namespace(
        smoke=smoke, device="cuda" if cuda else "cpu", models="c2fmae,mae", size="tiny" if smoke else "base",
        img_size=64 if smoke else 224, batch_size=4 if smoke else data.batch_size, steps=2 if smoke else 20,
        loader_steps=2 if smoke else LOADER_STEPS, warmup=1 if smoke else 5, compile="off",
        workers=0 if smoke else data.num_workers, unique=4 if smoke else 512,
        image_size=(96, 128) if smoke else (375, 500), peak_n=256 if smoke else 8192, semantic_head_fp32="on")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    results = train_gpu.run(args)
    train_gpu.report(results)
    by = {(r.model, r.source): r for r in results}
    rows = []
    for r in results:
        rows.append((f"{r.model} {r.source} batch {r.batch_size} images/s",
                     f"{r.images_per_s:.4g} ({r.step_s * 1e3:.1f} ms/step, wait {r.data_wait:.1%}, "
                     f"MFU {r.mfu:.1%}, peak {r.peak_gib:.1f} GiB)"))
    c2f, mae = by.get(("c2fmae", "synthetic")), by.get(("mae", "synthetic"))
    if c2f and mae:
        rows.append(("c2fmae / mae step time (synthetic)", f"{c2f.step_s / mae.step_s:.3f}"))
    rows.append(("loader workers / timed loader-fed steps", f"{args.workers} / {args.loader_steps}"))
    del results
    _release()
    return rows


# ---------------------------------------------------------------------------------------------
# d: real trainer steps


def trainer_config(smoke: bool, steps_per_epoch: int, epochs: int):
    """The recipe at its per-GPU batch and peak lr (held: min_lr = lr, no warm-up), one micro-batch a step."""
    from pretraining.training.allocation import peak_lr
    from pretraining.training.recipes import get_recipe

    cfg = get_recipe("tiny" if smoke else "c2fmae_base_400ep")
    lr = peak_lr(cfg.optim.lr, cfg.optim.base_lr, cfg.global_batch or cfg.data.batch_size)
    data = dataclasses.replace(cfg.data, batch_size=4, num_workers=0) if smoke else cfg.data
    return dataclasses.replace(
        cfg, data=data, global_batch=None, epochs=epochs, log_every=2 if smoke else TRAINER_LOG_EVERY,
        checkpoint_every=10**9, figure_every=0, keep_checkpoints=1,
        optim=dataclasses.replace(cfg.optim, lr=lr, min_lr=lr, warmup_epochs=0.0))


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def part_trainer(smoke: bool) -> list[tuple[str, str]]:
    import pretraining.training.trainer as trainer_module
    from benchmarks.train_gpu import write_folder
    from pretraining.train import train

    steps = 6 if smoke else TRAINER_STEPS
    per_epoch = 3 if smoke else TRAINER_LOG_EVERY  # a small folder read several times
    cfg = trainer_config(smoke, per_epoch, math.ceil(steps / per_epoch))
    with tempfile.TemporaryDirectory() as tmp:
        rows_needed = cfg.data.batch_size * per_epoch
        dataset = write_folder(Path(tmp) / "data", rows_needed, min(512, rows_needed),
                               (96, 128) if smoke else (375, 500))
        # The folder was written here, in the contract's columns: skip the schema check (it needs `datasets`).
        opened = trainer_module.open_labeled_dataset
        trainer_module.open_labeled_dataset = lambda root, images=None: dataset
        try:
            start = time.perf_counter()
            summary = train(cfg, dataset.root, str(Path(tmp) / "run"), progress=False)
            _sync()
            seconds = time.perf_counter() - start
        finally:
            trainer_module.open_labeled_dataset = opened
        scalars = tensorboard_scalars(Path(tmp) / "run")
    last = {tag: values[-1][1] for tag, values in scalars.items()}
    losses = scalars.get("loss/loss", [])
    shares = {tag.split("/", 1)[1]: v for tag, v in last.items() if tag.startswith("grad_share/")}
    waits = [v for _, v in scalars.get("perf/data_wait_share", [])]
    rows = [("recipe / per-GPU batch / peak lr", f"{cfg.name} / {cfg.data.batch_size} / {cfg.optim.lr:.3g} (held)"),
            ("optimizer steps / wall s", f"{summary.get('global_step', losses[-1][0] if losses else 0)} / {seconds:.0f}"),
            ("loss first / last log", f"{losses[0][1]:.4f} @ {losses[0][0]} / {losses[-1][1]:.4f} @ {losses[-1][0]}"
             if losses else "none logged"),
            ("gradient share (last log)", ", ".join(f"{m} {v:.2f}" for m, v in shares.items()) or "not logged"),
            ("data-wait share mean / max", f"{sum(waits) / len(waits):.1%} / {max(waits):.1%}" if waits else "none"),
            ("images/s (last log)", f"{last.get('perf/images_per_s', float('nan')):.4g}")]
    if "perf/gpu_mem_gib" in last:
        rows.append(("peak memory allocated / reserved GiB",
                     f"{last['perf/gpu_mem_gib']:.1f} / {last.get('perf/gpu_mem_reserved_gib', float('nan')):.1f}"))
    _release()
    return rows


# ---------------------------------------------------------------------------------------------
# e: the mini-ablation hook


def ablation_mode(smoke: bool) -> str | None:
    """`--mini` (the science issue's few-minute ablation) when the study has it and this is no smoke
    run, else `--smoke`; None when the study has neither."""
    help_text = subprocess.run([sys.executable, "-m", "pretraining.study.ablations", "--help"], cwd=ROOT,
                               capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    for mode in ((() if smoke else ("--mini",)) + ("--smoke",)):
        if mode in help_text.split():
            return mode
    return None


SMOKE_ARMS = ("random_init", "mae", "c2fmae")


def part_ablation(smoke: bool) -> list[tuple[str, str]]:
    mode = ablation_mode(smoke)
    if mode is None:
        return [("mini-ablation", "not run: pretraining.study.ablations has no --mini or --smoke mode")]
    # The smoke run proves the hook on three arms and one seed (the study's own smoke test runs them all).
    pieces = ["--arms", *SMOKE_ARMS, "--seed-ids", "0"] if smoke else []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run([sys.executable, "-m", "pretraining.study.ablations", mode, *pieces, "--output", tmp],
                              cwd=ROOT, env=env, capture_output=True, text=True)
    print(done.stdout[-6000:], done.stderr[-3000:], sep="\n", flush=True)
    if done.returncode:
        raise RuntimeError(f"pretraining.study.ablations {mode} exited with {done.returncode}")
    last = done.stdout.strip().splitlines()[-1]
    return [("mode", mode), *((k, v) for k, v in (item.split("=", 1) for item in last.split() if "=" in item))]


RUNNERS = {"a": part_tests, "b": part_labeling, "c": part_training, "d": part_trainer, "e": part_ablation}
TITLES = {"a": "GPU tests", "b": "labeling", "c": "training speed", "d": "trainer steps", "e": "mini-ablation"}


def run_part(part: str, smoke: bool) -> tuple[list[tuple[str, str]], bool, float]:
    """(rows, ok, seconds) of one part; a failure becomes its row."""
    start = time.perf_counter()
    gone = missing(part)
    if gone:
        return [("not run", f"missing {', '.join(gone)}: pip install {' '.join(gone)}, then rerun --part {part}")], \
            False, 0.0
    print(f"\n=== part {part}: {TITLES[part]} ===", flush=True)
    try:
        rows, ok = RUNNERS[part](smoke), True
    except Exception as err:  # a part's failure is its row; the other parts still run
        traceback.print_exc()
        rows, ok = [("FAILED", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:160])], False
        _release()
    return rows, ok, time.perf_counter() - start


def table(results: dict[str, tuple[list[tuple[str, str]], bool, float]], smoke: bool, seconds: float) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not smoke else \
        (platform.processor() or platform.machine())
    lines = [f"gpu_check {date.today()}: {device}, torch {torch.__version__}, {'smoke (CPU, tiny sizes)' if smoke else 'full'}"
             f", {seconds:.0f} s in all",
             f"{'part':<18} {'measure':<50} value"]
    for part, (rows, ok, part_s) in results.items():
        name = f"{part} {TITLES[part]}"
        for i, (measure, value) in enumerate(rows):
            lines.append(f"{name if i == 0 else '':<18} {measure:<50} {value}")
        lines.append(f"{'':<18} {'seconds' + ('' if ok else ' (FAILED)'):<50} {part_s:.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", action="append", choices=PARTS, help="run only this part (repeatable; default all)")
    parser.add_argument("--smoke", action="store_true", help="every part on the CPU at tiny sizes (seconds; CI)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA device: run this on a GPU machine, or with --smoke on a CPU.", file=sys.stderr)
        return 2
    if args.smoke:
        torch.set_num_threads(1)
    start = time.perf_counter()
    results = {part: run_part(part, args.smoke) for part in (args.part or PARTS)}
    print("\n" + table(results, args.smoke, time.perf_counter() - start), flush=True)
    return 0 if all(ok for _, ok, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
