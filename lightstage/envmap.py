"""HDR environment maps: equirectangular geometry, files, resampling, rotation, built-ins.

An environment map is a float32 array ``(H, W, 3)`` of linear RGB *radiance* arriving at the
subject from each direction (world frame: right-handed, y up, the subject faces +z), stored
equirectangularly ("lat-long") with ``W = 2 H``:

* row ``v`` -> polar angle from +y: ``theta = pi (v + 0.5) / H`` (row 0 is the zenith);
* column ``u`` -> azimuth ``phi = 2 pi (u + 0.5) / W - pi``;
* direction ``d = (sin(theta) sin(phi), cos(theta), sin(theta) cos(phi))``,

so the map's centre column looks along +z (what the subject faces), ``phi = +90 deg`` is +x and
the left/right edges are behind the subject (-z). A pixel's solid angle is the exact band
integral ``(2 pi / W) (cos theta_0 - cos theta_1)`` over its row's polar edges, so a uniform map
of radiance 1 integrates to 4 pi to rounding (:func:`solid_angles`).

Resampling conserves power: downsizing averages radiance weighted by the exact solid-angle
overlap of source and target pixels (so ``sum(L * Omega)`` is unchanged), upsizing
interpolates linearly (periodic in azimuth). Nothing here ever tiles an image to resize it.

Conversions: mirror ball (orthographic camera on +z looking along -z, image right = +x, up = +y,
the ball filling the square image; a pixel at normalised position (a, b) sees the sphere
normal ``n = (a, b, sqrt(1 - a^2 - b^2))`` and the reflected direction
``r = 2 (n . z) n - z``) and cube maps (faces ordered +x, -x, +y, -y, +z, -z, each seen from
inside with the basis in :data:`CUBE_FACES`; :func:`cube_to_cross` lays them out as a horizontal
cross ``+x +z -x -z`` with +y above and -y below +z, edges continuous).

Built-in environments (:func:`builtin_environment`): ``uniform`` (radiance 1), ``studio`` (key,
fill and rim disc area lights on black) and ``sun-sky`` / ``sunset`` (the Preetham et al.
analytic daylight sky with a solar disc whose radiance follows from turbidity and elevation;
unit: 1.0 = 1000 cd/m^2).

References
----------
Preetham, A. J., Shirley, P., Smits, B. (1999). A practical analytic model for daylight.
SIGGRAPH. (Perez sky distribution, turbidity fits, zenith luminance/chromaticity, Appendix A.2
transmittances.)
Perez, R., Seals, R., Michalsky, J. (1993). All-weather model for sky luminance distribution.
Solar Energy 50(3).
Kasten, F., Young, A. T. (1989). Revised optical air mass tables and approximation formula.
Applied Optics 28(22).
Debevec, P. (1998). Rendering synthetic objects into real scenes. SIGGRAPH. (light probes)
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Callable

import numpy as np

from .imageio import ImageIOError, read_image, write_exr

__all__ = [
    "EnvMapError",
    "equirect_directions",
    "solid_angles",
    "row_solid_angles",
    "direction_to_pixel",
    "sample",
    "resize",
    "rotation_matrix",
    "rotate",
    "exposure",
    "total_power",
    "load_envmap",
    "save_envmap",
    "mirrorball_to_equirect",
    "equirect_to_mirrorball",
    "mirrorball_direction",
    "sphere_from_mask",
    "CUBE_FACES",
    "cube_face_directions",
    "equirect_to_cube",
    "cube_to_equirect",
    "cube_to_cross",
    "cross_to_cube",
    "uniform_environment",
    "studio_environment",
    "sun_sky_environment",
    "BUILTIN_ENVIRONMENTS",
    "builtin_environment",
    "load_environment",
]


class EnvMapError(ValueError):
    """A bad environment map (file, shape or parameter); the message says which and why."""


# ---- geometry ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _directions(height: int, width: int) -> np.ndarray:
    theta = np.pi * (np.arange(height) + 0.5) / height
    phi = 2 * np.pi * (np.arange(width) + 0.5) / width - np.pi
    st, ct = np.sin(theta)[:, None], np.cos(theta)[:, None]
    d = np.stack(np.broadcast_arrays(st * np.sin(phi)[None], ct, st * np.cos(phi)[None]), -1)
    d = np.ascontiguousarray(d, dtype=np.float64)
    d.flags.writeable = False
    return d


def equirect_directions(height: int, width: int | None = None) -> np.ndarray:
    """(H, W, 3) float64 unit directions of the pixel centres (read-only, cached)."""
    return _directions(int(height), int(width or 2 * height))


def row_solid_angles(height: int, width: int | None = None) -> np.ndarray:
    """(H,) exact solid angle of one pixel in each row: (2 pi / W)(cos th0 - cos th1)."""
    width = width or 2 * height
    edges = np.cos(np.pi * np.arange(height + 1) / height)
    return (2 * np.pi / width) * (edges[:-1] - edges[1:])


def solid_angles(height: int, width: int | None = None) -> np.ndarray:
    """(H, W) exact per-pixel solid angles (steradians); they sum to 4 pi."""
    width = width or 2 * height
    return np.repeat(row_solid_angles(height, width)[:, None], width, axis=1)


def direction_to_pixel(d: np.ndarray, height: int, width: int | None = None):
    """Continuous pixel coordinates ``(u, v)`` (pixel centres at integers) of directions
    ``(..., 3)``; inverse of :func:`equirect_directions`."""
    width = width or 2 * height
    d = np.asarray(d, dtype=np.float64)
    n = np.linalg.norm(d, axis=-1)
    theta = np.arccos(np.clip(d[..., 1] / np.where(n > 0, n, 1), -1, 1))
    phi = np.arctan2(d[..., 0], d[..., 2])
    return (phi + np.pi) * width / (2 * np.pi) - 0.5, theta * height / np.pi - 0.5


def _check_env(env: np.ndarray, what: str = "environment") -> np.ndarray:
    env = np.asarray(env)
    if env.ndim != 3 or env.shape[2] != 3:
        raise EnvMapError(f"{what}: expected an (H, W, 3) RGB map, got shape {env.shape}")
    return env


def sample(env: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """Bilinearly interpolated radiance ``(..., 3)`` float32 in directions ``(..., 3)``
    (periodic in azimuth, clamped at the poles)."""
    env = _check_env(env)
    H, W = env.shape[:2]
    u, v = direction_to_pixel(dirs, H, W)
    u0 = np.floor(u)
    fu = (u - u0)[..., None]
    u0 = u0.astype(np.int64) % W
    u1 = (u0 + 1) % W
    vc = np.clip(v, 0, H - 1)
    v0 = np.floor(vc).astype(np.int64)
    fv = (vc - v0)[..., None]
    v1 = np.minimum(v0 + 1, H - 1)
    out = ((env[v0, u0] * (1 - fu) + env[v0, u1] * fu) * (1 - fv)
           + (env[v1, u0] * (1 - fu) + env[v1, u1] * fu) * fv)
    return out.astype(np.float32)


def total_power(env: np.ndarray) -> np.ndarray:
    """(3,) integral of the radiance over the sphere, ``sum(L * Omega)`` (float64)."""
    env = _check_env(env)
    H, W = env.shape[:2]
    return np.einsum("hwc,h->c", env.astype(np.float64), row_solid_angles(H, W))


# ---- resampling ------------------------------------------------------------------------------


def _overlap_matrix(edges_out: np.ndarray, edges_in: np.ndarray) -> np.ndarray:
    """(n_out, n_in) overlap length of [e_out[i], e_out[i+1]] with [e_in[j], e_in[j+1]]
    (both increasing)."""
    lo = np.maximum(edges_out[:-1, None], edges_in[None, :-1])
    hi = np.minimum(edges_out[1:, None], edges_in[None, 1:])
    return np.clip(hi - lo, 0, None)


def _linear_matrix(n_out: int, n_in: int, periodic: bool) -> np.ndarray:
    """(n_out, n_in) linear interpolation at the target pixel centres."""
    x = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    m = np.zeros((n_out, n_in))
    if periodic:
        x0 = np.floor(x).astype(int)
        f = x - x0
        np.add.at(m, (np.arange(n_out), x0 % n_in), 1 - f)
        np.add.at(m, (np.arange(n_out), (x0 + 1) % n_in), f)
    else:
        xc = np.clip(x, 0, n_in - 1)
        x0 = np.floor(xc).astype(int)
        x1 = np.minimum(x0 + 1, n_in - 1)
        f = xc - x0
        np.add.at(m, (np.arange(n_out), x0), 1 - f)
        np.add.at(m, (np.arange(n_out), x1), f)
    return m


def _row_matrix(h_out: int, h_in: int) -> np.ndarray:
    if h_out >= h_in:
        return _linear_matrix(h_out, h_in, periodic=False)
    # overlap measured in cos(theta): proportional to solid angle, so power is conserved exactly
    mu_out = -np.cos(np.pi * np.arange(h_out + 1) / h_out)
    mu_in = -np.cos(np.pi * np.arange(h_in + 1) / h_in)
    m = _overlap_matrix(mu_out, mu_in)
    return m / m.sum(axis=1, keepdims=True)


def _col_matrix(w_out: int, w_in: int) -> np.ndarray:
    if w_out >= w_in:
        return _linear_matrix(w_out, w_in, periodic=True)
    m = _overlap_matrix(np.linspace(0, 1, w_out + 1), np.linspace(0, 1, w_in + 1))
    return m / m.sum(axis=1, keepdims=True)


def resize(env: np.ndarray, height: int, width: int | None = None) -> np.ndarray:
    """Resample an equirect map to ``(height, width or 2*height, 3)``.

    Each axis shrinking is an exact area average (rows weighted by solid-angle overlap), so
    downsizing conserves :func:`total_power` to rounding; each axis growing interpolates
    linearly (periodic in azimuth). Returns float32.
    """
    env = _check_env(env)
    width = int(width or 2 * height)
    if height < 1 or width < 1:
        raise EnvMapError(f"resize: target size must be positive, got {height}x{width}")
    H, W = env.shape[:2]
    if (H, W) == (height, width):
        return env.astype(np.float32, copy=True)
    R = _row_matrix(int(height), H)
    C = _col_matrix(width, W)
    # two BLAS matrix products (einsum here would not use BLAS and is ~20x slower)
    out = (R @ env.astype(np.float64).reshape(H, W * 3)).reshape(-1, W, 3)
    h = out.shape[0]
    out = (C @ out.transpose(1, 0, 2).reshape(W, h * 3)).reshape(width, h, 3).transpose(1, 0, 2)
    return np.ascontiguousarray(out, dtype=np.float32)


# ---- rotation, exposure -----------------------------------------------------------------------


def rotation_matrix(axis, angle_deg: float) -> np.ndarray:
    """3x3 right-handed rotation by ``angle_deg`` about ``axis`` (Rodrigues).

    About +y, a positive angle turns +z towards +x, i.e. adds to the map azimuth ``phi``.
    """
    a = np.asarray(axis, dtype=np.float64)
    n = np.linalg.norm(a)
    if a.shape != (3,) or n == 0:
        raise EnvMapError(f"rotation axis must be a non-zero 3-vector, got {axis!r}")
    k = a / n
    t = math.radians(angle_deg)
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(t) * K + (1 - math.cos(t)) * (K @ K)


def _is_y_axis(axis) -> bool:
    a = np.asarray(axis, dtype=np.float64)
    return a.shape == (3,) and abs(a[0]) < 1e-12 and abs(a[2]) < 1e-12 and a[1] > 0


def _shift_columns(env: np.ndarray, shift: float) -> np.ndarray:
    """new[:, u] = old[:, u - shift] with periodic linear interpolation (row sums kept)."""
    k = math.floor(shift)
    f = shift - k
    a = np.roll(env, k, axis=1)
    if f < 1e-9:
        return a
    b = np.roll(env, k + 1, axis=1)
    b -= a  # in place: a + f (b - a), three passes over the map instead of six
    b *= env.dtype.type(f)
    a += b
    return a


def rotate(env: np.ndarray, angle_deg: float, axis=(0.0, 1.0, 0.0), supersample: int = 2) -> np.ndarray:
    """The environment turned by ``angle_deg`` about ``axis``: ``new(d) = old(R^T d)``.

    About +y (turntables) this is an exact column shift (periodic linear interpolation for a
    fractional pixel; power conserved). Other axes resample by direction, averaging
    ``supersample^2`` bilinear samples per target pixel.
    """
    env = _check_env(env)
    H, W = env.shape[:2]
    if _is_y_axis(axis):
        return _shift_columns(env.astype(np.float32), (angle_deg / 360.0 * W) % W)
    Rt = rotation_matrix(axis, angle_deg).T
    s = max(int(supersample), 1)
    if s == 1:
        return sample(env, equirect_directions(H, W) @ Rt.T)
    hi = equirect_directions(H * s, W * s) @ Rt.T
    return resize(sample(env, hi), H, W)


def exposure(env: np.ndarray, ev: float) -> np.ndarray:
    """The map scaled by ``2**ev`` (photographic stops)."""
    return (_check_env(env).astype(np.float32) * np.float32(2.0 ** ev)).astype(np.float32)


# ---- mirror ball --------------------------------------------------------------------------------


def _sample_image(img: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear sample of (h, w, 3) at continuous pixel coords, clamped at the borders."""
    h, w = img.shape[:2]
    x = np.clip(x, 0, w - 1)
    y = np.clip(y, 0, h - 1)
    x0 = np.floor(x).astype(np.int64)
    y0 = np.floor(y).astype(np.int64)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    return ((img[y0, x0] * (1 - fx) + img[y0, x1] * fx) * (1 - fy)
            + (img[y1, x0] * (1 - fx) + img[y1, x1] * fx) * fy)


