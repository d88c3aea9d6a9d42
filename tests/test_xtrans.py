"""X-Trans (and any periodic, non-2x2 CFA) end to end, against independent truth: LibRaw (rawpy)
reading our 6x6 DNGs, analytic images through the demosaic, the HDR merge on the mosaic, the
saturation rule against the demosaic's own measured support, and ``ls-ingest`` on a synthetic
capture of known radiance whose cameras carry X-Trans sensors (next to a Bayer one).

No real X-Trans file is available to the tests; the twin's DNG writer produces them and LibRaw
decodes them as it decodes Fujifilm's (``raw_pattern`` 6x6, ``filters == 9``)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import rawpy

from lightstage.cfa import XTRANS, CFAError, cfa_index_map, cfa_string, parse_cfa
from lightstage.dng import DNGError, DNGMetadata, colour_tags_from_response, write_dng
from lightstage.raw import (RawError, cfa_masks, demosaic_bilinear, demosaic_planes,
                            mosaic_from_rgb, read_raw, saturation_rgb)

RESPONSE = np.array([[0.52, 0.07, -0.02], [0.08, 1.03, 0.04], [-0.01, 0.09, 0.71]])
#: X-Trans seen from another origin (a crop 2 rows down, 3 columns right)
XTRANS_SHIFTED = cfa_string(np.roll(parse_cfa(XTRANS), (-2, -3), axis=(0, 1)))


def _smooth_rgb(H, W, seed=0, scale=9.0):
    """A smooth positive (3, H, W) field: a few low-frequency sinusoids per channel."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    out = []
    for c in range(3):
        f = 1.0 + 0.05 * c
        for _ in range(3):
            ky, kx = rng.normal(0, 1 / scale, 2)
            f = f + 0.15 * np.sin(2 * np.pi * (ky * y + kx * x) / 2 + rng.uniform(0, 6.3))
        out.append(f)
    return np.asarray(out, np.float32)


# ---- pattern spelling ----------------------------------------------------------------------


def test_cfa_spelling():
    p = parse_cfa("X-Trans")
    assert p.shape == (6, 6)
    assert [(p == c).sum() for c in range(3)] == [8, 20, 8]  # Fujifilm's 8 R, 20 G, 8 B
    for r in range(6):  # every row and column holds all three colours
        assert set(p[r]) == {0, 1, 2} and set(p[:, r]) == {0, 1, 2}
    assert cfa_string(p) == XTRANS and parse_cfa("xtrans").tolist() == p.tolist()
    assert cfa_string(parse_cfa("RG/GB")) == "RGGB"
    assert cfa_string(np.tile(parse_cfa("GBRG"), (2, 2))) == "GBRG"  # reduced to its period
    for bad, why in (("RGBX", "letters"), ("RGG/B", "equal length"), ("RRGG", "no B"),
                     ("/".join(["RGBRGBRGB"] * 9), "exceeds")):
        with pytest.raises(CFAError, match=why):
            parse_cfa(bad)


def test_rig_accepts_xtrans_cameras(tmp_path):
    from lightstage.rig import RigError, builtin_rig, load_rig, rig_to_dict, save_rig

    rig = copy.deepcopy(builtin_rig("tiny"))
    d = rig_to_dict(rig)
    d["cameras"][0]["sensor"]["cfa_pattern"] = "X-Trans"
    d["cameras"][1]["sensor"]["cfa_pattern"] = XTRANS_SHIFTED
    from lightstage.rig import rig_from_dict

    r2 = rig_from_dict(d)
    assert r2.cameras[0].sensor.cfa_pattern == XTRANS  # stored in canonical spelling
    save_rig(r2, tmp_path / "rig.json")
    assert load_rig(tmp_path / "rig.json").cameras[1].sensor.cfa_pattern == XTRANS_SHIFTED
    d["cameras"][2]["sensor"]["cfa_pattern"] = "GGRGGB/GGBGGR"  # fine: a 2x6 period
    d["cameras"][3]["sensor"]["cfa_pattern"] = "GGRGGB/GGBGG"
    with pytest.raises(RigError, match=r"cameras\[3\]\.sensor\.cfa_pattern"):
        rig_from_dict(d)


