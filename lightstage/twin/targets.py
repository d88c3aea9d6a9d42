"""Calibration targets for the digital twin, and the calibration capture plan.

Every target implements the twin's ``Scene`` protocol (duck-typed; see
:mod:`lightstage.twin.scene`)::

    scene.radiance(camera, light_positions (N,3), light_rgb (N,3), pose=None, distant=False)
        -> (H, W, 3) float32 linear Rec.709 radiance (sum over the lights)
    scene.truth(camera, pose=None) -> dict(mask, depth, normal, albedo, position)

Lights are point sources: the irradiance at x is ``rgb * max(0, n.l) / |p - x|^2`` with
``rgb = colour * intensity`` (radiant intensity). With ``distant=True`` the positions are unit
directions and the irradiance is ``rgb * max(0, n.l)``.

Targets (all in metres, world frame of ``docs/conventions.md``: y up, origin rig centre):

* :class:`PlanarTarget`: a Lambertian plane carrying an albedo texture. Used for the
  ColorChecker 24 chart (:func:`colorchecker_texture`), the white card that flat-fields the
  chart's illumination, and the ChArUco board (:func:`charuco_texture`, OpenCV's own
  ``CharucoBoard.generateImage``). Board frame = OpenCV's board frame: origin at the top-left
  corner, x along columns, y along rows, z into the board; the printed face looks along -z.
* :class:`SphereTarget`: a white Lambertian sphere, or a chrome (mirror) sphere. A point light
  seen in the mirror is a small emitting disc of radius ``light_radius`` and radiance
  ``rgb / (pi light_radius^2)``, so each highlight is a small bright disc whose centre is the
  ideal mirror reflection of the light's centre. ``ambient`` adds a uniform dim dome reflected
  by the mirror so the ball's silhouette is visible (a real ball is seen against the stage).
* :class:`UniformEmitter`: a diffuser of known radiance filling the view (flat field).

Images are anti-aliased by ``supersample`` x ``supersample`` rays per pixel (corner, edge and
highlight positions must be sub-pixel exact for calibration to be tested against truth).

:func:`calibration_plan` lists the shots a calibration capture takes. Each shot's ``truth``
dict is JSON-able and has two parts: ``truth["known"]`` holds what a real stage *knows* about
its equipment (chart type and layout, board geometry, the reference-board fixture pose that
defines the world frame, sphere radii and albedo, the certified radiance of the flat-field
source); everything else is ground truth that only tests may read.

References
----------
McCamy, C. S., Marcus, H., Davidson, J. G. (1976). A color-rendition chart. J. Appl. Photogr.
    Eng. 2(3). (ColorChecker layout; reference values from colour-science.)
Garrido-Jurado, S. et al. (2014). Automatic generation and detection of highly reliable
    fiducial markers under occlusion. Pattern Recognition 47(6). (ArUco/ChArUco.)
Debevec, P. (1998). Rendering synthetic objects into real scenes. SIGGRAPH. (Mirror balls.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..camera import distort_normalised, undistort_normalised
from ..rig import Camera, Rig, look_at
from ..targets_spec import (DEFAULT_BOARD, DEFAULT_CHART, BoardSpec, ChartSpec, charuco_board,
                            colorchecker_reference)

__all__ = [
    "CalibrationShot",
    "PlanarTarget",
    "SphereTarget",
    "UniformEmitter",
    "BoardSpec",
    "ChartSpec",
    "colorchecker_reference",
    "colorchecker_texture",
    "charuco_board",
    "charuco_texture",
    "board_pose",
    "calibration_plan",
    "DEFAULT_BOARD",
    "DEFAULT_CHART",
]


# ---- textures (the specs live in lightstage.targets_spec, re-exported above) --------------


def colorchecker_texture(spec: ChartSpec = DEFAULT_CHART, px_per_m: float = 4000.0) -> np.ndarray:
    """(h, w, 3) float32 albedo texture of the chart (dark frame + 24 patches)."""
    W, H = spec.size
    w, h = int(round(W * px_per_m)), int(round(H * px_per_m))
    tex = np.full((h, w, 3), spec.frame_albedo, dtype=np.float32)
    ref = colorchecker_reference(spec.reference)
    half = spec.patch / 2
    for k, (cx, cy) in enumerate(spec.patch_centres()):
        x0, x1 = int(round((cx - half) * px_per_m)), int(round((cx + half) * px_per_m))
        y0, y1 = int(round((cy - half) * px_per_m)), int(round((cy + half) * px_per_m))
        tex[y0:y1, x0:x1] = ref[k]
    return tex


def charuco_texture(spec: BoardSpec = DEFAULT_BOARD, px_per_square: int = 240,
                    white: float = 0.85, black: float = 0.04) -> np.ndarray:
    """(h, w, 3) float32 albedo texture: OpenCV's ``generateImage`` mapped to printed paper
    (``white``) and ink (``black``) reflectances."""
    img = charuco_board(spec).generateImage(
        (spec.squares[0] * px_per_square, spec.squares[1] * px_per_square), marginSize=0,
        borderBits=1)
    a = black + (white - black) * (img.astype(np.float32) / 255.0)
    return np.repeat(a[..., None], 3, axis=2)


# ---- rays ------------------------------------------------------------------------------------


_RAY_CACHE: dict = {}


def _undistorted_grid(camera: Camera):
    """Per camera (cached): undistorted normalised coordinates of every pixel centre (H, W, 2)
    and the inverse Jacobian (H, W, 2, 2) of the distortion there, so sub-pixel rays cost a
    2x2 product instead of another fixed-point undistortion (the error of the first-order
    step is ~(0.5 px / f)^2 * |k|, far below 1e-4 px)."""
    H, W = camera.resolution
    K = camera.K_array
    dist = np.asarray(camera.distortion, np.float64)
    key = (H, W, K.tobytes(), dist.tobytes())
    if key not in _RAY_CACHE:
        v, u = np.mgrid[0:H, 0:W].astype(np.float64)
        y = (v - K[1, 2]) / K[1, 1]
        x = (u - K[0, 2] - K[0, 1] * y) / K[0, 0]
        xy = undistort_normalised(np.stack([x, y], axis=-1), dist)
        h = 1e-6
        jx = (distort_normalised(xy + [h, 0], dist) - distort_normalised(xy - [h, 0], dist)) / (2 * h)
        jy = (distort_normalised(xy + [0, h], dist) - distort_normalised(xy - [0, h], dist)) / (2 * h)
        J = np.stack([jx, jy], axis=-1)  # J[..., i, j] = d distorted_i / d undistorted_j
        if len(_RAY_CACHE) > 16:
            _RAY_CACHE.clear()
        _RAY_CACHE[key] = (xy, np.linalg.inv(J))
    return _RAY_CACHE[key]


def _window_rays(camera: Camera, window, dx: float = 0.0, dy: float = 0.0):
    """World ray origin (3,) and unit directions (h, w, 3) through pixels (u + dx, v + dy) of
    the window ``(y0, y1, x0, x1)``, lens distortion undone (as :func:`pixel_rays`)."""
    y0, y1, x0, x1 = window
    K = camera.K_array
    c2w = camera.cam2world_array
    xy, Jinv = _undistorted_grid(camera)
    xy, Jinv = xy[y0:y1, x0:x1], Jinv[y0:y1, x0:x1]
    ddy = dy / K[1, 1]
    ddx = (dx - K[0, 1] * ddy) / K[0, 0]
    if dx or dy:
        xy = xy + Jinv @ np.array([ddx, ddy])
    d = np.concatenate([xy, np.ones_like(xy[..., :1])], axis=-1) @ c2w[:3, :3].T
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    return c2w[:3, 3].copy(), d


def _centre_rays(camera: Camera):
    """(origin, directions (H, W, 3)) through every pixel centre (cached undistortion)."""
    H, W = camera.resolution
    return _window_rays(camera, (0, H, 0, W))


def _subpixel_rays(camera: Camera, ss: int, window=None):
    """Yield (origin (3,), directions (h, w, 3)) for ss x ss sub-pixel offsets over
    ``window`` (y0, y1, x0, x1; default the whole image)."""
    H, W = camera.resolution
    window = (0, H, 0, W) if window is None else window
    offs = (np.arange(ss) + 0.5) / ss - 0.5
    for dy in offs:
        for dx in offs:
            yield _window_rays(camera, window, dx, dy)


def _bbox(mask: np.ndarray, pad: int = 2):
    """(y0, y1, x0, x1) of a mask grown by ``pad`` pixels, or None if empty."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    H, W = mask.shape
    return (max(ys.min() - pad, 0), min(ys.max() + 1 + pad, H),
            max(xs.min() - pad, 0), min(xs.max() + 1 + pad, W))


