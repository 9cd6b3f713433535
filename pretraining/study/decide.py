"""The study that decides, before the GPU-hours: does C2FMAE beat MAE on an ImageNet-100-style subset?

    python -m pretraining.study.decide --images /data/imagenet/train --val-images /data/imagenet/val \\
        --output runs/decide [--classes 100 --per-class 1300 --epochs 200 --finetune-epochs 100] \\
        [--launcher "torchrun --nproc_per_node 8"]
    python -m pretraining.study.decide --tiny --output /tmp/decide      (the tiny twin: the bundled photos, minutes on a CPU)
    python -m pretraining.study.decide ... --estimate                   (print the estimated GPU-hours and stop)

Stages, each the project's own command, each resumed on a rerun (a stage whose command and inputs
did not change is reused from OUTPUT/stages/, so a cut-off study is continued by running it again):

1. subset   `--classes` class folders of `--images` (seeded, or `--class-list`), `--val-per-class` images
            of each held out (unless `--val-images` scores), the rest the candidates (pretraining/study/subset.py)
2. label    `python labeling/run.py --file-list CANDIDATES --sample CLASSES x PER_CLASS`: a class-stratified
            sample of the candidates, labeled
3. pretrain per arm: `python -m pretraining.train` at one recipe and one global batch; the arms differ
            only in the model: MAE (`mae_base`), C2FMAE (`c2fmae_base_400ep`), C2FMAE with the depth- and
            FLOP-matched parallel decoder, C2FMAE with labels as targets only (the encoder reads RGB)
4. export   `python -m pretraining.export RUN --to timm`
5. probe    linear probe (`linear-probe --config cached`) and k-NN on frozen features, and a randomly
            initialised encoder beside them; in this process, keeping every held-out image's prediction
6. finetune `python -m pretraining.evaluate finetune` (MAE's recipe), then its predictions
7. report   one table: each arm's linear / k-NN / fine-tune top-1 with 95% bootstrap intervals over the
            held-out images, the paired differences, and the go / no-go reading (pretraining/study/decision.py)

`--launcher` runs pretraining and fine-tuning under it (torchrun on a node); without it each runs as one
process. The tiny twin runs stages 3-6 as function calls of the same commands in this process (no
interpreter starts), on tiny models for a few steps: its numbers are meaningless, its mechanics real.
docs/evaluation.md ("The study that decides") gives the estimated GPU-hours and what each outcome means.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pretraining.study.subset import (
    SubsetError,
    choose_classes,
    choose_subset,
    class_folders,
    image_id,
    link_eval_folders,
    validation_files,
)

ROOT = Path(__file__).resolve().parents[2]
ARMS = ("mae", "c2fmae", "c2fmae_parallel", "c2fmae_targets_only")
MAE_TINY = "mae_vit_tiny_patch16_dec512d8b"


class StudyError(RuntimeError):
    """A stage failed or cannot start; the message says what to do."""


@dataclass(frozen=True)
class Size:
    """What sizes a study: its two recipes (one optimisation recipe: the MAE one is the C2FMAE one with
    MAE's model), the overrides every arm shares, and the evaluation recipes."""

    recipes: tuple[str, str]  # (C2FMAE's, MAE's)
    pretrain: tuple[str, ...]  # --set for every arm: epochs, global batch, warm-up
    finetune_config: str
    finetune: tuple[str, ...]  # --set for every fine-tune
    knn_config: str
    linear_config: str
    linear: tuple[str, ...]  # --set for the cached linear probe
    label: tuple[str, ...]  # labeling arguments beside --input/--output/--file-list/--sample


def gpu_size(epochs: int, global_batch: int, warmup_epochs: float, finetune_epochs: int) -> Size:
    return Size(("c2fmae_base_400ep", "mae_base"),
                (f"epochs={epochs}", f"global_batch={global_batch}", f"optim.warmup_epochs={warmup_epochs}"),
                "vit_base", (f"epochs={finetune_epochs}",), "mae", "cached", (), ("--models", "default"))


# The tiny twin: 3 optimizer steps of 4 images, in one CPU process; no worker processes to start.
TINY = Size(("tiny", "mae_tiny"),
            ("epochs=1", "global_batch=4", "data.batch_size=4", "data.num_workers=0", "optim.warmup_epochs=0.5",
             "figure_every=0", "log_every=3", "log_grad_share=False", "checkpoint_async=False"),
            "tiny", ("epochs=1", "batch_size=4"), "tiny", "cached_tiny", ("epochs=20", "warmup_epochs=2"),
            ("--models", "tiny-random", "--points-per-side", "4", "--num-cpus", "2", "--shard-size", "16"))


def mae_tiny():
    """The tiny twin of `mae_base` (recipes.py has none): the `tiny` recipe with MAE's model at its size."""
    from pretraining.models.factory import model_config
    from pretraining.training.recipes import tiny

    return replace(tiny(), name="mae_tiny", model=model_config(MAE_TINY, img_size=64, depth=2, decoder_dim=128,
                                                               decoder_depth=2))


def recipe(name: str):
    from pretraining.training.recipes import get_recipe

    return mae_tiny() if name == "mae_tiny" else get_recipe(name)


def parallel_decoder(size: Size, num_semantic_classes: int) -> dict:
    """The model overrides that turn C2FMAE's cascade into the parallel decoder of the same depth per
    modality and the same decoder FLOPs (models/factory.py `parallel_matched_overrides`)."""
    from pretraining.models.factory import parallel_matched_overrides

    m = recipe(size.recipes[0]).model
    return parallel_matched_overrides(
        m.arch, num_semantic_classes=num_semantic_classes, img_size=m.img_size, patch_size=m.patch_size,
        embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads, decoder_dim=m.decoder_dim,
        decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads, num_visible=m.masking.num_visible)


def arm_command(arm: str, size: Size, seed: int, parallel: dict) -> tuple[str, list[str]]:
    """(recipe, --set overrides) of `arm`: the shared ones, the arm's model switches, the seed.
    `parallel`: `parallel_decoder`'s overrides."""
    c2f, mae = size.recipes
    sets = [*size.pretrain, f"seed={seed}"]
    if arm == "mae":
        return mae, sets
    if arm == "c2fmae_parallel":
        sets += [f"model.{k}={tuple(v) if isinstance(v, list) else v!r}".replace(" ", "") for k, v in parallel.items()]
    elif arm == "c2fmae_targets_only":  # the encoder reads RGB alone, at MAE's visible share (factory.py)
        sets.append("model.input_modalities=('rgb',)")
    elif arm != "c2fmae":
        raise ValueError(f"unknown arm {arm!r}; choose one of {', '.join(ARMS)}")
    return c2f, sets


# ---------------------------------------------------------------- the GPU-hours estimate
# Assumed rates per H100 (estimates, not measurements: no GPU has run this project's training yet):
# labeling 4-20 images/s (docs/labelers.md: ours 12-20, an independent one 4-8), pretraining ViT-B
# 2,000-4,000 images/s (issue 17's target for C2FMAE is 4,000; MAE reads 25% of the tokens too),
# fine-tuning ViT-B/16 at 224 px 1,000-2,000 images/s (every token, forward and backward), and
# feature extraction for the probes 3,000 images/s.
RATES = {"label": (20.0, 4.0), "pretrain": (4000.0, 2000.0), "finetune": (2000.0, 1000.0), "features": (3000.0, 3000.0)}


def estimate_gpu_hours(images: int, held_out: int, epochs: int, finetune_epochs: int, seeds: int = 1,
                       arms: int = len(ARMS)) -> dict[str, tuple[float, float]]:
    """(low, high) GPU-hours per stage and in total: images processed / RATES, summed over arms and seeds."""
    work = {"label": images,
            "pretrain": arms * seeds * epochs * images,
            "finetune": arms * seeds * finetune_epochs * (images + held_out),
            "features": (arms * seeds + 1) * (images + held_out)}
    hours = {k: (n / RATES[k][0] / 3600, n / RATES[k][1] / 3600) for k, n in work.items()}
    hours["total"] = (sum(h[0] for h in hours.values()), sum(h[1] for h in hours.values()))
    return hours


# ---------------------------------------------------------------- running stages
class Runner:
    """Runs the study's stages; each finished stage's key (its command) and result are kept in
    OUTPUT/stages/NAME.json, and a stage whose key is unchanged is not run again."""

    def __init__(self, output: Path, in_process: bool, launcher: list[str]):
        self.output, self.in_process, self.launcher = output, in_process, launcher
        self.log = output / "decide.log"
        (output / "stages").mkdir(parents=True, exist_ok=True)

    def stage(self, name: str, key: list, run) -> dict:
        path = self.output / "stages" / f"{name}.json"
        if path.is_file():
            done = json.loads(path.read_text())
            if done["key"] == json.loads(json.dumps(key)):
                return done["result"]
        start, cpu = time.perf_counter(), time.process_time()
        print(f"=== {name}", flush=True)
        result = run()
        result = {**result, "seconds": round(time.perf_counter() - start, 1),
                  "cpu_seconds": round(time.process_time() - cpu, 1)}  # this process's, not a subprocess's
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "result": result}, indent=1))
        tmp.replace(path)
        return result

    def command(self, name: str, argv: list[str], distributed: bool = False) -> None:
        """Run `argv` (python's arguments: `-m MODULE ...` or a script) as a subprocess; its output goes to
        the terminal and OUTPUT/decide.log."""
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        from workflows.demo import tee_run

        head = [*self.launcher] if distributed and self.launcher else [sys.executable]
        args = [*head, *argv]
        code = tee_run(args, self.log, f"$ {shlex.join(args)}")
        if code != 0:
            raise StudyError(f"the {name} stage failed (exit {code}); its output is above and in {self.log}. Fix "
                             "the cause and rerun the same command: finished stages are reused")


