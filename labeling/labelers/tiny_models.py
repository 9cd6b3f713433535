"""Tiny randomly initialised twins of the labeling models, for tests and local runs without weights.

`build_tiny_random_models(folder)` writes a tiny SAM state dict and a tiny Mask2Former (model +
image processor) into `folder`; `build_tiny_ade_semantic(folder)` the twin of the ADE20K alternative
(150 classes); both are then loaded back through the same code paths as the real
checkpoints (`checkpoints.load_sam(TINY_SAM_TYPE, path)` and `SemanticLabeler(path)`).

The tiny SAM is SAM's own architecture (segment_anything's modeling classes) at small widths and a
256 px input. Its weights are random, with one deliberate structure (`make_masks_local`): plain
random weights give every point prompt the same image-wide speckle, which box NMS collapses to a
single mask, so nothing downstream (NMS, per-crop filtering, alignment, painting order) would be
exercised. A few attention weights are set so that image positions near the prompt attend to the
prompt token, which gives each prompt nested blobs around it whose outline the (random) image
features perturb: tens of distinct masks per image, like a real model gives.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

TINY_SAM_TYPE = "tiny"
TINY_SAM_FILE = "tiny_sam.pth"
TINY_SEMANTIC_DIR = "tiny_mask2former"

# A COCO-panoptic-like taxonomy in miniature: things first, then stuff (see semantic_labeler).
TINY_CLASSES = ("person", "car", "dog", "sky", "grass", "wall")
TINY_THING_IDS = (0, 1, 2)
TINY_ADE_SEMANTIC_DIR = "tiny_mask2former_ade"
# ADE20K's 150 classes as the published ADE checkpoints' config.json `id2label` names them
# (facebook/mask2former-swin-large-ade-semantic; "bed " with its trailing space). The twin's config
# names no `thing_ids`, so `semantic.class_taxonomy` takes the split from its ADE20K rule (by the
# class count), as for any 150-class config without them.
ADE20K_CLASS_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed ", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)


@dataclass(frozen=True)
class TinyModels:
    sam_checkpoint: str  # path of the saved tiny SAM state dict
    sam_model_type: str  # TINY_SAM_TYPE, for checkpoints.load_sam
    semantic_model: str  # folder with the saved tiny semantic model and its image processor


def build_tiny_sam(img_size: int = 256, dim: int = 32) -> Sam:
    """SAM's architecture at tiny widths (random torch init); `load_sam("tiny", path)` builds this."""
    grid = img_size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size,
            patch_size=16,
            embed_dim=dim,
            depth=2,
            num_heads=2,
            mlp_ratio=2.0,
            out_chans=dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=4,
            global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim, image_embedding_size=(grid, grid), input_image_size=(img_size, img_size), mask_in_chans=4
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=2 * dim, num_heads=2, attention_downsample_rate=1),
            transformer_dim=dim,
            iou_head_depth=2,
            iou_head_hidden_dim=dim,
        ),
    )
    return sam.eval()


