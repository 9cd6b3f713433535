"""Benchmark: our instance labeler against segment_anything's SamAutomaticMaskGenerator.

Same model, same parameters, output_mode="coco_rle", a fresh stock generator per image (nothing
cached across images or repeats). Prints the stock generator's time split (encoder / decoder /
post-processing), a table, and as its last line `speedup=<ours/stock images/s> iou=<median
matched IoU>` for our fast mode (encoder batches, large prompt batches, bf16 on a GPU).

CPU regime (the default; post-processing dominates): the tiny random SAM (small encoder),
images with a 512 px long side, points_per_side=16:
    PYTHONPATH=. python benchmarks/instance_labeler.py
SAM's real input size without weights: a real architecture with random weights (`--checkpoint
random`: seeded, with `tiny_models.make_masks_local` so that prompts give local masks; at the
default thresholds 0.65 / 0.8 they keep tens to hundreds of masks an image):
    PYTHONPATH=. python benchmarks/instance_labeler.py --model vit_b --checkpoint random --size 1024 --images 2
A plain random checkpoint file gives every prompt one image-wide speckle (predicted IoU about 0.07,
stability 0): no threshold above those keeps a mask, and the table then says 0 masks.
GPU regime (needs the official checkpoint in the cache or --checkpoint):
    PYTHONPATH=. python benchmarks/instance_labeler.py --model vit_h --device cuda --points-per-side 32 \\
        --pred-iou-thresh 0.88 --stability-score-thresh 0.95 --semantic default
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import contextmanager

import cv2
import numpy as np
import skimage.data
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator

from labeling.labelers.checkpoints import load_sam
from labeling.labelers.instance import InstanceLabeler, InstanceLabelerConfig
from labeling.labelers.semantic import DEFAULT_SEMANTIC_MODEL, SemanticLabeler, SemanticLabelerConfig
from labeling.labelers.tiny_models import build_sam_random, build_tiny_random_models

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel",
          "motorcycle_left")


def bench_images(count: int, side: int) -> list[np.ndarray]:
    """`count` distinct photos (skimage.data, flipped copies after the first round), long side `side`."""
    photos = []
    for name in PHOTOS:
        try:
            photos.append(getattr(skimage.data, name)()[..., :3])
        except Exception:  # some skimage photos need a download; skip those offline
            continue
    out = []
    for i in range(count):
        image = photos[i % len(photos)]
        image = image[:, ::-1] if (i // len(photos)) % 2 else image
        h, w = image.shape[:2]
        scale = side / max(h, w)
        out.append(np.ascontiguousarray(cv2.resize(image, (round(w * scale), round(h * scale)),
                                                   interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _timed(obj, name: str, bucket: dict, key: str, device: torch.device):
    """Adds the wall time of every `obj.name(...)` call to bucket[key]."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        _sync(device)
        start = time.perf_counter()
        result = original(*args, **kwargs)
        _sync(device)
        bucket[key] += time.perf_counter() - start
        return result

    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        setattr(obj, name, original)


def run_stock(sam, images, params, device):
    split = {"encoder": 0.0, "decoder": 0.0}
    outputs, start = [], time.perf_counter()
    for image in images:
        generator = SamAutomaticMaskGenerator(sam, output_mode="coco_rle", **params)
        with _timed(generator.predictor, "set_image", split, "encoder", device), \
                _timed(generator.predictor.model.mask_decoder, "forward", split, "decoder", device), \
                _timed(generator.predictor.model.prompt_encoder, "forward", split, "decoder", device):
            outputs.append(generator.generate(image))
    _sync(device)
    total = time.perf_counter() - start
    split["post-processing"] = total - split["encoder"] - split["decoder"]
    return outputs, total, split


def run_ours(labeler, images, batch, device):
    outputs, start = [], time.perf_counter()
    for i in range(0, len(images), batch):
        outputs += labeler(images[i : i + batch])
    _sync(device)
    return outputs, time.perf_counter() - start


