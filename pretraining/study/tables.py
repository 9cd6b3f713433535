"""The study's statistics and reports: intervals over seeds, paired differences, the validity gate,
the tables, the CSV files, the figure and the last line."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from pretraining.study.arms import DIRECTIONS, LABEL_INFORMED

METRICS = ("linear", "knn", "finetune", "texture_miou", "linear_shape", "miou", "attn_objects")
NAMES = {"linear": "linear", "knn": "k-NN", "finetune": "fine-tune", "texture_miou": "texture mIoU",
         "linear_shape": "shape lin (LI)", "miou": "sem mIoU (LI)", "attn_objects": "attn objects"}
VALIDITY_BAR = 10.0  # points MAE must beat random init by on the label-independent linear probe
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


def summarise(rows: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    arms = dict.fromkeys(r["arm"] for r in rows)
    keys = (*METRICS, "instance_loss", "instance_constant", "steps", "train_cpu_s", "lr")
    return {a: {m: interval([r.get(m, float("nan")) for r in rows if r["arm"] == a]) for m in keys} for a in arms}


def paired(rows: list[dict], better: str, worse: str, metric: str) -> tuple[float, float, int]:
    """Mean and 95% half-width of (better - worse) over the seeds both arms ran, and that count."""
    a = {r["seed"]: r[metric] for r in rows if r["arm"] == better and metric in r}
    b = {r["seed"]: r[metric] for r in rows if r["arm"] == worse and metric in r}
    seeds = sorted(a.keys() & b.keys())
    mean, half = interval([a[s] - b[s] for s in seeds]) if seeds else (float("nan"), float("nan"))
    return mean, half, len(seeds)


def validity(rows: list[dict]) -> tuple[float, float, int]:
    """The testbed's own validity: MAE minus random init on the label-independent linear probe, paired by seed."""
    return paired(rows, "mae", "random_init", "linear")


def instance_minus_constant(rows: list[dict], arm: str = "c2fmae") -> tuple[float, float, int]:
    """The constant predictor's held-out instance loss minus `arm`'s, over seeds (> 0: the head beats the
    best constant; `pretraining.study.instance_head` has the same sign)."""
    diffs = [r["instance_constant"] - r["instance_loss"] for r in rows if r["arm"] == arm and "instance_loss" in r]
    return (*interval(diffs), len(diffs))


def _cell(mean: float, half: float) -> str:
    return f"{mean:6.1f} +- {half:4.1f}" if not math.isnan(half) else f"{mean:6.1f}        "


def verdict(mean: float, half: float, kind: str) -> str:
    if math.isnan(half):
        return "open"
    if kind == ">":
        return "holds" if mean - half > 0 else "reversed" if mean + half < 0 else "open"
    return "holds" if mean + half >= 0 else "reversed"


def print_tables(rows: list[dict]) -> list[str]:
    """The per-arm table, then the validity gate, then (only past the gate) the directions."""
    lines = []
    stats = summarise(rows)
    lines.append(f"{'arm':24s} " + " ".join(f"{NAMES[m]:>15s}" for m in METRICS)
                 + f" {'const-inst':>10s} {'lr':>8s} {'steps':>6s} {'cpu min':>8s}")
    for arm, s in stats.items():
        inst = s["instance_constant"][0] - s["instance_loss"][0]
        lines.append(f"{arm:24s} " + " ".join(_cell(*s[m]) for m in METRICS)
                     + f" {inst:10.4f} {s['lr'][0]:8.1e} {s['steps'][0]:6.0f} {s['train_cpu_s'][0] / 60:8.1f}")
    lines.append("(LI: label-informed probes, which the label maps carry; they rank nothing)")
    lines.append("")
    mean, half, n = validity(rows)
    if n == 0:
        lines.append("cannot rank: the validity figure needs mae and random_init runs of the same seeds")
        return lines
    lines.append(f"validity: mae - random_init on the label-independent linear probe = {_cell(mean, half)} "
                 f"points over {n} seeds (bar: {VALIDITY_BAR:.0f})")
    if not mean >= VALIDITY_BAR:
        lines.append(f"cannot rank: MAE beats no pretraining by {mean:.1f} < {VALIDITY_BAR:.0f} points here, so "
                     "differences between arms say nothing about pretraining; the directions are not tested")
        return lines
    lines.append(f"{'direction':5s} {'claim':52s} {'metric':>12s} {'difference':>15s} {'n':>2s} verdict")
    for name, better, worse, metric, kind in DIRECTIONS:
        mean, half, n = paired(rows, better, worse, metric)
        if n == 0:
            continue
        note = " (label-informed)" if metric in LABEL_INFORMED else ""
        lines.append(f"{name:5s} {better + ' ' + kind + ' ' + worse:52s} {metric:>12s} {_cell(mean, half):>15s} "
                     f"{n:2d} {verdict(mean, half, kind)}{note}")
    return lines


def last_line(rows: list[dict]) -> str:
    """`validity=... c2fmae_minus_mae=... cascade_minus_parallel_matched=... instance_minus_constant=...`:
    linear-probe points (label-independent), and the constant predictor's held-out instance loss minus
    C2FMAE's (> 0: its instance head beats the best constant)."""
    figures = {"validity": validity(rows)[0],
               "c2fmae_minus_mae": paired(rows, "c2fmae", "mae", "linear")[0],
               "cascade_minus_parallel_matched": paired(rows, "c2fmae", "parallel_matched", "linear")[0],
               "instance_minus_constant": instance_minus_constant(rows)[0]}
    return " ".join(f"{k}={v:.2f}" if k != "instance_minus_constant" else f"{k}={v:.4f}" for k, v in figures.items())


def write_csvs(rows: list[dict], output: Path) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(output / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)
    with open(output / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["arm", *[f"{m}_{x}" for m in METRICS for x in ("mean", "ci95")], "lr", "steps", "seeds"])
        for arm, s in summarise(rows).items():
            n = sum(r["arm"] == arm for r in rows)
            writer.writerow([arm, *[f"{v:.3f}" for m in METRICS for v in s[m]], s["lr"][0], int(s["steps"][0]), n])


def plot(rows: list[dict], output: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summarise(rows)
    arms = list(stats)
    labels = {"linear": "linear probe top-1 (%)", "finetune": "fine-tune top-1 (%)",
              "texture_miou": "texture mIoU (%)", "linear_shape": "shape linear top-1 (%, label-informed)"}
    fig, axes = plt.subplots(1, len(labels), figsize=(18, 0.38 * len(arms) + 1.6), sharey=True)
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
        low = min((r[metric] for r in rows if not math.isnan(r[metric])), default=0.0)
        ax.set_xlim(left=max(0.0, low - 5))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = output / "ablations.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