@torch.no_grad()
def make_masks_local(sam: Sam, beta: float = 2.0, bar: float = 0.5, marker: float = 8.0, content: float = 0.6) -> None:
    """Set the few decoder weights that turn a point prompt into nested blobs around the point.

    Decoder tokens are [iou, mask x4, point, padding point]. The point token carries a marker
    +L in channel M, the padding token -L. In the last image-to-token attention, an image position
    scores the point token by the similarity of their random Fourier position encodings (7
    frequencies per head, scaled by beta) minus a bar b*L that the padding token does not pay, so
    positions close to the point attend to it and the rest to the padding token. The attended
    marker (minus delta) is written into channel 0 of the image features, which the upscaling
    passes through linearly (constant channels keep its LayerNorm from saturating), and each mask
    token thresholds it at its own level: three nested masks. The random image features enter the
    position scores and channel 0, so outlines follow the image.
    """
    D, M = sam.mask_decoder.transformer_dim, sam.mask_decoder.transformer_dim - 1
    delta, gain, sharpness, up_const = 1.0, 2.0, 8.0, 4.0
    levels = (0.5, 1.0, 1.5)  # per multimask output: small threshold = large mask
    transformer = sam.mask_decoder.transformer
    first = transformer.layers[0].self_attn  # layer 0 has no residual here: keep every token itself
    for linear, scale in ((first.q_proj, 2.0), (first.k_proj, 2.0), (first.v_proj, 1.0), (first.out_proj, 1.0)):
        linear.weight.copy_(torch.eye(D) * scale)
        linear.bias.zero_()
    sam.prompt_encoder.point_embeddings[1].weight.zero_()
    sam.prompt_encoder.point_embeddings[1].weight[0, M] = marker
    sam.prompt_encoder.not_a_point_embed.weight[0, M] = -marker
    transformer.layers[0].norm4.weight.fill_(content)  # image-feature scale entering the last layer

    attn = transformer.layers[-1].cross_attn_image_to_token  # 2 heads of D // 2 channels
    heads, per_head = attn.num_heads, attn.internal_dim // attn.num_heads
    freqs = (per_head - 2) // 2
    q, k, q_bias = torch.zeros(attn.internal_dim, D), torch.zeros(attn.internal_dim, D), torch.zeros(attn.internal_dim)
    for h in range(heads):
        for i in range(freqs):
            f, row = freqs * h + i, per_head * h + i
            for w in (q, k):
                w[row, f] = beta  # sin(f) of the position encoding
                w[row + freqs, D // 2 + f] = beta  # cos(f)
        q_bias[per_head * h + 2 * freqs] = -bar
        k[per_head * h + 2 * freqs, M] = 1.0
    attn.q_proj.weight.copy_(q)
    attn.q_proj.bias.copy_(q_bias)
    attn.k_proj.weight.copy_(k)
    attn.k_proj.bias.zero_()
    attn.v_proj.weight.zero_()
    attn.v_proj.weight[:, M] = 1.0
    attn.v_proj.bias.fill_(-delta)
    attn.out_proj.weight.zero_()
    attn.out_proj.weight[0, :] = gain / attn.internal_dim
    attn.out_proj.bias.zero_()

    conv1, norm, _, conv2, _ = sam.mask_decoder.output_upscaling
    conv1.weight.zero_()
    conv1.weight[0, 0] = 1.0  # same kernel at all 2x2 sub-positions: nearest upsampling, no checkerboard
    conv1.bias.zero_()
    conv1.bias[1], conv1.bias[2] = up_const, -up_const  # LayerNorm2d sees a near-constant spread
    norm.weight.fill_(1.0)
    norm.weight[0] = up_const / 1.75  # undo its scaling of channel 0
    norm.bias.zero_()
    conv2.weight.zero_()
    conv2.weight[0, 0] = 1.0
    conv2.bias.zero_()
    conv2.bias[1] = 1.0  # a constant feature, GELU(1) = 0.8413, that the mask tokens use as their bias
    for i, mlp in enumerate(sam.mask_decoder.output_hypernetworks_mlps):
        last = mlp.layers[-1]
        last.weight.zero_()
        last.bias.zero_()
        last.bias[0] = sharpness
        last.bias[1] = -sharpness * levels[max(i - 1, 0)] / 0.8413
    # Predicted IoU: a per-output level (the largest mask most confident) plus the random head's
    # variation (about +-0.1), so that an IoU threshold keeps some outputs of a point and not others.
    sam.mask_decoder.iou_prediction_head.layers[-1].bias.add_(torch.tensor([0.8, 0.9, 0.7, 0.5]))


# `make_masks_local` settings for SAM's real decoder (256 wide, 8 heads): its attention averages
# more heads, whose similarity profiles are wider, so the tiny settings give blobs a third of a
# 1024 px image wide; these give SAM-like counts and sizes (random vit_b, astronaut at 1024 px,
# 16 x 16 points, thresholds 0.65 / 0.8: 240 masks, median area 1.3% of the image).
REAL_SIZE_LOCAL_MASKS = {"beta": 1.0, "bar": 0.25}


def build_sam_random(model_type: str, seed: int = 0) -> Sam:
    """SAM of `model_type` (vit_b, vit_l, vit_h) at its real architecture with seeded random weights
    and local masks (`make_masks_local`): what the benchmarks run where no checkpoint can be had."""
    from segment_anything import sam_model_registry

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = sam_model_registry[model_type]()
    make_masks_local(sam, **REAL_SIZE_LOCAL_MASKS)
    return sam.eval()


def build_tiny_sam_random(seed: int = 0) -> Sam:
    """The tiny SAM with its (deterministic) random weights and local masks (`make_masks_local`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = build_tiny_sam()
    make_masks_local(sam)
    return sam


def build_tiny_semantic(folder: str, seed: int = 0, classes: tuple[str, ...] = TINY_CLASSES,
                        thing_ids: tuple[int, ...] | None = TINY_THING_IDS) -> str:
    """A tiny random Mask2Former (Swin backbone, `classes`, by default 6) and its image processor saved
    in `folder`; `thing_ids` go into its config (None: none)."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    backbone = SwinConfig(
        image_size=224,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    id2label = dict(enumerate(classes))
    config = Mask2FormerConfig(
        backbone_config=backbone,
        use_pretrained_backbone=False,
        num_queries=8,
        hidden_dim=32,
        mask_feature_size=32,
        feature_size=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        encoder_feedforward_dim=64,
        dim_feedforward=64,
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
        **({} if thing_ids is None else {"thing_ids": list(thing_ids)}),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():
        # At the init std (0.02) every mask logit is near 0 and every query's class near uniform, so
        # one class wins everywhere. Scaled up, queries claim different regions with different
        # classes: maps with a few classes and real boundaries, like a trained model's.
        model.model.pixel_level_module.decoder.mask_projection.weight.mul_(50.0)
        model.class_predictor.weight.mul_(50.0)
    # The processor config in the published checkpoints' form (facebook/mask2former-swin-*-coco-panoptic,
    # -ade-semantic): a fixed 384 x 384 size, size_divisor 32. The labeler sizes inputs itself (keeping
    # the aspect ratio), so tests exercise what a real checkpoint's config gives it.
    processor = Mask2FormerImageProcessor(
        size={"height": 384, "width": 384}, size_divisor=32, ignore_index=255, num_labels=len(classes)
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_random_models(folder: str, seed: int = 0) -> TinyModels:
    """Save a tiny random SAM and a tiny random semantic model under `folder` (deterministic in `seed`)."""
    os.makedirs(folder, exist_ok=True)
    sam_path = os.path.join(folder, TINY_SAM_FILE)
    torch.save(build_tiny_sam_random(seed).state_dict(), sam_path)
    semantic = build_tiny_semantic(os.path.join(folder, TINY_SEMANTIC_DIR), seed)
    return TinyModels(sam_checkpoint=sam_path, sam_model_type=TINY_SAM_TYPE, semantic_model=semantic)


def build_tiny_ade_semantic(folder: str, seed: int = 0) -> str:
    """The twin of facebook/mask2former-swin-large-ade-semantic (`model_choice.ADE20K_SEMANTIC_MODEL`):
    a tiny random Mask2Former with ADE20K's 150 class names and no `thing_ids`, and the published
    ADE processor config's form (384 x 384, size_divisor 32, ignore 255, 150 labels), saved in `folder`."""
    return build_tiny_semantic(folder, seed, ADE20K_CLASS_NAMES, thing_ids=None)
