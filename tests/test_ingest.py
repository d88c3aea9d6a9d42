"""ls-ingest on the digital twin (tiny rig) against its ground truth: radiance per unit light,
clipped-pixel recovery, residual misalignment against the true motion, the noise the sensor
model predicts, the store's readability, resume after kill -9, bad raw files, verify, and a
2-worker LocalCluster writing the same bytes as the in-process run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from lightstage import align
from lightstage.calibfile import CameraCalibration, save_calibration
from lightstage.camera import project
from lightstage.ingest import (DONE_WRITTEN, IngestConfig, IngestError,
                               apply_colour, ingest, read_flow, verify_store, vignetting_map)
from lightstage.rig import builtin_rig
from lightstage.store import open_take

from conftest import assert_same_take, take_arrays

ROOT = Path(__file__).resolve().parents[1]
FRAMES = "0:11"  # dark, tracking 1, olat 2-9, tracking 10
MOVING_FRAMES = "0:20"  # ... olat 11-18, tracking 19

# the twin renders a few seconds per image on a shared machine: end-to-end twin tests are slow
twin_test = pytest.mark.slow


def _simulate(out: Path, noise: bool, frames: str = FRAMES, static: bool = False) -> tuple[Path, Path]:
    cap = pytest.importorskip("lightstage.twin.capture")
    sensor = pytest.importorskip("lightstage.twin.sensor")
    rig = builtin_rig("tiny")
    with pytest.MonkeyPatch.context() as mp:
        if static:
            # a subject that holds still: isolates the radiometry from motion (a moving subject
            # changes its shading under fixed lights, which no 2D warp can undo)
            mp.setattr(cap, "motion_trajectory",
                       lambda n, seed, rest_frame=0, **kw: np.tile(np.eye(4), (n, 1, 1)))
        cap.simulate(out, rig, 1, seed=0, noise=noise, frames=frames, calibration=False)
    cal = out / "calibration" / "truth_calibration.json"
    if not cal.exists():
        cal = out / "truth_calibration.json"
        save_calibration(sensor.truth_calibration(rig), cal)
    return out, cal


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """Noise-free twin capture of a subject holding still."""
    return _simulate(tmp_path_factory.mktemp("twin") / "cap", noise=False, static=True)


@pytest.fixture(scope="module")
def twin_moving(tmp_path_factory):
    """Noise-free twin capture of a moving subject (the twin's default motion)."""
    return _simulate(tmp_path_factory.mktemp("twinm") / "cap", noise=False, frames=MOVING_FRAMES)


@pytest.fixture(scope="module")
def ingested(twin, tmp_path_factory):
    cap, cal = twin
    out = tmp_path_factory.mktemp("st") / "s.zarr"
    rep = ingest(cap, cal, out)
    assert rep.ok, rep.errors
    return out


def _truth(cap: Path):
    return open_take(cap / "s000" / "t0" / "truth" / "truth.zarr")


def _lit_errors(take, truth, cam):
    """Relative errors over lit foreground pixels (> 5 % of the image peak), valid only."""
    lights_t = list(truth.attrs["lights"])
    ob = take.olat(cam)
    v = take.group["valid"][cam] > 0
    fg = truth.mask(cam)
    out = []
    for li, light in enumerate(take.attrs["lights"]):
        tr = truth.olat(cam, lights=lights_t.index(light))
        lit = (tr.min(0) > 0.05 * tr.max()) & fg & v[li]
        out.append((np.abs(ob[li] - tr)[:, lit] / tr[:, lit]).ravel())
    return np.concatenate(out)


@twin_test
def test_noise_free_radiance_matches_truth(twin, ingested):
    cap, _ = twin
    take, truth = open_take(ingested), _truth(cap)
    errs = np.concatenate([_lit_errors(take, truth, c) for c in range(len(take.cameras))])
    assert errs.size > 5000
    med = float(np.median(errs))
    print(f"noise-free median relative error {med:.4%} over {errs.size} samples")
    assert med < 0.01
    # light metadata carried from the calibration, per unit light
    np.testing.assert_allclose(take.light_directions, np.asarray(truth.attrs["light_directions"])[
        [list(truth.attrs["lights"]).index(l) for l in take.attrs["lights"]]], atol=1e-9)


@twin_test
def test_clipped_pixels_recovered_from_short_exposure(twin, ingested):
    from lightstage.raw import read_raw, saturation_rgb

    cap, _ = twin
    take, truth = open_take(ingested), _truth(cap)
    mean_rgb = np.asarray(take.attrs["light_rgb"]).mean(0)[:, None, None]
    rels = []
    for c, cam in enumerate(take.cameras):
        f = take.attrs["tracking_frames"][0]
        long = read_raw(cap / "s000" / "t0" / "raw" / cam / f"f{f:04d}_e0.dng")
        short = read_raw(cap / "s000" / "t0" / "raw" / cam / f"f{f:04d}_e1.dng")
        # clipped in the long exposure, measured by the short one (3x3: demosaic support)
        clipped = long.saturated & ~saturation_rgb(short.saturated) & truth.mask(c)
        clipped[:2], clipped[-2:], clipped[:, :2], clipped[:, -2:] = False, False, False, False
        ours = take.tracking(c)[0] * mean_rgb
        ref = truth.tracking(c)[0]
        rels.append((np.abs(ours[:, clipped] - ref[:, clipped]) / ref[:, clipped]).ravel())
    rel = np.concatenate(rels)
    # pooled: a lone clipped glint is a 1-px spike that bilinear demosaic cannot reproduce
    print(f"clipped-pixel median relative error {np.median(rel):.4%} over {rel.size // 3} pixels")
    assert np.median(rel) < 0.01
    n = rel.size // 3
    assert n > 100  # the twin's tracking frames do clip in the long exposure


@twin_test
def test_motion_residual_against_true_motion(twin_moving, tmp_path):
    cap, cal = twin_moving
    out = tmp_path / "m.zarr"
    assert ingest(cap, cal, out).ok  # default: central reference, dense flow
    take = open_take(out)
    g = take.group
    mot = json.loads((cap / "s000" / "t0" / "truth" / "motion.json").read_text())
    poses = {f["index"]: np.asarray(f["pose"]) for f in mot["frames"]}
    tf, of = take.attrs["tracking_frames"], take.attrs["olat_frames"]
    refs = take.attrs["reference_frames"]
    K, D, C2W = (np.asarray(take.attrs[k]) for k in ("K", "distortion", "cam2world"))
    res, raw = [], []
    import cv2

    for c, cam in enumerate(take.cameras):
        z = np.load(cap / "s000" / "t0" / "truth" / "cameras" / f"{cam}.npz")
        X = z["position"][z["mask"]].astype(np.float64)  # surface points at the rest pose

        def proj(f):
            P = poses[f]
            return project(X @ P[:3, :3].T + P[:3, 3], K[c], D[c], C2W[c])[0]

        ur = proj(refs[c])
        for f in of:
            ia, ib, s = align.bracketing(f, tf)
            # the flow as stored (float16 grid, upsampled by the documented rule)
            F = align.interpolate_flow(read_flow(g, c, ia), read_flow(g, c, ib), s)
            m = cv2.remap(F, ur[:, :1].astype(np.float32), ur[:, 1:].astype(np.float32),
                          cv2.INTER_LINEAR)[:, 0]
            uf = proj(f)
            res.append(np.hypot(*(ur + m - uf).T))
            raw.append(np.hypot(*(ur - uf).T))
    r, q = np.median(np.concatenate(res)), np.median(np.concatenate(raw))
    print(f"residual misalignment median {r:.3f} px (uncompensated {q:.3f} px)")
    # the flow's own error floor on the twin's smooth skin is ~0.15 px, comparable to the
    # motion of a short sequence, so only the absolute residual is asserted
    assert r < 0.25


@twin_test
def test_fused_kernels_match_the_opencv_path(twin_moving, tmp_path, monkeypatch):
    """The default (lightstage._fused) ingest of a moving subject against the OpenCV reference
    path, same capture: equal to float16 rounding plus the reference warp's 1/32-px rounding
    of sampling positions; validity equal but for pixels at the edge of a mask."""
    from lightstage import _fused

    if not _fused.available():
        pytest.skip(f"fused kernels unavailable: {_fused.why_unavailable()}")
    cap, cal = twin_moving
    assert ingest(cap, cal, tmp_path / "fused.zarr").ok
    monkeypatch.setattr(_fused, "available", lambda: False)
    assert ingest(cap, cal, tmp_path / "ref.zarr").ok
    a, b = open_take(tmp_path / "fused.zarr").group, open_take(tmp_path / "ref.zarr").group
    for name in ("olat", "tracking"):
        x, y = np.asarray(a[name][...], np.float32), np.asarray(b[name][...], np.float32)
        rel = np.abs(x - y) / np.maximum(np.abs(y), 0.05 * np.abs(y).max())
        print(f"{name}: fused vs OpenCV path, median {np.median(rel):.2e}, 99.9 % "
              f"{np.quantile(rel, 0.999):.2e}, max {rel.max():.2e}, differing {(x != y).mean():.2%}")
        assert np.median(rel) < 1e-3 and np.quantile(rel, 0.999) < 0.02
    for name in ("valid", "flow_valid"):
        x, y = np.asarray(a[name][...]), np.asarray(b[name][...])
        assert (x != y).mean() < 1e-3, name
    np.testing.assert_array_equal(a["flow"][...], b["flow"][...])  # flows from the same images
    np.testing.assert_array_equal(a["mask"][...], b["mask"][...])


@twin_test
def test_xarray_opens_store_with_dims_and_attrs(ingested):
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(str(ingested), group="s000/t0", consolidated=False)
    assert ds["olat"].dims == ("camera", "light", "channel", "y", "x")
    assert ds["valid"].dims == ("camera", "light", "y", "x")
    assert ds["tracking"].dims == ("camera", "tracking_frame", "channel", "y", "x")
    assert ds["flow"].dims[2] == "component"
    for k in ("scale", "light_directions", "light_rgb", "K", "cam2world", "world2head", "rig",
              "calibration", "exposures", "provenance", "olat_frames", "tracking_frames"):
        assert k in ds.attrs, k
    assert ds.attrs["provenance"]["inputs_sha256"]
    assert np.asarray(ds.attrs["world2head"]).shape == (4, 4)
    assert ds["olat"].dtype == np.float16 and 0 < ds.attrs["scale"]
    # typical stored values O(1), the largest well inside float16
    o = ds["olat"].isel(camera=0).values.astype(np.float32)
    assert 1e-3 < np.percentile(o[o > 0], 50) < 100 and o.max() < 65504


@twin_test
def test_verify_detects_tampering_and_missing(ingested, tmp_path):
    assert verify_store(ingested) == []
    st = tmp_path / "copy.zarr"
    shutil.copytree(ingested, st)
    g = zarr.open_group(str(st), mode="r+")["s000/t0"]
    img = g["olat"][1, 3]
    img[0, 10, 10] = img[0, 10, 10] + 1
    g["olat"][1, 3] = img
    d = g["done"][...]
    d[2, 5] = 0
    g["done"][...] = d
    probs = verify_store(st)
    assert any("cam01 light 3: checksum mismatch" in p for p in probs)
    assert any("cam02 light 5: missing" in p for p in probs)
    assert len(probs) == 2


def _cli(*args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "cli.ingest", *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, **kw)


@twin_test
def test_killed_ingest_resumes_to_identical_store(twin, ingested, tmp_path):
    cap, cal = twin
    out = tmp_path / "k.zarr"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "cli.ingest", str(cap), "--calibration", str(cal),
                          "--out", str(out), "--workers", "0"],
                         cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    killed = False
    shards = out / "s000" / "t0" / "olat" / "c"
    while p.poll() is None and time.time() - t0 < 120:
        # kill -9 as soon as the first OLAT shards are on disk: mid-ingest
        if shards.exists() and any(f.is_file() for f in shards.rglob("*")):
            p.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    p.wait()
    assert killed and p.returncode == -signal.SIGKILL, "ingest finished before it could be killed"
    d = zarr.open_group(str(out), mode="r")["s000/t0/done"][...]
    assert (d == DONE_WRITTEN).sum() < d.size
    r = _cli(cap, "--calibration", cal, "--out", out, "--workers", "0")
    assert r.returncode == 0, r.stderr
    assert "already done" in r.stderr
    assert_same_take(out, ingested)
    assert _cli("--verify", out).returncode == 0