def mirrorball_to_equirect(ball: np.ndarray, height: int | None = None) -> np.ndarray:
    """Equirect map from a square mirror-ball image (ball filling the frame, camera on +z).

    ``r -> n = normalise(r + z)``, ``(a, b) = (n_x, n_y)``. Directions right behind the ball
    (within a few degrees of -z) are squeezed onto its rim and are the least reliable.
    """
    ball = _check_env(ball, "mirror ball")
    S = ball.shape[0]
    if ball.shape[1] != S:
        raise EnvMapError(f"mirror ball: image must be square, got {ball.shape[1]}x{S}")
    H = int(height or max(S // 2, 2))
    r = equirect_directions(H, 2 * H)
    n = r + np.array([0.0, 0.0, 1.0])
    nn = np.linalg.norm(n, axis=-1, keepdims=True)
    n = np.where(nn > 1e-9, n / np.where(nn > 1e-9, nn, 1), np.array([1.0, 0.0, 0.0]))
    x = (n[..., 0] + 1) * S / 2 - 0.5
    y = (1 - n[..., 1]) * S / 2 - 0.5
    return _sample_image(ball.astype(np.float32), x, y).astype(np.float32)


def equirect_to_mirrorball(env: np.ndarray, size: int) -> np.ndarray:
    """(size, size, 3) mirror-ball image of ``env`` (zeros outside the ball)."""
    env = _check_env(env)
    c = (np.arange(size) + 0.5) / size * 2 - 1
    a, b = np.meshgrid(c, -c)
    rr = a * a + b * b
    inside = rr < 1
    nz = np.sqrt(np.clip(1 - rr, 0, None))
    n = np.stack([a, b, nz], -1)
    r = 2 * nz[..., None] * n - np.array([0.0, 0.0, 1.0])
    out = sample(env, r)
    out[~inside] = 0
    return out


def mirrorball_direction(px, py, centre, radius) -> np.ndarray:
    """World direction ``(..., 3)`` reflected into image pixel ``(px, py)`` of a mirror ball.

    Orthographic camera on +z looking along -z (image x right = +x, image y down = -y); the
    ball's silhouette has centre ``(cx, cy)`` and ``radius`` in pixels. The normal there is
    ``n = ((px - cx) / r, -(py - cy) / r, sqrt(1 - nx^2 - ny^2))`` and the mirror reflection of
    the viewing direction ``v = -z`` about it is ``r = v - 2 (v . n) n = 2 n_z n - z``: the
    direction towards whatever the ball shows there (a light, for a highlight). Pixels off the
    ball are clamped to its rim.
    """
    cx, cy = centre
    nx = (np.asarray(px, np.float64) - cx) / radius
    ny = -(np.asarray(py, np.float64) - cy) / radius
    rr = nx * nx + ny * ny
    s = np.where(rr > 1, 1 / np.sqrt(np.maximum(rr, 1e-300)), 1.0)
    nx, ny = nx * s, ny * s
    nz = np.sqrt(np.clip(1 - nx * nx - ny * ny, 0, None))
    n = np.stack([nx, ny, nz], -1)
    return 2 * nz[..., None] * n - np.array([0.0, 0.0, 1.0])


def sphere_from_mask(mask: np.ndarray) -> tuple[tuple[float, float], float]:
    """Centre ``(cx, cy)`` (pixels, x right, y down) and radius of a ball's silhouette mask:
    the centroid and ``sqrt(area / pi)`` (both robust to a ragged edge)."""
    m = np.asarray(mask, bool)
    if m.sum() < 10:
        raise EnvMapError(f"sphere mask has only {int(m.sum())} pixels")
    ys, xs = np.nonzero(m)
    return (float(xs.mean()), float(ys.mean())), float(math.sqrt(m.sum() / math.pi))


# ---- cube maps ----------------------------------------------------------------------------------

#: (name, forward, right, up) of each cube face, seen from the centre; order of the face axis
CUBE_FACES = (
    ("+x", (1, 0, 0), (0, 0, 1), (0, 1, 0)),
    ("-x", (-1, 0, 0), (0, 0, -1), (0, 1, 0)),
    ("+y", (0, 1, 0), (-1, 0, 0), (0, 0, -1)),
    ("-y", (0, -1, 0), (-1, 0, 0), (0, 0, 1)),
    ("+z", (0, 0, 1), (-1, 0, 0), (0, 1, 0)),
    ("-z", (0, 0, -1), (1, 0, 0), (0, 1, 0)),
)


def cube_face_directions(size: int, supersample: int = 1) -> np.ndarray:
    """(6, S*s, S*s, 3) unit directions of the (sub)pixel centres of each face."""
    n = size * supersample
    c = (np.arange(n) + 0.5) / n * 2 - 1
    a, b = np.meshgrid(c, -c)
    out = []
    for _, f, r, u in CUBE_FACES:
        d = np.asarray(f, float) + a[..., None] * np.asarray(r, float) + b[..., None] * np.asarray(u, float)
        out.append(d / np.linalg.norm(d, axis=-1, keepdims=True))
    return np.stack(out)


def equirect_to_cube(env: np.ndarray, size: int, supersample: int = 2) -> np.ndarray:
    """(6, size, size, 3) cube faces (order of :data:`CUBE_FACES`), each texel the mean of
    ``supersample^2`` bilinear samples."""
    env = _check_env(env)
    s = max(int(supersample), 1)
    v = sample(env, cube_face_directions(size, s))
    return v.reshape(6, size, s, size, s, 3).mean(axis=(2, 4)).astype(np.float32)


def cube_to_equirect(faces: np.ndarray, height: int) -> np.ndarray:
    """Equirect map ``(height, 2*height, 3)`` from cube faces (bilinear within each face)."""
    faces = np.asarray(faces, dtype=np.float32)
    if faces.ndim != 4 or faces.shape[0] != 6 or faces.shape[1] != faces.shape[2] or faces.shape[3] != 3:
        raise EnvMapError(f"cube map: expected (6, S, S, 3) faces, got shape {faces.shape}")
    S = faces.shape[1]
    d = equirect_directions(height, 2 * height)
    out = np.zeros(d.shape[:2] + (3,), np.float32)
    ax = np.argmax(np.abs(d), axis=-1)
    sgn = np.take_along_axis(d, ax[..., None], -1)[..., 0] > 0
    face_idx = 2 * ax + (~sgn)
    for k, (_, f, r, u) in enumerate(CUBE_FACES):
        m = face_idx == k
        dk = d[m]
        fd = dk @ np.asarray(f, float)
        a = (dk @ np.asarray(r, float)) / fd
        b = (dk @ np.asarray(u, float)) / fd
        out[m] = _sample_image(faces[k], (a + 1) * S / 2 - 0.5, (1 - b) * S / 2 - 0.5)
    return out


_CROSS = {"+y": (0, 1), "+x": (1, 0), "+z": (1, 1), "-x": (1, 2), "-z": (1, 3), "-y": (2, 1)}


def cube_to_cross(faces: np.ndarray) -> np.ndarray:
    """(3S, 4S, 3) horizontal cross: ``+x +z -x -z`` in the middle row, +y above and -y
    below +z (zeros elsewhere)."""
    faces = np.asarray(faces, dtype=np.float32)
    S = faces.shape[1]
    out = np.zeros((3 * S, 4 * S, 3), np.float32)
    for k, (name, *_rest) in enumerate(CUBE_FACES):
        i, j = _CROSS[name]
        out[i * S:(i + 1) * S, j * S:(j + 1) * S] = faces[k]
    return out


def cross_to_cube(cross: np.ndarray) -> np.ndarray:
    """Inverse of :func:`cube_to_cross`: a (3S, 4S, 3) horizontal cross -> (6, S, S, 3)."""
    cross = _check_env(cross, "cube cross")
    h, w = cross.shape[:2]
    if h * 4 != w * 3:
        raise EnvMapError(f"cube cross: expected a 4:3 (width:height) image, got {w}x{h}")
    S = h // 3
    return np.stack([cross[_CROSS[n][0] * S:(_CROSS[n][0] + 1) * S,
                           _CROSS[n][1] * S:(_CROSS[n][1] + 1) * S] for n, *_ in CUBE_FACES]).astype(np.float32)


# ---- files ------------------------------------------------------------------------------------


def load_envmap(path: str | Path, layout: str = "auto", height: int | None = None) -> np.ndarray:
    """Read an environment map as an equirect ``(H, 2H, 3)`` float32 linear radiance map.

    ``layout``: ``equirect`` (2:1), ``mirrorball`` (square light probe), ``cross`` (4:3
    horizontal cube cross) or ``auto`` (decided by the aspect ratio). 8-bit files are sRGB
    decoded to linear first (their radiance is display-referred and clipped: prefer HDR).
    ``height`` resamples the result (power-conserving when shrinking).
    """
    p = Path(path)
    try:
        img = read_image(p)
    except ImageIOError as e:
        raise EnvMapError(str(e)) from None
    h, w = img.shape[:2]
    if layout == "auto":
        if w == 2 * h:
            layout = "equirect"
        elif w == h:
            layout = "mirrorball"
        elif 3 * w == 4 * h:
            layout = "cross"
        else:
            raise EnvMapError(f"{p}: cannot tell the layout of a {w}x{h} map (equirect is 2:1, "
                              "mirror ball 1:1, cube cross 4:3); pass layout= explicitly")
    if layout == "equirect":
        if w != 2 * h:
            raise EnvMapError(f"{p}: an equirect map must be twice as wide as high, got {w}x{h}")
        env = img
    elif layout == "mirrorball":
        env = mirrorball_to_equirect(img, height)
    elif layout == "cross":
        env = cube_to_equirect(cross_to_cube(img), height or max(h // 3 * 2, 2))
    else:
        raise EnvMapError(f"{p}: unknown layout {layout!r} (auto, equirect, mirrorball, cross)")
    if not np.all(np.isfinite(env)):
        raise EnvMapError(f"{p}: map holds non-finite radiance (NaN/inf)")
    if (env < 0).any():
        raise EnvMapError(f"{p}: map holds negative radiance (min {float(env.min()):.3g})")
    if height is not None and env.shape[0] != height:
        env = resize(env, height)
    return np.ascontiguousarray(env, dtype=np.float32)


def save_envmap(path: str | Path, env: np.ndarray, half: bool = False) -> None:
    """Write an equirect map as EXR (float32, or float16 with ``half``)."""
    write_exr(path, _check_env(env), half=half)


# ---- built-in environments ---------------------------------------------------------------------


def _sph(elevation_deg: float, azimuth_deg: float) -> np.ndarray:
    """Unit direction at elevation above the horizon and azimuth (0 = +z, 90 = +x)."""
    e, a = math.radians(elevation_deg), math.radians(azimuth_deg)
    return np.array([math.cos(e) * math.sin(a), math.sin(e), math.cos(e) * math.cos(a)])


def uniform_environment(height: int = 64, radiance=1.0) -> np.ndarray:
    """Constant radiance everywhere (RGB triple or scalar): ``sum E_i = 4 pi * radiance``."""
    rgb = np.broadcast_to(np.asarray(radiance, np.float32), (3,))
    return np.broadcast_to(rgb, (height, 2 * height, 3)).astype(np.float32)


def _discs(height: int, discs, supersample: int = 4) -> np.ndarray:
    """Disc area lights ``(direction, half_angle_deg, rgb)`` on black, anti-aliased by
    rendering ``supersample`` times larger and area averaging."""
    s = max(int(supersample), 1)
    d = equirect_directions(height * s, 2 * height * s)
    out = np.zeros(d.shape[:2] + (3,), np.float32)
    for direction, half_angle, rgb in discs:
        inside = d @ np.asarray(direction, float) >= math.cos(math.radians(half_angle))
        out[inside] += np.asarray(rgb, np.float32)
    return resize(out, height) if s > 1 else out


def studio_environment(height: int = 256, key: float = 1.0) -> np.ndarray:
    """Three-point studio: a warm key disc (upper front-right), a large soft cool fill
    (front-left, low) and a small bright rim behind, on black. ``key`` scales all three."""
    discs = [
        (_sph(35, 40), 12.0, key * np.array([20.0, 19.0, 17.5])),  # key
        (_sph(10, -55), 25.0, key * np.array([1.6, 1.8, 2.0])),  # fill
        (_sph(30, 165), 6.0, key * np.array([40.0, 40.0, 40.0])),  # rim
    ]
    return _discs(height, discs)


_PEREZ = {  # Preetham et al. 1999, Appendix A.2: coefficient = a * T + b for A..E
    "Y": [(0.1787, -1.4630), (-0.3554, 0.4275), (-0.0227, 5.3251), (0.1206, -2.5771), (-0.0670, 0.3703)],
    "x": [(-0.0193, -0.2592), (-0.0665, 0.0008), (-0.0004, 0.2125), (-0.0641, -0.8989), (-0.0033, 0.0452)],
    "y": [(-0.0167, -0.2608), (-0.0950, 0.0092), (-0.0079, 0.2102), (-0.0441, -1.6537), (-0.0109, 0.0529)],
}
_ZENITH_X = np.array([[0.00166, -0.00375, 0.00209, 0.0],
                      [-0.02903, 0.06377, -0.03202, 0.00394],
                      [0.11693, -0.21196, 0.06052, 0.25886]])
_ZENITH_Y = np.array([[0.00275, -0.00610, 0.00317, 0.0],
                      [-0.04214, 0.08970, -0.04153, 0.00516],
                      [0.15346, -0.26756, 0.06670, 0.26688]])
_XYZ_TO_REC709 = np.array([[3.2404542, -1.5371385, -0.4985314],
                           [-0.9692660, 1.8760108, 0.0415560],
                           [0.0556434, -0.2040259, 1.0572252]])
#: sun angular radius (rad) and extraterrestrial luminance (kcd/m^2): 128 klux over its disc
SUN_HALF_ANGLE = math.radians(0.2667)
SUN_SOLID_ANGLE = 2 * math.pi * (1 - math.cos(SUN_HALF_ANGLE))
SUN_LUMINANCE_0 = 128.0 / SUN_SOLID_ANGLE


def _perez(theta, gamma, coeffs):
    A, B, C, D, E = coeffs
    ct = np.maximum(np.cos(theta), 1e-3)
    return (1 + A * np.exp(B / ct)) * (1 + C * np.exp(D * gamma) + E * np.cos(gamma) ** 2)


def sun_radiance(elevation_deg: float, turbidity: float) -> np.ndarray:
    """(3,) linear Rec.709 radiance of the solar disc (kcd/m^2 units) after the atmosphere.

    Extraterrestrial sun taken as white of luminance :data:`SUN_LUMINANCE_0`, attenuated per
    channel (at 610 / 550 / 465 nm) by Rayleigh and Angstrom-haze transmittance over the
    Kasten-Young relative air mass (Preetham et al. 1999, A.2; ozone and water vapour
    absorption omitted). Zero below the horizon.
    """
    if elevation_deg <= 0:
        return np.zeros(3)
    zen = 90.0 - elevation_deg
    m = 1.0 / (math.cos(math.radians(zen)) + 0.15 * (93.885 - zen) ** -1.253)
    lam = np.array([0.610, 0.550, 0.465])  # micrometres
    beta = 0.04608 * turbidity - 0.04586
    tau = np.exp(-0.008735 * lam ** -4.08 * m) * np.exp(-beta * lam ** -1.3 * m)
    return SUN_LUMINANCE_0 * tau


def sun_sky_environment(height: int = 256, elevation_deg: float = 35.0, azimuth_deg: float = 40.0,
                        turbidity: float = 3.0, ground_albedo: float = 0.3,
                        sun: bool = True) -> np.ndarray:
    """Preetham daylight: Perez-distributed sky (Y, x, y from turbidity and sun position),
    a solar disc and a Lambertian ground lit by both. Unit: 1.0 = 1000 cd/m^2 (kcd/m^2).

    The sun (0.53 deg wide, smaller than a pixel at usual sizes) is deposited as *power*:
    ``sun_radiance * SUN_SOLID_ANGLE`` split bilinearly over the four pixels around its
    direction, so its integral is exact at any resolution. The ground's radiance is
    ``albedo / pi`` times the horizontal irradiance from sky and sun.
    """
    if not 1.7 <= turbidity <= 12:
        raise EnvMapError(f"sun-sky: turbidity {turbidity} outside the model's fitted range [2, 10]")
    if not 0 < elevation_deg <= 90:
        raise EnvMapError(f"sun-sky: sun elevation must be in (0, 90] degrees, got {elevation_deg}")
    T = float(turbidity)
    H, W = height, 2 * height
    d = equirect_directions(H, W)
    s = _sph(elevation_deg, azimuth_deg)
    ts = math.radians(90.0 - elevation_deg)
    theta = np.arccos(np.clip(d[..., 1], -1, 1))
    gamma = np.arccos(np.clip(d @ s, -1, 1))
    chi = (4.0 / 9.0 - T / 120.0) * (math.pi - 2 * ts)
    Yz = max((4.0453 * T - 4.9710) * math.tan(chi) - 0.2155 * T + 2.4192, 0.0)
    tvec = np.array([T * T, T, 1.0])
    svec = np.array([ts ** 3, ts ** 2, ts, 1.0])
    zen = {"Y": Yz, "x": tvec @ _ZENITH_X @ svec, "y": tvec @ _ZENITH_Y @ svec}
    val = {}
    for k in ("Y", "x", "y"):
        co = [a * T + b for a, b in _PEREZ[k]]
        val[k] = zen[k] * _perez(theta, gamma, co) / _perez(0.0, ts, co)
    Y, x, y = val["Y"], val["x"], val["y"]
    XYZ = np.stack([x * Y / y, Y, (1 - x - y) * Y / y], -1)
    sky = np.clip(XYZ @ _XYZ_TO_REC709.T, 0, None)
    up = d[..., 1] > 0
    env = np.where(up[..., None], sky, 0.0)
    omega = row_solid_angles(H, W)
    e_h = np.einsum("hwc,hw,h->c", env, np.clip(d[..., 1], 0, None), omega)
    sun_rgb = sun_radiance(elevation_deg, T) if sun else np.zeros(3)
    e_h = e_h + sun_rgb * SUN_SOLID_ANGLE * s[1]
    env = np.where(up[..., None], env, ground_albedo / math.pi * e_h)
    if sun:
        u, v = direction_to_pixel(s, H, W)
        u0, v0 = math.floor(u), math.floor(v)
        fu, fv = u - u0, v - v0
        power = sun_rgb * SUN_SOLID_ANGLE
        for dv, wv in ((0, 1 - fv), (1, fv)):
            for du, wu in ((0, 1 - fu), (1, fu)):
                vv = min(max(v0 + dv, 0), H - 1)
                env[vv, (u0 + du) % W] += power * wv * wu / omega[vv]
    return env.astype(np.float32)


#: name -> factory(height, **params) returning an (H, 2H, 3) float32 map
BUILTIN_ENVIRONMENTS: dict[str, Callable[..., np.ndarray]] = {
    "uniform": uniform_environment,
    "studio": studio_environment,
    "sun-sky": sun_sky_environment,
    "sunset": functools.partial(sun_sky_environment, elevation_deg=6.0, azimuth_deg=-70.0, turbidity=4.0),
}


def builtin_environment(name: str, height: int = 256, **params) -> np.ndarray:
    """A built-in environment by name (see :data:`BUILTIN_ENVIRONMENTS`)."""
    try:
        f = BUILTIN_ENVIRONMENTS[name]
    except KeyError:
        raise EnvMapError(f"no built-in environment {name!r}; choose one of "
                          f"{sorted(BUILTIN_ENVIRONMENTS)}") from None
    return f(height=height, **params)


def load_environment(spec: str | Path, height: int | None = None, layout: str = "auto") -> np.ndarray:
    """A built-in name or a file path -> equirect map (built-ins default to height 256)."""
    if str(spec) in BUILTIN_ENVIRONMENTS:
        return builtin_environment(str(spec), height=height or 256)
    p = Path(spec)
    if not p.exists():
        raise EnvMapError(f"{spec}: neither a file nor a built-in environment "
                          f"({', '.join(sorted(BUILTIN_ENVIRONMENTS))})")
    return load_envmap(p, layout=layout, height=height)