def labeled_ids(labels: Path) -> set[str]:
    import pyarrow.parquet as pq

    files = sorted((labels / "data").glob("train-*.parquet"))
    return {i for f in files for i in pq.read_table(f, columns=["image_id"]).column("image_id").to_pylist()}


def pretrain(runner: Runner, arm: str, seed: int, size: Size, labels: Path, run_dir: Path, parallel: dict) -> dict:
    name, sets = arm_command(arm, size, seed, parallel)
    argv = ["-m", "pretraining.train", "--data", str(labels), "--config", name, "--output", str(run_dir),
            "--no-progress", *[a for s in sets for a in ("--set", s)]]

    def run():
        if runner.in_process:
            from pretraining.train import train
            from pretraining.training.config import apply_overrides

            summary = train(apply_overrides(recipe(name), sets), str(labels), str(run_dir), progress=False)
        else:
            runner.command(f"pretrain {arm}", argv, distributed=True)
            summary = json.loads((run_dir / "summary.json").read_text())
        return {"global_step": summary["global_step"], "last": summary.get("last", {})}

    return runner.stage(f"pretrain-{arm}-s{seed}", argv, run)


def export(runner: Runner, arm: str, seed: int, run_dir: Path, timm_dir: Path) -> None:
    argv = [str(run_dir), "--to", "timm", "--output", str(timm_dir)]

    def run():
        if runner.in_process:
            from pretraining.export import main

            if main(argv) != 0:
                raise StudyError(f"exporting {run_dir} failed; its message is above")
        else:
            runner.command(f"export {arm}", ["-m", "pretraining.export", *argv])
        return {}

    runner.stage(f"export-{arm}-s{seed}", [*argv, (run_dir / "summary.json").stat().st_mtime_ns], run)


