"""Does C2FMAE learn what the paper claims? Controlled ablations on procedural scenes with exact labels.

    python -m pretraining.study.ablations --quick --sweep-lr   (once: each arm's lr, on seed 100; writes lr.json)
    python -m pretraining.study.ablations --quick [--jobs 2]   (every arm and seed not yet run, then the report)
    python -m pretraining.study.ablations --quick --arms mae c2fmae --seed-ids 0 1 --parts   (one piece)
    python -m pretraining.study.ablations --quick --report     (merge the finished runs; train nothing)
    python -m pretraining.study.ablations --quick --set epochs=18 --set "target_radius=(0.4,0.5)"   (another size:
        any field of the mode's Scale; the default output folder is named after the changes)
    python -m pretraining.study.ablations --full  [--jobs 1]   (the GPU machine)
    python -m pretraining.study.ablations --smoke              (seconds: the pipeline, not a result)

The testbed (dataset_card/synthetic/scenes.py, task "appearance"): the image class is the texture of
the largest object, while the label maps carry only its shape and instances, so no arm can read the
class off an input it is given. Every arm pretrains through `pretraining.train.train` (the real
loader, curriculum and loop) on the same scenes for the same number of optimizer steps, at the lr
its sweep chose; each encoder is then probed on held-out scenes from RGB alone
(pretraining/study/probes.py: linear, k-NN, a short end-to-end fine-tune, a dense texture probe no arm
is trained on, and the label-informed shape and semantic probes, which rank nothing). Each cell is the
mean over seeds +- a 95% t-interval; differences are paired by seed.

Validity first: before ranking anything the study reports MAE minus random init on the
label-independent linear probe, and if that is under 10 points it prints "cannot rank" and tests no
direction (a testbed where MAE barely beats no pretraining cannot say whether anything beats MAE).

Learning rates: `--sweep-lr` pretrains each trained arm at every lr of the scale's grid on seed 100
(a seed the comparison does not use), keeps the lr with the best linear probe and records the choice
and every score in OUTPUT/lr.json; later runs read it (an arm without a choice runs at the scale's lr,
and its rows say so in `lr_source`).

Directions tested (fixed before any run of this version; the paper claims D1-D8 and D13):
  D1  c2fmae > mae                         C2FMAE beats MAE (linear probe; D1f: fine-tune)
  D2  c2fmae > multimae                    ...and MultiMAE
  D3  c2fmae > parallel_matched            the cascade beats a parallel decoder of the same depth and FLOPs
  D4  cascade_random > parallel_random     the cascade helps without the curriculum too
  D5  c2fmae > parallel_progressive        ...and with it, at the parallel decoder's own depth
  D6  c2fmae > cascade_shuffled_links      the links carry information about *this* image
  D7  c2fmae > cascade_random              progressive masking beats random masking
  D8  c2fmae > c2fmae_reversed             ...in coarse -> fine order, not the reverse
  D9  c2fmae_adaptive >= c2fmae            the adaptive curriculum is no worse than the fixed one
  D10 c2fmae > c2fmae_shuffled_labels      the gain comes from the labels' content
  D11 c2fmae >= c2fmae_noisy_labels        cleaner labels help
  D12 mae_semantic_guided > mae            labels help even only through the masking
  D13 c2fmae > mae in texture mIoU (the dense probe no arm trains on) and in attention on objects
The controls that separate the explanations of a gap between C2FMAE and MAE (RGB exposure: C2FMAE's
encoder sees 6 RGB tokens of its 18 on average, MAE 9 of 36), with the direction we expect:
  C1  c2fmae_rgb_matched > c2fmae          RGB dilution costs C2FMAE: with MAE's 9 RGB tokens in every
                                           sample (and 9 label tokens beside them) it probes better
  C2  c2fmae_rgb_matched > c2fmae_targets_only   at equal RGB exposure, label *inputs* help beyond targets
  C3  c2fmae_targets_only > mae            at equal RGB exposure, label *targets* help
  C4  c2fmae_label_dropout > c2fmae        dropping label inputs in half the samples makes the encoder use RGB
  C5  c2fmae_rgb_matched > mae             the paper's claim once exposure is matched
Label-informed (the maps carry them; reported, not a ranking): L1 c2fmae > mae on the shape probe,
L2 on semantic mIoU. A ">" direction "holds" when its paired 95% interval lies above 0, is
"reversed" when it lies below, and is "open" otherwise; a ">=" direction "holds" unless its interval
lies below 0 (no evidence of harm, which is not evidence of a gain).

Runs are pieces: each (arm, seed) is one process whose row is kept in OUTPUT/runs/ARM-sSEED/result.json
and reused by every later invocation (any mode of the same OUTPUT), so the quick run can be done in
parts, on several machines whose `runs/` folders are then merged. Writes OUTPUT/runs.csv,
OUTPUT/summary.csv and OUTPUT/ablations.png; prints the tables, and as its last line
`validity=... c2fmae_minus_mae=... cascade_minus_parallel_matched=... instance_minus_constant=...`:
the first three in linear-probe points, the last the best constant predictor's held-out instance
loss minus C2FMAE's (pretraining.study.instance_head; > 0 when the head beats the constant).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from dataset_card.synthetic.scenes import APPEARANCE_FILE, SEMANTIC_CLASSES, write_scenes
from pretraining.study.arms import ARMS, GROUPS, SCALES, Scale, model_overrides, resize
from pretraining.study.tables import last_line, plot, print_tables, write_csvs

SWEEP_SEED = 100  # the lr sweep's seed: not one the comparison uses


def write_data(root: Path, scale: Scale, variants: set[str]) -> dict[str, str]:
    """The pretraining scenes (appearance task) in each label variant needed, and the probe splits."""
    paths = {}
    for name, count, seed, labels in [*((f"train-{v}", scale.train_images, 0, v) for v in sorted(variants)),
                                      ("probe_train", scale.probe_train, 1000, "clean"),
                                      ("probe_val", scale.probe_val, 2000, "clean")]:
        key = name.removeprefix("train-") if name.startswith("train-") else name
        paths[key] = str(root / name)
        if not (root / name / APPEARANCE_FILE).exists():
            shutil.rmtree(root / name, ignore_errors=True)
            write_scenes(paths[key], count, scale.img_size, seed=seed, labels=labels, task="appearance",
                         target_radius=scale.target_radius)
    return paths


def _tensorboard_means(run_dir: Path, prefixes: tuple[str, ...]) -> dict[str, float]:
    """Mean over the run of every TensorBoard scalar whose tag starts with one of `prefixes`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: float(np.mean([e.value for e in events.Scalars(tag)]))
            for tag in events.Tags()["scalars"] if tag.startswith(prefixes)}


