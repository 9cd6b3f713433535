"""What made the labels: the software and hardware of the model actor that labeled a shard's rows.

An environment is recorded, never compared: a rerun under newer libraries, another CUDA build or
another GPU resumes (with one warning line, `manifest.prepare`), and each shard's footer lists the
environments its rows were made in (`writer.commit`), as the model actors saw them, not the
driver. The model actor collects its environment once, at start (`collect`), and each row carries
it as one canonical JSON string (`encode`): the same string object on every row, dictionary-encoded
in the part files.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
from importlib import metadata

from labeling.pipeline.labels_version import label_code_digest

# Libraries whose release can move a label by float rounding (a resize, mask decoding, RLE).
SOFTWARE = ("torch", "torchvision", "transformers", "segment-anything", "pycocotools", "opencv-python-headless",
            "numpy", "pillow")


def software_versions() -> dict[str, str | None]:
    """{distribution: installed version (None when absent)} of SOFTWARE, plus Python's."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in SOFTWARE:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def code_version() -> str:
    """`<this package's version>+<12 hex of the label-shaping code's syntax digest>` (provenance only)."""
    try:
        version = metadata.version("c2fmae")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    return f"{version}+{label_code_digest()[:12]}"


def _nvidia_driver() -> str | None:
    """The NVIDIA kernel driver's version, from /proc or nvidia-smi (None without one)."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            found = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]*)", f.read())
        if found:
            return found.group(1)
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return out.splitlines()[0].strip() or None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def no_cuda_sentence() -> str:
    """Why a model actor that was given a GPU cannot use it, and what to do, in one sentence: the
    NVIDIA driver this host runs (if any can be read) and the CUDA torch was built for."""
    import torch

    driver = _nvidia_driver()
    host = f"NVIDIA driver {driver}" if driver else "no NVIDIA driver readable (/proc/driver/nvidia, nvidia-smi)"
    if torch.version.cuda is None:
        build, fix = f"torch {torch.__version__} built without CUDA", "install a CUDA build of torch on the GPU nodes"
    else:
        build = f"torch {torch.__version__} built for CUDA {torch.version.cuda}"
        fix = (f"install a driver that supports CUDA {torch.version.cuda} or a torch build for this driver, "
               "and check that the GPU is visible (nvidia-smi)")
    return (f"a model actor was given a GPU but torch sees no CUDA device on {platform.node()} ({host}, {build}): "
            f"{fix}, or run the models on CPUs with --device cpu")


def collect(device: str, compiled: bool) -> dict:
    """This process's environment for labels made on `device` ("cuda" or "cpu"), SAM compiled or not."""
    import torch

    gpu = device == "cuda"
    return {
        **software_versions(),
        "c2fmae": code_version(),
        "device": device,
        "cuda": torch.version.cuda,  # the CUDA torch was built with (None for a CPU build)
        "driver": _nvidia_driver() if gpu else None,
        "gpu": torch.cuda.get_device_name() if gpu else None,
        "compile": bool(compiled),
    }


def encode(environment: dict) -> str:
    """One canonical JSON string per environment: equal environments give equal strings."""
    return json.dumps(environment, sort_keys=True, separators=(",", ":"))


def decode_all(encoded) -> list[dict]:
    """The distinct environments among `encoded` strings (empty ones skipped), in a fixed order."""
    return [json.loads(e) for e in sorted({e for e in encoded if e})]
