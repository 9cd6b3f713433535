"""Canonical decoding of odd images, mask PNGs and RLE."""

import io

import numpy as np
import pytest
from PIL import Image

from dataset_card.contract import codecs


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_rgb_jpeg_and_png():
    arr = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    out = codecs.decode_image(_encode(Image.fromarray(arr), "PNG"))
    np.testing.assert_array_equal(out, arr)
    assert codecs.decode_image(_encode(Image.fromarray(arr), "JPEG")).shape == (20, 30, 3)


def test_sixteen_bit_grey_is_scaled_not_saturated():
    grey = np.full((8, 9), 32768, np.uint16)
    out = codecs.decode_image(_encode(Image.fromarray(grey), "PNG"))
    assert out.shape == (8, 9, 3) and out.dtype == np.uint8
    assert 120 <= out[0, 0, 0] <= 135  # PIL's convert("RGB") would give 255


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK"])
def test_other_modes_become_rgb(mode):
    img = Image.new("RGB", (7, 5), (10, 200, 30)).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = codecs.decode_image(_encode(img, fmt))
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8


def test_one_pixel_image():
    assert codecs.decode_image(_encode(Image.new("RGB", (1, 1)), "PNG")).shape == (1, 1, 3)


@pytest.mark.parametrize(
    "data, reason",
    [(b"", "empty"), (b"this is not an image", "cannot decode"), (None, "cannot decode")],
)
def test_bad_bytes_raise_decode_error(data, reason):
    if data is None:  # a JPEG cut in half
        arr = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        full = _encode(Image.fromarray(arr), "JPEG")
        data = full[: len(full) // 2]
    with pytest.raises(codecs.DecodeError, match=reason):
        codecs.decode_image(data)


def test_exif_orientation_is_not_applied():
    arr = np.zeros((10, 20, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": a viewer would show 20 high, 10 wide
    data = _encode(Image.fromarray(arr), "JPEG", exif=exif.tobytes())
    assert codecs.decode_image(data).shape == (10, 20, 3)


@pytest.mark.parametrize("dtype, top", [(np.uint8, 254), (np.uint16, 65535), (np.int64, 300)])
def test_mask_round_trip(dtype, top):
    mask = np.random.default_rng(0).integers(0, top + 1, (13, 17)).astype(dtype)
    data = codecs.encode_mask(mask)
    assert data[:4] == codecs.ZSTD_MAGIC
    out = codecs.decode_mask(data)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, mask.astype(np.int64))


@pytest.mark.parametrize("dtype, top", [(np.uint8, 254), (np.uint16, 65535)])
def test_mask_decodes_as_stored(dtype, top):
    """dtype=None (the training loader's path) keeps the stored width and the values."""
    mask = np.random.default_rng(1).integers(0, top + 1, (13, 17)).astype(dtype)
    out = codecs.decode_mask(codecs.encode_mask(mask), dtype=None)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, mask)


def test_mask_is_a_standard_npy_in_a_standard_zstd_frame():
    """What the card tells readers without this project: zstandard + np.load give the map back."""
    import zstandard

    mask = np.random.default_rng(2).integers(0, 65535, (5, 9)).astype(np.uint16)
    for stored in (mask, np.zeros((0, 3), np.uint8)):
        got = np.load(io.BytesIO(zstandard.decompress(codecs.encode_mask(stored))), allow_pickle=False)
        assert got.dtype == stored.dtype and np.array_equal(got, stored)


def test_mask_decode_names_bad_bytes():
    import zstandard

    for data, match in ((b"", "empty"), (b"GIF89a" + bytes(20), "zstd-compressed .npy"),
                        (codecs.ZSTD_MAGIC + bytes(12), "cannot decode label map")):
        with pytest.raises(codecs.DecodeError, match=match):
            codecs.decode_mask(data)
    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(codecs.DecodeError, match=r"\(H, W\) uint8 or uint16"):
        codecs.decode_mask(zstandard.ZstdCompressor().compress(buf.getvalue()))


@pytest.mark.parametrize("dtype, top", [(np.uint8, 254), (np.uint16, 65535), (np.uint16, 200)])
def test_v2_png_maps_decode_as_pil_reads_them(dtype, top):
    """Schema v2 stored PNGs (read by the upgrade): OpenCV's fast path gives PIL's values and width."""
    mask = np.random.default_rng(3).integers(0, top + 1, (37, 53)).astype(dtype)
    data = _encode(Image.fromarray(mask), "PNG")
    expected = np.asarray(Image.open(io.BytesIO(data)))
    got = codecs.decode_mask(data, dtype=None)
    assert got.dtype == expected.dtype.newbyteorder("=") and np.array_equal(got, expected)


def test_mask_png_as_stored_reads_palette_indices_and_names_bad_modes():
    palette = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4)).convert("P")
    np.testing.assert_array_equal(codecs.decode_mask(_encode(palette, "PNG"), dtype=None),
                                  np.asarray(palette))  # the palette indices, as PIL reads them
    with pytest.raises(codecs.DecodeError, match="single-channel"):
        codecs.decode_mask(_encode(Image.fromarray(np.zeros((3, 4, 3), np.uint8)), "PNG"), dtype=None)
    with pytest.raises(codecs.DecodeError):
        codecs.decode_mask(b"\x89PNG\r\n\x1a\ntruncated", dtype=None)


def test_instance_mask_is_8_bit_below_256_ids_and_16_bit_above():
    ids = np.zeros((6, 7), np.uint16)
    ids[1:3, 2:5] = 255
    for top, dtype in ((255, np.uint8), (256, np.uint16)):
        ids[4, 4] = top
        data = codecs.encode_instance_mask(ids)
        assert codecs.decode_mask(data, dtype=None).dtype == dtype
        np.testing.assert_array_equal(codecs.decode_mask(data), ids.astype(np.int64))


def test_mask_rejects_out_of_range():
    with pytest.raises(ValueError, match="65535"):
        codecs.encode_mask(np.full((2, 2), 70000))


def test_rle_round_trip_and_area():
    mask = np.zeros((31, 17), bool)
    mask[3:20, 4:9] = True
    rle = codecs.encode_rle(mask)
    assert rle["size"] == [31, 17] and isinstance(rle["counts"], str)
    np.testing.assert_array_equal(codecs.decode_rle(rle), mask)
    assert codecs.rle_area(rle) == mask.sum()


def test_crop_rle_and_tight_box():
    mask = np.zeros((9, 7), bool)
    mask[2:5, 3:6] = True
    rle = codecs.encode_rle(mask)
    assert codecs.tight_box(rle) == (2, 3, 5, 6)
    assert codecs.crop_rle(mask[2:5, 3:6], 2, 3, 9, 7) == rle
    assert codecs.tight_box(codecs.encode_rle(np.zeros((4, 4), bool))) == (0, 0, 0, 0)


def test_corrupt_rle_raises_instead_of_returning_garbage():
    mask = np.zeros((20, 20), bool)
    mask[2:5, 3:9] = True
    rle = codecs.encode_rle(mask)
    short = {"size": rle["size"], "counts": codecs.encode_rle(mask[:10])["counts"]}  # runs cover 200 of 400 px
    with pytest.raises(codecs.DecodeError, match="corrupt RLE"):
        codecs.decode_rle(short)