def probes(runner: Runner, name: str, spec: str, eval_dir: Path, size: Size, scores_file: Path,
           random_init: bool = False, stamp: int = 0) -> dict:
    """Linear probe and k-NN of the frozen encoder `spec`, in this process; correctness kept in `scores_file`."""

    def run():
        from pretraining.evaluate import apply_overrides
        from pretraining.evaluation import probe
        from pretraining.evaluation.backbones import setup_device
        from pretraining.evaluation.folders import load_eval_data
        from pretraining.study.scoring import encoder_scores

        data = load_eval_data(str(eval_dir))
        linear = apply_overrides(probe.CACHED_LINEAR_PROBE_RECIPES[size.linear_config](), list(size.linear))
        scores = encoder_scores(spec, data, probe.KNN_RECIPES[size.knn_config](), linear, setup_device(None),
                                random_init)
        np.savez(scores_file, **scores)
        return {k: 100.0 * float(v.mean()) for k, v in scores.items()}

    return runner.stage(f"probe-{name}", [spec, str(eval_dir), size.knn_config, size.linear_config, size.linear,
                                          random_init, stamp], run)


def finetune(runner: Runner, arm: str, seed: int, timm_dir: Path, eval_dir: Path, size: Size, out: Path,
             scores_file: Path) -> dict:
    sets = [*size.finetune, f"seed={seed}"]
    argv = ["finetune", "--model", f"local-dir:{timm_dir}", "--data", str(eval_dir), "--config",
            size.finetune_config, "--output", str(out), *[a for s in sets for a in ("--set", s)]]

    def run():
        from pretraining.evaluate import apply_overrides, main
        from pretraining.evaluation.backbones import setup_device
        from pretraining.evaluation.finetune import RECIPES
        from pretraining.evaluation.folders import load_eval_data
        from pretraining.study.scoring import classifier_scores

        if runner.in_process:
            main(argv)
        else:
            runner.command(f"finetune {arm}", ["-m", "pretraining.evaluate", *argv], distributed=True)
        cfg = apply_overrides(RECIPES[size.finetune_config](), sets)
        correct = classifier_scores(f"local-dir:{timm_dir}", str(out / "model" / "model.safetensors"),
                                    load_eval_data(str(eval_dir)), cfg, setup_device(None))
        np.savez(scores_file, finetune=correct)
        metrics = json.loads((out / "metrics.json").read_text())
        return {"finetune": 100.0 * float(correct.mean()), "command_top1": metrics["top1"]}

    return runner.stage(f"finetune-{arm}-s{seed}", [*argv, (timm_dir / "model.safetensors").stat().st_mtime_ns], run)