@twin_test
def test_existing_take_with_other_options_is_refused(twin, ingested, tmp_path):
    cap, cal = twin
    st = tmp_path / "c.zarr"
    shutil.copytree(ingested, st)
    before = take_arrays(st)[0]["olat"].copy()
    with pytest.raises(IngestError, match="overwrite"):
        ingest(cap, cal, st, config=IngestConfig(reference="first", flow=align.FlowConfig(upsample=2)))
    np.testing.assert_array_equal(take_arrays(st)[0]["olat"], before)
    # same options: a no-op resume
    rep = ingest(cap, cal, st)
    assert rep.ok and rep.written == 0 and rep.resumed == before.shape[0] * before.shape[1]


@twin_test
def test_localcluster_two_workers_same_store(twin, ingested, tmp_path):
    pytest.importorskip("distributed")
    cap, cal = twin
    out = tmp_path / "d.zarr"
    rep = ingest(cap, cal, out, workers=2)
    assert rep.ok and rep.dashboard
    assert_same_take(out, ingested)


@twin_test
def test_noise_matches_sensor_model(twin, tmp_path):
    """Noisy minus noise-free ingest (no motion compensation, float32), normalised by the
    standard deviation propagated from the sensor's shot + read + rounding noise through the
    merge, demosaic, vignetting, colour matrix and light normalisation: unit variance."""
    import cv2

    from lightstage.raw import cfa_masks, read_raw

    rig = builtin_rig("tiny")
    a, cal = twin
    b, _ = _simulate(tmp_path / "ns", noise=True, static=True)
    cfg = IngestConfig(motion=False, dtype="float32")
    assert ingest(a, cal, tmp_path / "a.zarr", config=cfg).ok
    assert ingest(b, cal, tmp_path / "b.zarr", config=cfg).ok
    ta, tb = open_take(tmp_path / "a.zarr"), open_take(tmp_path / "b.zarr")
    truth = _truth(a)
    k_rb = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 4
    k_g = np.array([[0, 1, 0], [1, 4, 1], [0, 1, 0]], np.float32) / 4
    from lightstage.calibfile import load_calibration

    calib = load_calibration(cal)
    zs, rel_truth = [], []
    for c, cam in enumerate(rig.cameras):
        s = cam.sensor
        cc = calib.cameras[cam.name]
        for li, f in enumerate(ta.attrs["olat_frames"]):
            files = [a / "s000" / "t0" / "raw" / cam.name / f"f{f:04d}_e{k}.dng" for k in range(2)]
            exps = rig.sequence[f].exposures
            num = np.zeros(cam.resolution, np.float64)
            den = np.zeros(cam.resolution, np.float64)
            for p, t in zip(files, exps):
                fr = read_raw(p)
                dn = fr.data * (s.white_level - s.black_level)  # noise-free expected DN
                ok = ~fr.saturated
                var_dn = np.clip(dn, 0, None) / s.electrons_per_dn + s.read_noise_dn**2 + 1 / 12
                num += ok * var_dn / (s.white_level - s.black_level) ** 2
                den += ok * t * s.gain
            v = (num / den**2).astype(np.float32)  # merged photosite variance
            m = cfa_masks(s.cfa_pattern, *cam.resolution)
            var_ch = []
            for ch in range(3):
                k = k_g if ch == 1 else k_rb
                nrm = cv2.filter2D(m[ch], -1, k, borderType=cv2.BORDER_REFLECT_101)
                var_ch.append(cv2.filter2D(v * m[ch], -1, k * k, borderType=cv2.BORDER_REFLECT_101) / nrm**2)
            var_ch = np.stack(var_ch) / vignetting_map(cc, *cam.resolution)[None] ** 2
            M = np.asarray(cc.colour_matrix)
            var_out = np.tensordot(M**2, var_ch, 1) / np.asarray(ta.attrs["light_rgb"])[li][:, None, None] ** 2
            lit = ta.olat(c, lights=li).min(0) > 0.05 * ta.olat(c, lights=li).max()
            lit &= truth.mask(c)
            # skip the image border, where reflected demosaic neighbours are not independent
            lit[:2], lit[-2:], lit[:, :2], lit[:, -2:] = False, False, False, False
            d = tb.olat(c, lights=li) - ta.olat(c, lights=li)
            zs.append((d[:, lit] / np.sqrt(var_out[:, lit])).ravel())
            t_idx = list(truth.attrs["lights"]).index(ta.attrs["lights"][li])
            tr = truth.olat(c, lights=t_idx)
            rel_truth.append((np.abs(tb.olat(c, lights=li) - tr)[:, lit] / tr[:, lit]).ravel())
    z = np.concatenate(zs)
    z = z[np.isfinite(z)]
    # neighbouring demosaiced pixels share photosites, but each pixel's variance is exact
    print(f"noise z-score std {z.std():.3f}, mean {z.mean():+.3f}; median relative error vs "
          f"truth with noise {np.median(np.concatenate(rel_truth)):.4%} (n={z.size})")
    assert z.size > 2000
    assert abs(z.std() - 1) < 0.1 and abs(z.mean()) < 0.1


