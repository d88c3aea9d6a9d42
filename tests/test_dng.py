"""The DNG writer against independent readers: LibRaw (rawpy) and tifffile."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import rawpy
import tifffile

from lightstage.dng import (
    REC709_TO_XYZ,
    DNGError,
    DNGMetadata,
    colour_tags_from_response,
    encode_dng,
    write_dng,
)

RESPONSE = np.array([[0.52, 0.07, -0.02], [0.08, 1.03, 0.04], [-0.01, 0.09, 0.71]])


def _mosaic(h=64, w=96, lo=0, hi=4096, seed=0):
    return np.random.default_rng(seed).integers(lo, hi, (h, w)).astype(np.uint16)


@pytest.mark.parametrize("pattern", ["RGGB", "BGGR", "GRBG", "GBRG"])
def test_rawpy_reads_bit_exact(tmp_path, pattern):
    a = _mosaic(seed=len(pattern) + ord(pattern[0]))
    cm, neutral = colour_tags_from_response(RESPONSE)
    meta = DNGMetadata(pattern, black_level=64, white_level=4095, exposure_time=1 / 240,
                       f_number=5.6, iso=200, colour_matrix1=cm, as_shot_neutral=neutral)
    p = tmp_path / "x.dng"
    digest = write_dng(p, a, meta)
    assert digest == hashlib.sha256(p.read_bytes()).hexdigest()
    with rawpy.imread(str(p)) as r:
        assert np.array_equal(r.raw_image, a)
        assert r.raw_image.dtype == np.uint16
        desc = r.color_desc.decode()
        # LibRaw numbers the second green 3 ("G2"): map indices back to letters
        letters = "".join(desc[i] for i in r.raw_pattern.reshape(-1))
        assert letters == pattern
        assert list(r.black_level_per_channel) == [64] * 4
        assert r.white_level == 4095
        assert r.other.shutter_speed == pytest.approx(1 / 240, rel=1e-6)
        assert r.other.iso_speed == 200
        assert r.other.aperture == pytest.approx(5.6, rel=1e-6)
        assert r.sizes.flip == 0 and (r.sizes.raw_height, r.sizes.raw_width) == a.shape
        # as-shot white balance = 1 / neutral, green normalised to 1
        wb = np.asarray(r.camera_whitebalance[:3])
        white = RESPONSE.sum(1)
        np.testing.assert_allclose(wb, white[1] / white, rtol=1e-5)
        # LibRaw turns ColorMatrix1 into camera -> sRGB with rows of (M_norm) summing to one:
        # independent analytic value inv(diag(1/rowsum) M) = inv(M) diag(rowsum)
        expect = np.linalg.inv(RESPONSE) @ np.diag(RESPONSE.sum(1))
        np.testing.assert_allclose(np.asarray(r.color_matrix)[:, :3], expect, atol=2e-3)


def test_tifffile_sees_dng_and_exif_tags(tmp_path):
    a = _mosaic(40, 50)
    cm, neutral = colour_tags_from_response(RESPONSE)
    p = tmp_path / "y.dng"
    write_dng(p, a, DNGMetadata("BGGR", 256, 16383, 1 / 60, 8.0, 400, cm, neutral))
    with tifffile.TiffFile(p) as t:
        page = t.pages[0]
        assert np.array_equal(page.asarray(), a)
        tags = {tag.code: tag.value for tag in page.tags}
        assert tags[262] == 32803  # CFA
        assert tags[50714] == 256 and tags[50717] == 16383
        assert tuple(tags[33421]) == (2, 2)
        exif = tags[34665]
        assert exif["ISOSpeedRatings"] == 400
        assert exif["ExposureTime"] == (1, 60)
        # ColorMatrix1 maps D65 white (XYZ of Rec.709 white) to the neutral, max 1
        cm_read = np.asarray(tags[50721], dtype=np.float64).reshape(9, 2)
        cm_read = (cm_read[:, 0] / cm_read[:, 1]).reshape(3, 3)
        d65 = REC709_TO_XYZ @ np.ones(3)
        np.testing.assert_allclose(cm_read @ d65, neutral, atol=1e-5)
        assert (cm_read @ d65).max() == pytest.approx(1.0, abs=1e-5)


def test_tifffile_sees_xtrans_and_linear_dng_tags(tmp_path):
    """DNG 1.4 CFA tags of a 6x6 X-Trans mosaic, and a LinearRaw (demosaiced) DNG, as an
    independent TIFF reader sees them."""
    from lightstage.cfa import XTRANS, parse_cfa

    a = _mosaic(36, 48)
    write_dng(tmp_path / "x.dng", a, DNGMetadata(XTRANS, 64, 4095))
    with tifffile.TiffFile(tmp_path / "x.dng") as t:
        page = t.pages[0]
        assert np.array_equal(page.asarray(), a)
        tags = {tag.code: tag.value for tag in page.tags}
        assert tags[262] == 32803 and tuple(tags[33421]) == (6, 6)
        assert bytes(tags[33422]) == parse_cfa(XTRANS).tobytes()  # row-major 0 R, 1 G, 2 B
    rgb = np.stack([_mosaic(24, 30, seed=k) for k in range(3)], -1)
    write_dng(tmp_path / "l.dng", rgb, DNGMetadata(black_level=64, white_level=4095))
    with tifffile.TiffFile(tmp_path / "l.dng") as t:
        page = t.pages[0]
        assert np.array_equal(page.asarray(), rgb)
        tags = {tag.code: tag.value for tag in page.tags}
        assert tags[262] == 34892 and tags[277] == 3  # LinearRaw, 3 samples per pixel
        assert tuple(tags[50714]) == (64, 64, 64) and 33421 not in tags and 33422 not in tags


def test_extremes_and_determinism(tmp_path):
    a = _mosaic(32, 32, 0, 65536, seed=3)
    a[0, 0], a[-1, -1] = 0, 65535
    meta = DNGMetadata("RGGB", 0, 65535, 2.5, 1.4, 6400)
    b1, b2 = encode_dng(a, meta), encode_dng(a.copy(), meta)
    assert b1 == b2
    p = tmp_path / "z.dng"
    p.write_bytes(b1)
    with rawpy.imread(str(p)) as r:
        assert np.array_equal(r.raw_image, a)
        assert r.other.shutter_speed == pytest.approx(2.5)
        assert r.other.iso_speed == 6400
    # a non-contiguous view is written as its values
    big = _mosaic(64, 64, seed=4)
    write_dng(tmp_path / "v.dng", big[::2, ::2], meta)
    with rawpy.imread(str(tmp_path / "v.dng")) as r:
        assert np.array_equal(r.raw_image, big[::2, ::2])


def test_bad_input_is_refused(tmp_path):
    a = _mosaic(32, 32)
    with pytest.raises(DNGError, match="2-D"):
        write_dng(tmp_path / "a.dng", a[None], DNGMetadata())
    with pytest.raises(DNGError, match="uint16"):
        write_dng(tmp_path / "a.dng", a.astype(np.float32), DNGMetadata())
    with pytest.raises(DNGError, match="cfa_pattern"):
        write_dng(tmp_path / "a.dng", a, DNGMetadata(cfa_pattern="RGBX"))
    with pytest.raises(DNGError, match="black_level"):
        write_dng(tmp_path / "a.dng", a, DNGMetadata(black_level=5000, white_level=4095))
    with pytest.raises(DNGError, match="exposure_time"):
        write_dng(tmp_path / "a.dng", a, DNGMetadata(exposure_time=0.0))
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_real_dng_rewritten_reads_identically(real_data, tmp_path):
    """A real sensor's mosaic (OV5647 DNG), re-encoded by us, reads back bit for bit."""
    src = real_data / "raw" / "mini_isp_face_ov5647.dng"
    with rawpy.imread(str(src)) as r:
        raw = r.raw_image.copy()
        desc = r.color_desc.decode()
        pattern = "".join(desc[i] for i in r.raw_pattern.reshape(-1))
        black = int(r.black_level_per_channel[0])
        white = int(r.white_level)
        wb = np.asarray(r.camera_whitebalance[:3], dtype=np.float64)
    meta = DNGMetadata(pattern, black, white, 1 / 50, 2.9, 100, None, wb[1] / wb)
    p = tmp_path / "face.dng"
    write_dng(p, raw, meta)
    with rawpy.imread(str(p)) as r:
        assert np.array_equal(r.raw_image, raw)
        assert r.white_level == white
        assert list(r.black_level_per_channel) == [black] * 4
        np.testing.assert_allclose(np.asarray(r.camera_whitebalance[:3]) / r.camera_whitebalance[1],
                                   wb / wb[1], rtol=1e-4)


def test_images_libraw_cannot_read_are_refused_by_name(tmp_path):
    """LibRaw treats a raw image under 22 pixels on a side as "not a raw file": the writer
    refuses it with that reason instead of leaving a file no decoder of ours can open."""
    import rawpy

    with pytest.raises(DNGError, match="under 22 pixels"):
        write_dng(tmp_path / "s.dng", _mosaic(16, 40), DNGMetadata("RGGB", 64, 4095))
    assert not (tmp_path / "s.dng").exists()
    write_dng(tmp_path / "ok.dng", _mosaic(22, 22), DNGMetadata("RGGB", 64, 4095))
    with rawpy.imread(str(tmp_path / "ok.dng")) as r:  # the smallest size LibRaw takes
        assert r.raw_image_visible.shape == (22, 22)