# ---- DNG ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", [XTRANS, XTRANS_SHIFTED])
def test_xtrans_dng_read_by_libraw_bit_exact(tmp_path, pattern):
    a = np.random.default_rng(3).integers(0, 4096, (45, 62)).astype(np.uint16)
    cm, neutral = colour_tags_from_response(RESPONSE)
    meta = DNGMetadata(pattern, black_level=64, white_level=4095, exposure_time=1 / 125,
                       f_number=4.0, iso=400, colour_matrix1=cm, as_shot_neutral=neutral)
    p = tmp_path / "x.dng"
    write_dng(p, a, meta)
    with rawpy.imread(str(p)) as r:
        assert r.raw_pattern.shape == (6, 6)  # LibRaw's X-Trans path (filters == 9)
        desc = r.color_desc.decode()
        letters = "/".join("".join(desc[i] for i in row) for row in r.raw_pattern)
        assert letters == pattern
        assert np.array_equal(r.raw_image_visible, a)
        # LibRaw's own per-photosite colour map agrees with ours
        np.testing.assert_array_equal(r.raw_colors_visible, cfa_index_map(pattern, *a.shape))
        assert list(r.black_level_per_channel)[:3] == [64] * 3 and r.white_level == 4095
        assert r.num_colors == 3
        assert r.other.shutter_speed == pytest.approx(1 / 125) and r.other.iso_speed == 400
        wb = np.asarray(r.camera_whitebalance[:3])
        white = RESPONSE.sum(1)
        np.testing.assert_allclose(wb, white[1] / white, rtol=1e-5)
    fr = read_raw(p)
    assert fr.cfa == pattern and fr.data.shape == a.shape
    np.testing.assert_allclose(fr.data, (a.astype(np.float64) - 64) / (4095 - 64), atol=1e-6)
    assert np.array_equal(fr.saturated, a >= 4095 - max(1.0, 0.005 * (4095 - 64)))


def test_dng_rejects_bad_patterns(tmp_path):
    a = np.zeros((12, 12), np.uint16)
    with pytest.raises(DNGError, match="cfa_pattern"):
        write_dng(tmp_path / "a.dng", a, DNGMetadata(cfa_pattern="GGRGGB/GGBGG"))
    with pytest.raises(DNGError, match="2-D"):
        write_dng(tmp_path / "a.dng", np.zeros((4, 4, 2), np.uint16), DNGMetadata())


def test_linear_dng_is_normalised_per_channel(tmp_path):
    """An already demosaiced raw (LinearRaw DNG, 3 samples per pixel) needs no demosaic: each
    channel is normalised exactly (LibRaw's postprocess would scale by the white level alone)."""
    # (LibRaw refuses images under 22 pixels on a side)
    rgb = np.random.default_rng(1).integers(64, 4096, (23, 30, 3)).astype(np.uint16)
    rgb[3, 4, 1] = 4095
    p = tmp_path / "lin.dng"
    write_dng(p, rgb, DNGMetadata(black_level=64, white_level=4095, exposure_time=0.01, iso=200))
    with rawpy.imread(str(p)) as r:
        assert r.raw_pattern is None and r.num_colors == 3
    fr = read_raw(p)
    assert fr.cfa is None and fr.data.shape == rgb.shape
    np.testing.assert_allclose(fr.data, (rgb - 64.0) / (4095 - 64), atol=1e-6)
    assert fr.saturated.shape == rgb.shape[:2] and fr.saturated.sum() == (rgb >= 4075).any(-1).sum()
    assert fr.exposure == pytest.approx(0.01) and fr.iso == 200


def test_libraw_fallback_agrees_on_xtrans(tmp_path, monkeypatch):
    """What we cannot demosaic ourselves goes to LibRaw's linear development. Forced here on an
    X-Trans file (smaller than the 512 pixels LibRaw's default X-Trans demosaic requires):
    measured photosites come back exact to 16-bit quantisation, and the interpolated ones agree
    with ours on a smooth image."""
    import lightstage.raw as raw

    H, W = 48, 66
    truth = _smooth_rgb(H, W, seed=4)
    dn = np.rint(64 + mosaic_from_rgb(truth, XTRANS) / 2.0 * 3000).astype(np.uint16)
    p = tmp_path / "x.dng"
    write_dng(p, dn, DNGMetadata(XTRANS, black_level=64, white_level=4095))
    ours = demosaic_bilinear(read_raw(p).data, XTRANS)
    monkeypatch.setattr(raw, "_cfa_string", lambda pattern, desc: None)
    fb = raw.read_raw(p)
    assert fb.cfa is None and fb.data.shape == (H, W, 3)
    theirs = np.moveaxis(fb.data, -1, 0)
    m = cfa_masks(XTRANS, H, W).astype(bool)
    np.testing.assert_allclose(theirs[m], ours[m], atol=2e-5)
    inner = (slice(None), slice(3, -3), slice(3, -3))
    assert np.median(np.abs(theirs - ours)[inner] / ours[inner]) < 0.005


