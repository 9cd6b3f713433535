"""One masked autoencoder for C2FMAE, MultiMAE and MAE: forward = encode -> decode -> loss.

The three are configurations of `MaskedAutoencoder` (see pretraining/models/factory.py):
- C2FMAE: modalities (semantic, instance, rgb), decoder "cascaded", masking "progressive".
- MultiMAE: the same modalities, decoder "multimae" (its output adapters), masking "random" with
  MultiMAE's rounded Dirichlet allocation.
- MAE: modalities (rgb,), decoder "mae", masking "random" with 49 of 196 tokens visible.
Each of the paper's ideas is one switch: `decoder` (cascaded | parallel) and `masking.strategy`
(progressive | random); docs/model.md lists the controls (matched depth, shuffled links, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pretraining.models import losses
from pretraining.models.adapters import downsample_labels
from pretraining.models.curriculum import curriculum_weights
from pretraining.models.decoders import CascadedDecoder, MAEDecoder, MultiMAEDecoder, ParallelDecoder
from pretraining.models.encoder import Encoder
from pretraining.models.masking import (
    MODALITIES,
    MaskingConfig,
    assemble_visible,
    draw_masking,
    visible_to_masked,
)

DECODERS = ("cascaded", "parallel", "multimae", "mae")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = ""  # the factory name it was resolved by (models/factory.py), a record for messages
    modalities: tuple[str, ...] = MODALITIES  # coarse to fine; the cascade follows this order
    input_modalities: tuple[str, ...] | None = None  # what the encoder reads (None: all); the rest are only targets
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_semantic_classes: int = 133  # from DatasetMetadata.num_semantic_classes
    semantic_class_dim: int = 64  # MultiMAE's class embedding width
    semantic_downsample: int = 4  # semantic labels enter and are predicted at 1/4 resolution
    decoder: str = "cascaded"  # cascaded | parallel | multimae | mae
    decoder_dim: int = 256
    decoder_depth: int = 2  # transformer blocks per stage (after its cross-attention block)
    decoder_heads: int = 8
    decoder_units: tuple[int, ...] | None = None  # cascaded / parallel: (cross-attn + blocks) units per stage; None = 1 each
    cascade_link: str = "image"  # cascaded: image | shuffled (each sample's link carries another sample's tokens)
    instance_offset_unit: str = "patch"  # the instance offsets' unit: patch | image (docs/model.md)
    instance_offset_loss: str = "l1"  # the instance offsets' loss: l1 | mse (docs/model.md, Losses)
    norm_pix_loss: bool = True
    loss_reduction: str = "sample"  # sample | token: how masked patches are averaged (losses._mean_over)
    lambda_semantic: float = 1.0
    lambda_instance: float = 1.0
    lambda_rgb: float = 1.0
    # The semantic head's linear layer and its logits in fp32 under bf16/fp16 autocast (MultiMAE keeps its
    # semantic output adapter in fp32); the same parameters either way, a no-op without autocast (CPU).
    semantic_head_fp32: bool = False
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    timm_arch: str = "vit_base_patch16_224"

    def __post_init__(self):
        if self.decoder not in DECODERS:
            raise ValueError(f"Unknown decoder {self.decoder!r}; use cascaded, parallel, multimae or mae.")
        if self.decoder_units is not None:
            object.__setattr__(self, "decoder_units", tuple(self.decoder_units))  # JSON gives lists
            if self.decoder not in ("cascaded", "parallel") or len(self.decoder_units) != len(self.modalities) \
                    or min(self.decoder_units) < 1:
                raise ValueError(f"decoder_units takes one count >= 1 per modality of a cascaded or parallel decoder, "
                                 f"got {self.decoder_units} for {self.modalities}.")
        if self.cascade_link not in ("image", "shuffled"):
            raise ValueError(f"Unknown cascade_link {self.cascade_link!r}; use image or shuffled.")
        if self.instance_offset_unit not in ("patch", "image"):
            raise ValueError(f"Unknown instance_offset_unit {self.instance_offset_unit!r}; use patch or image.")
        if self.instance_offset_loss not in losses.OFFSET_LOSSES:
            raise ValueError(f"Unknown instance_offset_loss {self.instance_offset_loss!r}; use one of "
                             f"{losses.OFFSET_LOSSES}.")
        if self.loss_reduction not in losses.REDUCTIONS:
            raise ValueError(f"Unknown loss_reduction {self.loss_reduction!r}; use one of {losses.REDUCTIONS}.")
        if self.decoder == "mae" and self.modalities != ("rgb",):
            raise ValueError("The MAE decoder reconstructs RGB only; use modalities=('rgb',).")
        if "rgb" not in self.modalities or self.modalities != tuple(m for m in MODALITIES if m in self.modalities):
            raise ValueError(f"modalities must include rgb and follow the order {MODALITIES}, got {self.modalities}.")
        if self.input_modalities is not None:
            object.__setattr__(self, "input_modalities", tuple(self.input_modalities))
            indices = tuple(self.modalities.index(m) for m in self.input_modalities if m in self.modalities)
            if len(indices) != len(self.input_modalities) or "rgb" not in self.input_modalities:
                raise ValueError(f"input_modalities {self.input_modalities} must include rgb and be among "
                                 f"{self.modalities}.")
            if self.masking.inputs != indices:
                raise ValueError(f"masking.inputs is {self.masking.inputs} but input_modalities "
                                 f"{self.input_modalities} are modalities {indices}.")
        if self.masking.num_positions != self.num_positions:
            raise ValueError(f"masking.num_positions is {self.masking.num_positions} but {self.img_size} px images "
                             f"with patch {self.patch_size} have {self.num_positions}.")

    @property
    def num_positions(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def offset_unit_pixels(self) -> int | None:
        """What `instance_representation` divides offsets by: the patch size, or None (the image size)."""
        return self.patch_size if self.instance_offset_unit == "patch" else None

    def patch_dim(self, modality: str) -> int:
        """Values predicted per patch: pixels x channels, or label pixels x classes for semantics."""
        if modality == "semantic":
            return (self.patch_size // self.semantic_downsample) ** 2 * self.num_semantic_classes
        return self.patch_size**2 * 3  # rgb, and the 3-channel instance representation


@dataclass
class PretrainOutput:
    loss: torch.Tensor  # scalar, the weighted sum
    terms: dict[str, torch.Tensor]  # modality -> unweighted loss
    predictions: dict[str, torch.Tensor]  # modality -> (B, N, patch_dim)
    visible: torch.Tensor  # (B, V)
    strategy: torch.Tensor  # (B,) masking strategy per sample (0 semantic, 1 instance, 2 random)
    sample_terms: dict[str, torch.Tensor]  # modality -> (B,) each sample's unweighted loss (detached; for logs)
    sample_loss: torch.Tensor  # (B,) each sample's weighted sum (detached; the adaptive curriculum reads it)


class MaskedAutoencoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        grid = cfg.img_size // cfg.patch_size
        self.encoder = Encoder(cfg.modalities, cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth,
                               cfg.num_heads, cfg.mlp_ratio, cfg.num_semantic_classes, cfg.semantic_class_dim,
                               cfg.semantic_downsample, cfg.input_modalities)
        patch_dims = {m: cfg.patch_dim(m) for m in cfg.modalities}
        shared = (cfg.embed_dim, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads)
        fp32_heads = ("semantic",) if cfg.semantic_head_fp32 else ()
        if cfg.decoder == "mae":
            self.decoder = MAEDecoder(*shared, cfg.patch_dim("rgb"), grid, cfg.mlp_ratio)
        elif cfg.decoder == "multimae":
            self.decoder = MultiMAEDecoder(cfg.modalities, *shared, patch_dims, grid, cfg.mlp_ratio, fp32_heads)
        elif cfg.decoder == "parallel":
            self.decoder = ParallelDecoder(cfg.modalities, *shared, patch_dims, grid, cfg.mlp_ratio, cfg.decoder_units,
                                           fp32_heads)
        else:
            self.decoder = CascadedDecoder(cfg.modalities, *shared, patch_dims, grid, cfg.mlp_ratio, cfg.decoder_units,
                                           fp32_heads, link_shift=int(cfg.cascade_link == "shuffled"))
        self.apply(_init_weights)

    # Masking -----------------------------------------------------------------------------------

    def mask_batch(self, batch: dict[str, torch.Tensor], generator: torch.Generator,
                   progress: float = 0.0) -> dict[str, torch.Tensor]:
        """`batch` with "visible" (B, V), "strategy" and "strategy_requested" (B,) added, as the loader
        and `Batch.to` add them, for callers without the loader (tests, benchmarks): each sample's draws
        by `draw_masking` (from one numpy generator seeded by `generator`, in sample order) under the
        scheduled curriculum weights at `progress`, through the trainer's `assemble_visible`. Labels
        may guide the masking even of an RGB-only model ("semantic" / "instance_ids" in the batch)."""
        cfg = self.cfg
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
        draws = [draw_masking(rng, cfg.masking, len(cfg.modalities)) for _ in range(batch["rgb"].shape[0])]
        key, proportions, keys = (torch.from_numpy(np.stack([d[k] for d in draws])).to(batch["rgb"].device)
                                  for k in ("strategy_key", "proportions", "keys"))
        weights = curriculum_weights(progress, cfg.masking.curriculum)
        labels = batch.get("semantic"), batch.get("instance_ids")  # (B, H, W) each, or None
        visible, strategy, requested = assemble_visible(key, proportions, keys, weights, *labels, cfg.masking,
                                                        cfg.patch_size)
        return {**batch, "visible": visible, "strategy": strategy, "strategy_requested": requested}

    def visible_mask(self, out: PretrainOutput) -> dict[str, torch.Tensor]:
        """Modality -> (B, N) bool, True where the encoder saw the patch."""
        return self._visible_by_modality(out.visible)

    def _visible_by_modality(self, visible: torch.Tensor) -> dict[str, torch.Tensor]:
        N = self.cfg.num_positions
        masked = visible_to_masked(visible, len(self.cfg.modalities) * N)  # (B, M * N)
        return {m: ~masked[:, i * N:(i + 1) * N] for i, m in enumerate(self.cfg.modalities)}

    # Forward -----------------------------------------------------------------------------------

    def forward(self, batch: dict[str, torch.Tensor]) -> PretrainOutput:
        """batch: the loader's dict (layout in docs/model.md), masked: "visible" and "strategy" come from
        `Batch.to`, or from `mask_batch` for a batch built without the loader."""
        missing = [m for m in self.cfg.modalities if m not in batch]
        if missing:
            raise ValueError(f"The batch lacks {missing}; this model reads {list(self.cfg.modalities)}, "
                             "so build batches for it with the pretraining data loader (layout in docs/model.md).")
        if "visible" not in batch or "strategy" not in batch:
            raise ValueError("The batch has no masks (\"visible\", \"strategy\"); build it with the "
                             "pretraining data loader, or add them with model.mask_batch(batch, generator).")
        visible, strategy = batch["visible"], batch["strategy"]
        x = self.encoder({m: batch[m] for m in self.encoder.inputs}, visible)  # (B, 1 + V, D)
        predictions, sample_terms, terms = self._decode_and_score(x, visible, batch)
        loss = sum(self.loss_weight(m) * terms[m] for m in self.cfg.modalities)
        sample_loss = sum(self.loss_weight(m) * sample_terms[m] for m in self.cfg.modalities)
        return PretrainOutput(loss, terms, predictions, visible, strategy, sample_terms, sample_loss)

    def _decode_and_score(self, x: torch.Tensor, visible: torch.Tensor, batch: dict[str, torch.Tensor]):
        """Encoder tokens -> (predictions, per-sample terms (B,) detached, reduced terms) by modality."""
        predictions = self.decoder(x, visible)  # modality -> (B, N, patch_dim)
        masked = {m: ~v for m, v in self._visible_by_modality(visible).items()}  # modality -> (B, N)
        per_sample = {m: self.loss_term(m, predictions[m], batch, masked[m], "none") for m in self.cfg.modalities}
        if self.cfg.loss_reduction == "sample":
            terms = {m: v.mean() for m, v in per_sample.items()}
        else:
            terms = {m: self.loss_term(m, predictions[m], batch, masked[m]) for m in self.cfg.modalities}
        return predictions, {m: v.detach() for m, v in per_sample.items()}, terms

    def term_gradient_norms(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(M,) norm of the gradient of each weighted loss term with respect to the encoder's output
        tokens, on a batch that has "visible": how hard each term pulls on the shared representation
        (the share of each is logged). Runs the encoder without gradients and the decoder once."""
        with torch.no_grad():
            x = self.encoder({m: batch[m] for m in self.encoder.inputs}, batch["visible"])
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            terms = self._decode_and_score(x, batch["visible"], batch)[2]
            grads = [torch.autograd.grad(self.loss_weight(m) * terms[m], x, retain_graph=True)[0]
                     for m in self.cfg.modalities]
        return torch.stack([g.float().norm() for g in grads])

    def loss_weight(self, modality: str) -> float:
        return {"semantic": self.cfg.lambda_semantic, "instance": self.cfg.lambda_instance,
                "rgb": self.cfg.lambda_rgb}[modality]

    def loss_term(self, modality: str, pred: torch.Tensor, batch: dict[str, torch.Tensor],
                  masked: torch.Tensor, reduction: str | None = None) -> torch.Tensor:
        """One modality's loss on its masked patches; `reduction` defaults to cfg.loss_reduction."""
        cfg = self.cfg
        reduction = reduction or cfg.loss_reduction
        if modality == "rgb":
            return losses.rgb_loss(pred, batch["rgb"], masked, cfg.patch_size, cfg.norm_pix_loss, reduction)
        if modality == "instance":
            return losses.instance_loss(pred, batch["instance"], masked, cfg.patch_size, reduction,
                                        cfg.instance_offset_loss)
        labels = downsample_labels(batch["semantic"], cfg.semantic_downsample)  # (B, H/4, W/4)
        return losses.semantic_loss(pred, labels, masked, cfg.patch_size // cfg.semantic_downsample,
                                    cfg.num_semantic_classes, reduction)

    # Figures and export ------------------------------------------------------------------------

    @torch.no_grad()
    def reconstruct(self, batch: dict[str, torch.Tensor], out: PretrainOutput) -> dict[str, torch.Tensor]:
        """Full-size images: visible patches from the input, masked patches predicted.

        "rgb" (B, 3, H, W) in normalised-image space (per-patch normalised predictions mapped back
        with the input patch's mean and std, as MAE's figures do); "semantic" (B, H, W) class ids;
        "instance" (B, 3, H, W) with the boundary channel as a probability.
        """
        cfg, P = self.cfg, self.cfg.patch_size
        visible = self.visible_mask(out)
        images = {}
        for m in cfg.modalities:
            pred, keep = out.predictions[m].float(), visible[m][..., None]  # (B, N, K), (B, N, 1)
            if m == "rgb":
                target = losses.patchify(batch["rgb"].float(), P)
                if cfg.norm_pix_loss:
                    _, mean, std = losses.normalise_patches(target)
                    pred = pred * std + mean
                images[m] = losses.unpatchify(torch.where(keep, target, pred), P, 3)
            elif m == "instance":
                pred = pred.reshape(*pred.shape[:2], -1, 3)
                pred = torch.cat([pred[..., :1].sigmoid(), pred[..., 1:]], dim=-1).flatten(2)
                images[m] = losses.unpatchify(torch.where(keep, losses.patchify(batch[m].float(), P), pred), P, 3)
            else:
                p = P // cfg.semantic_downsample
                ids = pred.reshape(*pred.shape[:2], -1, cfg.num_semantic_classes).argmax(-1)  # (B, N, p*p)
                labels = downsample_labels(batch["semantic"], cfg.semantic_downsample)[:, None]
                ids = torch.where(keep, losses.patchify(labels, p), ids)
                small = losses.unpatchify(ids, p, 1).float()  # (B, 1, H/4, W/4)
                images[m] = F.interpolate(small, scale_factor=cfg.semantic_downsample, mode="nearest")[:, 0].long()
        return images

    def encode_rgb(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + N, D), equal to timm's forward_features of the exported model."""
        return self.encoder.encode_rgb(images)

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """The RGB path as `timm.create_model(cfg.timm_arch, num_classes=0)`'s state dict."""
        return self.encoder.timm_state_dict()


def _init_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform linear and patch projections, small normal tokens."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):  # patch projections, treated as the linear layer they are
        nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    for name, param in module.named_parameters(recurse=False):
        if name in ("cls_token", "mask_token", "modality_embed"):
            nn.init.normal_(param, std=0.02)
