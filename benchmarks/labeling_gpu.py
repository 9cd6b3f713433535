"""Throughput of one model actor: SAM ViT-H (32 x 32 points) + Mask2Former Swin-L on one GPU.

    PYTHONPATH=. python benchmarks/labeling_gpu.py            # CUDA, the real architectures: 2-5 minutes
    PYTHONPATH=. python benchmarks/labeling_gpu.py --smoke    # CPU, the tiny twins: seconds (CI runs it)

What runs is what a model actor runs per batch (`labeling.labelers.paired.PairedLabeler`): JPEG
bytes in; decoding, shrinking and both models' input preparation in a thread pool; SAM's encoder in
fixed-size bf16 calls with fused attention, its prompts in fixed-size decoder calls, filters, NMS,
upsampling and RLE run boundaries on the device; the semantic model in fp16 with its class map at
the image's size; RLE strings and cleanup back in the pool. With `--processes` (the default on
CUDA, as the model actor on a GPU) decoding and SAM's CPU half run in processes of the labeler's own
(`labelers.child_pool`: `DecodePool`, `FinishPool`, one per thread), the pool's threads handing
them the work; without, in the threads themselves. It imports neither `ray` nor `datasets`:
torch, torchvision, transformers, segment-anything, pycocotools, opencv and pyarrow suffice.

Weights are random at the real architectures, so nothing is downloaded: SAM from
segment_anything's `sam_model_registry` builder, Mask2Former from transformers' config of
facebook/mask2former-swin-large-coco-panoptic (Swin-L: 192 wide, depths 2-2-18-2, 6-48 heads,
window 12; 200 queries, 133 classes) with its processor's published form. Model time does not
depend on the weights; post-processing does (how many candidates pass each filter, how big the
masks are). Plain random SAM weights give every prompt the same image-wide speckle, so SAM's
decoder gets `tiny_models.make_masks_local` (prompts then give local masks, as a trained SAM's
do); the masks kept per image are printed, to compare with a real checkpoint's load.

Images: synthetic JPEGs at ImageNet's most common sizes (500 x 375, 375 x 500, 500 x 333, 333 x 500,
500 x 500, 500 x 400), smooth colour fields with texture, so decoding costs what ImageNet's does.

After a warm-up batch, two passes over the same images:
  throughput  the labeler as an actor runs it (threads overlap the device, no syncs): images/s;
  stages      the device synchronised at every stage boundary: each stage's seconds per image and
              its share of their sum (CPU stages overlap the device in the throughput pass, so the
              shares say where the time goes, not what the wall clock adds up to).
Last line: `images_per_s=... sam_share=... semantic_share=... masks_per_image=...`.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

# ImageNet's most common sizes (width, height), in proportion to how often they occur, roughly.
IMAGENET_SIZES = ((500, 375), (500, 375), (500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (500, 400))
SAM_STAGES = ("encoder", "decoder", "filter", "masks")
STAGE_NAMES = {"decode": "decode + prepare (CPU threads)", "encoder": "SAM encoder", "decoder": "SAM decoder",
               "filter": "SAM filters: IoU, stability, boxes, NMS", "masks": "SAM masks: upsample + RLE runs, one copy",
               "finish": "SAM finish: RLE strings, cleanup (CPU)", "semantic model": "semantic model",
               "class map": "semantic class map at image size"}


def synthetic_jpegs(count: int, scale: float, seed: int = 0) -> list[bytes]:
    """`count` JPEGs (quality 90) at IMAGENET_SIZES times `scale`: smooth fields plus texture."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        width, height = (max(8, round(side * scale)) for side in IMAGENET_SIZES[i % len(IMAGENET_SIZES)])
        coarse = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 12, (height, width, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def swin_large_mask2former(folder: str) -> str:
    """A randomly initialised Mask2Former with facebook/mask2former-swin-large-coco-panoptic's
    architecture and processor form, saved in `folder` (loaded back like a real checkpoint)."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    backbone = SwinConfig(image_size=384, patch_size=4, embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48],
                          window_size=12, drop_path_rate=0.3, out_features=["stage1", "stage2", "stage3", "stage4"])
    id2label = {i: f"class_{i}" for i in range(133)}  # COCO panoptic: 80 things, then 53 stuff
    config = Mask2FormerConfig(backbone_config=backbone, use_pretrained_backbone=False, num_queries=200,
                               id2label=id2label, label2id={v: k for k, v in id2label.items()})
    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(config).save_pretrained(folder)
    Mask2FormerImageProcessor(size={"height": 384, "width": 384}, size_divisor=32, ignore_index=255,
                              num_labels=133).save_pretrained(folder)
    return folder


def build_labeler(args, device: torch.device, folder: str):
    from labeling.labelers.checkpoints import load_sam
    from labeling.labelers.instance import InstanceLabeler, InstanceLabelerConfig
    from labeling.labelers.paired import PairedLabeler
    from labeling.labelers.semantic import SemanticLabeler, SemanticLabelerConfig
    from labeling.labelers.tiny_models import build_sam_random, build_tiny_random_models

    if args.smoke:
        tiny = build_tiny_random_models(folder)
        sam, semantic_model, max_side, shortest_edge = load_sam(tiny.sam_model_type, tiny.sam_checkpoint), \
            tiny.semantic_model, 256, 128
    else:
        sam, semantic_model = build_sam_random(args.sam), swin_large_mask2former(os.path.join(folder, "mask2former"))
        max_side, shortest_edge = 1024, 640
    instance = InstanceLabeler(sam, InstanceLabelerConfig(
        points_per_side=args.points_per_side, pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_score_thresh, min_mask_region_area=args.min_mask_region_area,
        max_mask_fraction=0.95, encoder_batch_size=args.encoder_batch_size, points_per_batch=args.points_per_batch,
        compile=args.compile), device)
    semantic = SemanticLabeler(semantic_model, SemanticLabelerConfig(batch_size=args.semantic_batch_size,
                                                                     shortest_edge=shortest_edge), device)
    decoder = finisher = None
    if args.processes:  # as the model actor on a GPU (`labeling.pipeline.predictors`)
        from labeling.labelers.child_pool import DecodePool, FinishPool

        decoder = DecodePool(args.threads, 100_000_000, max_side)
        finisher = FinishPool(args.threads, instance.cfg)
    return PairedLabeler(instance, semantic, max_side=max_side, threads=args.threads, decoder=decoder,
                         finisher=finisher)


def timed_finish(labeler, clock) -> None:
    """Charge the instance labeler's CPU half (in the pool's threads or processes) to `clock`; the
    labeler's `close` still closes its finishing processes."""
    finish, lock = labeler.finisher or labeler.instance.finish, threading.Lock()

    def wrapper(result):
        start = time.perf_counter()
        out = finish(result)
        with lock:
            clock.seconds["finish"] += time.perf_counter() - start
        return out

    if labeler.finisher is None:
        labeler.instance.finish = wrapper
    else:
        wrapper.close = finish.close
        labeler.finisher = wrapper