def matched_ious(reference: list[dict], ours: list[dict]) -> np.ndarray:
    """Greedy one-to-one IoU matching of stock masks to ours."""
    if not reference or not ours:
        return np.zeros(0)
    ref = [dict(r["segmentation"], counts=r["segmentation"]["counts"].encode()) for r in reference]
    out = [dict(r["rle"], counts=r["rle"]["counts"].encode()) for r in ours]
    iou = mask_utils.iou(ref, out, [0] * len(out))
    pairs, used_r, used_o = [], set(), set()
    for flat in np.argsort(-iou, axis=None):
        i, j = np.unravel_index(flat, iou.shape)
        if i not in used_r and j not in used_o:
            used_r.add(i), used_o.add(j), pairs.append(iou[i, j])
    return np.array(pairs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny (random twin), vit_b, vit_l or vit_h")
    parser.add_argument("--checkpoint", default=None,
                        help="SAM checkpoint path, or 'random' (seeded random weights with local masks; "
                             "default: the official file)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=512, help="long side of the test images in pixels")
    parser.add_argument("--points-per-side", type=int, default=16)
    parser.add_argument("--pred-iou-thresh", type=float, default=0.65)
    parser.add_argument("--stability-score-thresh", type=float, default=0.8)
    parser.add_argument("--encoder-batch-size", type=int, default=4, help="fast mode")
    parser.add_argument("--points-per-batch", type=int, default=None,
                        help="fast mode prompts per decoder call (default: 256 on CUDA, 64 on CPU)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="fast mode bf16 autocast (default: on for CUDA)")
    parser.add_argument("--semantic", default=None,
                        help="semantic model to time as well: a hub id, a path, 'default', or 'none' "
                             "(default: the tiny twin with --model tiny, else none)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tiny = build_tiny_random_models(tempfile.mkdtemp()) if args.model == "tiny" or args.semantic is None else None
    if args.model == "tiny":
        sam = load_sam(tiny.sam_model_type, tiny.sam_checkpoint).to(device)
    elif args.checkpoint == "random":
        sam = build_sam_random(args.model).to(device)
    else:
        sam = load_sam(args.model, args.checkpoint).to(device)
    semantic = args.semantic or ("tiny" if args.model == "tiny" else "none")
    semantic = {"tiny": tiny.semantic_model if tiny else None, "default": DEFAULT_SEMANTIC_MODEL}.get(semantic, semantic)
    params = dict(points_per_side=args.points_per_side, pred_iou_thresh=args.pred_iou_thresh,
                  stability_score_thresh=args.stability_score_thresh)
    bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    args.points_per_batch = args.points_per_batch or (256 if device.type == "cuda" else 64)
    images = bench_images(args.images, args.size)
    exact = InstanceLabeler(sam, InstanceLabelerConfig(**params, points_per_batch=64, encoder_batch_size=1, bf16=False),
                            device)
    fast = InstanceLabeler(sam, InstanceLabelerConfig(**params, encoder_batch_size=args.encoder_batch_size,
                                                      points_per_batch=args.points_per_batch, bf16=bf16), device)
    with torch.inference_mode():  # warm-up: first-call allocations and kernel selection
        SamAutomaticMaskGenerator(sam, output_mode="coco_rle", **params).generate(images[0])
    exact(images[:1]), fast(images[:1])

    stock_out, stock_s, split = run_stock(sam, images, params, device)
    rows = [("stock (SamAutomaticMaskGenerator)", stock_s, stock_out, None)]
    for name, labeler, batch in (("ours exact (fp32, encoder batch 1)", exact, 1),
                                 (f"ours fast (encoder batch {args.encoder_batch_size}, {args.points_per_batch} "
                                  f"prompts/call, {'bf16' if bf16 else 'fp32'})", fast, args.encoder_batch_size)):
        out, seconds = run_ours(labeler, images, batch, device)
        rows.append((name, seconds, out, np.concatenate([matched_ious(r, o) for r, o in zip(stock_out, out)])))

    n = len(images)
    shapes = sorted({im.shape[:2] for im in images})
    print(f"device={device} model={args.model} images={n} long_side={args.size} shapes={shapes[0]}..{shapes[-1]} "
          f"params={params}")
    print("stock time split: " + ", ".join(f"{k} {v:.2f} s ({100 * v / stock_s:.0f}%)" for k, v in split.items()))
    print(f"{'mode':<62} {'img/s':>8} {'s/img':>8} {'masks':>7} {'speedup':>8} {'median IoU':>10} {'min IoU':>8}")
    for name, seconds, out, ious in rows:
        masks = sum(map(len, out))
        med = "-" if ious is None or not len(ious) else f"{np.median(ious):.4f}"
        low = "-" if ious is None or not len(ious) else f"{ious.min():.4f}"
        print(f"{name:<62} {n / seconds:8.3f} {seconds / n:8.3f} {masks:7d} {stock_s / seconds:8.2f} {med:>10} {low:>8}")
    if semantic and semantic != "none":
        labeler = SemanticLabeler(semantic, SemanticLabelerConfig(batch_size=args.encoder_batch_size), device)
        labeler(images[:1])
        _sync(device)
        start = time.perf_counter()
        labeler(images)
        _sync(device)
        semantic_s = time.perf_counter() - start
        fast_s = rows[-1][1]
        print(f"semantic ({semantic}): {n / semantic_s:.3f} img/s; instance fast + semantic on one device: "
              f"{n / (fast_s + semantic_s):.3f} img/s")
    _, fast_s, fast_out, fast_ious = rows[-1]
    if not len(fast_ious):
        print(f"no masks matched (stock kept {sum(map(len, stock_out))}, ours {sum(map(len, fast_out))}): "
              "lower the thresholds, or use --checkpoint random for random weights")
    iou = f"{np.median(fast_ious):.4f}" if len(fast_ious) else "nan"
    print(f"speedup={stock_s / fast_s:.2f} iou={iou} masks={sum(map(len, fast_out))}")


if __name__ == "__main__":
    main()