def _four_colour_dng(path: Path, dn: np.ndarray) -> None:
    """A 2x2 CMYG-type CFA DNG: our Bayer file with CFAPattern/CFAPlaneColor rewritten to the
    DNG colour codes 3 cyan, 1 green, 5 yellow, 4 magenta (both 4-byte values sit inline in
    IFD0, so the bytes are patched in place)."""
    import struct

    from lightstage.dng import encode_dng

    b = bytearray(encode_dng(dn, DNGMetadata("RGGB", 64, 4095)))
    off = struct.unpack_from("<I", b, 4)[0]
    for i in range(struct.unpack_from("<H", b, off)[0]):
        e = off + 2 + 12 * i
        tag, typ, _ = struct.unpack_from("<HHI", b, e)
        if tag in (33422, 50710):  # CFAPattern, CFAPlaneColor
            struct.pack_into("<HHI", b, e, tag, typ, 4)
            b[e + 8:e + 12] = bytes([3, 1, 5, 4])
    path.write_bytes(bytes(b))


def test_four_colour_cfa_falls_back_to_libraw_linear(tmp_path):
    """A CFA we do not demosaic (four colours) is developed by LibRaw, still linear: doubling
    the signal doubles the result, and three channels come back."""
    dn = np.random.default_rng(6).integers(100, 1000, (40, 60)).astype(np.uint16)
    _four_colour_dng(tmp_path / "a.dng", dn)
    _four_colour_dng(tmp_path / "b.dng", ((dn - 64) * 2 + 64).astype(np.uint16))
    with rawpy.imread(str(tmp_path / "a.dng")) as r:
        assert r.num_colors == 4 and sorted(r.color_desc.decode()) == sorted("CMYG")
    a, b = read_raw(tmp_path / "a.dng"), read_raw(tmp_path / "b.dng")
    assert a.cfa is None and a.data.shape == (40, 60, 3) and a.saturated.shape == (40, 60)
    ok = a.data > 1e-3
    assert ok.mean() > 0.9
    np.testing.assert_allclose(b.data[ok] / a.data[ok], 2.0, rtol=2e-3)


# ---- demosaic -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 6), (7, 11), (37, 53), (60, 90)])
@pytest.mark.parametrize("pattern", [XTRANS, XTRANS_SHIFTED, "GGRGGB/GGBGGR"])
def test_demosaic_flat_colour_exact(shape, pattern):
    rgb = np.array([0.7, 0.2, 0.05], np.float32)[:, None, None] * np.ones((3, *shape), np.float32)
    mosaic = mosaic_from_rgb(rgb, pattern)
    out = demosaic_bilinear(mosaic, pattern)
    np.testing.assert_allclose(out, rgb, rtol=1e-6)
    assert all(np.array_equal(a, b) for a, b in zip(demosaic_planes(mosaic, pattern), out))


def test_demosaic_smooth_field_accurate():
    H, W = 96, 120
    truth = _smooth_rgb(H, W, scale=20.0)  # features ~40 px across, channels independent
    out = demosaic_bilinear(mosaic_from_rgb(truth, XTRANS), XTRANS)
    # measured photosites keep their value exactly, borders included
    m = cfa_masks(XTRANS, H, W).astype(bool)
    assert np.array_equal(out[m], truth[m])
    # green (the guide) is a convex combination of the green photosites of its 3x3 window: it
    # lies within the truth's range there
    from scipy.ndimage import maximum_filter, minimum_filter

    lo = minimum_filter(truth[1], size=3, mode="nearest")
    hi = maximum_filter(truth[1], size=3, mode="nearest")
    assert (out[1] >= lo - 1e-6).all() and (out[1] <= hi + 1e-6).all()
    rel = np.abs(out - truth) / truth
    print(f"X-Trans demosaic of a smooth field: median {np.median(rel):.2e}, "
          f"p99 {np.percentile(rel, 99):.2e}")
    assert np.median(rel) < 3e-3 and np.percentile(rel, 99) < 0.04