# ---------------------------------------------------------------- the study
def bundled_photos(folder: Path) -> Path:
    """The demo's ImageFolder of skimage.data photos (workflows/demo.py), for the tiny twin."""
    sys.path.insert(0, str(ROOT))
    from workflows.demo import lay_out_photos  # the demo's own layout: one set of bundled photos

    lay_out_photos(folder)
    return folder


def prepare_data(args, runner: Runner, size: Size) -> tuple[Path, Path, int]:
    """Stages 1 and 2 and the evaluation folders: (labeled folder, evaluation folder, semantic classes)."""
    from dataset_card.contract.layout import METADATA_FILE, DatasetMetadata

    out = args.output
    images = Path(args.images) if args.images else bundled_photos(out / "photos")
    listed = Path(args.class_list).read_text().split() if args.class_list else ()
    classes = choose_classes(class_folders(images), args.classes, args.seed, listed)
    held = 0 if args.val_images else args.val_per_class
    subset = choose_subset(images, classes, held, args.seed)
    val_root = Path(args.val_images) if args.val_images else images
    held_out = validation_files(val_root, classes) if args.val_images else list(subset.held_out)
    file_list = out / "subset" / "candidates.txt"
    file_list.parent.mkdir(parents=True, exist_ok=True)
    if not file_list.is_file() or file_list.read_text() != "\n".join(subset.candidates) + "\n":
        file_list.write_text("\n".join(subset.candidates) + "\n")
    (out / "subset" / "classes.txt").write_text("\n".join(classes) + "\n")
    sample = len(classes) * args.per_class
    print(f"subset: {len(classes)} classes of {images}; {len(subset.candidates)} candidates, a class-stratified "
          f"sample of up to {sample} to label; {len(held_out)} held-out images scored from {val_root}", flush=True)
    labels = out / "labels"
    argv = ["labeling/run.py", "--input", str(images), "--file-list", str(file_list), "--sample", str(sample),
            "--output", str(labels), "--no-progress", *size.label, *args.label_arg]
    runner.stage("label", [*argv, len(subset.candidates)], lambda: (runner.command("label", argv), {})[1])
    ids = labeled_ids(labels)
    train = [rel for rel in subset.candidates if image_id(rel) in ids]
    eval_dir = out / "eval"
    digest = hashlib.sha256("\n".join([*train, "", *held_out]).encode()).hexdigest()  # 130k names: their digest
    runner.stage("eval-folders", [str(images), str(val_root), digest],
                 lambda: link_eval_folders(eval_dir, images, train, val_root, held_out))
    metadata = DatasetMetadata.from_json((labels / METADATA_FILE).read_text(), source=str(labels / METADATA_FILE))
    return labels, eval_dir, metadata.num_semantic_classes


