"""Raw decode: CFA orientation, normalisation, saturation and demosaic against independent truth
(LibRaw's own linear development of real raw files, analytic images)."""

from __future__ import annotations

import numpy as np
import pytest

from lightstage.raw import (RawError, cfa_masks, demosaic_bilinear, mosaic_from_rgb,
                            normalise_mosaic, read_raw, saturation_rgb)

PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")


@pytest.mark.parametrize("cfa", PATTERNS)
def test_demosaic_flat_colour_is_exact(cfa):
    rgb = np.array([0.7, 0.2, 0.05], np.float32)[:, None, None] * np.ones((3, 9, 12), np.float32)
    out = demosaic_bilinear(mosaic_from_rgb(rgb, cfa), cfa)
    np.testing.assert_allclose(out, rgb, rtol=1e-6)


@pytest.mark.parametrize("cfa", PATTERNS)
def test_demosaic_reproduces_linear_ramps_in_the_interior(cfa):
    y, x = np.mgrid[0:16, 0:20].astype(np.float32)
    rgb = np.stack([0.1 + 0.01 * x, 0.2 + 0.02 * y, 0.3 + 0.005 * (x + y)])
    out = demosaic_bilinear(mosaic_from_rgb(rgb, cfa), cfa)
    np.testing.assert_allclose(out[:, 2:-2, 2:-2], rgb[:, 2:-2, 2:-2], rtol=1e-5, atol=1e-6)
    # measured photosites keep their own value everywhere, borders included
    m = cfa_masks(cfa, 16, 20).astype(bool)
    np.testing.assert_allclose(out[m], rgb[m], rtol=1e-6)


def test_normalise_and_saturation():
    raw = np.array([[64, 4095], [2079, 4090]], np.uint16)
    v, sat = normalise_mosaic(raw, 64, 4095, margin=5)
    np.testing.assert_allclose(v, [[0, 1], [2015 / 4031, (4090 - 64) / 4031]], rtol=1e-6)
    assert sat.tolist() == [[False, True], [False, True]]
    s = np.zeros((7, 7), bool)
    s[3, 3] = True
    d = saturation_rgb(s)
    assert d.sum() == 9 and d[2:5, 2:5].all()


def _libraw_linear(path):
    rawpy = pytest.importorskip("rawpy")
    with rawpy.imread(str(path)) as r:
        out = r.postprocess(gamma=(1, 1), no_auto_bright=True, output_bps=16, adjust_maximum_thr=0.0,
                            user_wb=[1, 1, 1, 1], user_flip=0, output_color=rawpy.ColorSpace.raw,
                            demosaic_algorithm=rawpy.DemosaicAlgorithm.LINEAR)
    return out.astype(np.float64) / 65535.0


@pytest.mark.parametrize("name,cfa,black,white", [
    ("mini_isp_face_ov5647.dng", "RGGB", 16, 1023),
    ("RAW_KODAK_DC50.KDC", "GRBG", 0, 16383),
])
def test_real_raw_matches_libraw_linear_development(real_data, name, cfa, black, white):
    p = real_data / "raw" / name
    fr = read_raw(p)
    assert fr.cfa == cfa and fr.white == white and fr.black == black
    assert fr.exposure > 0 and fr.iso > 0
    assert fr.data.dtype == np.float32 and fr.data.shape == fr.saturated.shape
    rgb = demosaic_bilinear(fr.data, fr.cfa)
    ref = _libraw_linear(p)
    # LibRaw's own linear development: per-channel means agree (a wrong CFA orientation would
    # swap red and blue, off by far more than this)
    ours = rgb.reshape(3, -1).mean(1)
    theirs = ref.reshape(-1, 3).mean(0)
    np.testing.assert_allclose(ours, theirs, rtol=0.02)
    assert np.corrcoef(rgb[0].ravel(), ref[..., 0].ravel())[0, 1] > 0.98


def test_truncated_raw_names_the_file(real_data, tmp_path):
    src = (real_data / "raw" / "mini_isp_face_ov5647.dng").read_bytes()
    bad = tmp_path / "cut.dng"
    bad.write_bytes(src[:2000])
    with pytest.raises(RawError, match="cut.dng"):
        read_raw(bad)
    with pytest.raises(RawError, match="no such raw file"):
        read_raw(tmp_path / "missing.dng")


def test_non_bayer_fallback_is_linear_libraw_development(real_data, monkeypatch):
    """Sensors whose CFA we do not demosaic ourselves (four colours, periods over 8 ...) go
    through LibRaw's demosaic with linear settings; forced here on a Bayer DNG, it must agree
    with our own linear path."""
    import lightstage.raw as raw

    p = real_data / "raw" / "mini_isp_face_ov5647.dng"
    bayer = raw.read_raw(p)
    ours = raw.demosaic_bilinear(bayer.data, bayer.cfa).reshape(3, -1).mean(1)
    monkeypatch.setattr(raw, "_cfa_string", lambda pattern, desc: None)
    fb = raw.read_raw(p)
    assert fb.cfa is None and fb.data.shape == bayer.data.shape + (3,)
    assert fb.saturated.shape == bayer.data.shape
    np.testing.assert_allclose(fb.data.reshape(-1, 3).mean(0), ours, rtol=0.02)
    # linear: no gamma, no auto-brightening (the brightest pixel is not pushed to white)
    assert fb.data.max() <= 1.0 and np.median(fb.data) < 0.5