def test_demosaic_row_bands_do_not_change_the_result(monkeypatch):
    """The demosaic runs in row bands (cache-sized); band edges must not show."""
    import lightstage.raw as raw

    mosaic = np.random.default_rng(9).random((150, 77), dtype=np.float32)
    monkeypatch.setattr(raw, "_BAND_ROWS", 10_000)
    whole = demosaic_bilinear(mosaic, XTRANS)
    for rows in (1, 7, 64):
        monkeypatch.setattr(raw, "_BAND_ROWS", rows)
        np.testing.assert_array_equal(demosaic_bilinear(mosaic, XTRANS), whole)


def test_demosaic_is_linear():
    """Superposition holds (OLATs are summed by relighting): demosaic(a x + b y) equals
    a demosaic(x) + b demosaic(y) to float32 rounding."""
    rng = np.random.default_rng(7)
    x, y = rng.random((2, 31, 43), dtype=np.float32)
    lhs = demosaic_bilinear(np.float32(0.3) * x + np.float32(2.5) * y, XTRANS)
    rhs = 0.3 * demosaic_bilinear(x, XTRANS) + 2.5 * demosaic_bilinear(y, XTRANS)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5, atol=1e-6)


def test_green_guide_helps_where_colours_vary_together():
    """Texture shared by the colours (shading, skin): the green-guided correction cuts the error
    of red and blue, whose X-Trans samples are sparse and off-centre, against the plain
    normalised convolution (GUIDE_GAIN = 0)."""
    H, W = 90, 108
    lum = _smooth_rgb(H, W, seed=8, scale=6.0)[0]
    truth = lum[None] * np.array([0.9, 0.6, 0.35], np.float32)[:, None, None]
    mosaic = mosaic_from_rgb(truth, XTRANS)
    guided = demosaic_bilinear(mosaic, XTRANS)
    plain = demosaic_bilinear(mosaic, XTRANS, guide=0.0)
    # per-colour gains (the colours' ratios to green: colour differences in white-balanced terms)
    ratio = demosaic_bilinear(mosaic, XTRANS, guide=(0.9 / 0.6, 0.0, 0.35 / 0.6))
    e_r = np.median(np.abs(ratio - truth)[[0, 2]] / truth[[0, 2]])
    e_g = np.median(np.abs(guided - truth)[[0, 2]] / truth[[0, 2]])
    e_p = np.median(np.abs(plain - truth)[[0, 2]] / truth[[0, 2]])
    print(f"red/blue median error: guided {e_g:.2e}, plain {e_p:.2e}, per-colour {e_r:.2e}")
    assert e_g < 0.7 * e_p and e_r < 0.7 * e_p
    np.testing.assert_array_equal(guided[1], plain[1])  # green itself is not guided


def test_saturation_covers_the_demosaic_support():
    """A pixel is flagged when a saturated photosite can change its demosaiced value: the
    support found by perturbing each photosite in turn (borders and corners included)."""
    H, W = 14, 17
    base = _smooth_rgb(H, W, seed=2)
    mosaic = mosaic_from_rgb(base, XTRANS)
    ref = demosaic_bilinear(mosaic, XTRANS)
    wider = False
    for y in range(H):
        for x in range(W):
            mm = mosaic.copy()
            mm[y, x] += 1.0
            touched = np.abs(demosaic_bilinear(mm, XTRANS) - ref).max(0) > 0
            s = np.zeros((H, W), bool)
            s[y, x] = True
            flagged = saturation_rgb(s, XTRANS)
            assert (flagged >= touched).all(), (y, x)
            assert flagged.sum() <= 49  # 5x5 in the interior, 7x7 at most at the borders
            wider |= bool((touched & ~saturation_rgb(s)).any())
    assert wider  # the Bayer rule (3x3, no cfa given) would miss pixels


# ---- HDR merge on the X-Trans mosaic --------------------------------------------------------


