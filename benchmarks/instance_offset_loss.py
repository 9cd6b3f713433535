"""L1 or squared-error instance offsets (`model.instance_offset_loss`) over seeds: the evidence for the default.

    PYTHONPATH=. python benchmarks/instance_offset_loss.py head [--size study|twin] [--seeds 0 1 2 3 4] [--losses l1 mse]
    PYTHONPATH=. python benchmarks/instance_offset_loss.py tiny [--seeds 0 1 2 3 4] [--losses l1 mse]

`head`: the instance head against the best constant predictor (`pretraining.study.instance_head`) in
C2FMAE and the targets-only arm. `--size study`, the setup of docs/model.md's Losses table: 48 px
procedural scenes (`dataset_card.synthetic.scenes`, 512 to train on, 256 held out), ViT 64-d x 2,
decoder 64-d (2 blocks per stage); `--size twin`, tests/test_instance_head.py's tiny twin: 32 px, 256
and 128 scenes, ViT 32-d x 1, decoder 32-d x 1. Both: patch 8, 150 AdamW steps of 32 at lr 2e-3, the
curriculum's progress running 0 -> 1, held-out scenes randomly masked. The seed sets the initial weights, the batches and masks drawn and the held-out masks; the
scenes are the same for every seed. One line per run: head, constant, relative = (constant - head) /
constant, and each term's gradient share on the encoder output.

`tiny`: `tests/test_train.py::test_tiny_run_learns_semantics_of_masked_patches` with `seed=S` (the
TrainConfig seed: initial weights, shuffle, masks and augmentation; the dataset and the evaluation's
masks stay the test's), printing its masked-patch semantic accuracy against the test's bar.

Each prints a summary per (arm, loss): mean and a 95% t-interval over seeds. Use `--threads 1` and
run the two losses as two processes on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# The two-sided 95% Student t quantile by degrees of freedom (1-9), for intervals over a few seeds.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% t-interval) over seeds; half-width nan for one value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


# (image size, training scenes, held-out scenes, model) of the two sizes; patch 8, 150 steps of 32 in both.
SIZES = {
    "study": (48, 512, 256, {"embed_dim": 64, "depth": 2, "num_heads": 2, "decoder_dim": 64, "decoder_heads": 2}),
    "twin": (32, 256, 128, {"embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_dim": 32, "decoder_heads": 2,
                            "decoder_depth": 1}),
}


def head_run(arm: str, offset_loss: str, seed: int, train: dict, held_out: dict, size: str, patch: int = 8,
             steps: int = 150) -> dict:
    """Train one small C2FMAE (or targets-only) and measure its instance head on the held-out scenes."""
    from pretraining.models.factory import create_model
    from pretraining.study.instance_head import measure_instance_head

    torch.manual_seed(seed)
    extra = {"input_modalities": ("rgb",)} if arm == "targets_only" else {}
    model = create_model("c2fmae_vit_tiny_patch16", num_semantic_classes=9, img_size=SIZES[size][0], patch_size=patch,
                         instance_offset_loss=offset_loss, **SIZES[size][3], **extra)
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.05)
    rows = len(train["rgb"])
    for step in range(steps):
        index = torch.randint(0, rows, (32,), generator=g)
        out = model(model.mask_batch({k: v[index] for k, v in train.items()}, g, step / steps))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    reading = measure_instance_head(model, [held_out], torch.Generator().manual_seed(1000 + seed))
    return {"arm": arm, "loss": offset_loss, "seed": seed, "head": reading.head, "constant": reading.constant,
            "relative": reading.relative, "shares": reading.grad_shares}


def tiny_run(offset_loss: str, seed: int, data: str, run: str) -> dict:
    """The tiny training test's run and measurement at another TrainConfig seed."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_train import masked_semantic_accuracy  # the test's own measure, not a second one

    from pretraining.export import load_run_model
    from pretraining.train import train
    from pretraining.training.config import apply_overrides
    from pretraining.training.recipes import tiny

    cfg = apply_overrides(tiny(), ["model.masking.strategy=random", "figure_every=0", "checkpoint_every=1000",
                                   f"seed={seed}", f"model.instance_offset_loss={offset_loss}"])
    train(cfg, data, run, progress=False)
    model, _ = load_run_model(run)
    accuracy, baseline = masked_semantic_accuracy(model, data)
    return {"loss": offset_loss, "seed": seed, "accuracy": accuracy, "baseline": baseline}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("head", "tiny"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--losses", nargs="+", default=["l1", "mse"], choices=("l1", "mse"))
    parser.add_argument("--arms", nargs="+", default=["c2fmae", "targets_only"], choices=("c2fmae", "targets_only"))
    parser.add_argument("--size", choices=tuple(SIZES), default="study", help="head: the model and scenes")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    start = time.perf_counter()
    if args.what == "head":
        from pretraining.study.instance_head import scene_batch

        px, rows, held = SIZES[args.size][:3]
        train_scenes, held_out = scene_batch(rows, px, 1, 8), scene_batch(held, px, 2, 8)
        for seed in args.seeds:
            for arm in args.arms:
                for offset_loss in args.losses:
                    results.append(head_run(arm, offset_loss, seed, train_scenes, held_out, args.size))
                    print(json.dumps(results[-1]), f"# {time.perf_counter() - start:.0f} s", flush=True)
        for arm in args.arms:
            for offset_loss in args.losses:
                runs = [r for r in results if r["arm"] == arm and r["loss"] == offset_loss]
                mean, half = interval([r["relative"] for r in runs])
                share, share_half = interval([r["shares"]["instance"] for r in runs])
                wins = sum(r["relative"] > 0 for r in runs)
                print(f"SUMMARY {arm} {offset_loss}: (constant - head) / constant {100 * mean:+.2f}% "
                      f"+- {100 * half:.2f} (95% t, {len(runs)} seeds), beats the constant in {wins}/{len(runs)}, "
                      f"min {100 * min(r['relative'] for r in runs):+.2f}%; instance grad share "
                      f"{100 * share:.2f}% +- {100 * share_half:.2f}", flush=True)
    else:
        from dataset_card.synthetic.shapes import write_synthetic_dataset

        with tempfile.TemporaryDirectory() as tmp:
            data = str(Path(tmp) / "shapes")
            write_synthetic_dataset(data, num_images=640, num_shards=10, size=(64, 64), seed=5)
            for seed in args.seeds:
                for offset_loss in args.losses:
                    results.append(tiny_run(offset_loss, seed, data, str(Path(tmp) / f"run-{offset_loss}-{seed}")))
                    print(json.dumps(results[-1]), f"# {time.perf_counter() - start:.0f} s", flush=True)
        for offset_loss in args.losses:
            runs = [r for r in results if r["loss"] == offset_loss]
            mean, half = interval([r["accuracy"] for r in runs])
            bar = runs[0]["baseline"] + 0.05
            print(f"SUMMARY {offset_loss}: masked-patch semantic accuracy {mean:.3f} +- {half:.3f} (95% t, "
                  f"{len(runs)} seeds), min {min(r['accuracy'] for r in runs):.3f}, sd "
                  f"{statistics.stdev([r['accuracy'] for r in runs]) if len(runs) > 1 else math.nan:.3f}; "
                  f"the test's bar {bar:.3f} passed in {sum(r['accuracy'] > bar for r in runs)}/{len(runs)}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
