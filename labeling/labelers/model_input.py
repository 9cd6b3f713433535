"""What the models see of an image file: its canonical decode, shrunk to at most `max_side`.

Models never see full resolution: SAM's own input is 1024 px, so a larger image is shrunk (area
interpolation) to a longest side of `max_side` and its masks come back at that size; the semantic
map is still made at the original size (`semantic.SemanticLabeler` upsamples its scores there).
The header is read first, so an image over `max_pixels` is refused before its pixels are decoded.
"""

from __future__ import annotations

import cv2
import numpy as np

from dataset_card.contract import codecs


def check_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the header, or raises DecodeError (empty, unreadable, over `max_pixels`)."""
    width, height = codecs.image_size(data)
    if width * height > max_pixels:
        raise codecs.DecodeError(
            f"image too large: {width}x{height} = {width * height} pixels, more than --max-pixels {max_pixels}")
    return width, height


def model_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(h, w) the models get: the image shrunk to a longest side of `max_side`, never enlarged."""
    longest = max(height, width)
    if longest <= max_side:
        return height, width
    scale = max_side / longest
    return max(1, round(height * scale)), max(1, round(width * scale))


def pixels_for_models(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8 with h, w from `model_size`."""
    h, w = model_size(rgb.shape[0], rgb.shape[1], max_side)
    if (h, w) == rgb.shape[:2]:
        return rgb
    return cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)


def decode(data: bytes, max_pixels: int, max_side: int) -> tuple[np.ndarray, int, int]:
    """Original bytes -> ((h, w, 3) model pixels, width, height) or raises `codecs.DecodeError`."""
    width, height = check_size(data, max_pixels)
    rgb = codecs.decode_image(data)  # THE canonical decode: same pixels as training sees
    if rgb.shape[:2] != (height, width):
        raise codecs.DecodeError(f"header says {width}x{height} but pixels are {rgb.shape[1]}x{rgb.shape[0]}")
    pixels = pixels_for_models(rgb, max_side)
    return (pixels if pixels.flags.writeable and pixels.flags.c_contiguous else pixels.copy()), width, height