def study_size(args) -> Size:
    """The tiny twin's or the GPU study's size, with the command line's overrides."""
    size = TINY if args.tiny else gpu_size(args.epochs, args.global_batch, args.warmup_epochs, args.finetune_epochs)
    if not args.tiny and args.finetune_set:
        size = replace(size, finetune=(*size.finetune, *args.finetune_set))
    if args.pretrain_set:
        size = replace(size, pretrain=(*size.pretrain, *args.pretrain_set))
    return size


def run_study(args) -> list[str]:
    size = study_size(args)
    runner = Runner(args.output, in_process=args.tiny, launcher=shlex.split(args.launcher or ""))
    labels, eval_dir, semantic_classes = prepare_data(args, runner, size)
    # Computed once (it builds the model at every candidate width) and kept, as a stage, for reruns.
    parallel = runner.stage("parallel-decoder", [size.recipes[0], semantic_classes],
                            lambda: parallel_decoder(size, semantic_classes))
    parallel = {k: v for k, v in parallel.items() if k not in ("seconds", "cpu_seconds")}
    scores: dict[str, list[dict[str, np.ndarray]]] = {}
    for seed in range(args.seeds):
        for arm in ARMS:
            base = args.output / "runs" / f"{arm}-s{seed}"
            pretrain(runner, arm, seed, size, labels, base / "pretrain", parallel)
            export(runner, arm, seed, base / "pretrain", base / "timm")
            stamp = (base / "timm" / "model.safetensors").stat().st_mtime_ns
            probes(runner, f"{arm}-s{seed}", f"local-dir:{base / 'timm'}", eval_dir, size, base / "probes.npz",
                   stamp=stamp)
            finetune(runner, arm, seed, base / "timm", eval_dir, size, base / "finetune", base / "finetune.npz")
            scores.setdefault(arm, []).append({**np.load(base / "probes.npz"), **np.load(base / "finetune.npz")})
    mae_timm = args.output / "runs" / "mae-s0" / "timm"
    probes(runner, "random_init", f"local-dir:{mae_timm}", eval_dir, size, args.output / "random_init.npz",
           random_init=True)
    scores["random_init"] = [dict(np.load(args.output / "random_init.npz"))]
    return report(scores, args)