def test_hdr_merge_recovers_clipped_photosites(tmp_path):
    from lightstage.hdr import merge_raw_snr

    H, W = 42, 54
    y, x = np.mgrid[0:H, 0:W]
    radiance = _smooth_rgb(H, W, seed=5) * (1 + 6 * np.exp(-((x - 20) ** 2 + (y - 18) ** 2) / 40))
    black, white = 64, 4095
    exps = [1 / 30, 1 / 240]
    frames = []
    for k, t in enumerate(exps):
        dn = mosaic_from_rgb(radiance.astype(np.float32), XTRANS) * t * 30 * 0.3 * (white - black)
        raw = np.clip(np.rint(dn + black), 0, white).astype(np.uint16)
        write_dng(tmp_path / f"e{k}.dng", raw, DNGMetadata(XTRANS, black, white, exposure_time=t))
        frames.append(read_raw(tmp_path / f"e{k}.dng", normalise=False))
    long = frames[0]
    assert long.cfa == XTRANS and long.saturated.sum() > 40  # the spot clips the long exposure
    merged = merge_raw_snr([f.data for f in frames], [f.black_map for f in frames],
                           [f.white for f in frames], [f.saturated for f in frames],
                           [f.exposure for f in frames])
    assert merged.valid.all()
    truth_mosaic = mosaic_from_rgb(radiance.astype(np.float32), XTRANS) * 30 * 0.3
    rel = np.abs(merged.radiance - truth_mosaic) / truth_mosaic
    # clipped photosites come from the short exposure alone: its DN rounding (< 0.5 DN)
    assert rel[long.saturated].max() < 0.5 / (truth_mosaic[long.saturated] / 240 * (white - black)).min() + 1e-6
    assert np.median(rel[~long.saturated]) < 1e-3
    rgb = demosaic_bilinear(merged.radiance, XTRANS)
    assert np.median(np.abs(rgb - radiance * 9) / (radiance * 9)) < 0.01


# ---- ls-ingest on an X-Trans capture --------------------------------------------------------


H_CAP, W_CAP = 34, 50  # not multiples of 6: the pattern's phase changes at the far edges
FRAMES = [1, 2, 3, 4, 10]  # tracking, olat (lights 0, 1, 2), tracking
PATTERNS = [XTRANS, XTRANS_SHIFTED, XTRANS, "RGGB"]  # a rig may mix X-Trans and Bayer


def _albedo(ci: int) -> np.ndarray:
    """(H, W, 3) radiance per unit light seen by camera ci: smooth, with two bright spots."""
    y, x = np.mgrid[0:H_CAP, 0:W_CAP].astype(np.float64)
    base = 0.25 + 0.1 * np.sin(2 * np.pi * x / W_CAP + ci)[..., None] * np.array([1.0, 0.6, 0.3])
    spot = (2.2 * np.exp(-((x - 14) ** 2 + (y - 12) ** 2) / 80)
            + 1.5 * np.exp(-((x - 34) ** 2 + (y - 20) ** 2) / 60))
    return base + spot[..., None] * np.array([1.0, 0.9, 0.8])


def _write_capture(root: Path):
    """A static capture of :func:`_albedo` through the twin's sensor model (noise off) and DNG
    writer, the tiny rig's cameras carrying the sensors of :data:`PATTERNS`."""
    from lightstage.calibfile import save_calibration
    from lightstage.manifest import CaptureManifest, FrameRecord, RawFile
    from lightstage.rig import builtin_rig, save_rig
    from lightstage.twin import sensor

    rig = copy.deepcopy(builtin_rig("tiny"))
    for c, pat in zip(rig.cameras, PATTERNS):
        K = np.asarray(c.K)
        K[0] *= W_CAP / c.sensor.width
        K[1] *= H_CAP / c.sensor.height
        c.K = K.tolist()
        c.sensor.width, c.sensor.height = W_CAP, H_CAP
        c.sensor.cfa_pattern = pat
    root.mkdir(parents=True)
    save_rig(rig, root / "rig.json")
    take = root / "s000" / "t0"
    E = sensor.light_irradiance(rig)
    records = []
    for f in FRAMES:
        fr = rig.sequence[f]
        files = {}
        for ci, cam in enumerate(rig.cameras):
            rad = _albedo(ci) * (E[fr.light] if fr.kind == "olat" else E.sum(0))
            lst = []
            for k, t in enumerate(fr.exposures):
                raw = sensor.simulate_raw(rad, cam, t, noise=False)
                rel = f"raw/{cam.name}/f{f:04d}_e{k}.dng"
                (take / rel).parent.mkdir(parents=True, exist_ok=True)
                sha = write_dng(take / rel, raw, sensor.dng_metadata(cam, t))
                lst.append(RawFile(rel, t, cam.sensor.iso, sha))
            files[cam.name] = lst
        records.append(FrameRecord(f, fr.kind, fr.light, files))
    CaptureManifest(root=take, rig=rig, subject="s000", take="t0", frames=records,
                    rig_ref="../../rig.json").save()
    cal = root / "cal.json"
    save_calibration(sensor.truth_calibration(rig), cal)
    return root, cal, rig