def run_one(name: str, seed: int, scale: Scale, paths: dict[str, str], run_dir: str, lr: float,
            lr_source: str) -> dict:
    """Pretrain arm `name` with `seed` at `lr`, probe it; one row of runs.csv. A finished run's row is
    kept in `run_dir`/result.json and reused unless it ran at another lr."""
    from pretraining.data.loader import DataConfig
    from pretraining.models.factory import create_model, model_config
    from pretraining.study.probes import probe, read_probe_split
    from pretraining.train import train
    from pretraining.training.config import OptimConfig, TrainConfig

    run_dir = Path(run_dir)
    arm = ARMS[name]
    done = run_dir / "result.json"
    if done.exists():
        row = json.loads(done.read_text())
        if not arm.train or row.get("lr") == lr:
            return {**row, "reused": True}
    # A run cut off before its probe (or at another lr) is trained again from the start.
    shutil.rmtree(run_dir, ignore_errors=True)
    train_split, val_split = read_probe_split(paths["probe_train"]), read_probe_split(paths["probe_val"])
    num_classes = len(SEMANTIC_CLASSES)
    args = model_overrides(arm, scale, num_classes)
    cpu, wall = time.process_time(), time.perf_counter()
    row = {"arm": name, "seed": seed, "labels": arm.labels, "steps": 0, "lr": lr if arm.train else 0.0,
           "lr_source": lr_source if arm.train else "none"}
    if arm.train:
        cfg = TrainConfig(
            name=f"ablation-{name}", model=model_config(arm.model, **args),
            data=DataConfig(batch_size=scale.batch_size, num_workers=scale.num_workers, shuffle_buffer=512,
                            prefetch_factor=2),
            optim=OptimConfig(lr=lr, warmup_epochs=scale.warmup_epochs), epochs=scale.epochs, seed=seed,
            precision="bf16", checkpoint_every=10**9, keep_checkpoints=1, log_every=24, figure_every=0)
        captured = {}
        summary = train(cfg, paths[arm.labels], str(run_dir), hooks=[lambda end: captured.update(model=end.model)],
                        progress=False)
        model = captured["model"]
        row.update(steps=summary["global_step"], **{f"final_{k}": v for k, v in summary["last"].items()})
        row.update(_tensorboard_means(run_dir, ("grad_share/", "strategy/used_", "strategy/fallback_")))
    else:
        torch.manual_seed(seed)
        model = create_model(arm.model, num_semantic_classes=num_classes, **args)
    row["train_wall_s"], row["train_cpu_s"] = time.perf_counter() - wall, time.process_time() - cpu
    model = model.cpu()  # the probes' tensors live on the host (a GPU run's model comes back from the device)
    row.update(probe(model, train_split, val_split, scale.patch_size, seed, scale.probe_epochs,
                     scale.patch_probe_epochs, scale.finetune_epochs))
    row["wall_s"], row["cpu_s"] = time.perf_counter() - wall, time.process_time() - cpu
    run_dir.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(row, indent=1))
    return row


