"""The twin's sensor model and capture simulation against independent truth.

Sensor: the statistics of the simulated raw against the analytic shot + read noise model; the
ground-truth calibration applied to a noise-free raw must give back the radiance. Capture:
every DNG LibRaw reads equals the sensor model of the scene's radiance; same seed -> same bytes
for any worker count; the folder matches lightstage.manifest; bad input writes nothing.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from lightstage.rig import builtin_rig, rig_to_dict
from lightstage.twin.sensor import (
    cfa_channels,
    dn_scale,
    expected_dn,
    light_irradiance,
    noise_rng,
    simulate_raw,
    truth_calibration,
    vignetting_gain,
)


def _camera(pattern="GRBG", vignetting=0.25, **sensor):
    cam = copy.deepcopy(builtin_rig("tiny").cameras[0])
    cam.sensor.cfa_pattern = pattern
    cam.sensor.vignetting = vignetting
    for k, v in sensor.items():
        setattr(cam.sensor, k, v)
    return cam


def _linearise(raw, cam, exposure, cal):
    """Ingest's documented inverse, written out independently: (DN - black)/(white - black)
    /(t g), divide by the calibfile vignetting polynomial, demosaic by nearest same-colour
    sample, colour matrix."""
    s = cam.sensor
    c = cal.cameras[cam.name]
    H, W = raw.shape
    x = (raw.astype(np.float64) - s.black_level) / (s.white_level - s.black_level) / (exposure * s.gain)
    K = c.K
    yy, xx = np.mgrid[0:H, 0:W]
    r2 = ((xx - K[0, 2]) ** 2 + (yy - K[1, 2]) ** 2) / ((W**2 + H**2) / 4)
    x = x / (1 + c.vignetting[0] * r2 + c.vignetting[1] * r2**2)
    return x, c.colour_matrix


def test_cfa_layout_matches_pattern():
    ch = cfa_channels("GBRG", 5, 7)
    assert ch.shape == (5, 7)
    assert ch[0, 0] == 1 and ch[0, 1] == 2 and ch[1, 0] == 0 and ch[1, 1] == 1
    assert ch[4, 6] == ch[0, 0] and ch[3, 5] == ch[1, 1]


def test_noise_free_raw_inverts_to_radiance_with_truth_calibration():
    """Uniform grey-ish radiance: per CFA colour, linearising the noise-free raw with the truth
    calibration's inverse gives M @ rgb / full_scale, and colour_matrix maps it back to rgb."""
    rig = builtin_rig("tiny")
    cam = rig.cameras[1]
    cal = truth_calibration(rig)
    rgb = np.array([0.3, 0.5, 0.2])
    H, W = cam.resolution
    rad = np.broadcast_to(rgb.astype(np.float32), (H, W, 3)).copy()
    exposure = 1 / 240
    raw = simulate_raw(rad, cam, exposure, noise=False)
    assert raw.dtype == np.uint16
    lin, colour_matrix = _linearise(raw, cam, exposure, cal)
    ch = cfa_channels(cam.sensor.cfa_pattern, H, W)
    cam_rgb = np.array([np.median(lin[ch == k]) for k in range(3)])
    np.testing.assert_allclose(colour_matrix @ cam_rgb, rgb, rtol=2e-3)
    # rounding is the only error: every photosite within half a DN of the analytic value
    M = np.asarray(cam.sensor.colour_response)
    yy, xx = np.mgrid[0:H, 0:W]
    K = cam.K_array
    r2 = ((xx - K[0, 2]) ** 2 + (yy - K[1, 2]) ** 2) / ((W**2 + H**2) / 4)
    analytic = (M @ rgb)[ch] * (1 - cam.sensor.vignetting * r2) * dn_scale(cam, exposure)
    assert np.abs(raw.astype(np.float64) - cam.sensor.black_level - analytic).max() <= 0.5 + 1e-3
    # the truth calibration's lights are the irradiance at the centre
    l0 = rig.lights[0]
    p = np.asarray(l0.position)
    np.testing.assert_allclose(cal.lights[0].rgb, np.asarray(l0.colour) * l0.intensity / (p @ p))
    np.testing.assert_allclose(light_irradiance(rig, [0])[0], cal.lights[0].rgb)


