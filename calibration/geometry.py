"""Geometric calibration: planar-target detection (ChArUco, chessboard), per-camera intrinsics
and the joint bundle adjustment of every camera and board pose in the world frame.

World frame (docs/conventions.md: metres, y up, origin at the rig centre): the gauge of a
multi-camera calibration is fixed by a *reference board pose*, the pose at which the stage's
fixture holds the board (``board2world`` of one view, known from the stage's design, as the
twin's ``truth['known']['board2world']`` of board pose 0). That pose is held fixed in the
bundle adjustment, so translation, rotation and scale (from the board's square size) all
come from it. Without a reference, the first view's board frame is the world.

Pipeline::

    det   = detect_charuco(image, board)                 per camera and view: ids, corners
    init  = calibrate_camera(...)                        cv2.calibrateCamera per camera
    rig   = calibrate_rig(detections, ...)               chain poses, then joint BA (scipy)

References
----------
Zhang, Z. (2000). A flexible new technique for camera calibration. IEEE TPAMI 22(11).
Triggs, B. et al. (2000). Bundle adjustment: a modern synthesis. Vision Algorithms.
Garrido-Jurado, S. et al. (2014). ArUco markers. Pattern Recognition 47(6).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lightstage.camera import distort_normalised
from lightstage.targets_spec import BoardSpec, charuco_board

__all__ = [
    "GeometryError",
    "Detection",
    "PlanarPattern",
    "charuco_pattern",
    "refine_saddle_corners",
    "chessboard_pattern",
    "parse_board",
    "DISTORTION_MODELS",
    "calibrate_camera",
    "RigGeometry",
    "calibrate_rig",
    "reprojection_errors",
]


class GeometryError(RuntimeError):
    """Geometric calibration impossible (too few views, degenerate, disconnected)."""


@dataclass
class Detection:
    """Corners of one pattern seen in one image: ids (N,) and pixel positions (N, 2)."""

    ids: np.ndarray
    corners: np.ndarray


@dataclass
class PlanarPattern:
    """A planar calibration pattern: object points (M, 3) on z = 0 (metres) and a detector
    ``detect(grey_u8) -> Detection | None``."""

    name: str
    object_points: np.ndarray
    detect: object
    min_corners: int = 6


def parse_board(text: str) -> BoardSpec:
    """``"5x7:0.04:0.02:DICT_6X6_250"`` (columns x rows : square : marker : dictionary)."""
    import cv2

    try:
        dims, sq, mk, dic = text.split(":")
        c, r = (int(v) for v in dims.lower().split("x"))
        spec = BoardSpec((c, r), float(sq), float(mk), dic.strip())
    except ValueError:
        raise ValueError(f"board {text!r}: expected COLSxROWS:SQUARE:MARKER:DICT, "
                         "e.g. 5x7:0.04:0.02:DICT_6X6_250") from None
    if not hasattr(cv2.aruco, spec.dictionary):
        raise ValueError(f"board {text!r}: unknown ArUco dictionary {spec.dictionary!r}")
    if not 0 < spec.marker < spec.square:
        raise ValueError(f"board {text!r}: marker must be positive and smaller than the square")
    return spec


def charuco_pattern(spec: BoardSpec) -> PlanarPattern:
    """ChArUco detection with OpenCV 5's ``CharucoDetector`` (corner ids and sub-pixel
    positions; partial views are fine)."""
    import cv2

    board = charuco_board(spec)
    det = cv2.aruco.CharucoDetector(board)

    def detect(grey: np.ndarray):
        cc, ids, _, _ = det.detectBoard(grey)
        if ids is None or len(ids) < 4:
            return None
        return Detection(ids.ravel().astype(int), cc.reshape(-1, 2).astype(np.float64))

    return PlanarPattern(f"charuco {spec.squares[0]}x{spec.squares[1]}",
                         np.asarray(board.getChessboardCorners(), np.float64), detect)


def refine_saddle_corners(lum: np.ndarray, det: Detection, board_xy: np.ndarray, clear: float,
                          margin_px: float = 1.0, min_pixels: int = 12, max_shift_px: float = 1.5,
                          max_misfit: float = 0.2, iterations: int = 20) -> Detection | None:
    """Sub-pixel chessboard corners by fitting a blurred-saddle model to *linear* image data.

    ``CharucoDetector`` refines corners with ``cornerSubPix`` on an 8-bit tone-mapped image;
    on the twin its corners are off by ~0.17 px RMS (0.11 px median) even without noise. Here
    every corner's neighbourhood is fitted, by batched Levenberg-Marquardt, with

        I(p) = b + a erf(d1(p) / (sqrt(2) sigma)) erf(d2(p) / (sqrt(2) sigma))

    where d1, d2 are the signed pixel distances to the two board lines through the corner
    (their angles free), sigma the blur (optics, pixel footprint, demosaic) -- the image of a
    saddle blurred by an isotropic Gaussian, exact for orthogonal lines and point-symmetric
    about the corner in general, so the fitted corner is unbiased on a symmetric window.
    The window is the marker-free square of half-size ``clear`` (board units) around the corner,
    mapped into the image by the view's board->image homography from the detected corners,
    less ``margin_px`` (the blur of the marker edges). Linear data matter: blur acts on
    radiance, and the tone curve would make the edge profiles asymmetric.

    Parameters
    ----------
    lum : (H, W) linear luminance
    det : the detector's corners (initial positions)
    board_xy : (N, 2) board coordinates of ``det``'s corners (same units as ``clear``)
    clear : half-size of the marker-free square around a corner ((square - marker) / 2 for
        ChArUco)
    margin_px, min_pixels, max_shift_px, max_misfit : corners whose window is smaller than
        ``min_pixels``, that move more than ``max_shift_px``, or whose RMS misfit exceeds
        ``max_misfit`` of the saddle's amplitude are dropped (strongly foreshortened views,
        occlusions): a dropped corner costs less than a wrong one.

    Returns
    -------
    Detection with the refined corners that passed (None when fewer than 4 did).
    """
    import cv2
    from scipy.special import erf

    N = len(det.ids)
    if N < 4:
        return None
    lum = np.asarray(lum, np.float64)
    q0 = np.asarray(det.corners, np.float64)
    xy = np.asarray(board_xy, np.float64)
    Hm, _ = cv2.findHomography(xy, q0, 0)
    if Hm is None:
        return None
    # Jacobian of board -> pixels at each corner (columns: image directions of board x, y)
    X = np.c_[xy, np.ones(N)]
    w = X @ Hm[2]
    u, v = X @ Hm[0] / w, X @ Hm[1] / w
    J = np.empty((N, 2, 2))
    J[:, 0, 0], J[:, 0, 1] = (Hm[0, 0] - u * Hm[2, 0]) / w, (Hm[0, 1] - u * Hm[2, 1]) / w
    J[:, 1, 0], J[:, 1, 1] = (Hm[1, 0] - v * Hm[2, 0]) / w, (Hm[1, 1] - v * Hm[2, 1]) / w
    det_J = np.abs(np.linalg.det(J))
    if not np.all(det_J > 0):
        return None
    # one window size per view: the marker-free square's largest extent in pixels
    r = int(np.clip(np.ceil(clear * np.abs(J).sum(2).max()) + 1, 3, 15))
    oy, ox = np.mgrid[-r:r + 1, -r:r + 1]
    pts = np.round(q0).astype(int)[:, None, :] + np.stack([ox.ravel(), oy.ravel()], 1)[None]
    Hh, Ww = lum.shape
    inb = (pts[..., 0] >= 0) & (pts[..., 0] < Ww) & (pts[..., 1] >= 0) & (pts[..., 1] < Hh)
    I = lum[np.clip(pts[..., 1], 0, Hh - 1), np.clip(pts[..., 0], 0, Ww - 1)]
    pf = pts.astype(np.float64)
    st = np.einsum("nij,npj->npi", np.linalg.inv(J), pf - q0[:, None, :])
    lim = clear - margin_px / np.sqrt(det_J)[:, None]
    m = (inb & (np.abs(st[..., 0]) < lim) & (np.abs(st[..., 1]) < lim)).astype(np.float64)
    npx = m.sum(1)
    # keep only the window's pixels (padded to the fullest window): the square around the
    # marker-free diamond is mostly outside it
    keep = np.argsort(m == 0, axis=1, kind="stable")[:, : max(int(npx.max()), 1)]
    pf = np.take_along_axis(pf, keep[..., None], 1)
    I = np.take_along_axis(I, keep, 1)
    m = np.take_along_axis(m, keep, 1)
    st = np.take_along_axis(st, keep[..., None], 1)
    # start: lines along the board axes, sigma 0.8 px, amplitude signed by the quadrants
    th1 = np.arctan2(J[:, 1, 0], J[:, 0, 0])
    th2 = np.arctan2(J[:, 1, 1], J[:, 0, 1])
    b0 = (I * m).sum(1) / np.maximum(npx, 1)
    quad = np.sign(st[..., 0]) * np.sign(st[..., 1])
    a0 = (m * (I - b0[:, None]) * quad).sum(1) / np.maximum(npx, 1)
    x = np.stack([q0[:, 0], q0[:, 1], th1, th2, np.full(N, 0.8), a0 * 1.3, b0], 1)

    def model(x, jac: bool):
        """Residuals (N, P) and, with ``jac``, their analytic Jacobian (N, P, 7)."""
        dx = pf[..., 0] - x[:, None, 0]
        dy = pf[..., 1] - x[:, None, 1]
        s1, c1 = np.sin(x[:, None, 2]), np.cos(x[:, None, 2])
        s2, c2 = np.sin(x[:, None, 3]), np.cos(x[:, None, 3])
        e1, e2 = s1 * dx - c1 * dy, s2 * dx - c2 * dy
        sig = np.maximum(np.abs(x[:, None, 4]), 0.05)
        s = np.sqrt(2) * sig
        E1, E2 = erf(e1 / s), erf(e2 / s)
        a = x[:, None, 5]
        f = (x[:, None, 6] + a * E1 * E2 - I) * m
        if not jac:
            return f, None
        g1 = (2 / np.sqrt(np.pi)) * np.exp(-(e1 / s) ** 2) / s  # dE1/de1
        g2 = (2 / np.sqrt(np.pi)) * np.exp(-(e2 / s) ** 2) / s
        Jm = np.empty(f.shape + (7,))
        Jm[..., 0] = -a * (g1 * s1 * E2 + E1 * g2 * s2)
        Jm[..., 1] = a * (g1 * c1 * E2 + E1 * g2 * c2)
        Jm[..., 2] = a * g1 * (c1 * dx + s1 * dy) * E2
        Jm[..., 3] = a * E1 * g2 * (c2 * dx + s2 * dy)
        # dE/ds = -g e / s, ds/dsigma = sqrt(2) sign(sigma)
        Jm[..., 4] = -a * (g1 * e1 * E2 + E1 * g2 * e2) / s * np.sqrt(2) * np.sign(x[:, None, 4])
        Jm[..., 5] = E1 * E2
        Jm[..., 6] = 1.0
        return f, Jm * m[..., None]

    f, Jm = model(x, True)
    c = (f ** 2).sum(1)
    lam = np.full(N, 1e-3)
    eye = np.eye(7)[None]
    done = np.zeros(N, bool)
    for _ in range(iterations):
        Jt = Jm.transpose(0, 2, 1)
        A = Jt @ Jm
        g = (Jt @ f[..., None])[..., 0]
        D = np.einsum("nii->ni", A) + 1e-12
        try:
            dx = -np.linalg.solve(A + lam[:, None, None] * eye * D[:, :, None], g[..., None])[..., 0]
        except np.linalg.LinAlgError:
            break
        xn = x + dx
        fn, Jn = model(xn, True)
        cn = (fn ** 2).sum(1)
        better = cn < c
        x[better], f[better], c[better], Jm[better] = xn[better], fn[better], cn[better], Jn[better]
        lam = np.where(better, lam * 0.3, lam * 10)
        done |= better & (np.abs(dx[:, :2]).max(1) < 1e-4)
        if np.all(done | (lam > 1e8)):
            break
    q = x[:, :2]
    misfit = np.sqrt(c / np.maximum(npx, 1)) / np.maximum(np.abs(x[:, 5]), 1e-30)
    ok = (np.isfinite(q).all(1) & (npx >= min_pixels) & (misfit < max_misfit)
          & (np.linalg.norm(q - q0, axis=1) < max_shift_px))
    if ok.sum() < 4:
        return None
    return Detection(det.ids[ok].copy(), q[ok].copy())


def chessboard_pattern(inner: tuple[int, int], square: float = 1.0) -> PlanarPattern:
    """A plain chessboard of ``inner`` (columns, rows) inner corners; all-or-nothing."""
    import cv2

    cols, rows = inner
    obj = np.zeros((cols * rows, 3))
    obj[:, :2] = np.mgrid[0:cols, 0:rows].T.reshape(-1, 2) * square

    def detect(grey: np.ndarray):
        ok, c = cv2.findChessboardCorners(grey, (cols, rows),
                                          cv2.CALIB_CB_ADAPTIVE_THRESH | cv2.CALIB_CB_NORMALIZE_IMAGE)
        if not ok:
            return None
        c = cv2.cornerSubPix(grey, c, (11, 11), (-1, -1),
                             (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 50, 1e-3))
        return Detection(np.arange(cols * rows), c.reshape(-1, 2).astype(np.float64))

    return PlanarPattern(f"chessboard {cols}x{rows}", obj, detect, min_corners=cols * rows)


DISTORTION_MODELS = {
    "none": (),
    "k1": ("k1",),
    "k1k2": ("k1", "k2"),
    "k1k2p1p2": ("k1", "k2", "p1", "p2"),
    "k1k2p1p2k3": ("k1", "k2", "p1", "p2", "k3"),
}
_DIST_INDEX = {"k1": 0, "k2": 1, "p1": 2, "p2": 3, "k3": 4}


def _flags(model: str) -> int:
    import cv2

    if model not in DISTORTION_MODELS:
        raise ValueError(f"distortion model {model!r}: choose one of {sorted(DISTORTION_MODELS)}")
    free = DISTORTION_MODELS[model]
    f = 0
    for name, flag in (("k1", cv2.CALIB_FIX_K1), ("k2", cv2.CALIB_FIX_K2), ("k3", cv2.CALIB_FIX_K3)):
        if name not in free:
            f |= flag
    if "p1" not in free:
        f |= cv2.CALIB_ZERO_TANGENT_DIST
    return f


def calibrate_camera(pattern: PlanarPattern, detections: list[Detection],
                     image_size: tuple[int, int], name: str = "camera",
                     distortion: str = "k1k2p1p2"):
    """Intrinsics of one camera from its views (``cv2.calibrateCamera``).

    Parameters
    ----------
    image_size : (height, width)
    distortion : a key of :data:`DISTORTION_MODELS` (the coefficients left free; narrow
        fields of view cannot measure k2/k3: fix what the data cannot see)

    Returns
    -------
    rms, K (3, 3), dist (5,), list of board2cam (4, 4) per detection
    """
    import cv2

    views = [d for d in detections if d is not None and len(d.ids) >= pattern.min_corners]
    if len(views) < 3:
        raise GeometryError(f"{name}: {len(views)} usable view(s) of the {pattern.name}; "
                            "intrinsics need at least 3 views at different tilts")
    obj = [pattern.object_points[d.ids].astype(np.float32) for d in views]
    img = [d.corners.astype(np.float32).reshape(-1, 1, 2) for d in views]
    H, W = image_size
    rms, K, dist, rvecs, tvecs = cv2.calibrateCamera(obj, img, (W, H), None, None,
                                                     flags=_flags(distortion))
    if not np.isfinite(rms) or K[0, 0] <= 0:
        raise GeometryError(f"{name}: calibration diverged (degenerate views?)")
    poses = []
    for rv, tv in zip(rvecs, tvecs):
        m = np.eye(4)
        m[:3, :3] = cv2.Rodrigues(rv)[0]
        m[:3, 3] = tv.ravel()
        poses.append(m)
    d5 = np.zeros(5)
    d5[: min(5, dist.size)] = dist.ravel()[:5]
    return float(rms), K, d5, poses


# ---- joint bundle adjustment --------------------------------------------------------------------


@dataclass
class RigGeometry:
    """Result of :func:`calibrate_rig` (camera order = ``names``)."""

    names: list[str]
    K: dict[str, np.ndarray]
    dist: dict[str, np.ndarray]
    cam2world: dict[str, np.ndarray]
    board2world: dict[int, np.ndarray]
    rms: dict[str, float]
    n_views: dict[str, int]
    failed: dict[str, str] = field(default_factory=dict)


def _rotvec_to_R(rv: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_rotvec(rv).as_matrix()


def _R_to_rotvec(R: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_matrix(R).as_rotvec()


def _project(obj_board, b2w_R, b2w_t, w2c_R, w2c_t, intr):
    """Vectorised projection of board points through per-observation poses and intrinsics
    (fx, fy, cx, cy, k1, k2, p1, p2, k3)."""
    Xw = np.einsum("nij,nj->ni", b2w_R, obj_board) + b2w_t
    Xc = np.einsum("nij,nj->ni", w2c_R, Xw) + w2c_t
    xy = Xc[:, :2] / Xc[:, 2:3]
    k1, k2, p1, p2, k3 = intr[:, 4], intr[:, 5], intr[:, 6], intr[:, 7], intr[:, 8]
    x, y = xy[:, 0], xy[:, 1]
    r2 = x * x + y * y
    rad = 1 + k1 * r2 + k2 * r2 * r2 + k3 * r2 ** 3
    xd = x * rad + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * rad + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return np.stack([intr[:, 0] * xd + intr[:, 2], intr[:, 1] * yd + intr[:, 3]], axis=1)


def reprojection_errors(pattern: PlanarPattern, det: Detection, K, dist, board2cam) -> np.ndarray:
    """(N,) pixel distances between detected and reprojected corners of one view."""
    X = pattern.object_points[det.ids] @ board2cam[:3, :3].T + board2cam[:3, 3]
    xy = distort_normalised(X[:, :2] / X[:, 2:3], dist)
    uv = np.stack([K[0, 0] * xy[:, 0] + K[0, 1] * xy[:, 1] + K[0, 2], K[1, 1] * xy[:, 1] + K[1, 2]], 1)
    return np.linalg.norm(uv - det.corners, axis=1)


def _levenberg_marquardt(fun, jac, x0, robust: bool, max_iter: int = 60, tol: float = 1e-10,
                         scale: float = 1.0):
    """Levenberg-Marquardt on the normal equations, with soft-L1 IRLS weights per 2D point
    when ``robust`` (``scale`` px).

    The problem is small (tens to hundreds of parameters) but has thousands of residuals:
    normal equations cost P^2 per iteration where a dense SVD of the Jacobian (scipy's exact
    trust region) cost seconds on a busy machine."""

    def cost(f):
        s = (f.reshape(-1, 2) ** 2).sum(1) / scale ** 2
        return float(np.sum(2 * (np.sqrt(1 + s) - 1)) if robust else np.sum(s))

    scale = max(float(scale), 1e-9)
    x = np.asarray(x0, np.float64).copy()
    f = fun(x)
    c = cost(f)
    lam = 1e-3
    for _ in range(max_iter):
        J = jac(x)
        if robust:
            s = (f.reshape(-1, 2) ** 2).sum(1) / scale ** 2
            w = np.repeat(1 / np.sqrt(1 + s), 2)
        else:
            w = np.ones_like(f)
        if hasattr(J, "toarray"):  # scipy.sparse: the normal equations are small and dense
            Jt = J.T.tocsr()
            A = (Jt @ J.multiply(w[:, None]).tocsc()).toarray()
            g = Jt @ (w * f)
        else:
            A = J.T @ (J * w[:, None])
            g = J.T @ (w * f)
        d = np.diag(A).copy()
        d[d <= 0] = 1.0
        improved = False
        for _ in range(12):
            try:
                dx = -np.linalg.solve(A + lam * np.diag(d), g)
            except np.linalg.LinAlgError:
                lam *= 10
                continue
            xn = x + dx
            fn = fun(xn)
            cn = cost(fn)
            if np.isfinite(cn) and cn < c:
                improved = True
                break
            lam *= 10
        if not improved:
            break
        rel = (c - cn) / max(c, 1e-300)
        x, f, c = xn, fn, cn
        lam = max(lam / 10, 1e-12)
        if rel < tol or np.max(np.abs(dx) / np.maximum(np.abs(x), 1.0)) < tol:
            break
    return x


def calibrate_rig(pattern: PlanarPattern, detections: dict[str, dict[int, Detection | None]],
                  image_sizes: dict[str, tuple[int, int]], reference: tuple[int, np.ndarray] | None = None,
                  distortion: str = "k1k2p1p2", robust: bool = True,
                  progress=None, loss_scale: float = 1.0) -> RigGeometry:
    """Calibrate every camera's intrinsics and all extrinsics jointly.

    Parameters
    ----------
    detections : ``{camera: {view index: Detection or None}}`` (None: pattern not found)
    image_sizes : ``{camera: (height, width)}``
    reference : ``(view, board2world)``: the board pose that defines the world frame; default
        the first view with detections, as the identity
    distortion : distortion model, a key of :data:`DISTORTION_MODELS`
    robust : soft-L1 loss against stray corners
    loss_scale : its scale (px): residuals well below it count fully, far above it as |r|

    Cameras that cannot be calibrated (too few views, not linked to the reference through
    shared views) are listed in ``failed`` with the reason; raises :class:`GeometryError` if
    none can be.
    """
    failed: dict[str, str] = {}
    init: dict[str, tuple] = {}
    for cam, views in detections.items():
        items = [(v, d) for v, d in sorted(views.items())
                 if d is not None and len(d.ids) >= pattern.min_corners]
        try:
            rms, K, dist, poses = calibrate_camera(pattern, [d for _, d in items], image_sizes[cam],
                                                   cam, distortion)
        except GeometryError as e:
            failed[cam] = str(e)
            continue
        init[cam] = (K, dist, {v: (d, P) for (v, d), P in zip(items, poses)}, rms)
        if progress:
            progress(cam)
    if not init:
        raise GeometryError("no camera could be calibrated:\n  " +
                            "\n  ".join(f"{k}: {v}" for k, v in failed.items()))

    # gauge: the reference board pose
    if reference is None:
        v0 = min(v for c in init.values() for v in c[2])
        reference = (v0, np.eye(4))
    ref_view, ref_pose = reference[0], np.asarray(reference[1], np.float64)
    b2w: dict[int, np.ndarray] = {ref_view: ref_pose}
    c2w: dict[str, np.ndarray] = {}
    # chain: place cameras that see a placed board, then boards seen by placed cameras
    changed = True
    while changed:
        changed = False
        for cam, (K, dist, views, _) in init.items():
            if cam in c2w:
                continue
            seen = [(len(views[v][0].ids), v) for v in views if v in b2w]
            if seen:
                _, v = max(seen)
                c2w[cam] = b2w[v] @ np.linalg.inv(views[v][1])
                changed = True
        for cam in c2w:
            for v, (_, P) in init[cam][2].items():
                if v not in b2w:
                    b2w[v] = c2w[cam] @ P
                    changed = True
    for cam in list(init):
        if cam not in c2w:
            failed[cam] = (f"{cam}: shares no board view with the cameras linked to the "
                           f"reference pose (view {ref_view})")
            del init[cam]
    if not init:
        raise GeometryError(f"no camera sees the reference board pose (view {ref_view})")

    names = sorted(init)
    views = sorted(v for v in b2w if v != ref_view)
    vidx = {v: i for i, v in enumerate(views)}
    free_intr = [0, 1, 2, 3] + [4 + _DIST_INDEX[n] for n in DISTORTION_MODELS[distortion]]
    nI = len(free_intr)
    nC = nI + 6
    obs_cam, obs_view, obs_obj, obs_uv = [], [], [], []
    for ci, cam in enumerate(names):
        for v, (d, _) in init[cam][2].items():
            obs_cam.append(np.full(len(d.ids), ci))
            obs_view.append(np.full(len(d.ids), v))
            obs_obj.append(pattern.object_points[d.ids])
            obs_uv.append(d.corners)
    obs_cam = np.concatenate(obs_cam)
    obs_view = np.concatenate(obs_view)
    obs_obj = np.concatenate(obs_obj)
    obs_uv = np.concatenate(obs_uv)
    if len(obs_uv) < 3 * nC:
        raise GeometryError(f"too few corners ({len(obs_uv)}) for {len(names)} cameras")

    x0 = []
    base_intr = {}
    for cam in names:
        K, dist = init[cam][0], init[cam][1]
        full = np.array([K[0, 0], K[1, 1], K[0, 2], K[1, 2], *dist[:5]])
        base_intr[cam] = full
        w2c = np.linalg.inv(c2w[cam])
        x0 += list(full[free_intr]) + list(_R_to_rotvec(w2c[:3, :3])) + list(w2c[:3, 3])
    for v in views:
        x0 += list(_R_to_rotvec(b2w[v][:3, :3])) + list(b2w[v][:3, 3])
    x0 = np.asarray(x0, np.float64)
    nCam = len(names)

    def unpack(x):
        intr = np.stack([base_intr[c].copy() for c in names])
        cams = x[: nCam * nC].reshape(nCam, nC)
        intr[:, free_intr] = cams[:, :nI]
        w2c_R = _rotvec_to_R(cams[:, nI:nI + 3])
        w2c_t = cams[:, nI + 3:]
        vp = x[nCam * nC:].reshape(-1, 6)
        bR = np.concatenate([ref_pose[None, :3, :3], _rotvec_to_R(vp[:, :3]).reshape(-1, 3, 3)])
        bt = np.concatenate([ref_pose[None, :3, 3], vp[:, 3:]])
        return intr, w2c_R, w2c_t, bR, bt

    vi = np.array([0 if v == ref_view else vidx[v] + 1 for v in obs_view])

    def residuals(x):
        intr, wR, wt, bR, bt = unpack(x)
        uv = _project(obs_obj, bR[vi], bt[vi], wR[obs_cam], wt[obs_cam], intr[obs_cam])
        return (uv - obs_uv).ravel()

    # Jacobian by grouped forward differences: parameter k of *every* camera can be stepped
    # at once (cameras share no residual rows), likewise for the board poses, so a Jacobian
    # costs nC + 6 residual evaluations whatever the rig size
    n_obs = len(obs_uv)
    rows = np.arange(2 * n_obs)
    cam_of_row = np.repeat(obs_cam, 2)
    view_of_row = np.repeat(vi, 2) - 1  # -1: reference view (fixed)
    n_par = len(x0)

    def jac(x):
        # sparse: a row depends on its camera's nC and its board pose's 6 parameters only
        from scipy.sparse import csr_matrix

        r_idx, c_idx, vals = [], [], []
        f0 = residuals(x)
        for k in range(nC):
            cols = np.arange(nCam) * nC + k
            h = 1e-7 * np.maximum(1.0, np.abs(x[cols]))
            xp = x.copy()
            xp[cols] += h
            r_idx.append(rows)
            c_idx.append(cam_of_row * nC + k)
            vals.append((residuals(xp) - f0) / h[cam_of_row])
        vr = view_of_row >= 0
        for k in range(6):
            cols = nCam * nC + np.arange(len(views)) * 6 + k
            if len(cols) == 0:
                continue
            h = 1e-7 * np.maximum(1.0, np.abs(x[cols]))
            xp = x.copy()
            xp[cols] += h
            r_idx.append(rows[vr])
            c_idx.append(nCam * nC + view_of_row[vr] * 6 + k)
            vals.append((residuals(xp) - f0)[vr] / h[view_of_row[vr]])
        return csr_matrix((np.concatenate(vals), (np.concatenate(r_idx), np.concatenate(c_idx))),
                          shape=(2 * n_obs, n_par))

    x = _levenberg_marquardt(residuals, jac, x0, robust, scale=loss_scale)
    intr, wR, wt, bR, bt = unpack(x)
    r = residuals(x).reshape(-1, 2)
    out_K, out_d, out_c2w, rms, nviews = {}, {}, {}, {}, {}
    for ci, cam in enumerate(names):
        f = intr[ci]
        out_K[cam] = np.array([[f[0], 0, f[2]], [0, f[1], f[3]], [0, 0, 1.0]])
        out_d[cam] = f[4:9].copy()
        w2c = np.eye(4)
        w2c[:3, :3], w2c[:3, 3] = wR[ci], wt[ci]
        out_c2w[cam] = np.linalg.inv(w2c)
        e = r[obs_cam == ci]
        rms[cam] = float(np.sqrt(np.mean(np.sum(e * e, axis=1))))
        nviews[cam] = len(init[cam][2])
    boards = {ref_view: ref_pose}
    for v in views:
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = bR[vidx[v] + 1], bt[vidx[v] + 1]
        boards[v] = m
    return RigGeometry(names, out_K, out_d, out_c2w, boards, rms, nviews, failed)