def _init_worker(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)  # train() then leaves torch's thread count alone
    torch.set_num_threads(threads)


def chosen_lrs(output: Path) -> dict[str, float]:
    path = output / "lr.json"
    return {arm: v["lr"] for arm, v in json.loads(path.read_text()).items()} if path.exists() else {}


def run_pieces(work: list[tuple], scale: Scale, paths: dict[str, str], jobs: int, threads: int) -> list[dict]:
    """Run (arm, seed, run_dir, lr, lr_source) pieces on `jobs` processes; their rows, in `work`'s order."""
    rows = []
    context = multiprocessing.get_context("spawn")  # no forked torch state
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(threads,)) as pool:
        futures = [pool.submit(run_one, a, s, scale, paths, d, lr, src) for a, s, d, lr, src in work]
        for future in futures:
            row = future.result()
            rows.append(row)
            print(f"  {row['arm']:24s} seed {row['seed']:3d} lr {row['lr']:.1e}: linear {row['linear']:5.1f} "
                  f"fine-tune {row['finetune']:5.1f} texture {row['texture_miou']:5.1f} shape {row['linear_shape']:5.1f}"
                  f" ({row['steps']} steps, {row['cpu_s'] / 60:.1f} cpu min{', reused' if row.get('reused') else ''})",
                  file=sys.stderr, flush=True)
    return rows


def sweep_lr(arms: list[str], scale: Scale, paths: dict[str, str], output: Path, jobs: int, threads: int) -> dict:
    """Each trained arm at every lr of the grid on SWEEP_SEED; the best linear probe's lr, in lr.json."""
    trained = [a for a in arms if ARMS[a].train]
    work = [(a, SWEEP_SEED, str(output / "sweep" / f"{a}-lr{lr:g}"), lr, "sweep") for a in trained
            for lr in scale.lr_grid]
    rows = run_pieces(work, scale, paths, jobs, threads)
    path = output / "lr.json"
    choice = json.loads(path.read_text()) if path.exists() else {}
    for a in trained:
        scores = {f"{r['lr']:g}": r["linear"] for r in rows if r["arm"] == a}
        best = max(scores, key=scores.get)
        choice[a] = {"lr": float(best), "linear_by_lr": scores, "seed": SWEEP_SEED, "metric": "linear"}
        print(f"{a:24s} lr {best} (linear probe by lr: {scores})")
    path.write_text(json.dumps(choice, indent=1))
    return choice


def finished_rows(output: Path, arms: list[str]) -> list[dict]:
    """Every finished comparison run of `arms` under OUTPUT/runs (the sweep's runs are not in it)."""
    rows = [json.loads(p.read_text()) for p in sorted((output / "runs").glob("*/result.json"))]
    return sorted((r for r in rows if r["arm"] in arms), key=lambda r: (arms.index(r["arm"]), r["seed"]))