def run(labeler, images: list[bytes], batch_size: int, device: torch.device) -> tuple[float, list]:
    start, results = time.perf_counter(), []
    for i in range(0, len(images), batch_size):
        results += labeler(images[i : i + batch_size])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    bad = [r for r in results if isinstance(r, BaseException)]
    if bad:
        raise RuntimeError(f"{len(bad)} images failed: {bad[0]}")
    return time.perf_counter() - start, results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="the tiny twins on the CPU, a few small images (seconds)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    p.add_argument("--sam", default="vit_h", choices=("vit_h", "vit_l", "vit_b"))
    p.add_argument("--images", type=int, default=None, help="images per pass (default 64; 6 with --smoke)")
    p.add_argument("--batch-size", type=int, default=None, help="images per labeler call, as --model-batch-size "
                   "(default 16; 3 with --smoke)")
    p.add_argument("--points-per-side", type=int, default=None, help="default 32 (8 with --smoke)")
    p.add_argument("--pred-iou-thresh", type=float, default=None, help="default 0.88 (0.65 with --smoke)")
    p.add_argument("--stability-score-thresh", type=float, default=None, help="default 0.95 (0.8 with --smoke)")
    p.add_argument("--min-mask-region-area", type=int, default=100, help="SA-1B's cleanup, as the default preset")
    p.add_argument("--encoder-batch-size", type=int, default=None, help="default: the labeler's (4 on CUDA)")
    p.add_argument("--points-per-batch", type=int, default=None, help="default: the labeler's (256 on CUDA)")
    p.add_argument("--semantic-batch-size", type=int, default=None,
                   help="images per semantic forward pass, fillers included (default: the labeler's, 2 on CUDA, 1 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile SAM's encoder and decoder call")
    p.add_argument("--threads", type=int, default=4, help="CPU threads of the labeler's pool")
    p.add_argument("--processes", action=argparse.BooleanOptionalAction, default=None,
                   help="decoding and SAM's CPU half in processes of the labeler's own, one per thread (default: on "
                   "CUDA, as the model actor)")
    args = p.parse_args(argv)
    smoke = args.smoke
    defaults = {"images": (64, 6), "batch_size": (16, 3), "points_per_side": (32, 8), "pred_iou_thresh": (0.88, 0.65),
                "stability_score_thresh": (0.95, 0.8)}
    for name, (real, tiny) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if smoke else real)
    device = torch.device(args.device or ("cpu" if smoke else "cuda"))
    if args.processes is None:
        args.processes = device.type == "cuda"
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; run with --smoke (CPU, tiny twins) or on a GPU machine", file=sys.stderr)
        return 2
    if smoke:
        torch.set_num_threads(1)

    from labeling.labelers.timing import StageClock

    folder = tempfile.mkdtemp(prefix="labeling-gpu-")
    start = time.perf_counter()
    labeler = build_labeler(args, device, folder)
    build_s = time.perf_counter() - start
    images = synthetic_jpegs(args.images, 0.5 if smoke else 1.0)
    start = time.perf_counter()
    run(labeler, images[: args.batch_size], args.batch_size, device)  # warm-up: allocations, kernel choice, compile
    warm_s = time.perf_counter() - start

    fillers = labeler.semantic.fillers
    seconds, results = run(labeler, images, args.batch_size, device)
    fillers = labeler.semantic.fillers - fillers
    masks = [len(r.masks) for r in results]

    clock = StageClock(device, sync=True)
    labeler.instance.clock = labeler.semantic.clock = clock
    timed_finish(labeler, clock)
    _, staged = run(labeler, images, args.batch_size, device)
    clock.seconds["decode"] = sum(r.seconds["decode"] for r in staged)
    total = sum(clock.seconds.values())
    labeler.close()

    n = len(images)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    sizes = sorted({Image.open(io.BytesIO(b)).size for b in images})
    print(f"labeling_gpu {date.today()}: {device} ({gpu}), torch {torch.__version__}, "
          f"{'tiny twins (smoke)' if smoke else f'SAM {args.sam} + Mask2Former Swin-L'} with random weights")
    print(f"images={n} sizes={sizes[0]}..{sizes[-1]} batch={args.batch_size} points={args.points_per_side}x"
          f"{args.points_per_side} thresholds=({args.pred_iou_thresh}, {args.stability_score_thresh}) "
          f"semantic_batch={labeler.semantic.batch_size} compile={args.compile} processes={args.processes}; not timed: build {build_s:.1f} s, "
          f"warm-up {warm_s:.1f} s")
    print(f"throughput: {n} images in {seconds:.2f} s = {n / seconds:.2f} images/s (decode, both models, RLE)")
    print(f"masks kept per image: mean {np.mean(masks):.1f}, min {min(masks)}, max {max(masks)}")
    print(f"semantic passes: {fillers} filler images beside {n} images (buckets {labeler.semantic.buckets})")
    print(f"{'stage (device synchronised at each boundary)':<48}{'ms/image':>10}{'share':>8}")
    for key, name in STAGE_NAMES.items():
        value = clock.seconds.get(key, 0.0)
        print(f"{name:<48}{1000 * value / n:>10.1f}{value / total:>8.1%}")
    sam_share = sum(clock.seconds.get(k, 0.0) for k in (*SAM_STAGES, "finish")) / total
    semantic_share = (clock.seconds.get("semantic model", 0.0) + clock.seconds.get("class map", 0.0)) / total
    print(f"images_per_s={n / seconds:.3f} sam_share={sam_share:.3f} semantic_share={semantic_share:.3f} "
          f"masks_per_image={np.mean(masks):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
