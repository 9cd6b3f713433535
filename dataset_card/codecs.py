"""Canonical encoders and decoders for the contract's columns. Both stages use these, never their own.

- Images: `decode_image` turns the original file bytes into (H, W, 3) uint8 RGB. EXIF orientation
  is *not* applied (in either stage), so masks stay aligned with the stored pixels.
- Masks: single-channel PNG bytes written here (`datasets.Image` would store a uint16 array as
  TIFF), decoded through numpy as int64 (torchvision reads 16-bit PNGs as int16).
- Instances: COCO RLE as pycocotools writes it, with `counts` as a str.
- `tight_box` / `crop_rle`: a mask's box, and its full-size RLE from the crop of that box.
The painting rules that turn `instances` into `instance_mask` are `dataset_card.painting`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
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


def coco_mask():
    """pycocotools' mask API, imported on first use, so that readers of the PNG maps alone (the
    training loader, `benchmarks/train_gpu.py` on a bare CUDA box) run without pycocotools."""
    import pycocotools.mask

    return pycocotools.mask


def encode_rle(mask: np.ndarray) -> dict:
    """(H, W) bool mask -> {"size": [h, w], "counts": str}, pycocotools' compressed RLE."""
    rle = coco_mask().encode(np.asfortranarray(mask, dtype=np.uint8))
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
    decoded = coco_mask().decode({"size": size, "counts": counts})
    if check and decoded.size and (decoded.max() > 1 or coco_mask().encode(decoded)["counts"] != counts):
        raise DecodeError(f"corrupt RLE: its runs do not describe a {size[0]}x{size[1]} mask")
    return decoded.astype(bool)


def rle_area(rle: Mapping) -> int:
    counts = rle["counts"]
    counts = counts.encode("ascii") if isinstance(counts, str) else counts
    return int(coco_mask().area({"size": [int(s) for s in rle["size"]], "counts": counts}))


def _counts(rle: Mapping) -> dict:
    counts = rle["counts"]
    return {"size": [int(s) for s in rle["size"]], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def tight_box(rle: Mapping) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1), the half-open pixel box holding every pixel of the mask (zeros if empty)."""
    x, y, w, h = (int(round(v)) for v in coco_mask().toBbox(_counts(rle)))
    return y, x, y + h, x + w


def crop_rle(crop: np.ndarray, y0: int, x0: int, height: int, width: int) -> dict:
    """The full-size COCO RLE of a mask given as a crop at (y0, x0): {"size": [H, W], "counts": str}.

    Costs O(H x crop width), not O(H x W): column-major runs of the box's columns, padded with the
    zero runs of the columns left and right of it.
    """
    h, w = crop.shape
    columns = np.zeros((height, w), np.uint8, order="F")
    columns[y0 : y0 + h] = crop
    flat = columns.ravel(order="F")
    if not flat.any():
        return {"size": [height, width], "counts": _text(coco_mask().encode(np.zeros((height, width), np.uint8,
                                                                                      order="F"))["counts"])}
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat[0]:
        runs.insert(0, 0)  # RLE starts with a run of zeros
    runs[0] += x0 * height
    right = (width - x0 - w) * height
    if not flat[-1]:
        runs[-1] += right
    elif right:
        runs.append(right)
    rle = coco_mask().frPyObjects({"counts": runs, "size": [height, width]}, height, width)
    return {"size": [height, width], "counts": _text(rle["counts"])}


def _text(counts) -> str:
    return counts.decode("ascii") if isinstance(counts, bytes) else str(counts)