def test_noise_statistics_match_shot_plus_read_model():
    cam = _camera("RGGB", vignetting=0.0, electrons_per_dn=3.0, read_noise_dn=2.5, gain=2.0)
    H, W = cam.resolution
    rad = np.full((H, W, 3), 0.2, np.float32)
    exposure = 1 / 120
    mu = expected_dn(rad, cam, exposure)
    n = 24  # repeated exposures of the same flat field, each with its own generator
    raws = np.stack([simulate_raw(rad, cam, exposure, noise_rng(7, 0, 0, f, 0)) for f in range(n)])
    resid = raws.astype(np.float64) - cam.sensor.black_level - mu
    ch = cfa_channels("RGGB", H, W)
    for k in range(3):
        m = float(np.mean(mu[ch == k]))
        assert 20 < m < cam.sensor.white_level - 200  # a flat, unclipped level
        pred = m / cam.sensor.electrons_per_dn + cam.sensor.read_noise_dn**2 + 1 / 12
        var = resid[:, ch == k].var()
        nsamp = resid[:, ch == k].size
        # sample variance of ~1e5 values: relative standard error sqrt(2/n) < 0.5 %
        assert var == pytest.approx(pred, rel=6 * np.sqrt(2 / nsamp) + 0.01)
        assert abs(resid[:, ch == k].mean()) < 5 * np.sqrt(pred / nsamp)  # unbiased
    # the generator is keyed, not shared: same keys -> same image, other keys -> another
    a = simulate_raw(rad, cam, exposure, noise_rng(7, 0, 0, 3, 0))
    assert np.array_equal(a, raws[3])
    assert not np.array_equal(a, raws[4])
    assert np.array_equal(noise_rng(1, "s000", "cam01").integers(0, 1 << 30, 4),
                          noise_rng(1, "s000", "cam01").integers(0, 1 << 30, 4))


def test_noise_does_not_depend_on_the_block_size(monkeypatch):
    """Large frames draw their noise in blocks (bounded memory): same keys, same bytes as one
    whole-image draw, whatever the block size."""
    import lightstage.twin.sensor as sensor

    cam = _camera("GBRG", vignetting=0.2)
    H, W = cam.resolution
    rad = np.random.default_rng(5).uniform(0, 2, (H, W, 3)).astype(np.float32)
    monkeypatch.setattr(sensor, "_NOISE_BLOCK", H * W)
    whole = simulate_raw(rad, cam, 1 / 60, noise_rng(3, 1, 2))
    for block in (1000, 77):
        monkeypatch.setattr(sensor, "_NOISE_BLOCK", block)
        assert np.array_equal(simulate_raw(rad, cam, 1 / 60, noise_rng(3, 1, 2)), whole)