def test_colour_and_vignetting_maths():
    rng = np.random.default_rng(0)
    M = rng.normal(0, 0.3, (3, 3)) + np.eye(3)
    cal = CameraCalibration(K=np.array([[100, 0, 9.5], [0, 100, 4.5], [0, 0, 1]]),
                            distortion=np.zeros(5), cam2world=np.eye(4), image_size=(10, 20),
                            colour_matrix=M, vignetting=np.array([-0.3, 0.1]))
    rgb = rng.random((3, 10, 20)).astype(np.float32)
    np.testing.assert_allclose(apply_colour(rgb, cal), np.einsum("ij,jyx->iyx", M, rgb), rtol=1e-5)
    # root-polynomial of degree 2 whose root terms have zero coefficients is the 3x3 matrix
    cal.colour_method = "root-polynomial-2"
    cal.colour_terms = np.vstack([M.T, np.zeros((3, 3))])
    np.testing.assert_allclose(apply_colour(rgb, cal), np.einsum("ij,jyx->iyx", M, rgb), rtol=1e-5)
    # ... and any root-polynomial is exposure invariant (degree-one homogeneous)
    cal.colour_terms = rng.normal(0, 0.2, (6, 3))
    np.testing.assert_allclose(apply_colour(4 * rgb, cal), 4 * apply_colour(rgb, cal), rtol=1e-5)
    v = vignetting_map(cal, 10, 20)
    r2 = ((19 - 9.5) ** 2 + (9 - 4.5) ** 2) / ((20**2 + 10**2) / 4)
    assert v[9, 19] == pytest.approx(1 - 0.3 * r2 + 0.1 * r2**2, rel=1e-6)
    assert v[4, 9] == pytest.approx(1 - 0.3 * (0.25 + 0.25) / 125 + 0.1 * (0.5 / 125) ** 2, rel=1e-6)
