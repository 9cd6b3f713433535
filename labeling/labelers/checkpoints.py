"""SAM checkpoints: by path, or by name (`vit_h`, `vit_l`, `vit_b`) downloaded once into a cache.

A named checkpoint is the official file from Meta's segment-anything release. It is fetched once
per cache folder (so once per node, or once per cluster when the cache is on shared storage): the
processes that want it take a file lock beside it (`<file>.lock`, `filelock`), the first downloads
with `torch.hub.download_url_to_file` to a temporary name of its own, checks the SHA-256 against the
published value and only then renames it into place; the others wait on the lock and find the file.
So a file at the final path is always complete and verified, and no process ever deletes a file
another may be reading (a failed download removes only its own temporary file). Offline, the one
error names the file, its URL and where to put it. Weights are loaded with
`torch.load(weights_only=True)`, so a checkpoint can hold tensors only, never code.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable

import torch
from filelock import FileLock
from segment_anything import sam_model_registry
from segment_anything.modeling import Sam

from labeling.labelers.tiny_models import TINY_SAM_TYPE, build_tiny_sam

_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"

# name -> (file name, SHA-256). The file names carry the first 6 hex digits of the MD5; the SHA-256
# values are the ones published alongside these files by many independent users of them.
OFFICIAL_CHECKPOINTS = {
    "vit_h": ("sam_vit_h_4b8939.pth", "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
    "vit_l": ("sam_vit_l_0b3195.pth", "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
    "vit_b": ("sam_vit_b_01ec64.pth", "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
}

SAM_BUILDERS: dict[str, Callable[[], Sam]] = {
    "vit_h": sam_model_registry["vit_h"],
    "vit_l": sam_model_registry["vit_l"],
    "vit_b": sam_model_registry["vit_b"],
    TINY_SAM_TYPE: build_tiny_sam,
}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, cannot be downloaded, or does not fit its model type."""


def default_cache_dir() -> str:
    """`$TORCH_HOME/hub/checkpoints` (torch's own cache), so one download serves every tool."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def official_checkpoint(model_type: str, cache_dir: str | None = None, flag: str | None = None) -> str:
    """Path of the official `model_type` checkpoint in `cache_dir`, downloaded and verified if absent
    (by one process at a time: see the module docstring). `flag`: the caller's option that takes a
    checkpoint's path, named in the error when the download fails."""
    file_name, sha256 = OFFICIAL_CHECKPOINTS[model_type]
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, file_name)
    if os.path.isfile(path):
        return path
    url = _BASE_URL + file_name
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        if offline:
            raise ConnectionError("HF_HUB_OFFLINE is set")
        os.makedirs(cache_dir, exist_ok=True)
        with FileLock(path + ".lock"):
            if os.path.isfile(path):  # another process fetched it while this one waited
                return path
            _download_verified(url, path, sha256)
    except (OSError, ConnectionError) as err:  # URLError and socket errors are OSErrors
        raise CheckpointError(
            f"Could not download the SAM {model_type} checkpoint ({err}); download {url} yourself and put it "
            f"at {path}, or pass its path {f'with {flag}' if flag else 'as the checkpoint'}."
        ) from err
    return path


def _download_verified(url: str, path: str, sha256: str) -> None:
    """`url` to `path` through a temporary name of this process's own, renamed only once its SHA-256
    is `sha256`; raises CheckpointError (the temporary file removed) when it is not."""
    temporary = f"{path}.{uuid.uuid4().hex}.partial"
    try:
        torch.hub.download_url_to_file(url, temporary, progress=True)
        actual = file_sha256(temporary)
        if actual != sha256:
            raise CheckpointError(
                f"The downloaded {os.path.basename(path)} has SHA-256 {actual}, not the published {sha256}; it was "
                "deleted, so retry the download."
            )
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def load_sam(model_type: str, checkpoint: str | None = None, cache_dir: str | None = None) -> Sam:
    """SAM of `model_type` with weights from `checkpoint` (a path), or the official file when None.

    model_type: "vit_h" | "vit_l" | "vit_b" | TINY_SAM_TYPE (the test twin; needs a path).
    Returns the model in eval mode on the CPU.
    """
    if model_type not in SAM_BUILDERS:
        raise CheckpointError(f"Unknown SAM model type {model_type!r}; use one of {sorted(SAM_BUILDERS)}.")
    if checkpoint is None:
        if model_type not in OFFICIAL_CHECKPOINTS:
            raise CheckpointError(
                f"SAM model type {model_type!r} has no official checkpoint; pass the path of one "
                "(labeling.labelers.tiny_models.build_tiny_random_models writes one)."
            )
        checkpoint = official_checkpoint(model_type, cache_dir)
    if not os.path.isfile(checkpoint):
        raise CheckpointError(f"SAM checkpoint {checkpoint} does not exist; check the path.")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and unsafe-global errors all mean "not a weights file"
        raise CheckpointError(
            f"{checkpoint} is not a loadable SAM state dict ({type(err).__name__}); re-download or re-save it."
        ) from err
    sam = SAM_BUILDERS[model_type]()
    try:
        sam.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"{checkpoint} does not hold weights of SAM {model_type!r} (missing or mis-shaped tensors); "
            "pass the matching model type."
        ) from err
    return sam.eval()
