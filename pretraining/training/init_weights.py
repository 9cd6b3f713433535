"""A new run's starting weights from another checkpoint (`--init PATH`): reading it, mapping its keys, the report.

What PATH may be, told apart by what it holds:
- a run of ours: RUN/checkpoints/step-N.pt (or RUN itself: its newest), whose "model" has our names;
- our timm export (`pretraining.export`): DIR/model.safetensors (or DIR), timm VisionTransformer names;
- MAE's released checkpoints (`mae_pretrain_vit_base.pth`): {"model": timm ViT names}, the dict MAE's
  own fine-tuning reads (`cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.N.*`, `norm.*`; its
  decoder keys, when present, are not ours to use).
Only the shared ViT encoder is initialised (every model kind has the same one); decoders, and the
adapters and modality embeddings the source lacks, keep their fresh initialisation. A tensor whose
shape differs from ours stops the run in one sentence naming the key and both shapes.

Positions: our encoder adds a fixed sin-cos table recomputed for its grid (as MAE's pretraining
does), so a source's `pos_embed` is not copied but recognised. It must be our sin-cos of the
source's own grid up to a constant per channel (our export: the constant is the RGB modality
embedding, loaded back) and up to an order of channels (MAE's table orders sin/cos and the two
axes differently from timm's, which we use). A reordering is applied to the whole residual stream
(patch projection, class token, norms, the blocks' input and output projections): a transformer
computes the same function with its width permuted, so the loaded encoder computes the source's
function, with permuted features, at any grid. Any other table (a learned one) is not loaded and
the report says by how much it differs. Nothing is interpolated: a fixed table needs none.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from pretraining.models.adapters import sincos_pos_embed
from pretraining.models.masking import MODALITIES
from pretraining.training import checkpoint as ckpt
from pretraining.training.resume import RunError
from pretraining.training.run_folder import stored_config

_TIMM_TO_OURS = (("cls_token", "encoder.cls_token"), ("patch_embed.", "encoder.adapters.rgb."),
                 ("blocks.", "encoder.blocks."), ("norm.", "encoder.norm."))
# Which dimension of an encoder tensor runs over the width of the residual stream (a reordering permutes it).
_RESIDUAL_DIM = (
    (re.compile(r"^encoder\.cls_token$"), -1),
    (re.compile(r"^encoder\.(adapters\.rgb\.proj|norm|blocks\.\d+\.(norm1|norm2|attn\.proj|mlp\.fc2))\."
                r"(weight|bias)$"), 0),
    (re.compile(r"^encoder\.blocks\.\d+\.(attn\.qkv|mlp\.fc1)\.weight$"), 1),
)
FORMATS = {"run": "our run checkpoint", "timm": "timm export", "mae": "MAE-format checkpoint"}
SINCOS_TOLERANCE = 1e-4  # a float32 sin-cos table (plus a constant) matches ours to ~1e-7


@dataclass
class InitReport:
    """What `initialize` did, for the user (`lines`) and RUN/init.json (`asdict`)."""

    source: str  # the --init argument
    file: str  # the file read
    sha256: str
    format: str  # run | timm | mae
    loaded: list[str] = field(default_factory=list)  # our tensors that took the source's values
    loaded_parameters: int = 0
    new: list[str] = field(default_factory=list)  # ours left at their initialisation
    new_parameters: int = 0
    unused: list[str] = field(default_factory=list)  # source keys nothing took
    positions: str = ""  # what became of the source's position embedding

    def provenance(self) -> dict:
        """What run.json records: where the weights came from."""
        return {"source": self.source, "file": self.file, "sha256": self.sha256, "format": self.format}

    def lines(self) -> list[str]:
        return [f"init: loaded {len(self.loaded)} tensors ({self.loaded_parameters:,} parameters) of the encoder "
                f"from {FORMATS[self.format]} {self.file} (sha256 {self.sha256[:12]})",
                f"init: new, left at their initialisation: {_grouped(self.new)} ({self.new_parameters:,} parameters)",
                f"init: unused source keys: {_grouped(self.unused)}",
                f"init: position embedding: {self.positions}"]


def _grouped(names: list[str]) -> str:
    """"decoder (52), encoder.adapters.semantic (3)": names counted by their prefix before any block index."""
    if not names:
        return "none"
    counts: dict[str, int] = {}
    for name in names:
        parts = name.split("[")[0].split(".")
        head = parts[:next((i for i, p in enumerate(parts) if p.isdigit()), len(parts))]
        if len(head) == len(parts) > 2:  # no block index: drop the tensor's own name (weight, bias)
            head = head[:-1]
        group = ".".join(head[:3])
        counts[group] = counts.get(group, 0) + 1
    return ", ".join(f"{k} ({n})" for k, n in counts.items())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:  # in 1 MiB pieces (hashlib.file_digest needs Python 3.11; we support 3.10)
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def _source_modalities(data: dict) -> tuple[str, ...] | None:
    """The modalities of the model a run checkpoint was trained with, from the config it stores."""
    try:
        return tuple(stored_config(data)[0].model.modalities)
    except (KeyError, TypeError, ValueError):
        return None


def read_source(path: str | Path) -> tuple[Path, str, dict[str, torch.Tensor], tuple[str, ...] | None]:
    """(the file read, its format, its state dict, its modalities when known) for --init `path`."""
    given = Path(path)
    if not given.exists():
        raise RunError(f"--init {path} does not exist; give a run folder, one of its checkpoints, a timm export "
                       "folder (model.safetensors) or an MAE checkpoint file.")
    file = given
    if given.is_dir():
        file = given / "model.safetensors"
        if not file.is_file():
            file = ckpt.latest_checkpoint(given)
        if file is None:
            raise RunError(f"--init {path} is a folder with neither checkpoints/step-N.pt (a run) nor "
                           "model.safetensors (a timm export); give one of those, or a checkpoint file.")
    if file.suffix == ".safetensors":
        try:
            return file, "timm", safetensors.torch.load_file(file), None
        except Exception as err:  # a damaged or foreign file fails in several ways
            raise RunError(f"--init {file} cannot be read as safetensors ({err.__class__.__name__}); it is damaged "
                           "or not a weights file: export the run again.") from err
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        detail = (str(err).strip().splitlines() or [""])[0][:160]
        raise RunError(f"--init {file} cannot be read as a torch checkpoint of tensors ({err.__class__.__name__}: "
                       f"{detail}); if it also holds other Python objects (as MAE's training checkpoints hold "
                       "'args') and you trust it, save only its weights: torch.save({'model': torch.load(f, "
                       "weights_only=False)['model']}, 'weights.pth').") from err
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        is_run = "config" in data and "run" in data
        state, fmt, modalities = data["model"], "run" if is_run else "mae", _source_modalities(data) if is_run else None
    else:
        state, fmt, modalities = data, "timm", None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RunError(f"--init {file} holds no state dict of tensors (neither one nor one under 'model'); give a "
                       "run checkpoint, a timm export or an MAE checkpoint.")
    return file, fmt, {k.removeprefix("module."): v for k, v in state.items()}, modalities


def match_sincos(table: torch.Tensor, grid: int, tol: float = SINCOS_TOLERANCE) -> tuple[torch.Tensor | None,
                                                                                          torch.Tensor | None, float]:
    """Is `table` (G*G, D) our fixed sin-cos of a G x G grid, up to a constant and an order of channels?

    Returns (order, offset, deviation): order (D,) picks the table's channel for each of ours and
    offset (D,) is the constant, so `table[:, order] - offset` equals ours within `tol` (the identity
    order when it does); (None, None, deviation) when no order does. Deviation: the largest difference.
    """
    D = table.shape[1]
    ours = sincos_pos_embed(grid, D).double()  # (N, D)
    src = table.detach().double()
    src_c, ours_c = src - src.mean(0), ours - ours.mean(0)  # the constant drops out
    order = torch.arange(D)
    deviation = float((src_c - ours_c).abs().max())
    if deviation > tol:
        _, cols = linear_sum_assignment(torch.cdist(ours_c.T, src_c.T).numpy())  # (D ours, D source) costs
        order = torch.from_numpy(cols)
        deviation = float((src_c[:, order] - ours_c).abs().max())
        if deviation > tol:
            return None, None, deviation
    return order, (src[:, order] - ours).mean(0).float(), deviation


def _reorder(name: str, value: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    for pattern, dim in _RESIDUAL_DIM:
        if pattern.match(name):
            return value.index_select(dim, order)
    return value


def _positions(pos_embed: torch.Tensor, has_cls: bool) -> tuple[torch.Tensor | None, torch.Tensor | None,
                                                                  torch.Tensor | None, str]:
    """(order, RGB modality-embedding row, class-token position row, the report's sentence) for a timm pos_embed."""
    table = pos_embed.reshape(-1, pos_embed.shape[-1])
    prefix = 1 if has_cls and math.isqrt(table.shape[0] - 1) ** 2 == table.shape[0] - 1 else 0
    grid = math.isqrt(table.shape[0] - prefix)
    if grid * grid != table.shape[0] - prefix or table.shape[1] % 4:
        return None, None, None, f"not loaded: its {tuple(table.shape)} table is not a square grid of a width divisible by 4 (ours is fixed sin-cos)"
    order, offset, deviation = match_sincos(table[prefix:], grid)
    if order is None:
        return None, None, None, (f"not loaded: it is not a sin-cos table of its {grid}x{grid} grid (it differs from "
                                  f"ours by up to {deviation:.3g}, e.g. a learned one); our encoder keeps its fixed "
                                  "sin-cos, so the blocks see other positions than they were trained with")
    how = "in our channel order" if torch.equal(order, torch.arange(len(order))) else (
        "in another channel order (as MAE's), so the residual stream was reordered to match and the encoder "
        "computes the source's function with permuted features")
    cls_row = table[0] if prefix else None  # in the source's channel order
    return order, offset, cls_row, (f"a fixed sin-cos table of a {grid}x{grid} grid {how}; our encoder recomputes "
                                    "the table for its own grid and takes its constant part as the RGB modality "
                                    "embedding")


def _map_timm(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str],
                                                        str]:
    """timm ViT names -> (our tensors, modality-embedding rows by modality, unused keys, the position sentence)."""
    mapped, rows, unused = {}, {}, []
    for key, value in state.items():
        target = next((ours + key[len(theirs):] for theirs, ours in _TIMM_TO_OURS if key.startswith(theirs)), None)
        if target is not None:
            mapped[target] = value
        elif key != "pos_embed":
            unused.append(key)
    positions = "none in the source (the RGB modality embedding is left at its initialisation)"
    if "pos_embed" in state:
        order, offset, cls_row, positions = _positions(state["pos_embed"], "cls_token" in state)
        if order is None:
            unused.append("pos_embed")
        else:
            cls = mapped.get("encoder.cls_token")
            if cls_row is not None and cls is not None and cls.shape[-1] == cls_row.shape[-1]:
                mapped["encoder.cls_token"] = cls + cls_row.to(cls)  # timm adds the class row to the class token
            mapped = {name: _reorder(name, value, order) for name, value in mapped.items()}
            rows["rgb"] = offset
    return mapped, rows, unused, positions


