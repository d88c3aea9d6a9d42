"""Light calibration from spheres: positions and directions from a chrome (mirror) ball's
highlights, linear RGB intensities from a white Lambertian ball.

* Sphere centre: sub-pixel silhouette edge points of every camera are back-projected to rays;
  the centre is the point whose distance to every ray equals the (known) radius, fitted by
  least squares jointly over the cameras (one camera suffices with the radius known).
* Highlight: intensity-weighted centroid of the brightest blob on the ball; its ray meets the
  sphere at x with normal n, and the light lies on the mirror ray ``x + s r``,
  ``r = d - 2 (d.n) n``.
* Position: the point closest to the mirror rays of >= 2 cameras; where the rays are too
  close to parallel to fix the range, the single ray is cut by the sphere of the median
  triangulated light distance (a near-field stage has its lights on a near-sphere).
* One view only (a photometric-stereo set, a hand-held ball): :func:`chrome_ball_directions`
  turns each image's highlight into a direction, orthographically (the mirror-ball formula of
  :func:`lightstage.envmap.mirrorball_direction`) or, given the camera, by reflecting the exact
  view ray of the highlight pixel on a sphere fitted to the silhouette. :func:`circle_edges` +
  :func:`fit_circle` measure the silhouette in the image itself (either polarity: a dark ball
  on a brighter backdrop too), e.g. to check a supplied mask.
* Intensity: on the diffuse ball, radiance ``L(x) = rho/pi * E * |p|^2 (n.(p-x))+ / |p-x|^3``
  with E the irradiance the light delivers at the rig centre facing it (the calibration
  file's light ``rgb``, the twin's ``colour * intensity / |p|^2``); E per channel is the least
  squares solution over the lit, well-inside pixels of every camera that sees them.

References
----------
Debevec, P. (1998). Rendering synthetic objects into real scenes. SIGGRAPH. (Mirror balls.)
Weber, M., Cipolla, R. (2001). A practical method for estimation of point light-sources. BMVC.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lightstage.camera import undistort_normalised

__all__ = [
    "LightError",
    "CameraModel",
    "pixel_ray",
    "silhouette_edges",
    "fit_sphere",
    "find_highlight",
    "mirror_ray",
    "triangulate_lines",
    "light_positions",
    "diffuse_irradiance",
    "circle_edges",
    "fit_circle",
    "chrome_ball_directions",
]


class LightError(RuntimeError):
    pass


@dataclass
class CameraModel:
    """What the light fits need of a calibrated camera."""

    K: np.ndarray
    dist: np.ndarray
    cam2world: np.ndarray


def pixel_ray(cam: CameraModel, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World origin (3,) and unit directions (N, 3) through pixels uv (N, 2)."""
    uv = np.atleast_2d(np.asarray(uv, np.float64))
    K = cam.K
    y = (uv[:, 1] - K[1, 2]) / K[1, 1]
    x = (uv[:, 0] - K[0, 2] - K[0, 1] * y) / K[0, 0]
    xy = undistort_normalised(np.stack([x, y], 1), cam.dist)
    d = np.c_[xy, np.ones(len(xy))] @ cam.cam2world[:3, :3].T
    return cam.cam2world[:3, 3].copy(), d / np.linalg.norm(d, axis=1, keepdims=True)


