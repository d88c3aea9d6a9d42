"""Real data (skipped when shared/data/real is absent): calibrate the 12 lights of the
photometric-stereo set ``olat/psmImages`` from its chrome-ball images, then relight the real
OLATs of the ceramic cat under the real HDRIs in ``envmaps/``.

Facts about the data used here, each checked against the files:

* ``lights.txt`` is in the camera frame with y up and z towards the camera: highlights above the
  ball centre have positive y. That frame *is* ours (y up, subject facing +z). Line k is image
  k (the best one-to-one assignment of our directions to the file's is the identity).
* The set's documentation (UW CSE 455 project 4; Cornell CS6644 uses the same images) says the
  lens is long (orthographic view) and the response linear. The cat TGAs are linear: a
  per-pixel Lambertian fit of the 12 images leaves a 0.5 % relative residual on the raw values
  and 1.3 % after sRGB decoding.
* How the directions are calibrated here (``calibration.lights``): the ball's silhouette is
  measured in the images themselves (:func:`circle_edges` on the mean chrome image: the dark
  ball against the grey backdrop, ~170 sub-pixel points, most of them over 0-140 deg; robust
  :func:`fit_circle`: centre (253.9, 146.8), radius 118.9 px, points within 0.1 px median); the
  supplied mask agrees (area radius 119.5 px, the image's edge points lie 119.8 +- 0.3 px from
  its centre on the clean upper arc). Highlights: background-subtracted centroids of one
  compact blob per image; saturated-core centroid, weighted centroid and blob centre agree to
  <= 0.65 px (<= 0.7 deg, most < 0.4). Mirror direction of the view ray: orthographic; with a perspective
  camera (exact view rays, sphere fitted to the silhouette) the agreement with the file only
  gets worse as the focal length shrinks (median 1.5 / 1.7 / 2.8 / 4.2 deg at f = 1e5 / 5000 /
  1000 / 500 px).
* Result: median 1.5 deg from ``lights.txt``, 8 of 12 within 2 deg (with the mask's circle
  instead: median 2.2 deg, 5 of 12), lights 0, 1, 8, 9 at 5.6, 8.2, 4.0, 2.6 deg.
* Why not 2 deg for all 12 (``test_lights_txt_contradicts_the_images``): no sphere reproduces
  the file. Given our highlight pixels, the orthographic ball that best explains ``lights.txt``
  (free centre and radius) has radius ~133 px centred near (256, 150), but the image's own
  silhouette points lie ~121 px from that centre, i.e. 12 px inside it; and even that ball
  leaves light 1 ~4.5 deg off: the file's light 1 reflects at a pixel ~5 px beside the saturated
  highlight of ``chrome.1.tga`` (value ~0.5 there, 1.0 in the blob). So the file is a rough
  reference, not truth to 2 deg; the tolerances below say what the data supports.
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


def ball_circle(chrome: np.ndarray, mask: np.ndarray):
    """The chrome ball's silhouette measured in the images: sub-pixel edge points of the mean
    image (highlights clipped so they do not dominate it) near the mask's circle, robust circle."""
    import cv2

    from calibration.lights import circle_edges, fit_circle

    centre, radius = E.sphere_from_mask(mask)
    mean = cv2.GaussianBlur(np.minimum(chrome, 0.05).mean(axis=(0, 3)).astype(np.float32), (0, 0), 1.0)
    pts = circle_edges(mean, centre, radius)
    c, r, mad = fit_circle(pts)
    return c, r, mad, pts


def calibrate(chrome: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(12, 3) light directions: ``calibration.lights.chrome_ball_directions`` (orthographic)
    on the ball circle measured in the images."""
    from calibration.lights import chrome_ball_directions

    c, r, _, _ = ball_circle(chrome, mask)
    return chrome_ball_directions(chrome.mean(-1), c, r)[0]


def _deg(a, b):
    return np.degrees(np.arccos(np.clip(np.sum(a * b, -1), -1, 1)))


def test_chrome_ball_calibration(psm):
    chrome, mask, _, _, ref = psm
    c, r, mad, pts = ball_circle(chrome, mask)
    assert len(pts) > 100 and mad < 0.3
    (mc, mr) = E.sphere_from_mask(mask)
    assert abs(r - mr) < 1.0 and np.hypot(*(c - np.asarray(mc))) < 1.5  # the mask agrees
    dirs = calibrate(chrome, mask)
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0, atol=1e-9)
    err = _deg(dirs, ref)
    assert np.median(err) < 1.8, err.round(2)
    assert np.sum(err < 2.0) >= 7, err.round(2)
    assert np.argmax(err) == 1, err.round(2)  # the light the file gets wrong (see below)
    # the geometry is right: every light is in front, above or near the horizon, as in the file
    assert (dirs[:, 2] > 0.7).all() and np.sign(dirs[:, 1]).tolist() == np.sign(ref[:, 1]).tolist()
    # exact view rays of a perspective camera fit the file worse the shorter its focal length
    from calibration.lights import CameraModel, chrome_ball_directions

    med = []
    for f in (1e5, 1000.0, 500.0):
        K = np.array([[f, 0, 255.5], [0, f, 169.5], [0, 0, 1]])
        cam = CameraModel(K, np.zeros(5), np.diag([1.0, -1, -1, 1]))  # viewer frame: y up, z back
        med.append(np.median(_deg(chrome_ball_directions(chrome.mean(-1), c, r, cam=cam)[0], ref)))
    assert abs(med[0] - np.median(err)) < 0.05 and med[0] < med[1] < med[2], med
    # line k of lights.txt is image k
    from scipy.optimize import linear_sum_assignment

    assert linear_sum_assignment(_deg(dirs[:, None], ref[None]))[1].tolist() == list(range(12))


def test_lights_txt_contradicts_the_images(psm):
    """Numerical proof that 2 deg for every light is out of reach with this reference: the ball
    ``lights.txt`` implies is not the ball in the images, and no ball fits its light 1."""
    from calibration.lights import chrome_ball_directions

    chrome, mask, _, _, ref = psm
    c, r, _, pts = ball_circle(chrome, mask)
    _, uv = chrome_ball_directions(chrome.mean(-1), c, r)
    # orthographic: highlight = centre + R (n_x, -n_y) with n the half vector of light and view;
    # the (centre, R) that best explains the file is linear least squares
    n = ref + np.array([0.0, 0.0, 1.0])
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    A = np.zeros((24, 3))
    A[0::2, 0] = A[1::2, 1] = 1
    A[0::2, 2], A[1::2, 2] = n[:, 0], -n[:, 1]
    cx, cy, R = np.linalg.lstsq(A, uv.ravel(), rcond=None)[0]
    assert R > r + 10, (R, r)                           # ~133 px vs the image's ~119 px
    rim = np.hypot(pts[:, 0] - cx, pts[:, 1] - cy)
    assert np.median(rim) < R - 8, (np.median(rim), R)  # its silhouette is not where that ball's is
    best = chrome_ball_directions(chrome.mean(-1), (cx, cy), R)[0]
    err = _deg(best, ref)
    assert err[1] > 4.0, err.round(2)                   # even the file's own ball misses light 1
    px = (cx + R * n[1, 0], cy - R * n[1, 1])           # where the file says light 1 reflects
    g = chrome[1].mean(-1)
    assert g[int(round(px[1])), int(round(px[0]))] < 0.7 < g[mask].max()


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