def _map_ours(state: dict[str, torch.Tensor], source_modalities: tuple[str, ...] | None, file: Path
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str], str]:
    """Our names -> (the encoder's tensors, modality-embedding rows by modality, unused keys, the position sentence)."""
    mapped = {k: v for k, v in state.items() if k.startswith("encoder.") and k != "encoder.modality_embed"}
    unused = [k for k in state if not k.startswith("encoder.")]
    rows = {}
    if "encoder.modality_embed" in state:
        table = state["encoder.modality_embed"]
        if source_modalities is None and len(table) in (1, len(MODALITIES)):
            source_modalities = ("rgb",) if len(table) == 1 else MODALITIES  # every model has rgb, in this order
        if source_modalities is None or len(source_modalities) != len(table):
            raise RunError(f"--init {file}: cannot tell which modality each of its {len(table)} modality embeddings "
                           "belongs to; give the run's own checkpoint (it records its config).")
        rows = dict(zip(source_modalities, table))
    return mapped, rows, unused, "ours: fixed sin-cos, nothing to load (the modality embeddings carry the rest)"


def initialize(model: nn.Module, path: str | Path) -> InitReport:
    """Load the encoder weights of --init `path` into `model` (in place), with shape checks; report what happened."""
    file, fmt, state, source_modalities = read_source(path)
    if any(k.startswith("encoder.") for k in state):
        mapped, rows, unused, positions = _map_ours(state, source_modalities, file)
    else:
        mapped, rows, unused, positions = _map_timm(state)
    ours = model.state_dict()
    unused += [k for k in mapped if k not in ours]
    mapped = {k: v for k, v in mapped.items() if k in ours}
    modalities = list(model.cfg.modalities)
    rows = {m: row for m, row in rows.items() if m in modalities}
    checks = [(k, v.shape, ours[k].shape) for k, v in mapped.items()]
    checks += [(f"encoder.modality_embed[{m}]", row.shape, ours["encoder.modality_embed"][0].shape)
               for m, row in rows.items()]
    wrong = [(k, theirs, mine) for k, theirs, mine in checks if theirs != mine]
    if wrong:
        key, theirs, mine = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise RunError(f"--init {file}: {key} has shape {tuple(theirs)} there but {tuple(mine)} in this model{more}; "
                       "start from a checkpoint of the same encoder size (embed_dim, patch_size, mlp_ratio, classes).")
    if not mapped and not rows:
        raise RunError(f"--init {file} holds no encoder weights this model can use (keys such as "
                       f"{', '.join(list(state)[:3])}); give a run checkpoint, a timm export or an MAE checkpoint.")
    new_state = dict(ours)
    new_state.update({k: v.to(ours[k].dtype) for k, v in mapped.items()})
    if rows:
        table = ours["encoder.modality_embed"].clone()
        for m, row in rows.items():
            table[modalities.index(m)] = row
        new_state["encoder.modality_embed"] = table
    model.load_state_dict(new_state, strict=True)

    loaded = sorted(mapped) + [f"encoder.modality_embed[{m}]" for m in rows]
    loaded_parameters = sum(v.numel() for v in mapped.values()) + sum(r.numel() for r in rows.values())
    new = [k for k in ours if k not in mapped and k != "encoder.modality_embed"]
    new += [f"encoder.modality_embed[{m}]" for m in modalities if m not in rows and "encoder.modality_embed" in ours]
    total = sum(v.numel() for v in ours.values())
    return InitReport(source=str(path), file=str(file), sha256=_sha256(file), format=fmt, loaded=loaded,
                      loaded_parameters=loaded_parameters, new=new, new_parameters=total - loaded_parameters,
                      unused=sorted(unused), positions=positions)
