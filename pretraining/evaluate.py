"""Downstream evaluation of a pretrained encoder: `python -m pretraining.evaluate COMMAND --help`.

  linear-probe  MAE's linear probe on the frozen encoder (top-1 / top-5; --config cached: the fast variant)
  knn           weighted k-NN on frozen features (top-1 / top-5)
  finetune      end-to-end fine-tuning with MAE's recipe (resumable; single device or torchrun)
  segment       UperNet on ADE20K as MAE (mIoU; --config linear: the fast probe; resumable)
  detect        ViTDet's Mask R-CNN on COCO (box / mask AP; resumable)
  vitdet        convert the encoder to a detectron2 ViTDet backbone checkpoint

The encoder is a timm model: `--model local-dir:DIR` (a folder with config.json + model.safetensors, as
`python -m pretraining.export --to timm` writes), or a timm architecture with `--checkpoint FILE`
(safetensors or a torch file), or an architecture with `--random-init` (the baseline). Each command
takes `--config NAME` (a recipe) and `--set key=value` overrides, and prints its metric. Under
`torchrun --nproc_per_node N -m pretraining.evaluate ...` the work is spread over N GPUs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import create_transform
from torch.utils.data import DataLoader

from dataset_card.contract.schema import SchemaError
from pretraining.evaluation import detect, finetune, linear_probe, probe, segment, vitdet
from pretraining.evaluation.backbones import UserError, load_timm_model, setup_device
from pretraining.evaluation.coco import load_coco
from pretraining.evaluation.folders import ClassificationSet, EvalDataError, Subset, load_eval_data


def apply_overrides(cfg, overrides: list[str]):
    """`key=value` strings -> a copy of the frozen dataclass `cfg`, values parsed by the field's type."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    changes = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or key not in fields:
            raise UserError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        current = getattr(cfg, key)
        try:
            if isinstance(current, bool):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                value = text.lower() in ("true", "1")
            else:
                value = type(current)(text)
        except ValueError as err:
            kind = {bool: "true or false", int: "an integer", float: "a number"}.get(type(current), "a string")
            raise UserError(f"--set {item!r}: {key} must be {kind}") from err
        changes[key] = value
    return dataclasses.replace(cfg, **changes)


def resolve_config(recipes: dict, args):
    if args.config not in recipes:
        raise UserError(f"--config {args.config!r} is not a recipe here; choose one of {', '.join(recipes)}")
    return apply_overrides(recipes[args.config](), args.set)


def _data(args, classification: bool):
    data = load_eval_data(args.data, args.val_fraction, args.num_classes, args.ignore_value, args.image_column,
                          args.label_column, args.mask_column, args.reduce_zero_label)
    if classification and not data.class_names:
        raise UserError(f"{args.data} has no image-level labels; classification needs labeled images")
    if not classification and not data.num_semantic_classes:
        raise UserError(f"{args.data} has no semantic masks; segmentation needs a dataset with masks")
    return data


def _write(output: str | None, name: str, cfg, metrics: dict) -> None:
    if output and (not dist.is_initialized() or dist.get_rank() == 0):
        os.makedirs(output, exist_ok=True)
        with open(os.path.join(output, f"{name}.json"), "w") as f:
            json.dump({"config": dataclasses.asdict(cfg), "metrics": metrics}, f, indent=2)


def _pooled_encoder(args, pool: str) -> nn.Module:
    """The encoder as a feature extractor: images -> (B, D) class token after the final norm, or the
    mean patch token (`pool="avg"`), at --img-size (default: the model's)."""
    pool_args = {"global_pool": "avg", "fc_norm": False} if pool == "avg" else {"global_pool": "token"}
    return load_timm_model(args.model, args.checkpoint, args.random_init, num_classes=0, **pool_args,
                           **({"img_size": args.img_size} if args.img_size else {}))


def run_linear_probe(args) -> dict:
    cfg = resolve_config({**linear_probe.RECIPES, **probe.CACHED_LINEAR_PROBE_RECIPES}, args)
    if isinstance(cfg, probe.LinearProbeConfig):
        return run_probe(args, "linear", cfg)
    device = setup_device(args.device)
    data = _data(args, classification=True)
    torch.manual_seed(cfg.seed)  # the head (and a --random-init encoder) start the same in every run
    model = linear_probe.FrozenEncoderProbe(_pooled_encoder(args, cfg.pool), len(data.class_names))
    metrics = linear_probe.train_frozen_probe(model, data, cfg, args.output, device)
    metrics.update(train_samples=len(data.train), val_samples=len(data.val), classes=len(data.class_names))
    _write(args.output, "linear", cfg, metrics)
    return metrics


