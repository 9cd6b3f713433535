"""Does C2FMAE learn what the paper claims? Controlled ablations on procedural scenes with exact labels.

    python -m pretraining.study.ablations --quick [--jobs 2] [--output runs/ablations-quick]
    python -m pretraining.study.ablations --full  [--jobs 1] (the GPU machine: 5 seeds, bigger)
    python -m pretraining.study.ablations --smoke            (seconds: the pipeline, not a result)

Every arm pretrains through `pretraining.train.train` (the real loader, curriculum and loop) on
the same scenes (dataset_card/synthetic/scenes.py: classes are shapes, colours and textures random, 2-5
occluding objects on stuff backgrounds, exact semantic and instance maps), for the same number
of optimizer steps, from the same seeds. Each frozen encoder is then probed on held-out scenes,
RGB only: a linear probe and a k-NN on the image class (the class token), a per-patch linear probe
for semantic mIoU, and the share of the class token's last-block attention on the objects.
Each cell is the mean over seeds +- a 95% t-interval; differences are paired by seed.

Directions tested (fixed before the run; the paper claims the first three):
  D1  c2fmae > mae                         C2FMAE beats MAE (linear probe)
  D2  c2fmae > multimae                    ...and MultiMAE (its output adapters and task sampling)
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
  D13 c2fmae > mae in semantic mIoU and in attention on objects (less "attention drift")
A ">" direction "holds" when its paired 95% interval lies above 0, is "reversed" when it lies
below, and is "open" otherwise. A ">=" direction (D9, D11: "no worse") "holds" unless its interval
lies below 0: no evidence of harm, which is not evidence of a gain.

Writes OUTPUT/runs.csv (one row per arm and seed), OUTPUT/summary.csv (per arm), OUTPUT/ablations.png
and the run folders; prints the tables, and as its last line the linear-probe differences in points:
`c2fmae_minus_mae=... cascade_minus_parallel_matched=... progressive_minus_random=...`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from dataset_card.contract import codecs
from dataset_card.synthetic.scenes import SEMANTIC_CLASSES, write_scenes


@dataclass(frozen=True)
class Scale:
    """Everything that sizes a mode: data, model, schedule, probes."""

    name: str
    train_images: int
    probe_train: int
    probe_val: int
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_dim: int
    decoder_heads: int
    mae_decoder_depth: int
    epochs: int
    batch_size: int
    lr: float
    warmup_epochs: float
    seeds: int
    num_workers: int
    probe_epochs: int  # linear probe on the class token
    patch_probe_epochs: int


QUICK = Scale("quick", train_images=3072, probe_train=2048, probe_val=1024, img_size=48, patch_size=8, embed_dim=96,
              depth=4, num_heads=3, decoder_dim=64, decoder_heads=4, mae_decoder_depth=8, epochs=9, batch_size=64,
              lr=2e-3, warmup_epochs=1.0, seeds=3, num_workers=0, probe_epochs=100, patch_probe_epochs=30)
FULL = Scale("full", train_images=20000, probe_train=5000, probe_val=2000, img_size=96, patch_size=8, embed_dim=192,
             depth=12, num_heads=3, decoder_dim=128, decoder_heads=4, mae_decoder_depth=8, epochs=100, batch_size=256,
             lr=1.5e-3, warmup_epochs=10.0, seeds=5, num_workers=6, probe_epochs=100, patch_probe_epochs=30)
SMOKE = Scale("smoke", train_images=32, probe_train=24, probe_val=16, img_size=32, patch_size=8, embed_dim=32,
              depth=1, num_heads=2, decoder_dim=32, decoder_heads=2, mae_decoder_depth=1, epochs=1, batch_size=16,
              lr=1e-3, warmup_epochs=0.5, seeds=2, num_workers=0, probe_epochs=5, patch_probe_epochs=2)


@dataclass(frozen=True)
class Arm:
    model: str  # factory name
    overrides: tuple[tuple[str, object], ...] = ()
    labels: str = "clean"  # which label variant it pretrains on
    matched: bool = False  # add the depth- and FLOP-matched parallel decoder overrides
    train: bool = True  # False: the random-initialised encoder (the floor)


C2F, MAE, MULTI = "c2fmae_vit_tiny_patch16", "mae_vit_tiny_patch16_dec512d8b", "multimae_vit_tiny_patch16"
ARMS = {
    "random_init": Arm(C2F, train=False),
    "mae": Arm(MAE),
    "mae_semantic_guided": Arm(MAE, (("masking", "semantic"),)),
    "multimae": Arm(MULTI),
    "parallel_random": Arm(C2F, (("decoder", "parallel"), ("masking", "random"))),
    "cascade_random": Arm(C2F, (("masking", "random"),)),
    "parallel_progressive": Arm(C2F, (("decoder", "parallel"),)),
    "c2fmae": Arm(C2F),
    "c2fmae_adaptive": Arm(C2F, (("mode", "adaptive"),)),
    "parallel_matched": Arm(C2F, matched=True),
    "cascade_shuffled_links": Arm(C2F, (("cascade_link", "shuffled"),)),
    "c2fmae_reversed": Arm(C2F, (("phases", ("random", "instance", "semantic")),)),
    "c2fmae_shuffled_labels": Arm(C2F, labels="shuffled"),
    # The diagnosis group (`--group diagnose`): what changes the outcome.
    "c2fmae_noisy_labels": Arm(C2F, labels="noisy"),
    "c2fmae_within_regions": Arm(C2F, (("guided_mode", "within"),)),  # guided phases keep part of each region
    "c2fmae_targets_only": Arm(C2F, (("input_modalities", ("rgb",)), ("rgb_visible_share", 0.25))),  # labels only as targets
    "parallel_targets_only": Arm(C2F, (("decoder", "parallel"), ("input_modalities", ("rgb",)),
                                       ("rgb_visible_share", 0.25))),
}
DIAGNOSE = ("random_init", "mae", "c2fmae", "c2fmae_noisy_labels", "c2fmae_within_regions", "c2fmae_targets_only",
            "parallel_targets_only")
PAPER = tuple(a for a in ARMS if a not in DIAGNOSE or a in ("random_init", "mae", "c2fmae"))
# (name, better arm, worse arm, metric, kind): kind ">" the claim, ">=" no worse
DIRECTIONS = [
    ("D1", "c2fmae", "mae", "linear", ">"),
    ("D2", "c2fmae", "multimae", "linear", ">"),
    ("D3", "c2fmae", "parallel_matched", "linear", ">"),
    ("D4", "cascade_random", "parallel_random", "linear", ">"),
    ("D5", "c2fmae", "parallel_progressive", "linear", ">"),
    ("D6", "c2fmae", "cascade_shuffled_links", "linear", ">"),
    ("D7", "c2fmae", "cascade_random", "linear", ">"),
    ("D8", "c2fmae", "c2fmae_reversed", "linear", ">"),
    ("D9", "c2fmae_adaptive", "c2fmae", "linear", ">="),
    ("D10", "c2fmae", "c2fmae_shuffled_labels", "linear", ">"),
    ("D11", "c2fmae", "c2fmae_noisy_labels", "linear", ">="),
    ("D12", "mae_semantic_guided", "mae", "linear", ">"),
    ("D13a", "c2fmae", "mae", "miou", ">"),
    ("D13b", "c2fmae", "mae", "attn_objects", ">"),
    # The diagnosis group's questions (asked after the quick run; see docs/results.md).
    ("X1", "c2fmae_targets_only", "c2fmae", "miou", ">"),
    ("X2", "c2fmae_targets_only", "mae", "linear", ">"),
    ("X3", "c2fmae_targets_only", "mae", "miou", ">"),
    ("X4", "c2fmae_targets_only", "parallel_targets_only", "linear", ">"),
    ("X5", "c2fmae_within_regions", "c2fmae", "linear", ">"),
]
METRICS = ("linear", "linear_cls", "knn", "miou", "attn_objects", "attn_target")
LAST_LINE = (("c2fmae_minus_mae", "c2fmae", "mae"), ("cascade_minus_parallel_matched", "c2fmae", "parallel_matched"),
             ("progressive_minus_random", "c2fmae", "cascade_random"))
# Two-sided 95% quantiles of Student's t by degrees of freedom (1.96 beyond the table).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}


def interval(values) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval); the half-width is nan for one value."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v.mean()) if len(v) else float("nan"), float("nan")
    df = len(v) - 1
    t = _T95.get(df) or next((q for d, q in sorted(_T95.items()) if d >= df), 1.96)
    return float(v.mean()), float(t * v.std(ddof=1) / math.sqrt(len(v)))


# ---------------------------------------------------------------------------------------------
# Data


def write_data(root: Path, scale: Scale, variants: set[str]) -> dict[str, str]:
    """The pretraining scenes in each label variant needed, and the probe splits (clean, other seeds)."""
    paths = {}
    for labels in sorted(variants):
        paths[labels] = str(root / f"train-{labels}")
        if not (root / f"train-{labels}" / "metadata.json").exists():
            write_scenes(paths[labels], scale.train_images, scale.img_size, seed=0, labels=labels)
    for split, count, seed in (("probe_train", scale.probe_train, 1000), ("probe_val", scale.probe_val, 2000)):
        paths[split] = str(root / split)
        if not (root / split / "metadata.json").exists():
            write_scenes(paths[split], count, scale.img_size, seed=seed)
    return paths


def read_probe_split(path: str) -> dict[str, torch.Tensor]:
    """images (N, 3, S, S) normalised, label (N,), semantic (N, S, S), objects and target (N, S, S) bool."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    rows = pq.read_table(next(Path(path, "data").glob("train-*.parquet"))).to_pylist()
    images = np.stack([codecs.decode_image(r["image"]["bytes"]) for r in rows])
    semantic = np.stack([codecs.decode_mask(r["semantic_mask"]["bytes"]) for r in rows])
    ids = np.stack([codecs.decode_mask(r["instance_mask"]["bytes"]) for r in rows])
    target = np.stack([ids[i] == max(r["instances"], key=lambda inst: inst["area"])["id"] for i, r in enumerate(rows)])
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return {"images": (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std,
            "label": torch.tensor([r["label"] for r in rows]), "semantic": torch.from_numpy(semantic).long(),
            "objects": torch.from_numpy(ids > 0), "target": torch.from_numpy(target)}


# ---------------------------------------------------------------------------------------------
# One arm and seed


def model_overrides(arm: Arm, scale: Scale, num_classes: int) -> dict:
    from pretraining.models.factory import parallel_matched_overrides

    args = dict(img_size=scale.img_size, patch_size=scale.patch_size, embed_dim=scale.embed_dim, depth=scale.depth,
                num_heads=scale.num_heads, decoder_dim=scale.decoder_dim, decoder_heads=scale.decoder_heads)
    if arm.model == MAE:
        args["decoder_depth"] = scale.mae_decoder_depth
    args.update(dict(arm.overrides))
    if "rgb_visible_share" in args:  # visible tokens as a share of one modality's positions (MAE's 0.25)
        args["num_visible"] = round(args.pop("rgb_visible_share") * (scale.img_size // scale.patch_size) ** 2)
    if arm.matched:
        args.update(parallel_matched_overrides(arm.model, num_semantic_classes=num_classes, **args))
    return args


def _features(model, images: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from pretraining.study.attention import cls_attention

    model.eval()
    tokens, attn = [], []
    with torch.no_grad():
        for i in range(0, len(images), 256):
            x = images[i:i + 256]
            tokens.append(model.encode_rgb(x))
            attn.append(cls_attention(model.encoder.rgb_input_tokens(x), model.encoder.blocks))
    tokens = torch.cat(tokens)
    h = images.shape[-1] // patch_size
    return tokens[:, 0], tokens[:, 1:].reshape(len(tokens), h, h, -1), torch.cat(attn)


def probe(model, scale: Scale, train: dict, val: dict, seed: int) -> dict[str, float]:
    from pretraining.evaluation.probe import knn_accuracy, linear_probe_accuracy, linear_probe_tiny
    from pretraining.study.attention import attention_mass, patch_fraction
    from pretraining.study.patch_probe import PatchProbeConfig, patch_probe_miou

    cls_train, patches_train, _ = _features(model, train["images"], scale.patch_size)
    cls_val, patches_val, attn_val = _features(model, val["images"], scale.patch_size)
    avg_train, avg_val = patches_train.flatten(1, 2).mean(1), patches_val.flatten(1, 2).mean(1)
    lin_cfg = replace(linear_probe_tiny(), epochs=scale.probe_epochs, warmup_epochs=min(5, scale.probe_epochs // 2),
                      seed=seed)
    num_classes = len(SEMANTIC_CLASSES)
    return {
        "linear": linear_probe_accuracy(avg_train, train["label"], avg_val, val["label"], lin_cfg),
        "linear_cls": linear_probe_accuracy(cls_train, train["label"], cls_val, val["label"], lin_cfg),
        "knn": knn_accuracy(avg_train, train["label"], avg_val, val["label"], k=20),
        "miou": patch_probe_miou(patches_train, train["semantic"], patches_val, val["semantic"], num_classes,
                                 PatchProbeConfig(epochs=scale.patch_probe_epochs, seed=seed)),
        "attn_objects": 100 * attention_mass(attn_val, patch_fraction(val["objects"], scale.patch_size)).mean().item(),
        "attn_target": 100 * attention_mass(attn_val, patch_fraction(val["target"], scale.patch_size)).mean().item(),
    }


def _tensorboard_means(run_dir: Path, prefixes: tuple[str, ...]) -> dict[str, float]:
    """Mean over the run of every TensorBoard scalar whose tag starts with one of `prefixes`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: float(np.mean([e.value for e in events.Scalars(tag)]))
            for tag in events.Tags()["scalars"] if tag.startswith(prefixes)}


def run_one(name: str, seed: int, scale: Scale, paths: dict[str, str], output: str) -> dict:
    """Pretrain arm `name` with `seed`, probe its frozen encoder; one row of runs.csv. A finished run's
    row is kept in its folder (result.json) and reused, so runs of several groups share arms."""
    from pretraining.data.loader import DataConfig
    from pretraining.models.factory import create_model, model_config
    from pretraining.train import train
    from pretraining.training.config import OptimConfig, TrainConfig

    run_dir = Path(output) / "runs" / f"{name}-s{seed}"
    if (run_dir / "result.json").exists():
        return {**json.loads((run_dir / "result.json").read_text()), "reused": True}
    # A run cut off before its probe left no result: train it again from the start (a finished run
    # would only say it is complete, and the probe needs the model in memory).
    shutil.rmtree(run_dir, ignore_errors=True)
    arm = ARMS[name]
    train_split, val_split = read_probe_split(paths["probe_train"]), read_probe_split(paths["probe_val"])
    num_classes = len(SEMANTIC_CLASSES)
    args = model_overrides(arm, scale, num_classes)
    cpu, wall = time.process_time(), time.perf_counter()
    row = {"arm": name, "seed": seed, "labels": arm.labels, "steps": 0}
    if arm.train:
        cfg = TrainConfig(
            name=f"ablation-{name}", model=model_config(arm.model, **args),
            data=DataConfig(batch_size=scale.batch_size, num_workers=scale.num_workers, shuffle_buffer=512,
                            prefetch_factor=2),
            optim=OptimConfig(lr=scale.lr, warmup_epochs=scale.warmup_epochs), epochs=scale.epochs, seed=seed,
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
    row.update(probe(model, scale, train_split, val_split, seed))
    row["wall_s"], row["cpu_s"] = time.perf_counter() - wall, time.process_time() - cpu
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "result.json").write_text(json.dumps(row, indent=1))
    return row


def _init_worker(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)  # train() then leaves torch's thread count alone
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Tables


def summarise(rows: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    arms = dict.fromkeys(r["arm"] for r in rows)
    return {a: {m: interval([r[m] for r in rows if r["arm"] == a]) for m in (*METRICS, "steps", "train_cpu_s")}
            for a in arms}


def paired(rows: list[dict], better: str, worse: str, metric: str) -> tuple[float, float, int]:
    """Mean and 95% half-width of (better - worse) over the seeds both arms ran, and that count."""
    a = {r["seed"]: r[metric] for r in rows if r["arm"] == better}
    b = {r["seed"]: r[metric] for r in rows if r["arm"] == worse}
    seeds = sorted(a.keys() & b.keys())
    mean, half = interval([a[s] - b[s] for s in seeds]) if seeds else (float("nan"), float("nan"))
    return mean, half, len(seeds)


def _cell(mean: float, half: float) -> str:
    return f"{mean:6.1f} +- {half:4.1f}" if not math.isnan(half) else f"{mean:6.1f}        "


def print_tables(rows: list[dict], scale: Scale) -> list[str]:
    lines = []
    stats = summarise(rows)
    names = {"linear": "linear (avg)", "linear_cls": "linear (cls)", "knn": "k-NN (avg)", "miou": "patch mIoU",
             "attn_objects": "attn objects", "attn_target": "attn target"}
    head = f"{'arm':24s} " + " ".join(f"{names[m]:>15s}" for m in METRICS) + f" {'steps':>6s} {'cpu min':>8s}"
    lines.append(head)
    for arm, s in stats.items():
        lines.append(f"{arm:24s} " + " ".join(_cell(*s[m]) for m in METRICS)
                     + f" {s['steps'][0]:6.0f} {s['train_cpu_s'][0] / 60:8.1f}")
    lines.append("")
    lines.append(f"{'direction':5s} {'claim':52s} {'metric':>12s} {'difference':>15s} {'n':>2s} verdict")
    for name, better, worse, metric, kind in DIRECTIONS:
        mean, half, n = paired(rows, better, worse, metric)
        if n == 0:
            continue
        if math.isnan(half):
            verdict = "open"
        elif kind == ">":
            verdict = "holds" if mean - half > 0 else "reversed" if mean + half < 0 else "open"
        else:
            verdict = "holds" if mean + half >= 0 else "reversed"
        lines.append(f"{name:5s} {better + ' ' + kind + ' ' + worse:52s} {metric:>12s} {_cell(mean, half):>15s} "
                     f"{n:2d} {verdict}")
    return lines


def write_csvs(rows: list[dict], output: Path) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(output / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)
    with open(output / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["arm", *[f"{m}_{x}" for m in METRICS for x in ("mean", "ci95")], "steps", "seeds"])
        for arm, s in summarise(rows).items():
            n = sum(r["arm"] == arm for r in rows)
            writer.writerow([arm, *[f"{v:.3f}" for m in METRICS for v in s[m]], int(s["steps"][0]), n])


def plot(rows: list[dict], output: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summarise(rows)
    arms = list(stats)
    fig, axes = plt.subplots(1, 4, figsize=(18, 0.38 * len(arms) + 1.6), sharey=True)
    labels = {"linear": "linear probe top-1 (%)", "knn": "k-NN top-1 (%)", "miou": "patch probe mIoU (%)",
              "attn_objects": "CLS attention on objects (%)"}
    for ax, metric in zip(axes, labels):
        means = [stats[a][metric][0] for a in arms]
        halves = [0 if math.isnan(stats[a][metric][1]) else stats[a][metric][1] for a in arms]
        colours = ["#c44e52" if a.startswith("c2fmae") else "#4c72b0" if a.startswith("mae") else "#8c8c8c"
                   for a in arms]
        ax.barh(range(len(arms)), means, xerr=halves, color=colours, capsize=3)
        for r in rows:
            ax.plot(r[metric], arms.index(r["arm"]), "k.", ms=3)
        ax.set_title(labels[metric], fontsize=10)
        ax.set_yticks(range(len(arms)), arms, fontsize=9)
        ax.invert_yaxis()
        low = min(r[metric] for r in rows)
        ax.set_xlim(left=max(0.0, low - 5))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = output / "ablations.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pretraining.study.ablations", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="CPU: 3 seeds, 48 px scenes, ViT 96-d x 4 (<= 45 min on 2 cores)")
    mode.add_argument("--full", action="store_true", help="the GPU machine: 5 seeds, 96 px scenes, ViT-Ti/8 x 12")
    mode.add_argument("--smoke", action="store_true", help="seconds: the whole pipeline at a toy size (tests)")
    parser.add_argument("--output", help="folder for data, runs and results (default runs/ablations-MODE)")
    parser.add_argument("--group", choices=("paper", "diagnose"), default="paper",
                        help="paper: the arms and controls of the issue (default); diagnose: what changes the outcome")
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), help="these arms instead of a group")
    parser.add_argument("--seeds", type=int, help="override the mode's seed count")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, each with cores / jobs threads")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: cores / jobs)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    scale = QUICK if args.quick else FULL if args.full else SMOKE
    if args.seeds:
        scale = replace(scale, seeds=args.seeds)
    arms = args.arms or list(PAPER if args.group == "paper" else DIAGNOSE)
    if args.smoke and not args.arms:
        arms = ["random_init", "mae", "c2fmae", "cascade_random", "parallel_matched"]
    output = Path(args.output or f"runs/ablations-{scale.name}")
    output.mkdir(parents=True, exist_ok=True)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    paths = write_data(output / "data", scale, {ARMS[a].labels for a in arms})
    data_s = time.perf_counter() - start_wall
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    jobs = max(1, min(args.jobs, cores))
    threads = args.threads or max(1, cores // jobs)
    work = [(a, s) for s in range(scale.seeds) for a in arms]
    print(f"{scale.name}: {len(arms)} arms x {scale.seeds} seeds on {jobs} processes x {threads} threads; "
          f"scenes written in {data_s:.0f} s", file=sys.stderr, flush=True)
    rows = []
    context = multiprocessing.get_context("spawn")  # no forked torch state
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(run_one, a, s, scale, paths, str(output)): (a, s) for a, s in work}
        for future in futures:
            row = future.result()
            rows.append(row)
            print(f"  {row['arm']:24s} seed {row['seed']}: linear {row['linear']:5.1f} knn {row['knn']:5.1f} "
                  f"mIoU {row['miou']:5.1f} attn {row['attn_objects']:5.1f} ({row['steps']} steps, "
                  f"{row['cpu_s'] / 60:.1f} cpu min)", file=sys.stderr, flush=True)
    wall = time.perf_counter() - start_wall
    reused = sum(bool(r.get("reused")) for r in rows)
    cpu = sum(r["cpu_s"] for r in rows if not r.get("reused")) + (time.process_time() - start_cpu)
    steps = {r["steps"] for r in rows if ARMS[r["arm"]].train}
    if len(steps) > 1:
        raise RuntimeError(f"arms ran different numbers of optimizer steps: {sorted(steps)}")
    write_csvs(rows, output)
    title = (f"{scale.name}: {scale.train_images} scenes at {scale.img_size} px, ViT {scale.embed_dim}-d x {scale.depth}, "
             f"{steps.pop() if steps else 0} steps of {scale.batch_size}, {scale.seeds} seeds (mean +- 95% CI)")
    plot(rows, output, title)
    print(title)
    for line in print_tables(rows, scale):
        print(line)
    print(f"wall {wall / 60:.1f} min on {cores} cores (shared machine); CPU {cpu / 60:.1f} min, i.e. about "
          f"{cpu / cores / 60:.1f} min on {cores} idle cores; scenes {data_s:.0f} s; {reused} runs reused from "
          f"earlier invocations; config {asdict(scale)}")
    figures = []
    for key, better, worse in LAST_LINE:
        mean = paired(rows, better, worse, "linear")[0]
        figures.append(f"{key}={mean:.2f}")
    print(" ".join(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