def report(scores: dict[str, list[dict[str, np.ndarray]]], args) -> list[str]:
    from pretraining.study.decision import Study, decide, last_line, table

    stacked = {arm: {p: np.stack([s[p] for s in per_seed]) for p in per_seed[0]} for arm, per_seed in scores.items()}
    study = Study(stacked, replicates=args.replicates)
    decision, reading = decide(study, args.primary)
    held = next(iter(stacked["mae"].values())).shape[1]
    lines = [f"top-1 (%) on {held} held-out images, {args.seeds} pretraining seed(s); [95% bootstrap interval over "
             f"the held-out images{' and seeds' if args.seeds > 1 else ''}, paired between arms]",
             *table(study), "", *reading, last_line(decision, study, args.primary)]
    (args.output / "report.txt").write_text("\n".join(lines) + "\n")
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pretraining.study.decide", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", help="ImageFolder to draw the subset from (ImageNet's train/: ROOT/CLASS/IMAGE)")
    p.add_argument("--val-images", help="ImageFolder scored instead of held-out training images (ImageNet's val/ laid "
                                        "out as ROOT/CLASS/IMAGE); its class names must match")
    p.add_argument("--output", required=True, type=Path, help="study folder (rerun the same command to resume)")
    p.add_argument("--tiny", action="store_true", help="the tiny twin: the bundled photos (unless --images), tiny "
                                                       "models, a few CPU steps; meaningless numbers, real mechanics")
    p.add_argument("--classes", type=int, default=None, help="class folders to draw (default 100; tiny: all)")
    p.add_argument("--class-list", help="a file of class folder names (whitespace-separated) instead of --classes")
    p.add_argument("--per-class", type=int, default=None, help="images per class to label and pretrain on "
                                                              "(default 1300: every image of ImageNet; tiny 4)")
    p.add_argument("--val-per-class", type=int, default=None,
                   help="images per class held out and scored when there is no --val-images (default 50; tiny 5)")
    p.add_argument("--epochs", type=int, default=200, help="pretraining epochs of every arm (default 200)")
    p.add_argument("--global-batch", type=int, default=1024, help="pretraining global batch of every arm (default "
                                                                  "1024; lr = 1.5e-4 x batch / 256)")
    p.add_argument("--warmup-epochs", type=float, default=20.0, help="pretraining warm-up epochs (default 20)")
    p.add_argument("--finetune-epochs", type=int, default=100, help="fine-tuning epochs (default 100, MAE's)")
    p.add_argument("--seeds", type=int, default=1, help="pretraining seeds per arm (default 1)")
    p.add_argument("--seed", type=int, default=0, help="which subset: the classes and held-out images (default 0)")
    p.add_argument("--primary", choices=("finetune", "linear", "knn"), default="finetune",
                   help="the probe the go / no-go reads (default finetune, the paper's protocol)")
    p.add_argument("--replicates", type=int, default=2000, help="bootstrap replicates (default 2000)")
    p.add_argument("--launcher", help='prefix for pretraining and fine-tuning, e.g. "torchrun --nproc_per_node 8"')
    p.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a pretraining override for every arm (e.g. data.batch_size=128 where 256 does not fit)")
    p.add_argument("--finetune-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a fine-tuning override for every arm (e.g. accum_steps=8 on one GPU)")
    p.add_argument("--label-arg", action="append", default=[], metavar="ARG",
                   help="an argument for the labeling command (e.g. --label-arg=--staged-models=/models)")
    p.add_argument("--estimate", action="store_true", help="print the estimated GPU-hours of this study and stop")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.classes = args.classes if args.classes is not None else None if tiny else 100
    args.per_class = args.per_class or (4 if tiny else 1300)
    args.val_per_class = args.val_per_class if args.val_per_class is not None else (5 if tiny else 50)
    if not tiny and not args.images:
        p.error("--images is required (an ImageFolder such as ImageNet's train/); --tiny uses the bundled photos")
    for name in ("per_class", "seeds", "epochs", "finetune_epochs", "replicates"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def print_estimate(args) -> None:
    images = (args.classes or 100) * args.per_class
    held = (args.classes or 100) * 50
    hours = estimate_gpu_hours(images, held, args.epochs, args.finetune_epochs, args.seeds)
    print(f"estimated H100 GPU-hours for {images} training and {held} held-out images, {len(ARMS)} arms x "
          f"{args.seeds} seed(s), {args.epochs} pretraining and {args.finetune_epochs} fine-tuning epochs "
          "(estimates from assumed rates, not measurements; pretraining/study/decide.py RATES):")
    for stage, (low, high) in hours.items():
        print(f"  {stage:9s} {low:6.1f} - {high:6.1f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.estimate:
        print_estimate(args)
        return 0
    try:
        lines = run_study(args)
    except (StudyError, SubsetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
