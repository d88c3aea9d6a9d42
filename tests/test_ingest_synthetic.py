"""Fast end-to-end ingest on a small synthetic capture with an analytic answer.

The capture is written through the twin's sensor model and DNG writer from a known radiance
per unit light (a smooth albedo with bright spots that clip the long exposure), so the
ingested OLATs must equal that albedo. Covers: exactness, clipped-pixel recovery, store
layout via xarray, verify, interruption + resume (identical bytes), bad raw files with and
without --skip-bad, and a 2-worker LocalCluster writing the same store."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from lightstage import ingest as ingest_mod
from lightstage.ingest import DONE_SKIPPED, DONE_WRITTEN, ingest, verify_store
from lightstage.store import open_take
from lightstage.twin.static_capture import write_static_capture

from conftest import assert_same_take

H, W = 32, 48
FRAMES = [1, 2, 3, 4, 10]  # tracking, olat (lights 0, 1, 2), tracking


def albedo(ci: int) -> np.ndarray:
    """(H, W, 3) radiance per unit light seen by camera ci: smooth, with two bright spots."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    base = 0.25 + 0.1 * np.sin(2 * np.pi * x / W + ci)[..., None] * np.array([1.0, 0.6, 0.3])
    spot = 2.2 * np.exp(-((x - 14) ** 2 + (y - 12) ** 2) / 80) + 1.5 * np.exp(-((x - 34) ** 2 + (y - 20) ** 2) / 60)
    return base + spot[..., None] * np.array([1.0, 0.9, 0.8])


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    """(capture folder, calibration file, rig) of the static capture of ``albedo``."""
    return tuple(write_static_capture(tmp_path_factory.mktemp("syn") / "cap", height=H, width=W,
                                      frames=FRAMES, radiance=albedo))


@pytest.fixture(scope="module")
def store(capture, tmp_path_factory):
    cap, cal, _ = capture
    out = tmp_path_factory.mktemp("st") / "s.zarr"
    rep = ingest(cap, cal, out)
    assert rep.ok, rep.errors
    assert rep.written == 4 * 3
    return out


def test_olat_equals_analytic_radiance_and_clipping_recovered(capture, store):
    cap, _, rig = capture
    take = open_take(store)
    assert take.attrs["lights"] == [0, 1, 2]
    n_clipped = 0
    for ci, cam in enumerate(rig.cameras):
        truth = np.moveaxis(albedo(ci), -1, 0)
        ob = take.olat(ci)
        valid = take.group["valid"][ci] > 0
        inner = (slice(None), slice(2, -2), slice(2, -2))
        for li in range(3):
            rel = np.abs(ob[li] - truth) / truth
            assert np.median(rel[inner]) < 0.006  # DN rounding + bilinear demosaic of the texture
            assert np.percentile(rel[inner], 99) < 0.03
            assert valid[li][2:-2, 2:-2].mean() > 0.99
            # photosites clipped in the long exposure: recovered from the short one
            e0 = cap / "s000" / "t0" / "raw" / cam.name / f"f{take.attrs['olat_frames'][li]:04d}_e0.dng"
            from lightstage.raw import read_raw

            sat = read_raw(e0).saturated
            sat[:2], sat[-2:], sat[:, :2], sat[:, -2:] = False, False, False, False
            n_clipped += int(sat.sum())
            if sat.any():
                # bilinear demosaic at the spot peaks dominates (curvature), not the merge
                assert np.median(rel[:, sat]) < 0.015
                assert valid[li][sat].all()
    assert n_clipped > 50  # the test exercises recovery


