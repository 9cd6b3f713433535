"""Training speed on one GPU: C2FMAE, MultiMAE and MAE ViT-B steps in bf16, compile off and on,
(a) on synthetic batches already on the device and (b) fed by the real loader from a labeled folder.

    PYTHONPATH=. python benchmarks/train_gpu.py                 # a CUDA box: about 5 minutes
    PYTHONPATH=. python benchmarks/train_gpu.py --smoke         # any CPU: tiny models, seconds

Needs only torch, torchvision, timm, numpy, pyarrow, pillow and zstandard (no ray, datasets or
pycocotools): the labeled folder is written with pyarrow directly (ImageNet-sized JPEGs, realistic
label maps: Voronoi regions as instances, coarser ones as semantic classes, encoded as the contract
stores them),
and opened without the contract check that `datasets` would do (the benchmark wrote it).

One step is forward (bf16 autocast) + backward + fused AdamW, as `pretraining.train` runs it. Rows:
images/s, ms per step, MFU (forward+backward FLOPs per image, counted by torch's FlopCounterMode,
times images/s, over the bf16 matmul peak measured on this device at the start), the share of
wall time spent waiting for the next batch (loader rows), and peak device memory. Ratios printed
beside them: each model's step time over MAE's (same input and compile setting), and each
loader-fed rate over the synthetic rate of the same model and compile setting. The last line holds
key=value figures. The issue's targets: C2FMAE ViT-B >= 4,000 images/s per H100 synthetic, loader-fed
>= 90% of that, C2FMAE/MAE step time <= 1.10.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from benchmarks.pretrain_step import make_batch, with_visible
from dataset_card.contract import codecs, layout
from dataset_card.contract.schema import semantic_ignore_value
from pretraining.data.augment import AugmentConfig
from pretraining.data.loader import DataConfig, LabeledDataset, PretrainingLoader, SampleSpec, Unit
from pretraining.data.prefetch import DevicePrefetcher
from pretraining.models.curriculum import curriculum_weights
from pretraining.models.factory import create_model

FAMILIES = {"c2fmae": "c2fmae_vit_{}_patch16", "multimae": "multimae_vit_{}_patch16",
            "mae": "mae_vit_{}_patch16_dec512d8b"}
NUM_CLASSES = 133  # COCO panoptic's taxonomy, as benchmarks/pretrain_step.py


# ---------------------------------------------------------------------------------------------
# A labeled folder, written with pyarrow only


def scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A photo-like image with region label maps: RGB (H, W, 3) uint8, semantic (H, W) uint8 (a coarse
    Voronoi partition, one class per cell), instances (H, W) uint8 (a fine partition inside it; 0 on
    "stuff" cells). Cells are computed at half resolution and upsampled, so borders are 2-px steps."""
    h, w = height // 2 + 1, width // 2 + 1
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    def cells(n: int) -> np.ndarray:
        seeds = rng.uniform([0, 0], [h, w], size=(n, 2)).astype(np.float32)
        d = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2  # (h, w, n)
        return d.argmin(-1)

    coarse, fine = cells(int(rng.integers(4, 10))), cells(int(rng.integers(20, 80)))
    classes = rng.integers(0, NUM_CLASSES, coarse.max() + 1)
    semantic = classes[coarse].astype(np.uint8)
    stuff = rng.random(coarse.max() + 1) < 0.4
    instance = np.where(stuff[coarse], 0, fine + 1).astype(np.uint8)
    colours = rng.integers(0, 256, (fine.max() + 1, 3))
    rgb = colours[fine] * 0.7 + rng.normal(0, 25, (h, w, 3)) + 0.3 * colours[coarse % len(colours)]
    up = (slice(None, height), slice(None, width))
    big = lambda a: a.repeat(2, 0).repeat(2, 1)[up]  # noqa: E731
    return big(rgb.clip(0, 255).astype(np.uint8)), big(semantic), big(instance)


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_folder(root: Path, num_rows: int, unique: int, size: tuple[int, int], seed: int = 0) -> LabeledDataset:
    """`num_rows` rows (the `unique` distinct scenes repeated) in row groups of 64, in the contract's
    columns (JPEG image, label maps as {"bytes", "path"} structs), and the LabeledDataset over them."""
    rng = np.random.default_rng(seed)
    encoded = []
    for _ in range(unique):
        rgb, semantic, instance = scene(rng, *size)
        encoded.append((_jpeg(rgb), codecs.encode_mask(semantic), codecs.encode_instance_mask(instance)))
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [encoded[i % unique] for i in range(num_rows)]
    table = pa.table({
        "image": pa.array([{"bytes": r[0], "path": f"{i}.jpg"} for i, r in enumerate(rows)], image),
        "semantic_mask": pa.array([{"bytes": r[1], "path": None} for r in rows], image),
        "instance_mask": pa.array([{"bytes": r[2], "path": None} for r in rows], image),
        "label": pa.array(rng.integers(0, 1000, num_rows), pa.int64()),
    })
    (root / "data").mkdir(parents=True, exist_ok=True)
    path = root / "data" / "train-00000-of-00001.parquet"
    pq.write_table(table, path, row_group_size=64)
    groups = pq.ParquetFile(path).metadata
    units, first = [], 0
    for g in range(groups.num_row_groups):
        n = groups.row_group(g).num_rows
        units.append(Unit(0, g, 0, n, first))
        first += n
    metadata = layout.DatasetMetadata(tuple(f"class{i}" for i in range(1000)),
                                      tuple(layout.SemanticClass(i, f"c{i}", True) for i in range(NUM_CLASSES)))
    return LabeledDataset(str(root), (str(path),), tuple(units), metadata)


