"""Real data (skipped when shared/data/real is absent): calibrate the 12 lights of the
photometric-stereo set ``olat/psmImages`` from its chrome-ball images, then relight the real
OLATs of the ceramic cat under the real HDRIs in ``envmaps/``.

Facts about the data used here, each checked against the files:

* ``lights.txt`` is in the camera frame with y up and z towards the camera: highlights above the
  ball centre have positive y. That frame *is* ours (y up, subject facing +z).
* The cat TGAs are linear, not sRGB: a per-pixel Lambertian fit of the 12 images leaves a
  0.5 % relative residual on the raw values and 1.3 % after sRGB decoding.
* ``lights.txt`` is only consistent with a ball of radius ~133 px centred at (256, 150), while
  the supplied chrome mask is a disc of radius 119.5 px at (253.3, 147.8); with the mask's ball
  our directions differ from ``lights.txt`` by 1.1-8.5 deg (median ~2.2 deg), and even with the
  best-fitting ball light 1 stays 4.6 deg off. So the file is a rough reference, not truth to
  2 deg; the tolerances below say so.
"""

from __future__ import annotations

import numpy as np
import pytest

from lightstage import envmap as E
from lightstage import relight as R


def _tga(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


@pytest.fixture(scope="module")
def psm(real_data):
    base = real_data / "olat" / "psmImages"
    chrome = np.stack([_tga(base / f"chrome/chrome.{i}.tga") for i in range(12)])
    chrome_mask = _tga(base / "chrome/chrome.mask.tga")[..., 0] > 0.5
    cat = np.stack([_tga(base / f"cat/cat.{i}.tga") for i in range(12)])
    cat_mask = _tga(base / "cat/cat.mask.tga")[..., 0] > 0.5
    ref = np.loadtxt(base / "lights.txt", skiprows=1)
    return chrome, chrome_mask, cat, cat_mask, ref


def calibrate(chrome: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(12, 3) light directions: centroid of each image's saturated highlight on the ball,
    reflected through the ball's normal there (orthographic, ``envmap.mirrorball_direction``)."""
    centre, radius = E.sphere_from_mask(mask)
    out = []
    for im in chrome:
        g = im.mean(-1) * mask
        ys, xs = np.nonzero(g >= 0.98 * g.max())
        out.append(E.mirrorball_direction(xs.mean(), ys.mean(), centre, radius))
    return np.asarray(out)


def test_chrome_ball_calibration(psm):
    chrome, mask, _, _, ref = psm
    dirs = calibrate(chrome, mask)
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0, atol=1e-9)
    err = np.degrees(np.arccos(np.clip(np.sum(dirs * ref, 1), -1, 1)))
    assert np.median(err) < 2.5 and err.max() < 9.0, err.round(2)
    assert np.sum(err < 2.0) >= 5, err.round(2)
    # the geometry is right: every light is in front, above or near the horizon, as in the file
    assert (dirs[:, 2] > 0.7).all() and np.sign(dirs[:, 1]).tolist() == np.sign(ref[:, 1]).tolist()


def test_relight_cat_under_real_hdris(psm, real_data):
    chrome, cmask, cat, mask, _ = psm
    dirs = calibrate(chrome, cmask)
    olat = np.ascontiguousarray(cat.transpose(0, 3, 1, 2))  # (12, 3, H, W) channel-planar
    files = sorted((real_data / "envmaps").glob("*"))
    assert len(files) >= 6
    for f in files:
        env = E.load_envmap(f, height=128)  # power-conserving downsizing
        w = R.light_weights(env, dirs)
        np.testing.assert_allclose(w.sum(0), E.total_power(env), rtol=1e-6, err_msg=f.name)
        img = R.relight(olat, w)
        ref = np.einsum("lchw,lc->chw", olat.astype(np.float64), w)
        np.testing.assert_allclose(img, ref, rtol=1e-4, atol=1e-6 * ref.max(), err_msg=f.name)
        assert np.isfinite(img).all() and img.min() >= 0
        cov = R.coverage(dirs, env=env)
        # 12 lights within ~40 deg of the camera: most of the sphere is nobody's
        assert cov.fraction > 0.8, f.name
    # physics: the quarry's sun turned into the lights' cone lights the cat far more than the
    # same sun turned behind it, once directions no light covers are dropped (given to the
    # nearest light instead, the sun behind lands on a front light: all power is kept)
    env = E.load_envmap(real_data / "envmaps/quarry_01_1k.hdr", height=128)
    d = E.equirect_directions(128)
    sun = d[np.unravel_index(np.argmax(env.sum(-1)), env.shape[:2])]
    centre = dirs.mean(0) / np.linalg.norm(dirs.mean(0))

    def turned_to(target):
        axis = np.cross(sun, target)
        ang = np.degrees(np.arccos(np.clip(sun @ target, -1, 1)))
        return E.rotate(env, ang, axis)

    front, back = turned_to(centre), turned_to(-centre)

    def lum(e, **kw):
        return R.relight(olat, R.light_weights(e, dirs, **kw))[:, mask].mean()

    assert lum(front, uncovered="drop") > 10 * lum(back, uncovered="drop")
    np.testing.assert_allclose(R.light_weights(back, dirs).sum(0), E.total_power(back), rtol=1e-6)


def test_ls_relight_on_a_real_capture(psm, real_data, tmp_path):
    """The cat as a one-camera store, relit by the command under the real office EXR."""
    import json

    from click.testing import CliRunner

    from cli.relight import main
    from lightstage.imageio import read_exr
    from lightstage.store import create_take

    chrome, cmask, cat, mask, _ = psm
    dirs = calibrate(chrome, cmask)
    H, W = cat.shape[1:3]
    g = create_take(tmp_path / "psm.zarr", "cat", "t0", cameras=["cam"], n_lights=12, n_tracking=1,
                    height=H, width=W, dtype="float16",
                    attrs={"light_directions": dirs, "light_rgb": np.ones((12, 3)),
                           "K": np.eye(3)[None], "cam2world": np.eye(4)[None]})
    g["olat"][0] = cat.transpose(0, 3, 1, 2).astype(np.float16)
    g["mask"][0] = mask * 255
    g["done"][...] = 1
    env_file = real_data / "envmaps/threejs_piz_compressed_office.exr"
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["--store", str(tmp_path / "psm.zarr"), "--env", str(env_file),
                                  "--env-height", "128", "--exposure", "auto", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "relight.json").read_text())
    assert rep["coverage"]["uncovered_sr"] > 0.8 * 4 * np.pi
    img = read_exr(out / "relit.exr")
    env = E.load_envmap(env_file, height=128)
    ref = R.relight(cat.transpose(0, 3, 1, 2).astype(np.float16), R.light_weights(env, dirs))
    np.testing.assert_allclose(img, ref.transpose(1, 2, 0), rtol=1e-4, atol=1e-6)
