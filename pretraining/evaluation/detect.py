"""COCO detection and instance segmentation with ViTDet's Mask R-CNN, scored by COCOeval box / mask AP.

The default recipe is ViTDet's ViT-B schedule (detectron2's `mask_rcnn_vitdet_b_100ep`): large-scale
jitter at 1024, 184375 iterations of batch 64 (100 epochs), AdamW lr 1e-4, weight decay 0.1,
layer-wise lr decay 0.7, drop path 0.1, 250 warm-up iterations, lr x 0.1 at 88.9% and 96.3%. The
model is `maskrcnn.py`; the data and the metric are `coco.py`; training is the resumable
iteration loop of `loop.py`. The run folder holds `checkpoint.pt`, `tb/`, `metrics.json` and
`detections.json` (the validation detections in COCO's result format).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import MultiStepLRScheduler
from torch.utils.data import DataLoader
from tqdm import tqdm

from pretraining.evaluation.coco import CocoData, DetectionSet, coco_ap, collate_lists, to_coco_results
from pretraining.evaluation.finetune import RunError, rank_world
from pretraining.evaluation.loop import layer_decay_groups, train_iterations
from pretraining.evaluation.maskrcnn import SimpleFeaturePyramid, mask_rcnn, windowed_vit
from pretraining.evaluation.transforms import detection_transform


@dataclass(frozen=True)
class DetectConfig:
    """Defaults: ViTDet's Mask R-CNN, ViT-B, 100 epochs of COCO (detectron2 `mask_rcnn_vitdet_b_100ep`)."""

    image_size: int = 1024
    scale_min: float = 0.1  # large-scale jitter: rescale to fit image_size x U(scale_min, scale_max)
    scale_max: float = 2.0
    iterations: int = 184375
    batch_size: int = 64  # global: per device x devices x accum_steps
    accum_steps: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.1
    layer_decay: float = 0.7
    drop_path: float = 0.1
    warmup_iters: int = 250
    warmup_factor: float = 0.001
    lr_steps: str = "163889,177546"  # iterations where lr drops x 0.1
    window_size: int = 14
    global_blocks: str = "2,5,8,11"
    rel_pos: bool = True  # ViTDet's decomposed relative position biases (zero-initialised)
    fpn_channels: int = 256
    box_fc: int = 1024
    head_convs: int = 4
    anchor_sizes: str = "32,64,128,256,512"
    proposals: int = 1000  # RPN proposals kept per image in training (2000 before NMS)
    rois_per_image: int = 512  # proposals sampled per image for the box and mask heads (25% positive)
    roi_aligned: bool = True  # RoIAlign with half-pixel-centred sampling (ViTDet's ROIAlignV2); False: torchvision's legacy
    score_thresh: float = 0.05  # detections kept for evaluation score at least this (ViTDet's test threshold)
    checkpoint_every: int = 5000
    eval_every: int = 0  # also score AP every N iterations (a multiple of checkpoint_every); 0: only at the end
    seed: int = 0
    num_workers: int = 8


def detect_vitdet_b() -> DetectConfig:
    return DetectConfig()


def detect_vitdet_l() -> DetectConfig:
    """ViTDet's ViT-L: layer decay 0.8, drop path 0.4, global attention in blocks 5, 11, 17, 23."""
    return DetectConfig(layer_decay=0.8, drop_path=0.4, global_blocks="5,11,17,23")


def detect_tiny() -> DetectConfig:
    """CPU twin: 64 px, 80 iterations of batch 4, a 32-channel pyramid, light heads, small anchors;
    every detection is scored (AP only ranks them), as an undertrained model's scores are low."""
    return DetectConfig(image_size=64, scale_min=0.8, scale_max=1.25, iterations=80, batch_size=4, lr=1e-3,
                        warmup_iters=4, lr_steps="60", window_size=4, global_blocks="1", fpn_channels=32, box_fc=64,
                        head_convs=0, anchor_sizes="8,16,32,64,128", proposals=100, rois_per_image=64,
                        score_thresh=0.0, checkpoint_every=40, num_workers=0)


RECIPES = {"vitdet_b": detect_vitdet_b, "vitdet_l": detect_vitdet_l, "tiny": detect_tiny}


