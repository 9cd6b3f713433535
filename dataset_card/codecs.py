"""Canonical encoders and decoders for the contract's columns. Both stages use these, never their own.

- Images: `decode_image` turns the original file bytes into (H, W, 3) uint8 RGB. EXIF orientation
  is *not* applied (in either stage), so masks stay aligned with the stored pixels.
- Masks: single-channel PNG bytes written here (`datasets.Image` would store a uint16 array as
  TIFF), decoded through numpy as int64 (torchvision reads 16-bit PNGs as int16).
- Instances: COCO RLE as pycocotools writes it, with `counts` as a str.
- `paint`: the one painting order that turns `instances` into `instance_mask`.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image, ImageFile

# Refuse truncated files instead of filling them with grey: a half image with full masks is worse
# than an entry in the errors table.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class DecodeError(ValueError):
    """Bytes that are not a readable image (empty, truncated, not an image, unsupported mode)."""


def _open(data: bytes) -> Image.Image:
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Image.DecompressionBombError as err:
        raise DecodeError(f"image too large to decode safely: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:  # PIL reports truncation and junk as these
        raise DecodeError(f"cannot decode image: {err}") from err
    return img


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone, without decoding pixels."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        return Image.open(io.BytesIO(data)).size
    except (OSError, SyntaxError, ValueError) as err:
        raise DecodeError(f"cannot read image header: {err}") from err


def decode_image(data: bytes) -> np.ndarray:
    """Original file bytes -> (H, W, 3) uint8 RGB, the pixels both stages see.

    16-bit grey is scaled to 8 bits (PIL's convert("RGB") would saturate it), alpha is dropped
    (the colour under it is kept, not composited), CMYK, palette and grey become RGB.
    """
    img = _open(data)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        grey = np.asarray(img).astype(np.float64)
        scale = 257.0 if grey.max(initial=0) > 255 or img.mode != "I" else 1.0
        grey = np.clip(np.rint(grey / scale), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode == "F":
        grey = np.clip(np.rint(np.asarray(img) * (255.0 if np.asarray(img).max(initial=0) <= 1 else 1)), 0, 255)
        return np.repeat(grey.astype(np.uint8)[:, :, None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def encode_mask_png(mask: np.ndarray) -> bytes:
    """(H, W) integer map -> single-channel PNG bytes: 8-bit if uint8, else 16-bit.

    Values must fit in uint16; the caller picks uint8 for small taxonomies (see schema).
    """
    if mask.ndim != 2:
        raise ValueError(f"a mask must be (H, W), got shape {mask.shape}")
    if mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > 65535):
            raise ValueError("mask values must lie in [0, 65535] to be stored as a 16-bit PNG")
        mask = mask.astype(np.uint16)
    buf = io.BytesIO()
    # compress_level 1: masks compress well anyway, and labeling is CPU-bound on this step.
    Image.fromarray(np.ascontiguousarray(mask)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_instance_png(instance_map: np.ndarray) -> bytes:
    """(H, W) instance id map -> PNG bytes: 8-bit when every id is below 256 (most images: SAM keeps
    tens to a few hundred masks), else 16-bit. Same ids either way; the 8-bit file is a third
    smaller and decodes about 40% faster, which the training loader feels on every sample."""
    narrow = instance_map.size == 0 or int(instance_map.max()) < 256
    return encode_mask_png(instance_map.astype(np.uint8) if narrow else instance_map)


def decode_mask(data: bytes, dtype: type | None = np.int64) -> np.ndarray:
    """Single-channel PNG bytes -> (H, W) map (8- or 16-bit, values unchanged), as `dtype`.

    dtype None keeps the stored width (uint8 or uint16) in native byte order: the training loader
    crops before it widens.
    """
    img = _open(data)
    if img.mode not in ("L", "I;16", "I;16L", "I;16B", "I", "P"):
        raise DecodeError(f"a mask must be a single-channel PNG, got mode {img.mode}")
    values = np.asarray(img)
    if dtype is None:
        return values if values.dtype.isnative else values.astype(values.dtype.newbyteorder("="))
    return values.astype(dtype)


def encode_rle(mask: np.ndarray) -> dict:
    """(H, W) bool mask -> {"size": [h, w], "counts": str}, pycocotools' compressed RLE."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: Mapping, check: bool = True) -> np.ndarray:
    """{"size": [h, w], "counts": str | bytes} -> (H, W) bool mask.

    Raises DecodeError for counts that do not cover exactly h*w pixels: pycocotools would return
    uninitialised memory for them without a word. The check re-encodes the mask; `check=False`
    skips it for RLEs this process just encoded itself (the labeler's hot path).
    """
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    size = [int(s) for s in rle["size"]]
    decoded = mask_utils.decode({"size": size, "counts": counts})
    if check and decoded.size and (decoded.max() > 1 or mask_utils.encode(decoded)["counts"] != counts):
        raise DecodeError(f"corrupt RLE: its runs do not describe a {size[0]}x{size[1]} mask")
    return decoded.astype(bool)


def rle_area(rle: Mapping) -> int:
    counts = rle["counts"]
    counts = counts.encode("ascii") if isinstance(counts, str) else counts
    return int(mask_utils.area({"size": [int(s) for s in rle["size"]], "counts": counts}))


def painting_order(instances: Iterable[Mapping]) -> list[Mapping]:
    """Instances in the order they are painted: by `id` ascending, later ones on top.

    Writers number instances 1..K by area, largest first, so smaller masks (parts) are painted
    over the larger ones that contain them (wholes) and stay visible in `instance_mask`.
    """
    return sorted(instances, key=lambda inst: int(inst["id"]))


def paint(instances: Iterable[Mapping], height: int, width: int) -> np.ndarray:
    """Instances -> (H, W) uint16 instance map: 0 = none, k = the instance with id k.

    This is the definition of `instance_mask`: a shard is valid only if its map equals this.
    """
    out = np.zeros((height, width), dtype=np.uint16)
    for inst in painting_order(instances):
        mask = decode_rle(inst["rle"])
        if mask.shape != (height, width):
            raise ValueError(f"instance {inst['id']} has RLE size {mask.shape}, image is {(height, width)}")
        out[mask] = int(inst["id"])
    return out