def report(rows: list[dict], scale: Scale, output: Path, expected: list[tuple[str, int]]) -> list[str]:
    """Write the CSVs and figure of `rows` and return the printed report (its last line the figures)."""
    missing = sorted(set(expected) - {(r["arm"], r["seed"]) for r in rows})
    steps = {r["steps"] for r in rows if ARMS[r["arm"]].train}
    if len(steps) > 1:
        raise RuntimeError(f"arms ran different numbers of optimizer steps: {sorted(steps)}; remove the runs of "
                           "another scale from OUTPUT/runs.")
    write_csvs(rows, output)
    seeds = len({r["seed"] for r in rows})
    title = (f"{scale.name}: {scale.train_images} appearance scenes at {scale.img_size} px, ViT {scale.embed_dim}-d "
             f"x {scale.depth}, {steps.pop() if steps else 0} steps of {scale.batch_size}, {seeds} seeds (mean +- 95% CI)")
    plot(rows, output, title)
    lines = [title, *print_tables(rows)]
    if missing:
        lines.append(f"incomplete: {len(missing)} runs missing, e.g. {missing[:4]}; run them (--parts) and --report")
    lines.append(f"CPU (training and probes) {sum(r['cpu_s'] for r in rows) / 60:.1f} min over {len(rows)} runs; "
                 f"config {asdict(scale)}")
    lines.append(last_line(rows))
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pretraining.study.ablations", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="CPU: 5 seeds, 48 px scenes, ViT 96-d x 4")
    mode.add_argument("--full", action="store_true", help="the GPU machine: 5 seeds, 96 px scenes, ViT-Ti/8 x 12")
    mode.add_argument("--smoke", action="store_true", help="seconds: the whole pipeline at a toy size (tests)")
    parser.add_argument("--output", help="folder for data, runs and results (default runs/ablations-MODE)")
    parser.add_argument("--group", choices=sorted(GROUPS), help="the arms (default: quick; smoke: smoke)")
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), help="these arms instead of a group")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the mode's scale (e.g. epochs=27); default output folder follows")
    parser.add_argument("--seeds", type=int, help="override the mode's seed count (seeds 0..N-1)")
    parser.add_argument("--seed-ids", type=int, nargs="+", help="only these seeds (a piece of the run)")
    parser.add_argument("--sweep-lr", action="store_true", help="choose each arm's lr on seed 100; write lr.json")
    parser.add_argument("--parts", action="store_true", help="run the pieces asked for and stop (no report)")
    parser.add_argument("--report", action="store_true", help="train nothing: report the finished runs")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, each with cores / jobs threads")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: cores / jobs)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    scale = SCALES["quick" if args.quick else "full" if args.full else "smoke"]
    try:
        scale = resize(scale, args.set)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    if args.seeds:
        scale = replace(scale, seeds=args.seeds)
    arms = args.arms or list(GROUPS[args.group or ("smoke" if args.smoke else "quick")])
    seeds = args.seed_ids if args.seed_ids is not None else list(range(scale.seeds))
    output = Path(args.output or f"runs/ablations-{scale.name}")
    output.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    jobs = max(1, min(args.jobs, cores))
    threads = args.threads or max(1, cores // jobs)
    expected = [(a, s) for s in seeds for a in arms]
    if not args.report:
        start = time.perf_counter()
        paths = write_data(output / "data", scale, {ARMS[a].labels for a in arms})
        print(f"{scale.name}: {len(arms)} arms x {len(seeds)} seeds on {jobs} processes x {threads} threads; "
              f"scenes ready in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        if args.sweep_lr:
            sweep_lr(arms, scale, paths, output, jobs, threads)
            return 0
        lrs = chosen_lrs(output)
        work = [(a, s, str(output / "runs" / f"{a}-s{s}"), lrs.get(a, scale.lr), "sweep" if a in lrs else "default")
                for a, s in expected]
        run_pieces(work, scale, paths, jobs, threads)
        if args.parts:
            return 0
    rows = finished_rows(output, arms)
    if not rows:
        print(f"No finished runs of {arms} in {output / 'runs'}; run them first (without --report).", file=sys.stderr)
        return 1
    for line in report(rows, scale, output, expected):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