def _ints(text: str, field: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise RunError(f"--set {field}={text}: expected comma-separated integers") from err


def build_detector(encoder: nn.Module, num_classes: int, cfg: DetectConfig, mean, std) -> nn.Module:
    """ViTDet's Mask R-CNN for `num_classes` classes on `encoder` (a plain timm ViT with its weights)."""
    depth = len(encoder.blocks)
    global_blocks = _ints(cfg.global_blocks, "global_blocks")
    if any(not 0 <= b < depth for b in global_blocks):
        raise RunError(f"--set global_blocks={cfg.global_blocks}: the encoder has blocks 0..{depth - 1}")
    try:
        vit = windowed_vit(encoder, cfg.image_size, cfg.window_size, global_blocks, cfg.drop_path, cfg.rel_pos)
        return mask_rcnn(SimpleFeaturePyramid(vit, cfg.fpn_channels), num_classes, cfg.image_size, mean, std,
                         cfg.box_fc, cfg.head_convs, _ints(cfg.anchor_sizes, "anchor_sizes"), cfg.proposals,
                         cfg.rois_per_image, cfg.score_thresh, cfg.roi_aligned)
    except ValueError as err:
        raise RunError(str(err)) from err


@torch.no_grad()
def evaluate_detector(model: nn.Module, loader: DataLoader, gt, cat_ids: list[int], device: torch.device,
                      progress: bool = False, verbose: bool = False) -> tuple[dict[str, float], list[dict]]:
    """Box and mask AP of `model` over the loader's (image, image_id) batches, gathered over ranks.

    Returns ({box_AP, box_AP50, ..., mask_AP, ...} in percent, the COCO result dicts); every rank
    gets the same numbers.
    """
    model.eval()
    results, image_ids = [], []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for images, ids in tqdm(loader, desc="COCO eval", disable=not progress, leave=False):
        with autocast:
            outputs = model([image.to(device) for image in images])
        for output, image_id in zip(outputs, ids):
            results += to_coco_results(output, image_id, cat_ids)
            image_ids.append(int(image_id))
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (results, image_ids))
        results = [r for part, _ in gathered for r in part]
        image_ids = [i for _, part in gathered for i in part]
    metrics = {}
    for iou_type, prefix in (("bbox", "box"), ("segm", "mask")):
        scores = coco_ap(gt, results, iou_type, image_ids, verbose=verbose)
        metrics.update({f"{prefix}_{k}": v for k, v in scores.items()})
    return metrics, results


def train_detection(model: nn.Module, data: CocoData, cfg: DetectConfig, output: str, device: torch.device,
                    progress: bool = True) -> dict:
    """Train `model` (from `build_detector`) on data.train, resuming from `output`; return box / mask
    AP on data.val (also written to output/metrics.json, with the detections in detections.json)."""
    rank, world = rank_world()
    train_set = DetectionSet(data.train, detection_transform(cfg.image_size, (cfg.scale_min, cfg.scale_max)))
    val_part = torch.utils.data.Subset(DetectionSet(data.val), range(rank, len(data.val), world))
    val_loader = DataLoader(val_part, batch_size=1, num_workers=cfg.num_workers, collate_fn=collate_lists)

    model.to(device)
    backbone = model.backbone.vit  # the ViT: layer-wise lr decay; everything else at the full lr
    rest = nn.ModuleDict({"neck_scales": model.backbone.scales, "neck_outputs": model.backbone.outputs,
                          "rpn": model.rpn, "roi_heads": model.roi_heads})
    groups = layer_decay_groups(backbone, cfg.weight_decay, cfg.layer_decay)
    groups += param_groups_weight_decay(rest, cfg.weight_decay)
    optimizer = create_optimizer_v2(groups, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = _ints(cfg.lr_steps, "lr_steps")
    scheduler = MultiStepLRScheduler(optimizer, decay_t=steps, decay_rate=0.1, warmup_t=cfg.warmup_iters,
                                     warmup_lr_init=cfg.lr * cfg.warmup_factor, warmup_prefix=False,
                                     t_in_epochs=False)  # steps count from iteration 0, as detectron2's
    config = {**asdict(cfg), "classes": list(data.class_names), "train_samples": len(data.train)}

    def loss_fn(net, batch) -> torch.Tensor:
        images, targets = batch
        losses = net([i.to(device, non_blocking=True) for i in images],
                     [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets])
        return sum(losses.values())

    def evaluate() -> dict[str, float]:
        scores, _ = evaluate_detector(model, val_loader, data.val.coco, data.val.cat_ids, device)
        return {"box_AP": scores["box_AP"], "mask_AP": scores["mask_AP"]}

    train_iterations(model, optimizer, scheduler, train_set, loss_fn, iterations=cfg.iterations,
                     batch_size=cfg.batch_size, accum_steps=cfg.accum_steps, checkpoint_every=cfg.checkpoint_every,
                     output=output, config=config, device=device, seed=cfg.seed, num_workers=cfg.num_workers,
                     collate_fn=collate_lists, eval_every=cfg.eval_every, evaluate=evaluate, name="detection",
                     progress=progress)
    metrics, results = evaluate_detector(model, val_loader, data.val.coco, data.val.cat_ids, device,
                                         progress and rank == 0, verbose=progress and rank == 0)
    metrics["iterations"] = cfg.iterations
    if rank == 0:
        with open(os.path.join(output, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        with open(os.path.join(output, "detections.json"), "w") as f:
            json.dump(results, f)
    return metrics
