"""Canonical encoders and decoders for the contract's columns. Both stages use these, never their own.

- Images: `decode_image` turns the original file bytes into (H, W, 3) uint8 RGB (`rgb_image`: the
  same pixels as a PIL image). EXIF orientation is *not* applied (in either stage), so masks stay
  aligned with the stored pixels.
- Label maps (schema v3): a zstd frame of a `.npy` file holding the (H, W) map as uint8, or as
  little-endian uint16 when a value needs it. Both are standard formats, so a reader without this
  project decodes a map with `np.load(io.BytesIO(zstandard.decompress(data)))`. `decode_mask`
  also reads the single-channel PNGs of schema v2 (the upgrade reads them). Why not PNG: a
  realistic 375 x 500 map decodes in 0.05 ms instead of 0.38, and is 3.7 KB instead of 7.0
  (docs/DESIGN.md), and the training loader decodes two on every sample.
- Instances: COCO RLE as pycocotools writes it, with `counts` as a str.
- `tight_box` / `crop_rle`: a mask's box, and its full-size RLE from the crop of that box.
The painting rules that turn `instances` into `instance_mask` are `dataset_card.contract.painting`.
"""

from __future__ import annotations

import functools
import io
import threading
from collections.abc import Mapping

import numpy as np
from PIL import Image, ImageFile

try:  # a project dependency; optional so that the loader's PNG path also runs on a bare CUDA box
    import cv2
except ImportError:  # pragma: no cover
    cv2 = None

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


def rgb_image(data: bytes) -> Image.Image:
    """Original file bytes -> a PIL image in mode RGB holding the pixels both stages see.

    16-bit grey is scaled to 8 bits (PIL's convert("RGB") would saturate it), alpha is dropped
    (the colour under it is kept, not composited), CMYK, palette and grey become RGB.
    """
    img = _open(data)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        grey = np.asarray(img).astype(np.float64)
        scale = 257.0 if grey.max(initial=0) > 255 or img.mode != "I" else 1.0
        grey = np.clip(np.rint(grey / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    if img.mode == "F":
        grey = np.clip(np.rint(np.asarray(img) * (255.0 if np.asarray(img).max(initial=0) <= 1 else 1)), 0, 255)
        return Image.fromarray(np.repeat(grey.astype(np.uint8)[:, :, None], 3, axis=2))
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(data: bytes) -> np.ndarray:
    """Original file bytes -> (H, W, 3) uint8 RGB, the pixels both stages see (`rgb_image`'s)."""
    return np.asarray(rgb_image(data), dtype=np.uint8)


# zstd level of the label maps: 9 makes realistic maps 15% smaller than the default 3 for 0.7 ms
# more per map when writing (labeling runs at tens of images/s per GPU), and decodes as fast.
MASK_ZSTD_LEVEL = 9
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def zstandard():
    """The zstandard bindings, imported on first use with a sentence if they are missing (they are
    a project dependency; a bare GPU box running a benchmark may lack them)."""
    try:
        import zstandard as zstd
    except ImportError:
        raise DecodeError("label maps of dataset schema v3 are zstd-compressed: pip install zstandard") from None
    return zstd


def encode_mask(mask: np.ndarray) -> bytes:
    """(H, W) integer map -> a zstd frame of its `.npy` file: uint8 if the array is uint8, else
    little-endian uint16. Values must fit in uint16; the caller picks uint8 for small taxonomies
    (see schema.semantic_mask_dtype)."""
    if mask.ndim != 2:
        raise ValueError(f"a mask must be (H, W), got shape {mask.shape}")
    if mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > 65535):
            raise ValueError("mask values must lie in [0, 65535] to be stored as uint16")
        mask = mask.astype("<u2")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(mask), allow_pickle=False)
    return zstandard().ZstdCompressor(level=MASK_ZSTD_LEVEL).compress(buf.getvalue())


def encode_instance_mask(instance_map: np.ndarray) -> bytes:
    """(H, W) instance id map -> `encode_mask` bytes, as uint8 when every id is below 256 (most
    images: SAM keeps tens to a few hundred masks), else uint16: same ids either way, half the bytes."""
    narrow = instance_map.size == 0 or int(instance_map.max()) < 256
    return encode_mask(instance_map.astype(np.uint8) if narrow else instance_map)


@functools.lru_cache(maxsize=64)
def _npy_layout(header: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    """A `.npy` file's first bytes -> (dtype, shape, data offset), parsed by numpy's own reader.
    Cached: a dataset's maps share a few dozen headers, and parsing one costs as much as decoding
    a map."""
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    if version != (1, 0):
        raise ValueError(f".npy version {version}")
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    if fortran or len(shape) != 2 or dtype not in (np.dtype(np.uint8), np.dtype("<u2")):
        raise ValueError(f"a label map must be a C-order (H, W) uint8 or uint16 array, got {dtype} {shape}")
    return dtype, shape, stream.tell()


_local = threading.local()


def _decompressor():
    """This thread's zstd decompressor: reusing one saves its set-up (a fifth of a map's decode);
    one per thread, since a decompressor is not safe to share between threads."""
    if not hasattr(_local, "decompressor"):
        _local.decompressor = zstandard().ZstdDecompressor()
    return _local.decompressor


def _decode_npy_zstd(data: bytes) -> np.ndarray:
    zstd = zstandard()
    try:
        raw = _decompressor().decompress(data)  # frames state their size (ZstdCompressor writes it)
        header_len = 10 + int.from_bytes(raw[8:10], "little")  # .npy 1.0: magic, version, u16 length
        dtype, shape, offset = _npy_layout(bytes(raw[:header_len]))
        values = np.frombuffer(raw, dtype, count=shape[0] * shape[1], offset=offset).reshape(shape)
    except (ValueError, zstd.ZstdError) as err:
        raise DecodeError(f"cannot decode label map: {err}") from err
    return values if dtype.isnative else values.astype(dtype.newbyteorder("="))


def _decode_png(data: bytes) -> np.ndarray:
    """A single-channel PNG (schema v2) -> its values as stored: through OpenCV when the header says
    an 8- or 16-bit grey PNG (no PIL image object), anything else through PIL."""
    grey = len(data) > 25 and data[24] in (8, 16) and data[25] == 0
    if cv2 is not None and grey:
        values = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if values is not None and values.ndim == 2:
            return values
    img = _open(data)
    if img.mode not in ("L", "I;16", "I;16L", "I;16B", "I", "P"):
        raise DecodeError(f"a mask must be a single-channel PNG, got mode {img.mode}")
    values = np.asarray(img)
    return values if values.dtype.isnative else values.astype(values.dtype.newbyteorder("="))


def decode_mask(data: bytes, dtype: type | None = np.int64) -> np.ndarray:
    """A stored label map -> (H, W) values as `dtype`: the zstd `.npy` of schema v3, or the
    single-channel PNG of schema v2 (told apart by their first bytes).

    dtype None keeps the stored width (uint8 or uint16) in native byte order, read-only for v3 maps:
    the training loader crops before it widens.
    """
    if not data:
        raise DecodeError("empty label map (0 bytes)")
    if data[:4] == ZSTD_MAGIC:
        values = _decode_npy_zstd(data)
    elif data[:8] == PNG_MAGIC:
        values = _decode_png(data)
    else:
        raise DecodeError(f"a label map must be a zstd-compressed .npy (or a v2 PNG); it starts with {data[:8]!r}")
    return values if dtype is None else values.astype(dtype)


def coco_mask():
    """pycocotools' mask API, imported on first use, so that readers of the label maps alone (the
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