def silhouette_edges(lum: np.ndarray, min_area: int = 200) -> np.ndarray:
    """(N, 2) sub-pixel silhouette points of the largest bright blob: along the radial line
    from the blob centre, where the intensity crosses half the blob's inside level."""
    import cv2

    lum = np.asarray(lum, np.float32)
    inside = float(np.percentile(lum, 99.5))
    if not inside > 0:
        raise LightError("image is dark: no sphere silhouette")
    mask = (lum > 0.5 * inside).astype(np.uint8)
    n, lab, stats, cents = cv2.connectedComponentsWithStats(mask)
    if n < 2:
        raise LightError("no bright blob")
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[k, cv2.CC_STAT_AREA] < min_area:
        raise LightError(f"sphere blob too small ({stats[k, cv2.CC_STAT_AREA]} px)")
    blob = (lab == k).astype(np.uint8)
    level = 0.5 * float(np.median(lum[cv2.erode(blob, np.ones((5, 5), np.uint8)) > 0]))
    contours, _ = cv2.findContours(blob, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    pts = max(contours, key=len).reshape(-1, 2).astype(np.float64)
    c = cents[k]
    radial = pts - c
    radial /= np.linalg.norm(radial, axis=1, keepdims=True)
    steps = np.linspace(-3, 3, 49)
    samp = pts[:, None, :] + steps[None, :, None] * radial[:, None, :]
    prof = cv2.remap(lum, samp[..., 0].astype(np.float32), samp[..., 1].astype(np.float32),
                     cv2.INTER_LINEAR)
    out = []
    for p, r, pr in zip(pts, radial, prof):
        # last crossing from inside (>= level) to outside (< level) along the outward line
        above = pr >= level
        idx = np.nonzero(above[:-1] & ~above[1:])[0]
        if len(idx) != 1:
            continue
        i = idx[0]
        t = steps[i] + (pr[i] - level) / (pr[i] - pr[i + 1]) * (steps[1] - steps[0])
        out.append(p + t * r)
    if len(out) < 20:
        raise LightError("too few sub-pixel silhouette points")
    return np.asarray(out)


def fit_sphere(edges: dict[str, np.ndarray], cams: dict[str, CameraModel], radius: float,
               init: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Centre (3,) of a sphere of known ``radius`` from silhouette points seen by one or more
    cameras; returns the centre and the RMS of (ray distance - radius) in metres."""
    from scipy.optimize import least_squares

    O, D = [], []
    for name, uv in edges.items():
        o, d = pixel_ray(cams[name], uv)
        O.append(np.broadcast_to(o, d.shape))
        D.append(d)
    O, D = np.concatenate(O), np.concatenate(D)
    if init is None:
        # start on the first camera's mean ray at the distance where the cone fits
        name = next(iter(edges))
        o, d = pixel_ray(cams[name], edges[name])
        axis = d.mean(0)
        axis /= np.linalg.norm(axis)
        half = np.mean(np.arccos(np.clip(d @ axis, -1, 1)))
        init = o + axis * radius / np.sin(max(half, 1e-6))

    def res(c):
        return np.linalg.norm(np.cross(c - O, D), axis=1) - radius

    r = least_squares(res, np.asarray(init, np.float64), method="lm")
    return r.x, float(np.sqrt(np.mean(r.fun ** 2)))


def find_highlight(lum: np.ndarray, region: np.ndarray | None = None,
                   rel_threshold: float = 0.25) -> tuple[np.ndarray, float] | None:
    """Intensity-weighted centroid (u, v) of the brightest compact blob (inside ``region`` if
    given) and its peak, or None. The background (the ball's dim reflection of the stage) is
    the median and is subtracted."""
    import cv2

    lum = np.asarray(lum, np.float32)
    sel = lum if region is None else np.where(region, lum, 0)
    peak = float(sel.max())
    bg = float(np.median(lum[region])) if region is not None and region.any() else 0.0
    if not peak > max(bg, 0) * 4 or peak <= 0:
        return None
    thr = bg + rel_threshold * (peak - bg)
    mask = (sel > thr).astype(np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask)
    v, u = np.unravel_index(int(np.argmax(sel)), sel.shape)
    k = lab[v, u]
    y0, x0 = stats[k, cv2.CC_STAT_TOP], stats[k, cv2.CC_STAT_LEFT]
    h, w = stats[k, cv2.CC_STAT_HEIGHT], stats[k, cv2.CC_STAT_WIDTH]
    # a window around the blob: partial-coverage pixels at its rim carry the sub-pixel
    # position, so they are weighted by their excess over the background, not thresholded
    y0, x0 = max(y0 - 2, 0), max(x0 - 2, 0)
    y1, x1 = min(y0 + h + 4, lum.shape[0]), min(x0 + w + 4, lum.shape[1])
    win = np.clip(lum[y0:y1, x0:x1] - bg, 0, None)
    win = np.where(win > 0.02 * (peak - bg), win, 0)
    ys, xs = np.mgrid[y0:y1, x0:x1]
    s = win.sum()
    return np.array([(win * xs).sum() / s, (win * ys).sum() / s]), peak


def mirror_ray(cam: CameraModel, uv, centre, radius, max_incidence_deg: float = 80.0
               ) -> tuple[np.ndarray, np.ndarray, float] | None:
    """The mirror ray of a highlight at pixel uv: (origin on the ball, unit direction, weight).

    The weight is cos(incidence): near the rim a pixel spans a wide range of normals, so a
    highlight there fixes its ray poorly; beyond ``max_incidence_deg`` it is rejected (None)."""
    o, d = pixel_ray(cam, uv)
    d = d[0]
    oc = o - centre
    b = d @ oc
    disc = b * b - (oc @ oc - radius * radius)
    if disc < 0:
        return None
    x = o + (-b - np.sqrt(disc)) * d
    n = (x - centre) / radius
    cos_i = float(-(d @ n))
    if cos_i < np.cos(np.radians(max_incidence_deg)):
        return None
    r = d - 2 * (d @ n) * n
    return x, r, cos_i


def triangulate_lines(origins: np.ndarray, dirs: np.ndarray, weights: np.ndarray | None = None
                      ) -> tuple[np.ndarray, float]:
    """Point closest to lines (weighted least squares) and the conditioning (smallest /
    largest eigenvalue of sum w (I - r r^T): near 0 when the lines are near parallel)."""
    w = np.ones(len(origins)) if weights is None else np.asarray(weights, np.float64)
    A = np.zeros((3, 3))
    b = np.zeros(3)
    for o, r, wi in zip(origins, dirs, w):
        P = wi * (np.eye(3) - np.outer(r, r))
        A += P
        b += P @ o
    ev = np.linalg.eigvalsh(A)
    return np.linalg.solve(A, b), float(ev[0] / ev[-1])


def light_positions(rays: dict[int, list[tuple]], strong_conditioning: float = 2e-3,
                    default_distance: float | None = None) -> dict[int, tuple[np.ndarray, str]]:
    """Light positions from mirror rays ``{light: [(x, r, weight), ...]}``.

    Mirror rays from one ball fix a light's *direction* well and its *range* poorly (they
    leave the ball a few cm apart and meet ~1.5 m away). So: every light with >= 2 rays is
    triangulated; one whose rays cross at a wide enough angle (conditioning >=
    ``strong_conditioning``) keeps its own range, the others take the median range of all
    triangulated lights (stages mount their lights on a near-sphere) or ``default_distance``
    when none was triangulated. Returns ``{light: (position, how)}``."""
    tri: dict[int, tuple[np.ndarray, float]] = {}
    for i, rl in rays.items():
        if len(rl) >= 2:
            p, cond = triangulate_lines(np.array([t[0] for t in rl]), np.array([t[1] for t in rl]),
                                        np.array([t[2] for t in rl]))
            if cond > 1e-7 and all((p - t[0]) @ t[1] > 0 for t in rl):
                tri[i] = (p, cond)
    dists = [np.linalg.norm(p) for p, _ in tri.values()]
    R = float(np.median(dists)) if dists else default_distance
    out: dict[int, tuple[np.ndarray, str]] = {}
    for i, rl in rays.items():
        if not rl:
            continue
        if i in tri and tri[i][1] >= strong_conditioning:
            out[i] = (tri[i][0], f"triangulated from {len(rl)} views")
            continue
        if R is None:
            raise LightError(f"light {i}: its mirror rays do not fix its range and no light was "
                             "triangulated; give more chrome-ball views or a default distance")
        # each ray meets the sphere |p| = R (s > 0); average the meeting points
        pts, w = [], []
        for x, r, wi in rl:
            b = x @ r
            s = -b + np.sqrt(max(b * b - (x @ x - R * R), 0.0))
            pts.append(x + s * r)
            w.append(wi)
        p = (np.array(pts) * np.array(w)[:, None]).sum(0) / sum(w)
        out[i] = (p * (R / np.linalg.norm(p)), f"{len(rl)} view(s), on the {R:.3f} m median light sphere")
    return out


def diffuse_irradiance(rgb: np.ndarray, cam: CameraModel, centre: np.ndarray, radius: float,
                       albedo: float, light_pos: np.ndarray, saturated: np.ndarray | None = None,
                       min_shading: float = 0.2, erode_px: int = 3) -> tuple[np.ndarray, int]:
    """Irradiance at the rig centre (3,) of one light from a colour-corrected radiance image
    (H, W, 3) of the white ball, and the number of pixels used (0: none usable)."""
    import cv2

    H, W = rgb.shape[:2]
    v, u = np.mgrid[0:H, 0:W]
    # restrict to the ball's bounding box for speed
    o, _ = pixel_ray(cam, np.zeros((1, 2)))
    uvc = (cam.K @ (np.linalg.inv(cam.cam2world) @ np.append(centre, 1))[:3])
    uc, vc = uvc[:2] / uvc[2]
    rpx = cam.K[0, 0] * radius / np.linalg.norm(centre - o) * 1.3 + 5
    y0, y1 = int(max(vc - rpx, 0)), int(min(vc + rpx + 1, H))
    x0, x1 = int(max(uc - rpx, 0)), int(min(uc + rpx + 1, W))
    if y1 <= y0 or x1 <= x0:
        return np.zeros(3), 0
    uv = np.stack([u[y0:y1, x0:x1].ravel(), v[y0:y1, x0:x1].ravel()], 1).astype(np.float64)
    o, d = pixel_ray(cam, uv)
    oc = o - centre
    b = d @ oc
    disc = b * b - (oc @ oc - radius * radius)
    hit = disc > 0
    s = -b - np.sqrt(np.clip(disc, 0, None))
    x = o + s[:, None] * d
    n = (x - centre) / radius
    mask = hit.reshape(y1 - y0, x1 - x0).astype(np.uint8)
    mask = cv2.erode(mask, np.ones((2 * erode_px + 1, 2 * erode_px + 1), np.uint8)).ravel() > 0
    pv = light_pos - x
    dist = np.linalg.norm(pv, axis=1)
    cos = np.einsum("ij,ij->i", n, pv) / dist
    p2 = float(light_pos @ light_pos)
    g = p2 * np.clip(cos, 0, None) / dist ** 2
    # stay clear of the terminator, where the pixel footprint straddles the kink of max(0, .)
    use = mask & (cos > min_shading)
    if saturated is not None:
        use &= ~saturated[y0:y1, x0:x1].ravel()
    L = rgb[y0:y1, x0:x1].reshape(-1, 3).astype(np.float64)
    use &= np.isfinite(L).all(1)
    if use.sum() < 20:
        return np.zeros(3), 0
    gg = g[use]
    a = (L[use] * gg[:, None]).sum(0) / (gg @ gg)
    return a * np.pi / albedo, int(use.sum())


# ---- one view -----------------------------------------------------------------------------------


def circle_edges(lum: np.ndarray, centre, radius: float, search: float = 0.15,
                 step_deg: float = 1.0, min_contrast: float | None = None) -> np.ndarray:
    """(N, 2) sub-pixel silhouette points of a ball near a guessed circle ``(centre, radius)``.

    Along rays from ``centre`` (every ``step_deg``), the profile between ``(1 - search)`` and
    ``(1 + search)`` x ``radius`` is compared with the medians just inside and just outside;
    a ray keeps the point where it crosses the half level, if it crosses exactly once and the
    two sides differ by at least ``min_contrast`` (default: 4 x the noise of the inner band).
    Either polarity works (bright ball on dark, or a dark chrome ball against a brighter
    backdrop); rays where ball and background look alike (the floor, a reflection at the rim)
    are skipped. Average several images first for faint edges.
    """
    import cv2

    lum = np.asarray(lum, np.float32)
    cx, cy = float(centre[0]), float(centre[1])
    rs = np.arange((1 - search) * radius, (1 + search) * radius, 0.25)
    inner = (rs > (1 - search) * radius) & (rs < (1 - search / 2) * radius)
    outer = (rs > (1 + search / 2) * radius)
    out = []
    for th in np.radians(np.arange(0.0, 360.0, step_deg)):
        x, y = cx + rs * np.cos(th), cy - rs * np.sin(th)
        if x.min() < 0 or y.min() < 0 or x.max() > lum.shape[1] - 1 or y.max() > lum.shape[0] - 1:
            continue
        pr = cv2.remap(lum, x.astype(np.float32)[None], y.astype(np.float32)[None],
                       cv2.INTER_LINEAR)[0].astype(np.float64)
        a, b = float(np.median(pr[inner])), float(np.median(pr[outer]))
        noise = 1.4826 * float(np.median(np.abs(pr[inner] - a))) + 1e-6
        if abs(b - a) < (min_contrast if min_contrast is not None else 4 * noise):
            continue
        s = np.sign(b - a) * (pr - 0.5 * (a + b))  # < 0 inside, > 0 outside
        k = np.nonzero((s[:-1] < 0) & (s[1:] >= 0))[0]
        if len(k) != 1:
            continue
        k = int(k[0])
        r = rs[k] + s[k] / (s[k] - s[k + 1]) * (rs[1] - rs[0])
        out.append((cx + r * np.cos(th), cy - r * np.sin(th)))
    return np.asarray(out, np.float64).reshape(-1, 2)


def fit_circle(points: np.ndarray, radius: float | None = None, robust_px: float = 0.5
               ) -> tuple[np.ndarray, float, float]:
    """Circle through (N, 2) points: centre (2,), radius, and the median absolute distance of
    the points from it (pixels).

    Robust (soft-L1 beyond ``robust_px``): silhouette points on a stand or a rim reflection
    do not pull the fit. With ``radius`` given only the centre is fitted (a short arc fixes the
    centre well but trades the radius against it)."""
    from scipy.optimize import least_squares

    p = np.asarray(points, np.float64)
    if len(p) < 3:
        raise LightError(f"a circle needs >= 3 silhouette points, got {len(p)}")
    A = np.c_[2 * p, np.ones(len(p))]
    cx, cy, k = np.linalg.lstsq(A, (p ** 2).sum(1), rcond=None)[0]  # algebraic start
    r0 = float(np.sqrt(max(k + cx * cx + cy * cy, 1e-12)))
    kw = dict(loss="soft_l1", f_scale=float(robust_px))
    if radius is None:
        f = least_squares(lambda q: np.hypot(p[:, 0] - q[0], p[:, 1] - q[1]) - q[2], [cx, cy, r0], **kw)
        c, r = f.x[:2], float(f.x[2])
    else:
        f = least_squares(lambda q: np.hypot(p[:, 0] - q[0], p[:, 1] - q[1]) - radius, [cx, cy], **kw)
        c, r = f.x, float(radius)
    return c, r, float(np.median(np.abs(np.hypot(p[:, 0] - c[0], p[:, 1] - c[1]) - r)))


def chrome_ball_directions(lums, centre, radius: float, region: np.ndarray | None = None,
                           cam: CameraModel | None = None, edges: np.ndarray | None = None
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Light directions (N, 3) and highlight pixels (N, 2) from N single-light images of a
    mirror ball seen by one camera.

    ``lums``: (N, H, W) luminance; ``centre``/``radius``: the ball's silhouette circle
    (pixels); ``region``: where to look for highlights (default: the disc). Highlights are
    :func:`find_highlight`'s background-subtracted centroids (a saturated core and its rim).

    Without ``cam`` the view is orthographic and the directions are in the viewer frame (x
    right, y up, z towards the camera). With ``cam`` the sphere (unit radius: directions do
    not depend on the scale) is placed by :func:`fit_sphere` on the silhouette rays of
    ``edges`` (default: 360 points of the circle; points more than 2 px off the circle are
    dropped) and the exact view ray of each highlight is reflected (:func:`mirror_ray`);
    directions are then in ``cam``'s world frame.
    """
    from lightstage.envmap import mirrorball_direction

    lums = np.asarray(lums)
    if lums.ndim == 2:
        lums = lums[None]
    H, W = lums.shape[1:]
    if region is None:
        v, u = np.mgrid[0:H, 0:W]
        region = (u - centre[0]) ** 2 + (v - centre[1]) ** 2 <= radius ** 2
    sphere = None
    if cam is not None:
        if edges is None:
            t = np.radians(np.arange(0.0, 360.0, 1.0))
            edges = np.c_[centre[0] + radius * np.cos(t), centre[1] + radius * np.sin(t)]
        edges = np.asarray(edges, np.float64).reshape(-1, 2)
        # the sphere fit is least squares: points off the circle (a stand, a rim reflection)
        # would pull it, so only those within 2 px of it are used
        edges = edges[np.abs(np.hypot(edges[:, 0] - centre[0], edges[:, 1] - centre[1]) - radius) < 2.0]
        if len(edges) < 20:
            raise LightError(f"only {len(edges)} silhouette points within 2 px of the ball circle")
        sphere, _ = fit_sphere({"cam": edges}, {"cam": cam}, 1.0)
    dirs, uvs = [], []
    for i, lum in enumerate(lums):
        h = find_highlight(lum, region)
        if h is None:
            raise LightError(f"image {i}: no highlight on the ball (nothing much brighter than "
                             "its median inside the region)")
        uv = h[0]
        if sphere is None:
            d = mirrorball_direction(uv[0], uv[1], centre, radius)
        else:
            m = mirror_ray(cam, uv, sphere, 1.0, max_incidence_deg=89.0)
            if m is None:
                raise LightError(f"image {i}: highlight at {np.round(uv, 1).tolist()} misses the "
                                 "fitted sphere")
            d = m[1]
        dirs.append(d / np.linalg.norm(d))
        uvs.append(uv)
    return np.asarray(dirs), np.asarray(uvs)