# ---------------------------------------------------------------------------------------------
# Timing


@dataclass
class Result:
    model: str
    source: str  # synthetic | loader
    compiled: bool
    batch_size: int
    step_s: float
    images_per_s: float
    mfu: float
    data_wait: float  # share of wall time waiting for the next batch
    peak_gib: float


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 20) -> float:
    """Measured dense matmul FLOP/s at n x n x n (the MFU denominator)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_backward_flops(name: str, overrides: dict) -> float:
    """Forward + backward FLOPs of one image (matmuls and attention), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = create_model(name, num_semantic_classes=NUM_CLASSES, **overrides)
    batch = {k: v.to("meta") for k, v in with_visible(model, make_batch(1, model.cfg.img_size)).items()}
    with FlopCounterMode(display=False) as counter:
        model(batch).loss.backward()
    return counter.get_total_flops()


class Stepper:
    """One model's training step: forward under autocast, backward, AdamW (fused on CUDA)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, compiled: bool, dtype: torch.dtype | None):
        self.model, self.device, self.dtype = model, device, dtype
        self.module = torch.compile(model) if compiled else model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def __call__(self, batch: dict[str, torch.Tensor]) -> None:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = self.module(batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def time_synthetic(stepper: Stepper, batch: dict[str, torch.Tensor], steps: int, warmup: int) -> tuple[float, float]:
    """(seconds per step, data-wait share 0) over `steps` steps on one batch already on the device."""
    for _ in range(warmup):
        stepper(batch)
    _sync(stepper.device)
    start = time.perf_counter()
    for _ in range(steps):
        stepper(batch)
    _sync(stepper.device)
    return (time.perf_counter() - start) / steps, 0.0


def time_loader(stepper: Stepper, loader: PretrainingLoader, steps: int, warmup: int) -> tuple[float, float]:
    """(seconds per step, share of wall time the host was blocked on the loader) over `steps`
    loader-fed steps, as `pretraining.train` runs them: side-stream prefetch, `Batch.to` on the
    device, the step. (The GPU may still be running the previous step while the host waits; the
    loader-fed over synthetic rate is the measure of what the loader costs.)"""
    spec = loader.stream.spec
    weights = curriculum_weights(0.5, spec.masking.curriculum)  # all three strategies in play
    batches = iter(DevicePrefetcher(loader, stepper.device))
    waited, start = 0.0, None
    for i in range(warmup + steps):
        if i == warmup:
            _sync(stepper.device)
            waited, start = 0.0, time.perf_counter()
        t = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - t
        stepper(batch.to(stepper.device, weights))
    _sync(stepper.device)
    elapsed = time.perf_counter() - start
    return elapsed / steps, waited / elapsed


def run(args: argparse.Namespace) -> list[Result]:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    peak = matmul_peak(device, torch.bfloat16 if device.type == "cuda" else torch.float32, args.peak_n)
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; measured "
          f"{'bf16' if dtype else 'fp32'} matmul peak {peak / 1e12:.3g} TFLOP/s at n={args.peak_n}", flush=True)
    overrides = {"img_size": args.img_size, "semantic_head_fp32": args.semantic_head_fp32 == "on",
                 **({"depth": 2, "decoder_depth": 1} if args.smoke else {})}
    compile_modes = [{"off": False, "on": True}[c] for c in args.compile.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        dataset = None
        if args.loader_steps:
            rows = args.batch_size * (args.loader_steps + args.warmup + 2)
            dataset = write_folder(Path(tmp), rows, min(args.unique, rows), tuple(args.image_size))
        for family in args.models.split(","):
            name = FAMILIES[family].format(args.size)
            flops = forward_backward_flops(name, overrides)
            torch.manual_seed(0)
            model = create_model(name, num_semantic_classes=NUM_CLASSES, **overrides).to(device)
            synthetic = {k: v.to(device) for k, v in with_visible(model, make_batch(args.batch_size, args.img_size)).items()}
            loader_spec = SampleSpec(img_size=model.cfg.img_size, patch_size=model.cfg.patch_size,
                                     modalities=model.cfg.modalities, masking=model.cfg.masking,
                                     augment=AugmentConfig(), ignore_value=semantic_ignore_value(NUM_CLASSES),
                                     seed=0, epochs=1000,
                                     instance_offset_unit=model.cfg.offset_unit_pixels)
            loader_cfg = DataConfig(batch_size=args.batch_size, num_workers=args.workers, shuffle_buffer=256,
                                    prefetch_factor=4 if args.workers else 2)
            for compiled in compile_modes:
                stepper = Stepper(model, device, compiled, dtype)
                for source in ["synthetic", *(["loader"] if dataset is not None else [])]:
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    if source == "synthetic":
                        step_s, wait = time_synthetic(stepper, synthetic, args.steps, args.warmup)
                    else:
                        loader = PretrainingLoader(dataset, loader_spec, loader_cfg,
                                                   pin_memory=device.type == "cuda")
                        step_s, wait = time_loader(stepper, loader, args.loader_steps, args.warmup)
                    rate = args.batch_size / step_s
                    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
                    results.append(Result(family, source, compiled, args.batch_size, step_s, rate,
                                          flops * rate / peak, wait, peak_gib))
                    print(f"  {family} {source} compile={'on' if compiled else 'off'}: {rate:.1f} images/s",
                          flush=True)
            del model, synthetic, stepper
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


def report(results: list[Result]) -> None:
    by = {(r.model, r.source, r.compiled): r for r in results}
    print(f"\n{'model':9} {'input':14} {'compile':7} {'batch':>5} {'images/s':>9} {'ms/step':>8} {'MFU':>6} "
          f"{'wait':>5} {'peak GiB':>8} {'/mae':>5} {'/synth':>6}")
    for r in results:
        mae = by.get(("mae", r.source, r.compiled))
        synth = by.get((r.model, "synthetic", r.compiled))
        print(f"{r.model:9} {r.source:14} {'on' if r.compiled else 'off':7} {r.batch_size:>5} {r.images_per_s:>9.4g} "
              f"{r.step_s * 1e3:>8.1f} {r.mfu:>6.1%} {r.data_wait:>5.1%} {r.peak_gib:>8.1f} "
              f"{r.step_s / mae.step_s if mae else float('nan'):>5.2f} "
              f"{r.images_per_s / synth.images_per_s if synth else float('nan'):>6.2f}")
    figures = {}
    for compiled in (True, False):  # the compiled figures when there are any
        c2f = [r for r in results if r.model == "c2fmae" and r.compiled == compiled]
        if not c2f:
            continue
        synth = by.get(("c2fmae", "synthetic", compiled))
        loaders = [r for r in results if r.model == "c2fmae" and r.source != "synthetic" and r.compiled == compiled]
        loader = max(loaders, key=lambda r: r.images_per_s) if loaders else None
        mae = by.get(("mae", "synthetic", compiled))
        figures = {"compile": "on" if compiled else "off",
                   "c2fmae_images_per_s": f"{synth.images_per_s:.4g}", "c2fmae_mfu": f"{synth.mfu:.3g}"}
        if loader:
            figures.update(c2fmae_loader_images_per_s=f"{loader.images_per_s:.4g}",
                           loader_over_synthetic=f"{loader.images_per_s / synth.images_per_s:.3f}",
                           data_wait_share=f"{loader.data_wait:.3f}")
        if mae:
            figures["c2fmae_over_mae_step_time"] = f"{synth.step_s / mae.step_s:.3f}"
        figures["peak_gib"] = f"{synth.peak_gib:.1f}"
        break
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="CPU check of the whole script: tiny 2-block models at 64 px, batch 4, 2 steps, compile off")
    parser.add_argument("--device", default=None, help="default: cuda when there is one (cpu with --smoke)")
    parser.add_argument("--models", default="c2fmae,multimae,mae")
    parser.add_argument("--size", default="base")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256, help="per-step batch (default 256, MAE's per-GPU)")
    parser.add_argument("--steps", type=int, default=20, help="timed synthetic steps")
    parser.add_argument("--loader-steps", type=int, default=15, help="timed loader-fed steps (0: no loader rows)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--compile", default="off,on", help="off, on, or off,on")
    parser.add_argument("--decode", default=None, help=argparse.SUPPRESS)  # removed: refused below
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="loader workers")
    parser.add_argument("--unique", type=int, default=512, help="distinct scenes in the folder (rows repeat them)")
    parser.add_argument("--image-size", type=int, nargs=2, default=(375, 500), help="stored image H W")
    parser.add_argument("--peak-n", type=int, default=8192, help="matmul size for the measured peak")
    parser.add_argument("--semantic-head-fp32", choices=("on", "off"), default="on",
                        help="the semantic head's logits in fp32 under autocast (the factories' default, on); run "
                             "once with each to measure what it costs (docs/DESIGN.md estimates about 1%%)")
    args = parser.parse_args(argv)
    if args.decode is not None:
        parser.error("--decode was removed: the loader decodes every image in its workers (docs/training.md says "
                     "why); drop the flag, and set --workers for more of them.")
    if args.smoke:
        args.device = args.device or "cpu"
        args.size, args.img_size, args.batch_size, args.steps, args.loader_steps = "tiny", 64, 4, 2, 2
        args.warmup, args.compile, args.workers, args.unique, args.image_size, args.peak_n = 1, "off", 0, 4, (96, 128), 256
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(args.device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    report(run(args))


if __name__ == "__main__":
    main()