def test_clipping_at_white_and_black():
    cam = _camera("BGGR")
    H, W = cam.resolution
    rad = np.zeros((H, W, 3), np.float32)
    rad[: H // 2] = 50.0  # far above full scale
    raw = simulate_raw(rad, cam, 1 / 30, noise_rng(0, 1))
    assert raw[: H // 2].max() == cam.sensor.white_level
    assert np.all(raw[: H // 2] == cam.sensor.white_level)
    dark = raw[H // 2:].astype(np.float64)
    # a dark region is black level plus read noise (a few DN), never clipped to zero here
    assert abs(dark.mean() - cam.sensor.black_level) < 0.2
    assert dark.std() == pytest.approx(np.sqrt(cam.sensor.read_noise_dn**2 + 1 / 12), rel=0.1)
    clean = simulate_raw(rad, cam, 1 / 30, noise=False)
    assert np.all(clean[H // 2:] == cam.sensor.black_level)


def test_vignetting_gain_is_radial_about_principal_point():
    cam = _camera(vignetting=0.3)
    g = vignetting_gain(cam)
    H, W = cam.resolution
    K = cam.K_array
    cy, cx = int(round(K[1, 2])), int(round(K[0, 2]))
    assert g[cy, cx] == pytest.approx(1.0, abs=1e-3)
    # a corner at distance d has gain 1 - v d^2 / half_diag^2
    d2 = (0 - K[0, 2]) ** 2 + (0 - K[1, 2]) ** 2
    assert g[0, 0] == pytest.approx(1 - 0.3 * d2 / ((W * W + H * H) / 4), rel=1e-5)


# ---- capture simulation ---------------------------------------------------------------------------

import hashlib  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import rawpy  # noqa: E402

from lightstage.calibfile import load_calibration  # noqa: E402
from lightstage.manifest import load_manifest, sha256_file  # noqa: E402
from lightstage.store import open_take  # noqa: E402
from lightstage.camera import pixel_rays  # noqa: E402
from lightstage.twin.capture import (  # noqa: E402
    SimulationError,
    SubjectSpec,
    default_subject,
    motion_trajectory,
    simulate,
    subject_seed,
)


class SphereScene:
    """Stand-in subject with analytic radiance: a Lambertian sphere whose albedo is striped in
    the subject frame (so rigid motion shows), lit by point lights. Keeps these tests
    independent of the head renderer's speed and state."""

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        self.centre = np.array([0.0, 0.03, 0.0]) + rng.uniform(-0.01, 0.01, 3)
        self.radius = 0.1
        self.albedo = rng.uniform(0.3, 0.7, 3)
        self.world2head = np.diag([10.0, 10.0, 10.0, 1.0])

    def _hit(self, camera, pose):
        o, d = pixel_rays(camera.K, camera.distortion, camera.cam2world, *camera.resolution)
        T = np.eye(4) if pose is None else np.asarray(pose)
        c = T[:3, :3] @ self.centre + T[:3, 3]
        oc = o - c
        b = d @ oc
        disc = b * b - (oc @ oc - self.radius**2)
        mask = disc > 0
        t = np.where(mask, -b - np.sqrt(np.clip(disc, 0, None)), np.inf)
        x = o + d * np.where(mask, t, 0)[..., None]
        n = (x - c) / self.radius
        xs = (x - T[:3, 3]) @ T[:3, :3]  # back to the subject frame
        alb = self.albedo * (1 + 0.4 * np.sin(60 * xs[..., :1]))
        return mask, t, n, np.where(mask[..., None], alb, 0), x

    def radiance(self, camera, light_positions, light_rgb, pose=None, distant=False):
        mask, _, n, alb, x = self._hit(camera, pose)
        E = np.zeros(x.shape)
        for p, rgb in zip(np.asarray(light_positions), np.asarray(light_rgb)):
            v = p - x
            d2 = (v * v).sum(-1, keepdims=True)
            cos = np.clip((n * v).sum(-1, keepdims=True) / np.sqrt(d2), 0, None)
            E += rgb * cos / d2
        return np.where(mask[..., None], alb / np.pi * E, 0).astype(np.float32)

    def truth(self, camera, pose=None):
        mask, t, n, alb, x = self._hit(camera, pose)
        R = np.asarray(camera.cam2world)[:3, :3]
        o, d = pixel_rays(camera.K, camera.distortion, camera.cam2world, *camera.resolution)
        depth = np.where(mask, t * (d @ R[:, 2]), np.inf)
        return {"mask": mask, "depth": depth.astype(np.float32),
                "normal": np.where(mask[..., None], n, 0).astype(np.float32),
                "albedo": alb.astype(np.float32),
                "position": np.where(mask[..., None], x, 0).astype(np.float32)}


def sphere_subject(seed: int) -> SubjectSpec:
    sc = SphereScene(seed)
    return SubjectSpec(sc, {"centre": sc.centre, "albedo": sc.albedo}, sc.world2head)

CAL_SMALL = {"lights": [0], "n_board_poses": 1, "supersample": 1, "chrome_cameras": 1,
             "diffuse_cameras": 1}


def _folder_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _independent_raw(radiance, cam, exposure):
    """Noise-free raw written out from the documented model, independent of sensor.py."""
    s = cam.sensor
    H, W = cam.resolution
    M = np.asarray(s.colour_response)
    ch = np.array(["RGB".index(c) for c in s.cfa_pattern]).reshape(2, 2)
    ch = np.tile(ch, (H // 2 + 1, W // 2 + 1))[:H, :W]
    cam_val = np.einsum("hwc,hwc->hw", radiance.astype(np.float64), M[ch])
    K = cam.K_array
    yy, xx = np.mgrid[0:H, 0:W]
    r2 = ((xx - K[0, 2]) ** 2 + (yy - K[1, 2]) ** 2) / ((W**2 + H**2) / 4)
    dn = cam_val * (1 - s.vignetting * r2) * exposure * s.gain / s.full_scale * (s.white_level - s.black_level)
    return np.clip(np.rint(dn) + s.black_level, 0, s.white_level)


@pytest.fixture(scope="module")
def tiny_capture(tmp_path_factory):
    out = tmp_path_factory.mktemp("cap") / "out"
    rig = builtin_rig("tiny")
    # dark, tracking, 3 OLATs: every frame kind, in seconds
    simulate(out, rig, 1, seed=5, noise=False, frames="0:5", calibration=CAL_SMALL,
             subject_factory=sphere_subject)
    return out, rig


def test_capture_dngs_match_sensor_model_of_scene(tiny_capture):
    out, rig = tiny_capture
    man = load_manifest(out / "s000" / "t0")
    assert [f.index for f in man.frames] == [0, 1, 2, 3, 4]
    assert [f.kind for f in man.frames] == [rig.sequence[i].kind for i in range(5)]
    poses = json.loads((out / "s000/t0/truth/motion.json").read_text())
    scene = sphere_subject(subject_seed(5, 0)).scene
    pos, rgb = rig.light_positions(), rig.light_rgb()
    checked = 0
    for fr in man.frames:
        seq = rig.sequence[fr.index]
        on = [seq.light] if seq.kind == "olat" else (list(range(rig.n_lights)) if seq.kind == "tracking" else [])
        pose = np.asarray(poses["frames"][fr.index]["pose"])
        for ci, cam in enumerate(rig.cameras):
            lst = fr.files[cam.name]
            assert [r.exposure for r in lst] == seq.exposures
            rad = (scene.radiance(cam, pos[on], rgb[on], pose=pose) if on
                   else np.zeros((*cam.resolution, 3), np.float32))
            for k, rf in enumerate(lst):
                p = man.path(rf)
                assert rf.sha256 == sha256_file(p)
                assert rf.iso == cam.sensor.iso
                with rawpy.imread(str(p)) as r:
                    raw = r.raw_image.copy()
                    assert r.white_level == cam.sensor.white_level
                    assert list(r.black_level_per_channel) == [cam.sensor.black_level] * 4
                    desc = r.color_desc.decode()
                    assert "".join(desc[i] for i in r.raw_pattern.reshape(-1)) == cam.sensor.cfa_pattern
                    assert r.other.shutter_speed == pytest.approx(rf.exposure, rel=1e-6)
                    assert r.other.iso_speed == cam.sensor.iso
                expect = _independent_raw(rad, cam, rf.exposure)
                # float32 vs float64 arithmetic may flip a rounding exactly at .5
                assert np.abs(raw.astype(np.float64) - expect).max() <= 1
                assert np.mean(raw != expect) < 1e-3
                checked += 1
            if seq.kind != "dark":
                assert raw.max() > cam.sensor.black_level + 20  # the subject is visible
    assert checked == sum(len(rig.sequence[i].exposures) for i in range(5)) * rig.n_cameras


def test_capture_truth_store_and_motion(tiny_capture):
    out, rig = tiny_capture
    take = open_take(out / "s000/t0/truth/truth.zarr")
    assert take.validate() == []
    a = take.attrs
    scene = sphere_subject(subject_seed(5, 0)).scene
    olat_frames = [f.index for f in rig.sequence if f.kind == "olat"]
    assert a["olat_frames"] == olat_frames
    cal = load_calibration(out / "calibration" / "truth_calibration.json")
    np.testing.assert_allclose(np.asarray(a["light_rgb"]), cal.light_rgb()[a["lights"]])
    done = take.group["done"][...]
    for slot, f in enumerate(olat_frames):
        # frames 2..4 are the first three OLATs; the rest of the sequence was not simulated
        assert (done[:, slot] == 255).all() == (f < 5)
        assert (done[:, slot] == 0).all() == (f >= 5)
    ci = 2
    cam = rig.cameras[ci]
    for slot in range(3):
        light = a["lights"][slot]
        ref = scene.radiance(cam, rig.light_positions()[[light]], rig.light_rgb()[[light]])
        E = cal.lights[light].rgb
        got = take.olat(ci, lights=slice(slot, slot + 1))[0]
        np.testing.assert_allclose(np.moveaxis(got, 0, -1) * E, ref, rtol=1e-5, atol=1e-7)
    tr = scene.truth(cam)
    assert np.array_equal(take.mask(ci), np.asarray(tr["mask"]).astype(bool))
    npz = np.load(out / "s000/t0/truth/cameras" / f"{cam.name}.npz")
    np.testing.assert_array_equal(npz["depth"], tr["depth"])
    # motion: identity at the central tracking frame (ingest's reference), small elsewhere
    m = json.loads((out / "s000/t0/truth/motion.json").read_text())
    P = np.asarray([f["pose"] for f in m["frames"]])
    assert len(P) == len(rig.sequence)
    np.testing.assert_allclose(P[m["rest_frame"]], np.eye(4), atol=1e-12)
    # frames 0:5 hold one tracking frame (1): ingest's central reference for this capture
    assert m["rest_frame"] == 1 and rig.sequence[1].kind == "tracking"
    ang = np.degrees(np.arccos(np.clip((np.trace(P[:, :3, :3], axis1=1, axis2=2) - 1) / 2, -1, 1)))
    assert ang.max() < 0.5 and ang.max() > 0.01
    # head centre displacement: sub-mm to a few mm
    c = np.array([0.0, 0.03, 0.0, 1.0])
    disp = np.linalg.norm((P @ c)[:, :3] - c[:3], axis=1)
    assert 1e-4 < disp.max() < 5e-3
    # smooth (<= 3 cycles over the sequence): random independent poses would jump ~disp.max()
    assert np.abs(np.diff(disp)).max() < 0.5 * disp.max()
    subj = json.loads((out / "s000/t0/truth/subject.json").read_text())
    assert subj["seed"] == subject_seed(5, 0)


def test_calibration_shots_written(tiny_capture):
    out, rig = tiny_capture
    shots = json.loads((out / "calibration" / "shots.json").read_text())["shots"]
    names = {s["name"] for s in shots}
    assert {"flat_field", "chart", "board_00", "chrome_000", "diffuse_000"} <= names
    for s in shots:
        assert sorted(s["files"]) == sorted(s["cameras"])
        for cam, lst in s["files"].items():
            assert [f["exposure"] for f in lst] == s["exposures"]
            p = out / "calibration" / lst[0]["path"]
            assert lst[0]["sha256"] == sha256_file(p)
    flat = next(s for s in shots if s["name"] == "flat_field")
    cam = rig.camera(flat["cameras"][0])
    with rawpy.imread(str(out / "calibration" / flat["files"][cam.name][0]["path"])) as r:
        raw = r.raw_image.copy()
    L0 = np.asarray(flat["truth"]["known"]["radiance_rgb"], dtype=np.float32)
    rad = np.broadcast_to(L0, (*cam.resolution, 3))
    assert np.abs(raw - _independent_raw(rad, cam, flat["exposures"][0])).max() <= 1
    cal = load_calibration(out / "calibration" / "truth_calibration.json")
    assert cal.source == "twin-ground-truth"
    assert set(cal.cameras) == {c.name for c in rig.cameras}


def test_same_seed_same_bytes_for_any_worker_count(tmp_path):
    rig = builtin_rig("tiny")
    # a module-level factory: spawned workers import this test module to unpickle it
    # (calibration shots use the same task machinery; left out to keep this test fast)
    kw = dict(noise=True, frames="1:3", calibration=False, subject_factory=sphere_subject)
    a = simulate(tmp_path / "a", rig, 1, seed=11, workers=1, **kw)
    b = simulate(tmp_path / "b", rig, 1, seed=11, workers=2, **kw)
    ha, hb = _folder_hash(a), _folder_hash(b)
    assert len(ha) > 20 and ha == hb
    c = simulate(tmp_path / "c", rig, 1, seed=12, workers=1, **kw)
    hc = _folder_hash(c)
    dng = [k for k in ha if k.endswith(".dng") and k.startswith("s000")]
    assert dng and all(ha[k] != hc[k] for k in dng)  # another seed: other noise everywhere


@pytest.mark.slow
def test_head_capture_same_bytes_with_shared_caches(tmp_path):
    """Workers load the driver's head scene and share rest-pose depth maps and shadow tables
    through a scratch folder: the bytes must still not depend on the worker count."""
    rig = builtin_rig("tiny")
    kw = dict(noise=True, frames="1:5", calibration=False)
    a = simulate(tmp_path / "a", rig, 1, seed=5, workers=1, **kw)
    b = simulate(tmp_path / "b", rig, 1, seed=5, workers=2, **kw)
    ha, hb = _folder_hash(a), _folder_hash(b)
    assert any(k.endswith(".dng") for k in ha) and ha == hb


def test_refuses_non_empty_out_and_overwrites_only_its_own(tmp_path):
    rig = builtin_rig("tiny")
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    kw = dict(calibration=False, noise=False, subject_factory=sphere_subject)
    with pytest.raises(SimulationError, match="not empty"):
        simulate(user, rig, 0, calibration=False)
    with pytest.raises(SimulationError, match="not written by ls-simulate"):
        simulate(user, rig, 0, calibration=False, overwrite=True)
    assert [p.name for p in user.iterdir()] == ["notes.txt"]
    out = tmp_path / "sim"
    simulate(out, rig, 1, frames="0:1", **kw)
    with pytest.raises(SimulationError, match="not empty"):
        simulate(out, rig, 1, frames="0:1", **kw)
    (out / "keep.txt").write_text("user file added later")
    (out / "s000" / "t0" / "raw" / "cam00" / "f0000_e0.dng").write_bytes(b"corrupt")
    simulate(out, rig, 1, frames="1:2", overwrite=True, **kw)
    assert (out / "keep.txt").read_text() == "user file added later"
    assert not (out / "s000" / "t0" / "raw" / "cam00" / "f0000_e0.dng").exists()
    man = load_manifest(out / "s000" / "t0")
    assert [f.index for f in man.frames] == [1]
    with pytest.raises(SimulationError, match="frames"):
        simulate(tmp_path / "x", rig, 1, frames="500:600")
    with pytest.raises(SimulationError, match="module-level"):
        simulate(tmp_path / "x", rig, 1, workers=2, subject_factory=lambda s: sphere_subject(s))
    assert not (tmp_path / "x").exists()


def test_motion_trajectory_is_seeded_and_bounded():
    a = motion_trajectory(200, 3, rest_frame=7)
    b = motion_trajectory(200, 3, rest_frame=7)
    assert np.array_equal(a, b)
    np.testing.assert_allclose(a[7], np.eye(4), atol=1e-12)
    for P in a[::17]:
        R = P[:3, :3]
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(R) == pytest.approx(1.0)
    assert not np.array_equal(a, motion_trajectory(200, 4, rest_frame=7))


@pytest.mark.slow
def test_head_subject_capture_integration(tmp_path):
    """The real head renderer through the whole pipeline (slow: renderer speed varies)."""
    rig = builtin_rig("tiny")
    out = simulate(tmp_path / "h", rig, 1, seed=1, noise=False, frames="1:3", calibration=False)
    man = load_manifest(out / "s000" / "t0")
    scene = default_subject(subject_seed(1, 0)).scene
    fr = man.frames[1]
    light = rig.sequence[fr.index].light
    pose = np.asarray(json.loads((out / "s000/t0/truth/motion.json").read_text())["frames"][fr.index]["pose"])
    cam = rig.cameras[0]
    rad = scene.radiance(cam, rig.light_positions()[[light]], rig.light_rgb()[[light]], pose=pose)
    with rawpy.imread(str(man.path(fr.files[cam.name][0]))) as r:
        raw = r.raw_image.copy()
    assert np.abs(raw - _independent_raw(rad, cam, fr.files[cam.name][0].exposure)).max() <= 1
    assert open_take(out / "s000/t0/truth/truth.zarr").validate() == []


# ---- ls-simulate -----------------------------------------------------------------------------------

from click.testing import CliRunner  # noqa: E402

from cli.simulate import main as simulate_cli  # noqa: E402


def test_cli_bad_rig_file_lists_every_error_and_writes_nothing(tmp_path):
    rig = json.loads(json.dumps(rig_to_dict(builtin_rig("tiny"))))
    rig["cameras"][1]["sensor"]["cfa_pattern"] = "RGBX"
    rig["cameras"][2]["K"][0][0] = -5.0
    rig["lights"][3]["intensity"] = 0
    rig["sequence"][4]["light"] = 999
    p = tmp_path / "bad_rig.json"
    p.write_text(json.dumps(rig))
    out = tmp_path / "out"
    res = CliRunner().invoke(simulate_cli, [str(out), "--rig", str(p)])
    assert res.exit_code == 2
    text = res.output
    for field in ("cameras[1].sensor.cfa_pattern", "cameras[2].K", "lights[3].intensity",
                  "sequence[4].light"):
        assert field in text
    assert "Traceback" not in text and not out.exists()
    res = CliRunner().invoke(simulate_cli, [str(out), "--rig", str(tmp_path / "missing.json")])
    assert res.exit_code == 2 and "missing.json" in res.output and not out.exists()


def test_cli_refuses_non_empty_out(tmp_path):
    (tmp_path / "precious.txt").write_text("x")
    res = CliRunner().invoke(simulate_cli, [str(tmp_path), "--rig", "tiny", "--frames", "0:1"])
    assert res.exit_code == 2 and "not empty" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(simulate_cli, [str(tmp_path), "--frames", "0:1", "--overwrite"])
    assert res.exit_code == 2 and "refusing" in res.output
    assert [p.name for p in tmp_path.iterdir()] == ["precious.txt"]
    res = CliRunner().invoke(simulate_cli, [str(tmp_path / "o"), "--frames", "7:3"])
    assert res.exit_code == 2 and "--frames" in res.output


def test_cli_tiny_head_capture_in_seconds(tmp_path):
    """The real head renderer on the tiny rig: dark + tracking frames, no calibration."""
    out = tmp_path / "cap"
    res = CliRunner().invoke(simulate_cli, [str(out), "--rig", "tiny", "--subjects", "1",
                                            "--seed", "2", "--frames", "0:2", "--no-calibration"])
    assert res.exit_code == 0, res.output
    assert "frames/s" in res.output
    man = load_manifest(out / "s000" / "t0")
    assert [f.kind for f in man.frames] == ["dark", "tracking"]
    tr = man.frames[1].files["cam00"][0]
    with rawpy.imread(str(man.path(tr))) as r:
        raw = r.raw_image.copy()
    assert raw.max() > builtin_rig("tiny").cameras[0].sensor.black_level + 50  # the head is lit
    assert not (out / "calibration" / "shots.json").exists()
    cal = load_calibration(out / "calibration" / "truth_calibration.json")  # always written
    assert cal.source == "twin-ground-truth"


def test_ingest_of_twin_capture_recovers_truth(tmp_path):
    """Twin -> DNGs -> ingest (with the truth calibration) -> store equals the truth store:
    an independent consumer checks the sensor model, DNG tags, colour matrix, vignetting and
    per-unit-light conventions end to end (motion compensated against the truth rest pose)."""
    ingest_mod = pytest.importorskip("lightstage.ingest")
    rig = builtin_rig("tiny")
    cap = simulate(tmp_path / "cap", rig, 1, seed=3, noise=False, frames="1:11", calibration=False,
                   subject_factory=sphere_subject)
    store = tmp_path / "store.zarr"
    ingest_mod.ingest(cap, cap / "calibration" / "truth_calibration.json", store,
                      config=ingest_mod.IngestConfig(dtype="float32", scale=1.0))
    got, truth = open_take(store), open_take(cap / "s000/t0/truth/truth.zarr")
    assert got.attrs["olat_frames"] == truth.attrs["olat_frames"][:8]
    for ci in range(rig.n_cameras):
        for li in (0, 7):
            x = got.olat(ci, lights=slice(li, li + 1))[0]
            y = truth.olat(ci, lights=slice(li, li + 1))[0]
            m = truth.mask(ci) & (y.min(0) > 0.05 * y.max())
            ratio = np.median(x[:, m] / y[:, m], axis=1)
            # absolute level within 1.5 % (motion changes shading a little), colour within 0.5 %
            np.testing.assert_allclose(ratio, 1.0, atol=0.015)
            assert ratio.max() - ratio.min() < 0.005
            assert np.median(np.abs(x[:, m] - y[:, m]) / y[:, m]) < 0.02
