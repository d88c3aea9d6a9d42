"""Single-view chrome-ball light calibration (``calibration.lights``: circle_edges, fit_circle,
chrome_ball_directions) on synthetic images with known truth: a ball rendered by ray casting
(orthographic and perspective), its highlights placed where the mirror law puts each light.
"""

from __future__ import annotations

import numpy as np
import pytest

from calibration.lights import CameraModel, LightError, chrome_ball_directions, circle_edges, fit_circle

H, W = 300, 400
LIGHTS = np.array([[0.4, 0.5, 0.77], [0.1, 0.15, 0.98], [-0.3, 0.45, 0.84], [0.25, -0.2, 0.95],
                   [-0.5, -0.1, 0.86]])
LIGHTS = LIGHTS / np.linalg.norm(LIGHTS, axis=1, keepdims=True)
VIEWER = np.diag([1.0, -1.0, -1.0, 1.0])  # OpenCV camera -> viewer frame (y up, z towards the camera)


def _deg(a, b):
    return np.degrees(np.arccos(np.clip(np.sum(a * b, -1), -1, 1)))


def _render(inside, highlights, ball=0.02, backdrop=0.3, ss=4):
    """Luminance images: ``inside(x, y)`` -> bool on sub-pixel samples (anti-aliased edge), one
    image per highlight pixel with a saturating Gaussian blob there."""
    o = (np.arange(ss) + 0.5) / ss - 0.5
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float64)
    cover = np.zeros((H, W))
    for dy in o:
        for dx in o:
            cover += inside(xs + dx, ys + dy)
    cover /= ss * ss
    base = backdrop + (ball - backdrop) * cover
    out = []
    for u, v in highlights:
        blob = 6.0 * np.exp(-((xs - u) ** 2 + (ys - v) ** 2) / (2 * 1.6 ** 2))
        out.append(np.minimum(base + blob, 1.0))  # clipped like a camera
    return np.array(out)


def test_orthographic_ball_recovers_circle_and_directions():
    cx, cy, r = 201.3, 148.7, 90.4
    n = LIGHTS + np.array([0.0, 0.0, 1.0])
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    hl = np.c_[cx + r * n[:, 0], cy - r * n[:, 1]]
    ims = _render(lambda x, y: (x - cx) ** 2 + (y - cy) ** 2 <= r * r, hl)
    pts = circle_edges(ims.mean(0), (cx + 3, cy - 2), r - 4)  # from a rough guess
    assert len(pts) > 300
    c, rr, mad = fit_circle(pts)
    assert np.hypot(c[0] - cx, c[1] - cy) < 0.1 and abs(rr - r) < 0.1 and mad < 0.1
    dirs, uv = chrome_ball_directions(ims, c, rr)
    np.testing.assert_allclose(uv, hl, atol=0.05)
    assert _deg(dirs, LIGHTS).max() < 0.1
    # a dark ball on a bright backdrop and a bright ball on a dark one are found alike
    bright = _render(lambda x, y: (x - cx) ** 2 + (y - cy) ** 2 <= r * r, hl[:1], ball=0.6, backdrop=0.05)
    c2, r2, _ = fit_circle(circle_edges(bright[0], (cx, cy), r))
    assert np.hypot(c2[0] - cx, c2[1] - cy) < 0.1 and abs(r2 - r) < 0.1


def _mirror_point(C, light, iters=60):
    """Point on the unit sphere at C (camera at the origin, OpenCV frame) that reflects the
    camera ray towards ``light``: the normal bisects the directions to camera and light."""
    x = C - np.array([0.0, 0.0, 1.0])
    for _ in range(iters):  # fixed point: n = normalise(to_camera(x) + light)
        to_cam = -x / np.linalg.norm(x)
        n = to_cam + light
        x = C + n / np.linalg.norm(n)
    return x


def test_perspective_ball_uses_exact_view_rays():
    f = 700.0
    K = np.array([[f, 0, W / 2 - 0.5], [0, f, H / 2 - 0.5], [0, 0, 1]])
    C = np.array([0.35, -0.2, 6.0])  # unit ball, off the optical axis: rays differ by ~10 deg
    lights_cv = LIGHTS * np.array([1.0, -1.0, -1.0])  # viewer frame -> OpenCV camera frame
    X = np.array([_mirror_point(C, l) for l in lights_cv])
    hl = (X @ K.T)[:, :2] / X[:, 2:]

    def inside(x, y):
        d = np.stack([(x - K[0, 2]) / f, (y - K[1, 2]) / f, np.ones_like(x)], -1)
        d /= np.linalg.norm(d, axis=-1, keepdims=True)
        b = d @ C
        return b * b - (C @ C - 1) >= 0

    ims = _render(inside, hl)
    cam = CameraModel(K, np.zeros(5), VIEWER)
    pts = circle_edges(ims.mean(0), (W / 2 - 0.5 + f * C[0] / C[2], H / 2 - 0.5 + f * C[1] / C[2]),
                       f * np.tan(np.arcsin(1 / np.linalg.norm(C))))
    c, r, _ = fit_circle(pts)
    dirs, _ = chrome_ball_directions(ims, c, r, cam=cam, edges=pts)
    assert _deg(dirs, LIGHTS).max() < 0.1, _deg(dirs, LIGHTS)
    # the orthographic formula on the same images is measurably wrong here
    ortho, _ = chrome_ball_directions(ims, c, r)
    assert _deg(ortho, LIGHTS).max() > 3 * _deg(dirs, LIGHTS).max()


def test_chrome_ball_errors_name_the_image():
    ims = np.zeros((2, 50, 60))
    ims[0, 20, 30] = 1.0
    with pytest.raises(LightError, match="image 1"):
        chrome_ball_directions(ims, (30, 25), 20)
    with pytest.raises(LightError, match=">= 3"):
        fit_circle(np.zeros((2, 2)))