@pytest.fixture(scope="module")
def xtrans_store(tmp_path_factory):
    from lightstage.ingest import ingest

    cap, cal, rig = _write_capture(tmp_path_factory.mktemp("xt") / "cap")
    out = tmp_path_factory.mktemp("xst") / "s.zarr"
    rep = ingest(cap, cal, out)
    assert rep.ok, rep.errors
    assert rep.written == len(rig.cameras) * 3
    return cap, out, rig


def test_ingest_xtrans_capture_matches_radiance(xtrans_store):
    from lightstage.store import open_take

    cap, store, rig = xtrans_store
    take = open_take(store)
    n_clipped = 0
    for ci, cam in enumerate(rig.cameras):
        truth = np.moveaxis(_albedo(ci), -1, 0)
        ob = take.olat(ci)
        valid = take.group["valid"][ci] > 0
        for li in range(3):
            e0 = cap / "s000" / "t0" / "raw" / cam.name / f"f{take.attrs['olat_frames'][li]:04d}_e0.dng"
            fr = read_raw(e0)
            assert fr.cfa == cam.sensor.cfa_pattern
            rel = np.abs(ob[li] - truth) / truth
            lit = (truth.min(0) > 0.05 * truth.max()) & valid[li]
            med = float(np.median(rel[:, lit]))
            print(f"{cam.name} ({'X-Trans' if '/' in fr.cfa else fr.cfa}) light {li}: "
                  f"median relative error {med:.3%}")
            assert med < 0.01  # the bound (DN rounding + demosaic of the texture)
            assert valid[li].mean() > 0.99
            # photosites clipped in the long exposure: recovered from the short one
            sat = fr.saturated
            n_clipped += int(sat.sum())
            if sat.any():
                assert np.median(rel[:, sat]) < 0.02  # demosaic at the spot's peak (curvature)
                assert valid[li][sat].all()
    assert n_clipped > 50  # the test exercises recovery


# ---- the digital twin with X-Trans cameras --------------------------------------------------


@pytest.mark.slow  # renders a procedural head (~10-30 s on a shared 2-core machine)
def test_twin_xtrans_capture_ingested_matches_truth(tmp_path):
    """``ls-simulate``'s capture of a head holding still, every camera an X-Trans sensor, noise
    off, ingested: radiance per unit light vs the twin's truth over lit foreground pixels (the
    issue's < 1 % median, as tests/test_ingest.py asserts for Bayer)."""
    from lightstage.calibfile import save_calibration
    from lightstage.ingest import ingest
    from lightstage.rig import builtin_rig
    from lightstage.store import open_take
    from lightstage.twin import capture as twin_capture
    from lightstage.twin import sensor

    rig = copy.deepcopy(builtin_rig("tiny"))
    for k, c in enumerate(rig.cameras):
        c.sensor.cfa_pattern = XTRANS if k % 2 == 0 else XTRANS_SHIFTED
    cap = tmp_path / "cap"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(twin_capture, "motion_trajectory",
                   lambda n, seed, rest_frame=0, **kw: np.tile(np.eye(4), (n, 1, 1)))
        twin_capture.simulate(cap, rig, 1, seed=0, noise=False, frames="0:6", calibration=False)
    cal = tmp_path / "cal.json"
    save_calibration(sensor.truth_calibration(rig), cal)
    out = tmp_path / "s.zarr"
    rep = ingest(cap, cal, out)
    assert rep.ok, rep.errors
    take = open_take(out)
    truth = open_take(cap / "s000" / "t0" / "truth" / "truth.zarr")
    lights_t = list(truth.attrs["lights"])
    errs = []
    for ci in range(len(take.cameras)):
        ob, v, fg = take.olat(ci), take.group["valid"][ci] > 0, truth.mask(ci)
        for li, light in enumerate(take.attrs["lights"]):
            tr = truth.olat(ci, lights=lights_t.index(light))
            lit = (tr.min(0) > 0.05 * tr.max()) & fg & v[li]
            errs.append((np.abs(ob[li] - tr)[:, lit] / tr[:, lit]).ravel())
    errs = np.concatenate(errs)
    med = float(np.median(errs))
    print(f"twin X-Trans noise-free median relative error {med:.3%} over {errs.size} samples")
    assert errs.size > 2000 and med < 0.01