def _irradiance(x: np.ndarray, n: np.ndarray, light_positions, light_rgb, distant: bool):
    """RGB irradiance (..., 3) at points x (..., 3) with normals n (..., 3)."""
    E = np.zeros(x.shape[:-1] + (3,), dtype=np.float64)
    for p, rgb in zip(np.asarray(light_positions, np.float64), np.asarray(light_rgb, np.float64)):
        if distant:
            l = np.broadcast_to(p / np.linalg.norm(p), x.shape)
            cos = np.einsum("...i,...i->...", n, l)
            E += np.clip(cos, 0, None)[..., None] * rgb
        else:
            v = p - x
            d2 = np.einsum("...i,...i->...", v, v)
            cos = np.einsum("...i,...i->...", n, v) / np.sqrt(d2)
            E += (np.clip(cos, 0, None) / d2)[..., None] * rgb
    return E


def _compose(pose, obj2world):
    return obj2world if pose is None else np.asarray(pose, np.float64) @ obj2world


# ---- targets ---------------------------------------------------------------------------------


_PALETTES: dict = {}  # id(texture) -> (texture, index image, palette)


class PlanarTarget:
    """Lambertian textured plane.

    Parameters
    ----------
    texture : (h, w, 3) albedo texture covering the plane, row 0 at the top (board y = 0)
    size : (width, height) of the plane in metres
    board2world : (4, 4) pose of the board frame (origin top-left, x cols, y rows, z into it)
    supersample : rays per pixel per axis
    """

    def __init__(self, texture: np.ndarray, size: tuple[float, float], board2world: np.ndarray,
                 supersample: int = 3):
        self.texture = np.ascontiguousarray(texture, dtype=np.float32)
        self.size = (float(size[0]), float(size[1]))
        self.board2world = np.asarray(board2world, dtype=np.float64)
        self.supersample = int(supersample)
        self._palette = None

    def _indexed(self):
        """The texture as a uint8 index image and a palette (L, 3) float32, when it has at
        most 256 distinct texels (a ChArUco board: 2); else a 32-bit index image. Exact."""
        if self._palette is None:
            # every board pose shares one texture array: index it once per process
            hit = _PALETTES.get(id(self.texture))
            if hit is None or hit[0] is not self.texture:
                flat = self.texture.reshape(-1, 3)
                rows = flat.view(np.dtype((np.void, 12))).ravel()
                levels, inv = np.unique(rows, return_inverse=True)
                levels = levels.view(np.float32).reshape(-1, 3)
                dt = np.uint8 if len(levels) <= 256 else np.int32
                if len(_PALETTES) > 8:
                    _PALETTES.clear()
                hit = (self.texture, inv.reshape(self.texture.shape[:2]).astype(dt),
                       np.ascontiguousarray(levels))
                _PALETTES[id(self.texture)] = hit  # holds the texture: its id stays unique
            self._palette = hit[1:]
        return self._palette

    def _hit(self, origin, d, b2w):
        R, t = b2w[:3, :3], b2w[:3, 3]
        z = R[:, 2]
        denom = d @ z
        with np.errstate(divide="ignore", invalid="ignore"):
            s = ((t - origin) @ z) / denom
        x = origin + s[..., None] * d
        local = (x - t) @ R  # board coordinates
        # only the printed face (normal -z) is visible
        ok = (s > 0) & (denom > 1e-9) & (local[..., 0] >= 0) & (local[..., 0] <= self.size[0]) \
            & (local[..., 1] >= 0) & (local[..., 1] <= self.size[1])
        return ok, x, local, s

    def _albedo(self, local, ok):
        import cv2

        h, w = self.texture.shape[:2]
        # texel centres at integer coordinates (OpenCV), texture spans the board exactly
        mx = (local[..., 0] * (w / self.size[0]) - 0.5).astype(np.float32)
        my = (local[..., 1] * (h / self.size[1]) - 0.5).astype(np.float32)
        a = cv2.remap(self.texture, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        return np.where(ok[..., None], a, 0.0)

    def radiance(self, camera: Camera, light_positions, light_rgb, pose=None, distant=False):
        b2w = _compose(pose, self.board2world)
        n = -b2w[:3, 2]
        H, W = camera.resolution
        out = np.zeros((H, W, 3), dtype=np.float32)
        origin, d = _centre_rays(camera)
        ok0, _, local0, _ = self._hit(origin, d, b2w)
        win = _bbox(ok0)
        if win is None:
            return out
        y0, y1, x0, x1 = win
        # supersampled albedo: a compiled loop over pixels x sub-pixel rays (the rays of
        # _subpixel_rays, the hit of _hit, bilinear texture lookups with replicated borders)
        from ._kernels import plane_albedo

        xy, Jinv = _undistorted_grid(camera)
        ss = self.supersample
        c2w = camera.cam2world_array
        acc = plane_albedo(np.ascontiguousarray(xy[y0:y1, x0:x1]),
                           np.ascontiguousarray(Jinv[y0:y1, x0:x1]),
                           (np.arange(ss) + 0.5) / ss - 0.5, camera.K_array,
                           np.ascontiguousarray(c2w[:3, :3]), c2w[:3, 3].copy(),
                           np.ascontiguousarray(b2w[:3, :3]), b2w[:3, 3].copy(),
                           np.asarray(self.size, np.float64), *self._indexed())
        # irradiance is smooth over the plane: evaluate it on a 65 x 65 grid in board
        # coordinates and interpolate at each pixel-centre hit (relative error ~1e-6)
        import cv2

        g = 65
        gx, gy = np.meshgrid(np.linspace(0, self.size[0], g), np.linspace(0, self.size[1], g))
        pts = np.stack([gx, gy, np.zeros_like(gx)], -1) @ b2w[:3, :3].T + b2w[:3, 3]
        Eg = _irradiance(pts, np.broadcast_to(n, pts.shape), light_positions, light_rgb, distant)
        loc = np.nan_to_num(local0[y0:y1, x0:x1])
        mx = (loc[..., 0] * ((g - 1) / self.size[0])).astype(np.float32)
        my = (loc[..., 1] * ((g - 1) / self.size[1])).astype(np.float32)
        E = cv2.remap(Eg.astype(np.float32), mx, my, cv2.INTER_LINEAR,
                      borderMode=cv2.BORDER_REPLICATE)
        out[y0:y1, x0:x1] = acc * E / math.pi
        return out

    def truth(self, camera: Camera, pose=None) -> dict[str, np.ndarray]:
        b2w = _compose(pose, self.board2world)
        H, W = camera.resolution
        origin, d = _centre_rays(camera)
        ok, x, local, s = self._hit(origin, d, b2w)
        zc = d @ camera.cam2world_array[:3, 2]
        return {
            "mask": ok,
            "depth": np.where(ok, s * zc, 0.0).astype(np.float32),
            "normal": np.where(ok[..., None], -b2w[:3, 2], 0.0).astype(np.float32),
            "albedo": self._albedo(local, ok).astype(np.float32),
            "position": np.where(ok[..., None], x, 0.0).astype(np.float32),
        }


class SphereTarget:
    """A white Lambertian (``kind='diffuse'``) or mirror (``kind='chrome'``) sphere.

    Parameters
    ----------
    centre : (3,) world position (m); radius : m
    kind : 'diffuse' | 'chrome'
    albedo : Lambertian albedo, or the mirror's (spectrally flat) reflectance
    light_radius : radius (m) of each light's emitting disc as seen in the mirror
    ambient : radiance of a uniform dome reflected by the mirror (0 for none)
    """

    def __init__(self, centre, radius: float, kind: str = "diffuse", albedo: float = 0.8,
                 light_radius: float = 0.05, ambient: float = 0.0, supersample: int = 4):
        if kind not in ("diffuse", "chrome"):
            raise ValueError(f"sphere kind must be 'diffuse' or 'chrome', got {kind!r}")
        self.centre = np.asarray(centre, dtype=np.float64)
        self.radius = float(radius)
        self.kind = kind
        self.albedo = float(albedo)
        self.light_radius = float(light_radius)
        self.ambient = float(ambient)
        self.supersample = int(supersample)
        self._cache: dict = {}

    def _hit(self, origin, d, c):
        oc = origin - c
        b = d @ oc
        disc = b * b - (oc @ oc - self.radius ** 2)
        ok = disc > 0
        s = -b - np.sqrt(np.clip(disc, 0, None))
        ok &= s > 0
        x = origin + s[..., None] * d
        n = (x - c) / self.radius
        return ok, x, n, s

    def _shade(self, d, ok, x, n, light_positions, light_rgb, distant):
        if self.kind == "diffuse":
            E = _irradiance(x, n, light_positions, light_rgb, distant)
            L = self.albedo / math.pi * E
        else:
            r = d - 2 * np.einsum("...i,...i->...", d, n)[..., None] * n
            L = np.full(x.shape, self.ambient * self.albedo, dtype=np.float64)
            area = math.pi * self.light_radius ** 2
            for p, rgb in zip(np.asarray(light_positions, np.float64),
                              np.asarray(light_rgb, np.float64)):
                if distant:
                    l = p / np.linalg.norm(p)
                    cosr = r @ l
                    hit = cosr > math.cos(self.light_radius)  # radius read as an angle
                    Lrad = rgb / (math.pi * self.light_radius ** 2)
                else:
                    v = p - x
                    dist = np.linalg.norm(v, axis=-1)
                    cosr = np.einsum("...i,...i->...", r, v) / dist
                    # the ray from x hits the disc facing x iff it passes within light_radius
                    hit = (cosr > 0) & (dist * np.sqrt(np.clip(1 - cosr ** 2, 0, None))
                                        < self.light_radius)
                    Lrad = rgb / area
                L += hit[..., None] * (self.albedo * Lrad)
        return np.where(ok[..., None], L, 0.0)

    def _geometry(self, camera: Camera, c: np.ndarray):
        """Window and per-subsample (d, ok, x, n) of a camera, cached: a sphere is rendered
        once per light from the same few cameras, and the rays dominate the cost."""
        key = (camera.name, camera.K_array.tobytes(), camera.cam2world_array.tobytes(),
               np.asarray(camera.distortion, np.float64).tobytes(), c.tobytes())
        if key not in self._cache:
            H, W = camera.resolution
            origin, d0 = _centre_rays(camera)
            win = _bbox(self._hit(origin, d0, c)[0])
            samples = []
            if win is not None:
                for o, dd in _subpixel_rays(camera, self.supersample, win):
                    ok, x, n, _ = self._hit(o, dd, c)
                    samples.append((dd, ok, x, n))
            if len(self._cache) > 8:
                self._cache.clear()
            self._cache[key] = (win, samples)
        return self._cache[key]

    def _mirror(self, camera: Camera, c: np.ndarray, samples):
        """Flattened sample points, reflected directions and hit flags of a camera's
        sub-samples (cached with the geometry)."""
        key = ("mirror", camera.name, camera.cam2world_array.tobytes(), c.tobytes())
        if key not in self._cache:
            X = np.concatenate([x.reshape(-1, 3) for _, _, x, _ in samples])
            D = np.concatenate([d.reshape(-1, 3) for d, _, _, _ in samples])
            N = np.concatenate([n.reshape(-1, 3) for _, _, _, n in samples])
            OK = np.concatenate([ok.ravel() for _, ok, _, _ in samples])
            Rr = D - 2 * np.einsum("ij,ij->i", D, N)[:, None] * N
            if len(self._cache) > 8:
                self._cache.clear()
            self._cache[key] = (X, Rr, OK)
        return self._cache[key]

    def radiance(self, camera: Camera, light_positions, light_rgb, pose=None, distant=False):
        c = self.centre if pose is None else (np.asarray(pose) @ np.append(self.centre, 1))[:3]
        H, W = camera.resolution
        out = np.zeros((H, W, 3), dtype=np.float32)
        lp = np.asarray(light_positions, np.float64).reshape(-1, 3)
        lr = np.asarray(light_rgb, np.float64).reshape(-1, 3)
        # only the sphere's bounding box is traced: the rest of the image is black
        win, samples = self._geometry(camera, c)
        if win is None:
            return out
        y0, y1, x0, x1 = win
        acc = np.zeros((y1 - y0, x1 - x0, 3), dtype=np.float64)
        if self.kind == "chrome":
            # compiled: reflected rays (cached per camera) against every light's disc
            from ._kernels import chrome_lights

            X, Rr, OK = self._mirror(camera, c, samples)
            L = chrome_lights(X, Rr, OK, lp, lr, self.light_radius,
                              self.albedo / (math.pi * self.light_radius ** 2), bool(distant))
            L[OK] += self.ambient * self.albedo
            acc = L.reshape(len(samples), y1 - y0, x1 - x0, 3).sum(0)
        else:
            for dd, ok, x, n in samples:
                acc += self._shade(dd, ok, x, n, lp, lr, distant)
        out[y0:y1, x0:x1] = acc / self.supersample ** 2
        return out

    def truth(self, camera: Camera, pose=None) -> dict[str, np.ndarray]:
        c = self.centre if pose is None else (np.asarray(pose) @ np.append(self.centre, 1))[:3]
        H, W = camera.resolution
        origin, d = _centre_rays(camera)
        ok, x, n, s = self._hit(origin, d, c)
        zc = d @ camera.cam2world_array[:3, 2]
        return {
            "mask": ok,
            "depth": np.where(ok, s * zc, 0.0).astype(np.float32),
            "normal": np.where(ok[..., None], n, 0.0).astype(np.float32),
            "albedo": np.where(ok[..., None], self.albedo, 0.0).astype(np.float32),
            "position": np.where(ok[..., None], x, 0.0).astype(np.float32),
        }


class UniformEmitter:
    """A diffuser of known, uniform radiance filling the whole view (flat-field source).

    The lights are ignored: the source is self-luminous (an integrating sphere port or a
    light box right in front of the lens)."""

    def __init__(self, radiance_rgb=(1.0, 1.0, 1.0)):
        self.radiance_rgb = np.asarray(radiance_rgb, dtype=np.float64)

    def radiance(self, camera: Camera, light_positions=None, light_rgb=None, pose=None,
                 distant=False):
        H, W = camera.resolution
        return np.broadcast_to(self.radiance_rgb.astype(np.float32), (H, W, 3)).copy()

    def truth(self, camera: Camera, pose=None) -> dict[str, np.ndarray]:
        H, W = camera.resolution
        return {"mask": np.ones((H, W), bool), "depth": np.full((H, W), 0.05, np.float32),
                "normal": np.broadcast_to(-camera.cam2world_array[:3, 2], (H, W, 3)).astype(np.float32),
                "albedo": np.zeros((H, W, 3), np.float32),
                "position": np.zeros((H, W, 3), np.float32)}


# ---- the plan --------------------------------------------------------------------------------


@dataclass
class CalibrationShot:
    """One calibration shot: a scene, the lights on, the cameras that record it, the exposure
    bracket (s, longest first) and JSON-able ``truth`` (``truth['kind']`` names the target;
    ``truth['known']`` is what a real stage knows; the rest is ground truth)."""

    name: str
    scene: Any
    lights: list[int]
    cameras: list[str]
    exposures: list[float]
    truth: dict = field(default_factory=dict)


def board_pose(centre, facing, roll_deg: float = 0.0, size=(0.0, 0.0)) -> np.ndarray:
    """board2world (4, 4) of a board whose centre is ``centre`` and whose printed face looks
    along ``facing``; at roll 0 the board's rows run along world -y (upright)."""
    facing = np.asarray(facing, np.float64) / np.linalg.norm(facing)
    centre = np.asarray(centre, np.float64)
    # look_at gives x right, y down, z forward for a camera looking along -facing: exactly the
    # board frame (z into the board)
    m = look_at(centre + facing, centre)
    a = math.radians(roll_deg)
    Rr = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    m[:3, :3] = m[:3, :3] @ Rr
    m[:3, 3] = centre - m[:3, :3] @ np.array([size[0] / 2, size[1] / 2, 0.0])
    return m


def _dir(yaw_deg, pitch_deg):
    y, p = math.radians(yaw_deg), math.radians(pitch_deg)
    return np.array([math.sin(y) * math.cos(p), math.sin(p), math.cos(y) * math.cos(p)])


def _exposure(rig: Rig, cameras, peak_rgb, level: float) -> float:
    """Longest exposure at which ``peak_rgb`` radiance reaches at most ``level`` of full scale
    in every listed camera (before vignetting, which only darkens)."""
    t = np.inf
    for name in cameras:
        s = rig.camera(name).sensor
        cam = np.asarray(s.colour_response) @ np.asarray(peak_rgb, np.float64)
        t = min(t, level * s.full_scale / (s.gain * max(float(cam.max()), 1e-12)))
    return float(t)


def _pick(names: list[str], k: int) -> list[str]:
    """k names spread evenly over the list (first and last included)."""
    if k >= len(names):
        return list(names)
    idx = np.round(np.linspace(0, len(names) - 1, k)).astype(int)
    return [names[i] for i in sorted(set(idx))]


def calibration_plan(rig: Rig, seed: int = 0, board: BoardSpec = DEFAULT_BOARD,
                     chart: ChartSpec = DEFAULT_CHART, n_board_poses: int = 30,
                     sphere_radius: float = 0.075, chrome_cameras: int = 3,
                     diffuse_cameras: int = 2, lights: list[int] | None = None,
                     light_radius: float = 0.025,
                     cameras: list[str] | None = None, supersample: int = 3,
                     board_supersample: int | None = None,
                     chrome_offsets: tuple = ((0.0, 0.0, 0.1),)) -> list[CalibrationShot]:
    """The shots of a calibration capture of ``rig``.

    Shots (``truth['kind']``): ``flat-field`` (uniform emitter, every camera), ``chart`` and
    ``chart-card`` (ColorChecker and a white card at the same pose, lit by the frontal lights,
    every camera), ``board`` x ``n_board_poses`` (ChArUco at various tilts; pose 0 is the
    reference fixture that defines the world frame), ``chrome-ambient`` (mirror ball, dome
    only), ``chrome-<light>`` and ``diffuse-<light>`` per light, ``diffuse-all`` (white ball,
    all lights, for its silhouette).

    Targets are sized for the rig: boards and charts ~0.25 m wide, placed at the rig centre
    (the cameras' common view). ``lights`` / ``cameras`` restrict the plan (fast tests).

    ``board_supersample``: rays per pixel per axis of the ChArUco boards (default 8, or
    ``supersample`` when that is below 3: a deliberately coarse, fast plan). Corner positions
    are what geometry is tested on, and a regular 3 x 3 grid quantises edge coverage to thirds
    of a pixel: corners then sit ~0.05 px off their true projection, which cost the demo rig
    ~0.5 mm / 0.05 deg of camera pose.
    ``chrome_offsets``: further mount positions of the chrome ball (metres from the rig
    centre; shots ``chrome_ambient_b<k>``, ``chrome_b<k>_<light>``, ``known['ball'] = k``):
    mirror rays from two ball positions triangulate near-field light *positions*, where one
    ball fixes little more than directions.
    """
    rng = np.random.default_rng(seed)
    cams = cameras if cameras is not None else [c.name for c in rig.cameras]
    light_ids = list(range(rig.n_lights)) if lights is None else [int(i) for i in lights]
    lp = rig.light_positions()
    lrgb = rig.light_rgb()
    shots: list[CalibrationShot] = []

    # flat field: a certified uniform source, D65 white (Rec.709 (1,1,1) direction)
    L0 = [2.0, 2.0, 2.0]
    shots.append(CalibrationShot(
        "flat_field", UniformEmitter(L0), [], cams, [_exposure(rig, cams, L0, 0.6)],
        {"kind": "flat-field", "known": {"radiance_rgb": L0}}))

    # colour chart and the white card at the same pose, lit by the frontal lights
    cw, ch = chart.size
    chart_pose = board_pose([0.0, 0.0, 0.0], [0.0, 0.0, 1.0], 0.0, (cw, ch))
    front = [i for i in range(rig.n_lights) if rig.lights[i].direction[2] > 0.3]
    E = _irradiance(np.zeros(3), np.array([0.0, 0.0, 1.0]), lp[front], lrgb[front], False)
    card_albedo = 0.85
    t_chart = _exposure(rig, cams, 0.92 * E / math.pi, 0.8)
    chart_truth = {"board2world": chart_pose.tolist(),
                   "reference_rgb": colorchecker_reference(chart.reference).tolist()}
    shots.append(CalibrationShot(
        "chart", PlanarTarget(colorchecker_texture(chart), (cw, ch), chart_pose, supersample),
        front, cams, [t_chart],
        {"kind": "chart", "known": {"chart": chart.to_dict(), "card_shot": "chart_card"},
         **chart_truth}))
    shots.append(CalibrationShot(
        "chart_card",
        PlanarTarget(np.full((4, 4, 3), card_albedo, np.float32), (cw, ch), chart_pose, 1),
        front, cams, [t_chart],
        {"kind": "chart-card", "known": {"albedo": card_albedo}, **chart_truth}))

    # ChArUco board poses: pose 0 = reference fixture (centred, upright, facing +z)
    bw, bh = board.size
    tex = charuco_texture(board)
    poses = [board_pose([0, 0, 0], [0, 0, 1], 0.0, (bw, bh))]
    yaws = np.linspace(-65, 65, max(n_board_poses - 1, 1))
    rng.shuffle(yaws)
    for k in range(1, n_board_poses):
        yaw = float(yaws[k - 1]) + rng.uniform(-5, 5)
        pitch = (30.0 if k % 2 else -25.0) + rng.uniform(-8, 8)
        roll = rng.uniform(-30, 30)
        # off-centre boards put corners near the image borders, where distortion and the
        # principal point are measured
        centre = np.array([rng.uniform(-0.08, 0.08), rng.uniform(-0.07, 0.07),
                           rng.uniform(-0.15, 0.15)])
        poses.append(board_pose(centre, _dir(yaw, pitch), roll, (bw, bh)))
    t_board = _exposure(rig, cams, np.full(3, 0.85) * E / math.pi, 0.85)
    bss = board_supersample if board_supersample is not None else (
        8 if supersample >= 3 else supersample)
    for k, P in enumerate(poses):
        nrm = -P[:3, 2]
        lit = [i for i in range(rig.n_lights) if rig.lights[i].direction @ nrm > 0.3]
        known = {"board": board.to_dict()}
        if k == 0:
            known["board2world"] = P.tolist()  # the reference fixture defines the world
        # cameras that see the printed face at < 70 deg
        see = [c for c in cams if (rig.camera(c).centre - P[:3, 3]) @ nrm
               / np.linalg.norm(rig.camera(c).centre - P[:3, 3]) > math.cos(math.radians(70))]
        shots.append(CalibrationShot(
            f"board_{k:02d}", PlanarTarget(tex, (bw, bh), P, bss),
            lit, see, [t_board],
            {"kind": "board", "known": known, "pose_index": k, "board2world": P.tolist()}))

    # spheres on the mount at the rig centre
    centre = [0.0, 0.0, 0.0]
    chrome_cams = _pick(cams, chrome_cameras)
    diffuse_cams = _pick(cams, diffuse_cameras)
    ambient = 0.2
    chrome = SphereTarget(centre, sphere_radius, "chrome", 0.9, light_radius, 0.0, 4)
    chrome_amb = SphereTarget(centre, sphere_radius, "chrome", 0.9, light_radius, ambient, 2)
    diffuse = SphereTarget(centre, sphere_radius, "diffuse", 0.8, supersample=2)
    sph_truth = {"centre": centre, "radius": sphere_radius}
    shots.append(CalibrationShot(
        "chrome_ambient", chrome_amb, [], chrome_cams, [_exposure(rig, chrome_cams, [0.9 * ambient] * 3, 0.5)],
        {"kind": "chrome-ambient", "known": {"radius": sphere_radius, "reflectance": 0.9},
         **sph_truth}))
    shots.append(CalibrationShot(
        "diffuse_all", diffuse, list(range(rig.n_lights)), diffuse_cams,
        [_exposure(rig, diffuse_cams, 0.8 / math.pi * lrgb.sum(0) / 2.25, 0.5)],
        {"kind": "diffuse-all", "known": {"radius": sphere_radius, "albedo": 0.8}, **sph_truth}))
    for i in light_ids:
        d2 = float(lp[i] @ lp[i])
        peak_spec = 0.9 * lrgb[i] / (math.pi * light_radius ** 2)
        peak_diff = 0.8 / math.pi * lrgb[i] / (math.sqrt(d2) - sphere_radius) ** 2
        shots.append(CalibrationShot(
            f"chrome_{i:03d}", chrome, [i], chrome_cams, [_exposure(rig, chrome_cams, peak_spec, 0.7)],
            {"kind": "chrome", "known": {"radius": sphere_radius}, "light": i, **sph_truth,
             "light_position": lp[i].tolist()}))
        shots.append(CalibrationShot(
            f"diffuse_{i:03d}", diffuse, [i], diffuse_cams, [_exposure(rig, diffuse_cams, peak_diff, 0.6)],
            {"kind": "diffuse", "known": {"radius": sphere_radius, "albedo": 0.8}, "light": i,
             **sph_truth, "light_rgb": (lrgb[i] / d2).tolist()}))
    # the chrome ball again at its other mount positions
    for b, off in enumerate(chrome_offsets, start=1):
        cb = [float(v) for v in off]
        ball = SphereTarget(cb, sphere_radius, "chrome", 0.9, light_radius, 0.0, 4)
        ball_amb = SphereTarget(cb, sphere_radius, "chrome", 0.9, light_radius, ambient, 2)
        bt = {"centre": cb, "radius": sphere_radius}
        shots.append(CalibrationShot(
            f"chrome_ambient_b{b}", ball_amb, [], chrome_cams,
            [_exposure(rig, chrome_cams, [0.9 * ambient] * 3, 0.5)],
            {"kind": "chrome-ambient", "known": {"radius": sphere_radius, "reflectance": 0.9,
                                                  "ball": b}, **bt}))
        for i in light_ids:
            peak_spec = 0.9 * lrgb[i] / (math.pi * light_radius ** 2)
            shots.append(CalibrationShot(
                f"chrome_b{b}_{i:03d}", ball, [i], chrome_cams,
                [_exposure(rig, chrome_cams, peak_spec, 0.7)],
                {"kind": "chrome", "known": {"radius": sphere_radius, "ball": b}, "light": i,
                 **bt, "light_position": lp[i].tolist()}))
    return shots