def test_store_layout_and_verify(store):
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(str(store), group="s000/t0", consolidated=False)
    assert ds["olat"].dims == ("camera", "light", "channel", "y", "x")
    assert ds["mask"].dims == ("camera", "y", "x")
    assert ds["done"].dims == ("camera", "light")
    assert int(ds["done"].min()) == DONE_WRITTEN
    assert ds.attrs["olat_frames"] == [2, 3, 4] and ds.attrs["tracking_frames"] == [1, 10]
    assert ds.attrs["exposures"]["2"] == pytest.approx([1 / 30, 1 / 240])
    assert np.allclose(ds.attrs["world2head"], np.eye(4))  # no subject.json: identity
    assert len(ds.attrs["provenance"]["inputs_sha256"]) == 5 * 4 * 2
    # a static subject: flows ~ 0, consistent
    assert np.abs(ds["flow"].values).max() < 0.1
    assert ds["flow"].dims == ("camera", "tracking_frame", "component", "fy", "fx")
    assert ds["flow"].dtype == np.float16 and ds["flow"].attrs["stride"] == 4
    assert ds["flow"].shape[-2:] == (-(-H // 4), -(-W // 4))
    assert verify_store(store) == []


def test_verify_reads_older_blake2b_checksums(store, tmp_path):
    import shutil

    from lightstage.ingest import image_checksum

    old = tmp_path / "old.zarr"
    shutil.copytree(store, old)
    g = zarr.open_group(str(old), mode="r+")["s000/t0"]
    # as a store from before CRC32C: blake2b-64 sums, said so in the attributes
    ing = dict(g.attrs["ingest"])
    ing["checksum"] = "blake2b-64 (little-endian uint64) of the stored olat bytes then valid bytes"
    g.attrs["ingest"] = ing
    C, L = g["done"].shape
    g["checksum"][...] = np.array([[image_checksum(g["olat"][c, l], g["valid"][c, l], algorithm="blake2b")
                                    for l in range(L)] for c in range(C)], np.uint64)
    T = g["tracking"].shape[1]
    g["tracking_checksum"][...] = np.array([[image_checksum(g["tracking"][c, j], algorithm="blake2b")
                                             for j in range(T)] for c in range(C)], np.uint64)
    assert verify_store(old) == []
    g["olat"][0, 1] = g["olat"][0, 1] * np.float16(1.5)
    assert any("checksum mismatch" in p for p in verify_store(old))


def test_interrupted_ingest_resumes_identically(capture, store, tmp_path, monkeypatch):
    cap, cal, _ = capture
    out = tmp_path / "r.zarr"
    real = ingest_mod.olat_task
    calls = {"n": 0}

    def flaky(spec, ci, li):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the OLATs
        return real(spec, ci, li)

    monkeypatch.setattr(ingest_mod, "olat_task", flaky)
    with pytest.raises(KeyboardInterrupt):
        ingest(cap, cal, out)
    monkeypatch.setattr(ingest_mod, "olat_task", real)
    d = zarr.open_group(str(out), mode="r")["s000/t0/done"][...]
    assert 0 < (d == DONE_WRITTEN).sum() < d.size  # flags of finished images flushed on Ctrl-C
    problems = verify_store(out)
    assert problems and all("missing" in p for p in problems)
    rep = ingest(cap, cal, out)
    assert rep.ok and rep.written + rep.resumed == 12 and rep.written < 12
    assert_same_take(out, store)


class _Result:
    def __init__(self, r):
        self.returncode = r.exit_code
        self.stderr = r.stderr if hasattr(r, "stderr") else r.output


def _cli(*args):
    """ls-ingest in process (click's CliRunner): exit code and stderr."""
    from click.testing import CliRunner

    from cli.ingest import main

    return _Result(CliRunner().invoke(main, [str(a) for a in args]))


def test_bad_raw_file_named_others_written_and_skip_bad(capture, tmp_path):
    import shutil

    cap0, cal, _ = capture
    cap = tmp_path / "cap"
    shutil.copytree(cap0, cap)
    bad = cap / "s000" / "t0" / "raw" / "cam01" / "f0003_e0.dng"
    bad.write_bytes(bad.read_bytes()[:1500])  # truncated
    r = _cli(cap, "--calibration", cal, "--out", tmp_path / "a.zarr", "--workers", "0")
    assert r.returncode == 1, r.stderr
    assert "f0003_e0.dng" in r.stderr
    g = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")["s000/t0"]
    d = g["done"][...]
    assert d[1, 1] == 0 and (d == DONE_WRITTEN).sum() == d.size - 1
    r = _cli("--verify", tmp_path / "a.zarr")
    assert r.returncode == 1 and "cam01 light 1: missing" in r.stderr
    r = _cli(cap, "--calibration", cal, "--out", tmp_path / "b.zarr", "--workers", "0", "--skip-bad")
    assert r.returncode == 0, r.stderr
    g = zarr.open_group(str(tmp_path / "b.zarr"), mode="r")["s000/t0"]
    assert g["done"][1, 1] == DONE_SKIPPED
    sk = g.attrs["provenance"]["skipped"]
    assert [(e["camera"], e["frame"]) for e in sk] == [("cam01", 3)]
    assert "f0003_e0.dng" in sk[0]["error"]
    assert _cli("--verify", tmp_path / "b.zarr").returncode == 0
    # the store is never replaced silently
    r = _cli(cap, "--calibration", cal, "--out", tmp_path / "b.zarr", "--workers", "0", "--dtype", "float32")
    assert r.returncode == 2 and "--overwrite" in r.stderr


def test_cli_usage_errors(tmp_path):
    assert _cli().returncode == 2
    r = _cli(tmp_path, "--out", tmp_path / "x.zarr")
    assert r.returncode == 2 and "--calibration" in r.stderr


@pytest.mark.slow  # starting two spawned workers takes ~10-40 s on a shared machine
def test_localcluster_two_workers_same_store(capture, store, tmp_path):
    pytest.importorskip("distributed")
    cap, cal, _ = capture
    out = tmp_path / "d.zarr"
    rep = ingest(cap, cal, out, workers=2)
    assert rep.ok, rep.errors
    assert rep.dashboard
    assert_same_take(out, store)


def test_bad_tracking_frame_then_fixed_gives_the_clean_store(capture, store, tmp_path):
    import shutil

    cap0, cal, _ = capture
    cap = tmp_path / "cap"
    shutil.copytree(cap0, cap)
    f = cap / "s000" / "t0" / "raw" / "cam01" / "f0010_e0.dng"
    good = f.read_bytes()
    f.write_bytes(good[: len(good) // 2])
    out = tmp_path / "t.zarr"
    rep = ingest(cap, cal, out)
    assert not rep.ok and any("f0010_e0.dng" in e for e in rep.errors)
    g = zarr.open_group(str(out), mode="r")["s000/t0"]
    assert g["tracking_done"][1] == 0 and g["tracking_ok"][1].tolist() == [1, 0]
    assert (g["done"][...] == DONE_WRITTEN).all()  # OLATs written, aligned with frame 1 only
    f.write_bytes(good)  # the user restores the file and reruns
    rep = ingest(cap, cal, out)
    assert rep.ok and rep.written == 3  # camera 1's OLATs redone with both tracking frames
    assert_same_take(out, store, provenance=False)


def test_root_polynomial_calibration_as_ls_calibrate_writes_it():
    """ingest applies a root-polynomial calibration in calibration.colour's convention."""
    import numpy as np

    from lightstage.calibfile import CameraCalibration
    from lightstage.ingest import apply_colour

    rng = np.random.default_rng(0)
    M = np.eye(3) + rng.normal(0, 0.1, (3, 3))
    terms = rng.normal(0, 0.05, (3, 3))
    cal = CameraCalibration(K=np.eye(3), distortion=np.zeros(5), cam2world=np.eye(4),
                            image_size=(4, 5), colour_matrix=M, colour_method="root-polynomial-2",
                            colour_terms=terms)
    rgb = rng.uniform(0.1, 1.0, (3, 4, 5)).astype(np.float32)
    got = apply_colour(rgb, cal)
    r, g, b = rgb.astype(np.float64)
    extra = np.stack([np.sqrt(r * g), np.sqrt(g * b), np.sqrt(r * b)])
    want = np.einsum("ij,jhw->ihw", M, rgb) + np.einsum("ki,khw->ihw", terms, extra)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # homogeneous of degree one: doubling the exposure doubles the output
    np.testing.assert_allclose(apply_colour(2 * rgb, cal), 2 * got, rtol=1e-5, atol=1e-6)
