"""Watching a run: TensorBoard scalars and reconstruction figures (PNG files and TensorBoard images).

RUN/tensorboard/   scalars: loss and each loss term, lr, curriculum weights, images/s, data-wait share,
                   gradient norm, fp16 loss scale, peak GPU memory
RUN/figures/       step-00002000.png: per sample and modality, input | masked input | prediction | target,
                   with a legend (grey, class colours, the instance channels); a panel with nothing to
                   show (all masked, nothing masked, no labels) says so in its title
Only rank 0 writes (other ranks get a disabled Monitor). On resume, `purge_step` hides the events a
killed run wrote after its checkpoint, so TensorBoard shows each step once. A full or read-only
disk is one sentence (`storage.StorageError`).
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files; never open a window (also on machines without a display)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.legend_handler import HandlerTuple  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from pretraining.training.storage import writing  # noqa: E402

COLUMNS = ("input", "masked input", "prediction", "target")


def _after_earlier_event_files(logdir: Path) -> None:
    """Wait (under a second) until this second is later than every event file's in `logdir`.
    TensorBoard reads a folder's event files in name order, `events.out.tfevents.<second>.<host>.
    <pid>.<n>`: a resume started within the second its predecessor's file was created would sort by
    pid or counter, maybe before it, and the older file's events would then purge the new ones."""
    seconds = [int(p.name.split(".")[3]) for p in logdir.glob("events.out.tfevents.*")
               if len(p.name.split(".")) > 3 and p.name.split(".")[3].isdigit()]
    if seconds and max(seconds) >= int(time.time()):
        time.sleep(max(seconds) + 1 - time.time())


class Monitor:
    def __init__(self, run_dir: str | Path, enabled: bool = True, purge_step: int | None = None):
        """`purge_step`: the first step this run logs; TensorBoard drops older files' events from it on."""
        self.run_dir = Path(run_dir)
        self.logdir = self.run_dir / "tensorboard"
        self.writer = None
        if enabled:
            _after_earlier_event_files(self.logdir)
            with writing(self.logdir):
                self.writer = SummaryWriter(str(self.logdir), purge_step=purge_step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            with writing(self.logdir):  # the event writer's thread raises its disk errors here
                for name, value in values.items():
                    self.writer.add_scalar(name, value, step)

    def figure(self, step: int, fig: Figure) -> Path | None:
        """Save `fig` as RUN/figures/step-NNNNNNNN.png and to TensorBoard; returns the PNG path."""
        if self.writer is None:
            plt.close(fig)
            return None
        path = self.run_dir / "figures" / f"step-{step:08d}.png"
        try:
            with writing(path, tmp=path):  # a half-written PNG is removed
                path.parent.mkdir(parents=True, exist_ok=True)
                fig.savefig(path, dpi=100)
            with writing(self.logdir):
                self.writer.add_figure("reconstruction", fig, step, close=False)
        finally:
            plt.close(fig)
        return path

    def close(self) -> None:
        if self.writer is not None:
            with writing(self.logdir):
                self.writer.close()


def step_scalars(grad_norm: torch.Tensor, scaler: torch.amp.GradScaler, device: torch.device) -> dict[str, float]:
    """An optimizer step's health, read at a log step (the only host syncs it costs): the gradient norm, the
    fp16 loss scale, and the peak GPU memory since the previous log step (whose peak it then resets)."""
    values = {"grad_norm": float(grad_norm)}
    if scaler.is_enabled():
        values["loss_scale"] = scaler.get_scale()
    if device.type == "cuda":
        values["perf/gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        values["perf/gpu_mem_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return values


def _rgb(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised image -> (H, W, 3) in [0, 1]."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    return (x.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _semantic(ids: torch.Tensor) -> np.ndarray:
    """(H, W) class ids (-1 = ignore) -> (H, W, 3): a fixed colour per class, ignore black."""
    palette = plt.get_cmap("tab20")(np.arange(20))[:, :3]
    ids = ids.cpu().numpy()
    out = palette[np.clip(ids, 0, None) % 20]
    out[ids < 0] = 0
    return out


def _instance(rep: torch.Tensor) -> np.ndarray:
    """(3, H, W) boundary + centre offsets -> (H, W, 3): the boundary in the red channel (a boundary pixel
    without offset is pink, (1, 0.5, 0.5)), offsets as green/blue around grey-teal (squashed by tanh, the
    same in every column, whether their unit is the patch or the image)."""
    b, dy, dx = rep.float().cpu()
    return torch.stack([b.clamp(0, 1), 0.5 + 0.5 * torch.tanh(2 * dy), 0.5 + 0.5 * torch.tanh(2 * dx)],
                       dim=-1).numpy()


_TO_IMAGE = {"rgb": _rgb, "semantic": _semantic, "instance": _instance}


def _pixel_mask(keep: torch.Tensor, size: int) -> np.ndarray:
    """(N,) bool per patch -> (H, W, 1) bool per pixel."""
    grid = int(round(keep.numel() ** 0.5))
    patch = size // grid
    return keep.view(grid, grid).cpu().repeat_interleave(patch, 0).repeat_interleave(patch, 1).numpy()[..., None]


def _empty(modality: str, target: torch.Tensor) -> str | None:
    """Why a modality's map has nothing to show, or None: no labelled pixel, or no instance."""
    if modality == "semantic" and not bool((target >= 0).any()):
        return "all ignore"
    if modality == "instance" and not bool(target.any()):  # no boundary, no offset: no instance in the crop
        return "no instances"
    return None


def _notes(modality: str, target: torch.Tensor, visible: torch.Tensor) -> tuple[str | None, ...]:
    """Per column, a word for a panel that would otherwise be a puzzling flat colour."""
    empty = _empty(modality, target)
    seen = int(visible.sum())
    masked_input = "all masked" if seen == 0 else empty
    target_note = "nothing masked: no loss" if seen == visible.numel() else empty
    return empty, masked_input, None, target_note


def legend_entries(modalities: list[str]) -> list[tuple[tuple[Patch, ...], str]]:
    """(swatches, label) per legend line, each swatch coloured by the function that draws the panels: the
    class colours as a strip of the first few, a boundary as `_instance` draws one (red over grey-teal)."""
    def swatch(rgb: np.ndarray) -> Patch:
        return Patch(color=tuple(float(c) for c in rgb))

    classes = _semantic(torch.arange(6)[None])[0]  # (6, 3): the first classes' colours
    ignore = _semantic(torch.tensor([[-1]]))[0, 0]
    # Instance pixels (boundary, dy, dx): a boundary with no offset, no offset, then offsets down and right.
    instance = _instance(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])[:, None])[0]
    entries = [((swatch(np.full(3, 0.5)),), "grey: masked (hidden from the encoder); in target: visible, no loss")]
    if "semantic" in modalities:
        entries += [(tuple(swatch(c) for c in classes), "semantic: one colour per class (tab20, repeating after 20)"),
                    ((swatch(ignore),), "semantic: ignore")]
    if "instance" in modalities:
        entries += [((swatch(instance[0]),), "instance: boundaries"),
                    (tuple(swatch(c) for c in instance[1:]), "instance: green/blue = offset to the instance centre "
                                                             "(y/x); teal = no offset")]
    return entries


def _legend(fig: Figure, modalities: list[str]) -> None:
    entries = legend_entries(modalities)
    fig.legend(handles=[h for h, _ in entries], labels=[label for _, label in entries], loc="lower center", ncol=2,
               fontsize=7, frameon=False, handler_map={tuple: HandlerTuple(ndivide=None, pad=0)})


def reconstruction_figure(batch: dict[str, torch.Tensor], reconstruction: dict[str, torch.Tensor],
                          visible: dict[str, torch.Tensor], num_samples: int = 2) -> Figure:
    """One row per (sample, modality): the input, what the encoder saw of it, the model's
    reconstruction (visible patches from the input, the rest predicted) and the target of the loss
    (the input where patches were masked). Masked-out areas are grey; a legend below says so and
    how labels are coloured, and a panel with nothing to show says why in its title."""
    modalities = list(reconstruction)
    num_samples = min(num_samples, batch["rgb"].shape[0])
    rows = num_samples * len(modalities)
    legend_rows = 1 + ("semantic" in modalities) + ("instance" in modalities)
    height = 2.2 * rows + 0.25 * legend_rows
    fig, axes = plt.subplots(rows, len(COLUMNS), figsize=(2.2 * len(COLUMNS), height), squeeze=False)
    grey = np.full(3, 0.5)
    for s in range(num_samples):
        for m, modality in enumerate(modalities):
            to_image = _TO_IMAGE[modality]
            full = to_image(batch[modality][s])
            keep = _pixel_mask(visible[modality][s], full.shape[0])
            images = (full, np.where(keep, full, grey), to_image(reconstruction[modality][s]),
                      np.where(keep, grey, full))
            notes = _notes(modality, batch[modality][s], visible[modality][s])
            row = s * len(modalities) + m
            for c, image in enumerate(images):
                ax = axes[row, c]
                ax.imshow(image, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                title = [COLUMNS[c]] if row == 0 else []
                if notes[c]:
                    title.append(f"({notes[c]})")
                if title:
                    ax.set_title("\n".join(title), fontsize=8)
                if c == 0:
                    ax.set_ylabel(f"#{s} {modality}", fontsize=9)
    _legend(fig, modalities)
    fig.tight_layout(rect=(0, 0.3 * legend_rows / height, 1, 1))
    return fig
