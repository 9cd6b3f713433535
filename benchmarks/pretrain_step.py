"""Cost of one pretraining step: C2FMAE vs MultiMAE vs MAE, recipe defaults, same encoder and batch.

    PYTHONPATH=. python benchmarks/pretrain_step.py [--batch-size 4] [--repeats 5] [--threads 1]

Prints, per model: visible tokens, decoder shape, forward+backward+AdamW step time on CPU at
tiny and small size (models interleaved, best of `--repeats`: the CPU is shared, so the
least-disturbed run is the measurement), forward+backward FLOPs at base
(torch's FlopCounterMode, on the meta device so nothing is allocated), and on a GPU, when one is
available, base images/s in bf16 autocast. The last line holds the ratios the issue asks for.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from pretraining.models.autoencoder import MaskedAutoencoder
from pretraining.models.factory import create_model
from pretraining.models.instances import instance_representation

FAMILIES = {"c2fmae": "c2fmae_vit_{}_patch16", "multimae": "multimae_vit_{}_patch16",
            "mae": "mae_vit_{}_patch16_dec512d8b"}
NUM_CLASSES = 133  # COCO panoptic, MultiMAE's and our default semantic model's taxonomy


def make_batch(batch_size: int, img_size: int = 224, device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # Blocky label maps, so guided masking finds regions as it would on real pseudo-labels.
    blocks = torch.randint(0, 8, (batch_size, img_size // 32, img_size // 32), generator=g)
    ids = blocks.repeat_interleave(32, 1).repeat_interleave(32, 2)  # (B, H, W)
    batch = {
        "rgb": torch.randn(batch_size, 3, img_size, img_size, generator=g),
        "semantic": ids * 7 % NUM_CLASSES,
        "instance_ids": ids,
        "instance": torch.stack([instance_representation(i) for i in ids]),
    }
    return {k: v.to(device) for k, v in batch.items()}


def describe(model: MaskedAutoencoder) -> str:
    cfg = model.cfg
    if cfg.decoder == "mae":
        return f"mae 1 x ({cfg.decoder_dim}d x {cfg.decoder_depth}b)"
    return f"{cfg.decoder} {len(cfg.modalities)} x ({cfg.decoder_dim}d x (1 xattn + {cfg.decoder_depth}b))"


def with_visible(model: MaskedAutoencoder, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The loader draws masks in its workers, so the step under test starts from a batch that has them."""
    return model.mask_batch(batch, torch.Generator().manual_seed(0))


def step_times(size: str, batch_size: int, repeats: int) -> dict[str, float]:
    """Best seconds of forward + backward + AdamW step per family, run interleaved."""
    torch.manual_seed(0)
    batch = make_batch(batch_size)
    models = {f: create_model(n.format(size), num_semantic_classes=NUM_CLASSES) for f, n in FAMILIES.items()}
    batches = {f: with_visible(m, batch) for f, m in models.items()}
    optimizers = {f: torch.optim.AdamW(m.parameters(), lr=1e-4) for f, m in models.items()}
    times: dict[str, list[float]] = {f: [] for f in models}
    for r in range(repeats + 1):  # the first round warms up
        for f, model in models.items():
            start = time.perf_counter()
            loss = model(batches[f]).loss
            optimizers[f].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[f].step()
            if r:
                times[f].append(time.perf_counter() - start)
    return {f: min(t) for f, t in times.items()}


def flops(size: str) -> dict[str, int]:
    """Forward + backward FLOPs of one 224 px image, counted on the meta device."""
    out = {}
    for f, name in FAMILIES.items():
        with torch.device("meta"):
            model = create_model(name.format(size), num_semantic_classes=NUM_CLASSES)
        batch = with_visible(model, make_batch(1))
        batch = {k: v.to("meta") for k, v in batch.items()}
        with FlopCounterMode(display=False) as counter:
            model(batch).loss.backward()
        out[f] = counter.get_total_flops()
    return out


def gpu_images_per_s(size: str, batch_size: int, steps: int = 10) -> dict[str, float]:
    """bf16-autocast images/s of forward + backward + AdamW on the current CUDA device."""
    out = {}
    for f, name in FAMILIES.items():
        torch.manual_seed(0)
        model = create_model(name.format(size), num_semantic_classes=NUM_CLASSES).cuda()
        batch = {k: v.cuda() for k, v in with_visible(model, make_batch(batch_size)).items()}
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        for i in range(steps + 3):
            if i == 3:
                torch.cuda.synchronize()
                start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        torch.cuda.synchronize()
        out[f] = steps * batch_size / (time.perf_counter() - start)
        del model, optimizer, batch
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4, help="CPU batch size (default 4)")
    parser.add_argument("--repeats", type=int, default=5, help="timed CPU steps per model (best; default 5)")
    parser.add_argument("--gpu-batch-size", type=int, default=128, help="GPU batch size at base (default 128)")
    parser.add_argument("--sizes", default="tiny,small", help="CPU sizes to time (default tiny,small)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads (default: torch's); use 1 on a shared machine, where spinning threads "
                             "of other jobs make multi-threaded timings erratic")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"{'model':34s} {'visible':>7s}  decoder")
    for name in FAMILIES.values():
        with torch.device("meta"):
            model = create_model(name.format("base"), num_semantic_classes=NUM_CLASSES)
        print(f"{name.format('base'):34s} {model.cfg.masking.num_visible:7d}  {describe(model)}")

    print(f"\nCPU forward+backward+AdamW, batch {args.batch_size}, {torch.get_num_threads()} threads (best s/step)")
    sizes = args.sizes.split(",")
    times = {s: step_times(s, args.batch_size, args.repeats) for s in sizes}
    print(f"{'size':6s} " + " ".join(f"{f:>10s}" for f in FAMILIES) + "  c2fmae/mae  multimae/mae")
    for s, t in times.items():
        print(f"{s:6s} " + " ".join(f"{t[f]:10.3f}" for f in FAMILIES)
              + f"  {t['c2fmae'] / t['mae']:10.2f}  {t['multimae'] / t['mae']:11.2f}")

    counted = flops("base")
    print("\nforward+backward GFLOPs per image at base: "
          + ", ".join(f"{f} {v / 1e9:.1f}" for f, v in counted.items()))

    if torch.cuda.is_available():
        rates = gpu_images_per_s("base", args.gpu_batch_size)
        print(f"\n{torch.cuda.get_device_name()} bf16 images/s at base, batch {args.gpu_batch_size}: "
              + ", ".join(f"{f} {v:.0f}" for f, v in rates.items()))

    at = times.get("small", times[sizes[-1]])
    print(f"c2fmae_over_mae={at['c2fmae'] / at['mae']:.2f} flops_ratio={counted['c2fmae'] / counted['mae']:.2f} "
          f"multimae_over_mae={at['multimae'] / at['mae']:.2f}")


if __name__ == "__main__":
    main()