def run_probe(args, kind: str, cfg=None) -> dict:
    """The cached-feature probes: k-NN, or the linear probe of `--config cached`."""
    cfg = cfg or resolve_config(probe.KNN_RECIPES, args)
    device = setup_device(args.device)
    data = _data(args, classification=True)
    torch.manual_seed(0)  # a --random-init baseline is the same encoder in every run
    model = _pooled_encoder(args, cfg.pool).to(device).eval()
    transform = create_transform(**finetune.model_data_config(model), is_training=False)
    rank, world = finetune.rank_world()
    batch = cfg.batch_size if kind == "knn" else cfg.extract_batch_size
    features = []
    for split in (data.train, data.val):
        part = ClassificationSet(Subset(split, range(rank, len(split), world)), transform)
        loader = DataLoader(part, batch, num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
        feats, labels = probe.extract_features(model, loader, device, progress=rank == 0)
        features += [probe.gather_strided(feats, len(split), device), probe.gather_strided(labels, len(split), device)]
    train_x, train_y, val_x, val_y = features
    num_classes = len(data.class_names)
    if kind == "knn":
        scores = probe.knn_scores(train_x.to(device), train_y, val_x, num_classes, cfg.k, cfg.temperature)
    else:
        head = probe.train_linear_probe(train_x, train_y, num_classes, cfg, device, progress=rank == 0)
        scores = probe.head_scores(head, val_x, device)
    top1, top5 = probe.topk_accuracy(scores, val_y)
    metrics = {"top1": top1, "top5": top5, "train_samples": len(train_y), "val_samples": len(val_y),
               "classes": num_classes}
    _write(args.output, kind, cfg, metrics)
    return metrics


def run_finetune(args) -> dict:
    cfg = resolve_config(finetune.RECIPES, args)
    device = setup_device(args.device)
    data = _data(args, classification=True)
    torch.manual_seed(cfg.seed)  # the new head (and a --random-init encoder) start the same in every run
    model = load_timm_model(args.model, args.checkpoint, args.random_init, head_init_std=cfg.head_init_std,
                            num_classes=len(data.class_names), global_pool=cfg.global_pool,
                            drop_path_rate=cfg.drop_path, img_size=cfg.img_size)
    return finetune.finetune(model, data, cfg, args.output, device)


def run_segment(args) -> dict:
    cfg = resolve_config(segment.RECIPES, args)
    device = setup_device(args.device)
    data = _data(args, classification=False)
    torch.manual_seed(cfg.seed)
    encoder = load_timm_model(args.model, args.checkpoint, args.random_init, num_classes=0, img_size=cfg.crop_size,
                              **({"drop_path_rate": cfg.drop_path} if cfg.finetune_encoder else {}))
    model = segment.build_segmenter(encoder, data.num_semantic_classes, cfg)
    return segment.train_segmentation(model, data, cfg, args.output, device)


def run_detect(args) -> dict:
    cfg = resolve_config(detect.RECIPES, args)
    device = setup_device(args.device)
    data = load_coco(args.data)
    torch.manual_seed(cfg.seed)
    encoder = load_timm_model(args.model, args.checkpoint, args.random_init, num_classes=0)
    data_config = finetune.model_data_config(encoder)
    model = detect.build_detector(encoder, len(data.class_names), cfg, data_config["mean"], data_config["std"])
    return detect.train_detection(model, data, cfg, args.output, device)


def run_vitdet(args) -> dict:
    model = load_timm_model(args.model, args.checkpoint, args.random_init, num_classes=0)
    count = vitdet.save_vitdet_checkpoint(model.state_dict(), args.output)
    return {"tensors": count, "path": args.output}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pretraining.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p):
        p.add_argument("--model", required=True, help="local-dir:DIR (timm export folder) or a timm architecture")
        p.add_argument("--checkpoint", help="weights for an architecture name (.safetensors, .pth)")
        p.add_argument("--random-init", action="store_true", help="random weights: the baseline to beat")

    def run_args(p, recipes, default, output_required, data_help=None):
        model_args(p)
        p.add_argument("--data", required=True, help=data_help or "labeled folder, ImageFolder, ADE20K folder, "
                       "datasets folder, or hub:REPO[@REVISION]")
        p.add_argument("--config", default=default, help=f"recipe: {', '.join(recipes)} (default {default})")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
        p.add_argument("--output", required=output_required, help="run folder (checkpoint, logs, metrics)")
        p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
        if data_help is not None:
            return
        p.add_argument("--val-fraction", type=float, default=0.1,
                       help="share held out by hashing sample ids when the data has no validation split")
        p.add_argument("--num-classes", type=int, help="semantic classes of a generic datasets folder")
        p.add_argument("--ignore-value", type=int, help="mask value meaning 'no class' (generic datasets; 255)")
        p.add_argument("--reduce-zero-label", action="store_true",
                       help="masks in ADE20K's convention: 0 is 'no class' and k is class k-1 (generic datasets)")
        p.add_argument("--image-column", help="image column of a datasets folder (default: image)")
        p.add_argument("--label-column", help="class label column of a datasets folder (default: label)")
        p.add_argument("--mask-column", help="semantic mask column of a datasets folder")

    p = sub.add_parser("linear-probe", help="MAE's linear probe on the frozen encoder",
                       description="MAE's linear probe: BatchNorm + linear head on the frozen encoder, trained on "
                                   "augmented images with LARS for 90 epochs (--config mae, resumable with --output); "
                                   "--config cached trains the same head on features cached once (fast). Prints "
                                   "top-1 / top-5 on the held-out split.")
    run_args(p, {**linear_probe.RECIPES, **probe.CACHED_LINEAR_PROBE_RECIPES}, "mae", False)
    p.add_argument("--img-size", type=int, help="input size (default: the model's)")
    p = sub.add_parser("knn", help="weighted k-NN on frozen features",
                       description="DINO's weighted k-NN on frozen features; prints top-1 / top-5 on the held-out split.")
    run_args(p, probe.KNN_RECIPES, "mae", False)
    p.add_argument("--img-size", type=int, help="input size (default: the model's)")
    run_args(sub.add_parser("finetune", help="end-to-end fine-tuning (MAE recipe)",
                            description="End-to-end fine-tuning with MAE's recipe; rerun the same command to resume "
                                        "from OUTPUT/checkpoint.pt."), finetune.RECIPES, "vit_base", True)
    run_args(sub.add_parser("segment", help="semantic segmentation scored by mIoU (UperNet, MAE's ADE20K protocol)",
                            description="UperNet on the fine-tuned encoder with MAE's ADE20K recipe (--config "
                                        "upernet), or the fast probe, a linear head on the frozen encoder (--config "
                                        "linear); scored by single-scale sliding-window mIoU. Rerun the same command "
                                        "to resume."), segment.RECIPES, "upernet", True)
    run_args(sub.add_parser("detect", help="COCO box / mask AP with ViTDet's Mask R-CNN",
                            description="ViTDet's Mask R-CNN (simple feature pyramid, windowed attention) on the "
                                        "encoder, trained on COCO with large-scale jitter and scored by COCOeval box "
                                        "and mask AP on val. Rerun the same command to resume."),
             detect.RECIPES, "vitdet_b", True,
             data_help="COCO folder: annotations/instances_{train,val}2017.json, train2017/, val2017/")
    p = sub.add_parser("vitdet", help="write a detectron2 ViTDet backbone checkpoint",
                       description="Rename the encoder's weights to detectron2 ViTDet's backbone keys "
                                   "(train.init_checkpoint=OUTPUT); see docs/evaluation.md.")
    model_args(p)
    p.add_argument("--output", required=True, help="the .pth file to write")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("linear-probe", "knn"):
            metrics = run_probe(args, "knn") if args.command == "knn" else run_linear_probe(args)
            line = f"{args.command}: top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}  " \
                   f"({metrics['train_samples']} train / {metrics['val_samples']} held out, {metrics['classes']} classes)"
        elif args.command == "finetune":
            metrics = run_finetune(args)
            line = f"finetune: top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}  (best top-1 " \
                   f"{metrics['best_top1']:.2f}, {metrics['epochs']} epochs)"
        elif args.command == "segment":
            metrics = run_segment(args)
            line = f"segment: mIoU {metrics['mIoU']:.2f}  pixel accuracy {metrics['pixel_accuracy']:.2f}"
        elif args.command == "detect":
            metrics = run_detect(args)
            line = f"detect: box AP {metrics['box_AP']:.2f}  mask AP {metrics['mask_AP']:.2f}  (AP50 " \
                   f"{metrics['box_AP50']:.2f} / {metrics['mask_AP50']:.2f}, {metrics['iterations']} iterations)"
        else:
            metrics = run_vitdet(args)
            line = f"vitdet: wrote {metrics['tensors']} backbone tensors to {metrics['path']}"
    except (UserError, EvalDataError, SchemaError, finetune.RunError, vitdet.ConversionError) as err:
        sys.exit(f"error: {err}")
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(line, flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return metrics



if __name__ == "__main__":
    main()
