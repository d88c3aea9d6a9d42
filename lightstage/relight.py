"""OLAT relighting: environment -> per-light weights -> weighted sum of OLAT images.

Radiometry (DESIGN.md): OLAT images are radiance *per unit light*, so an image under an
environment ``L_env`` is ``relit = sum_i E_i * OLAT_i`` with ``E_i`` (RGB) the environment
radiance integrated over the region of the sphere assigned to light ``i``:

    E_i = sum_p  w_i(p) * L_env(p) * Omega(p)

over equirect pixels ``p`` with exact solid angles ``Omega`` (:mod:`lightstage.envmap`) and an
assignment ``w_i(p) >= 0`` with ``sum_i w_i(p) = 1`` (a partition of unity), so a uniform
environment of radiance 1 gives ``sum_i E_i = 4 pi`` whatever the method. Methods
(:data:`WEIGHT_METHODS`):

``voronoi``
    ``w_i(p) = 1`` for the light nearest to ``p`` (spherical Voronoi cells, decided at pixel
    centres; the classic light-stage integration of Debevec et al. 2000).
``vmf``
    smooth: von Mises-Fisher kernels ``exp(kappa (l_i . d - 1))`` over the ``k`` nearest lights,
    normalised per direction. Spreads a small bright source (the sun) over neighbouring lights,
    which hides the light-stage sampling in hard shadows; ``kappa`` defaults to
    ``4 / s^2`` with ``s`` the median angular spacing of the lights.

The assignment for one (light set, method, map size) is a sparse ``(L, H*W)`` matrix built once
(a cKDTree query on unit vectors: the nearest in chord length is the nearest in angle) and
cached in memory and optionally on disk (:class:`TransferCache`); after that a weight
computation is one sparse product (milliseconds at 1024x512).

Directions far from every light (below the stage, typically) go to their nearest light by
default (all of the map's power is used) or are dropped (``uncovered="drop"``: right for a rig
that lights one side only); :func:`coverage` reports how much of the sphere, and of a map's
power, that concerns.

Combination: the OLAT stack is channel-planar ``(L, 3, H, W)``, so per channel it is a GEMV
``weights[:, c] @ olat[:, c].reshape(L, -1)`` that runs at memory bandwidth; torch (GPU when
present) does it with preallocated buffers for float32. A float16 stack on the CPU goes through
a fused numba kernel (:mod:`lightstage._half`: widen in registers, accumulate in float32, read
the stack once), because torch's and numpy's half paths run at a fraction of memory bandwidth;
without numba it falls back to converting a few lights at a time into a reused float32 buffer.
:func:`relight_take` streams a Zarr take in bounded memory (same paths per chunk).

Rotating an environment by ``R`` equals rotating the lights by ``R^T``:
``E_i(R env) = E(env; R^T l_i)``. :func:`weights_for_rotations` uses the cached matrix and a
column shift of the map for turns about +y (turntables).

References
----------
Debevec, P., Hawkins, T., Tchou, C., Duiker, H.-P., Sarokin, W., Sagar, M. (2000). Acquiring
the reflectance field of a human face. SIGGRAPH.
Fisher, R. (1953). Dispersion on a sphere. Proc. R. Soc. A 217. (von Mises-Fisher kernel)
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from . import envmap as _env

__all__ = [
    "RelightError",
    "Transfer",
    "TransferCache",
    "DEFAULT_CACHE",
    "WEIGHT_METHODS",
    "build_transfer",
    "light_weights",
    "weights_for_rotations",
    "Coverage",
    "coverage",
    "default_coverage_angle",
    "UNCOVERED_POLICIES",
    "light_spacing",
    "relight",
    "Relighter",
    "relight_take",
    "relight_take_dask",
    "OlatSource",
    "TakeSource",
]


class RelightError(ValueError):
    """Bad relighting input (shapes, light sets, incomplete takes); says what and why."""


def _check_dirs(light_dirs) -> np.ndarray:
    d = np.asarray(light_dirs, dtype=np.float64)
    if d.ndim != 2 or d.shape[1] != 3 or d.shape[0] < 1:
        raise RelightError(f"light directions must be (L, 3), got shape {d.shape}")
    n = np.linalg.norm(d, axis=1)
    if not np.all(np.isfinite(d)) or np.any(n < 1e-9):
        bad = np.flatnonzero(~np.isfinite(n) | (n < 1e-9))
        raise RelightError(f"light directions {bad.tolist()[:10]} are zero or not finite")
    return d / n[:, None]


def light_spacing(light_dirs) -> float:
    """Median angle (radians) from each light to its nearest neighbour."""
    d = _check_dirs(light_dirs)
    if len(d) < 2:
        return math.pi
    dist, _ = cKDTree(d).query(d, k=2)
    return float(np.median(2 * np.arcsin(np.clip(dist[:, 1] / 2, 0, 1))))


# ---- the transfer matrix (environment pixels -> lights) -------------------------------------


@dataclass(frozen=True)
class Transfer:
    """Everything needed to turn an ``(H, W, 3)`` map into ``(L, 3)`` light weights.

    Attributes
    ----------
    matrix : scipy.sparse.csc_matrix, (L, H*W) float64
        ``w_i(p) * Omega(p)``; columns sum to the pixel solid angles. Column-compressed: the
        product then streams the map once in memory order (2-3x faster than row-compressed).
    nearest : (H, W) int32
        index of the nearest light of each pixel centre (the Voronoi index map).
    nearest_angle : (H, W) float32
        angle (radians) from each pixel centre to its nearest light.
    """

    method: str
    height: int
    width: int
    n_lights: int
    matrix: sp.csc_matrix
    nearest: np.ndarray
    nearest_angle: np.ndarray

    def weights(self, env: np.ndarray, drop_beyond_deg: float | None = None) -> np.ndarray:
        """(L, 3) float64 weights of a map of this transfer's size; with ``drop_beyond_deg``
        directions farther than that from every light contribute nothing."""
        env = _env._check_env(env)
        if env.shape[:2] != (self.height, self.width):
            raise RelightError(f"map is {env.shape[1]}x{env.shape[0]}, transfer was built for "
                               f"{self.width}x{self.height}")
        # float64 matrix x float32 map: scipy accumulates in float64 without a converted copy
        x = env.reshape(-1, 3)
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float32)
        if drop_beyond_deg is not None:
            keep = (self.nearest_angle <= math.radians(drop_beyond_deg)).reshape(-1, 1)
            x = x * keep
        return np.asarray(self.matrix @ x, dtype=np.float64)


def _nearest(light_dirs: np.ndarray, H: int, W: int, k: int = 1):
    d = _env.equirect_directions(H, W).reshape(-1, 3)
    dist, idx = cKDTree(light_dirs).query(d, k=k)
    ang = 2 * np.arcsin(np.clip(dist / 2, 0, 1))
    return ang, idx


def _voronoi(light_dirs: np.ndarray, H: int, W: int) -> tuple[sp.spmatrix, np.ndarray, np.ndarray]:
    ang, idx = _nearest(light_dirs, H, W)
    omega = np.repeat(_env.row_solid_angles(H, W), W)
    L = len(light_dirs)
    m = sp.csr_matrix((omega, (idx, np.arange(H * W))), shape=(L, H * W))
    return m, idx.reshape(H, W).astype(np.int32), ang.reshape(H, W).astype(np.float32)


def _vmf(light_dirs: np.ndarray, H: int, W: int, kappa: float | None = None, k: int = 8):
    L = len(light_dirs)
    k = int(min(k, L))
    if kappa is None:
        kappa = 4.0 / light_spacing(light_dirs) ** 2
    ang, idx = _nearest(light_dirs, H, W, k=k)
    ang, idx = ang.reshape(-1, k), idx.reshape(-1, k)
    # exp(kappa (cos a - 1)) relative to the nearest light: stable for any kappa
    w = np.exp(kappa * (np.cos(ang) - np.cos(ang[:, :1])))
    w /= w.sum(axis=1, keepdims=True)
    omega = np.repeat(_env.row_solid_angles(H, W), W)
    cols = np.repeat(np.arange(H * W), k)
    m = sp.csr_matrix(((w * omega[:, None]).ravel(), (idx.ravel(), cols)), shape=(L, H * W))
    return m, idx[:, 0].reshape(H, W).astype(np.int32), ang[:, 0].reshape(H, W).astype(np.float32)


#: name -> builder(light_dirs (L,3) unit, H, W, **params) -> (matrix, nearest, nearest_angle)
WEIGHT_METHODS: dict[str, Callable] = {"voronoi": _voronoi, "vmf": _vmf}


def build_transfer(light_dirs, height: int, width: int | None = None, method: str = "voronoi",
                   **params) -> Transfer:
    """Build (uncached) the transfer of a light set for ``height x width`` maps."""
    if method not in WEIGHT_METHODS:
        raise RelightError(f"unknown weight method {method!r}; choose one of {sorted(WEIGHT_METHODS)}")
    d = _check_dirs(light_dirs)
    W = int(width or 2 * height)
    m, near, ang = WEIGHT_METHODS[method](d, int(height), W, **params)
    return Transfer(method, int(height), W, len(d), sp.csc_matrix(m), near, ang)


class TransferCache:
    """Transfers keyed by (light set hash, method, params, resolution): LRU in memory, and
    ``.npz`` files in ``directory`` when one is given (reused across runs)."""

    def __init__(self, max_items: int = 8, directory: str | Path | None = None):
        self.max_items = int(max_items)
        self.directory = Path(directory) if directory is not None else None
        self._items: OrderedDict[str, Transfer] = OrderedDict()
        self._lock = threading.Lock()
        self.builds = 0  # how many transfers were computed from scratch (for tests/benchmarks)

    @staticmethod
    def key(light_dirs, height: int, width: int, method: str, params: dict) -> str:
        d = np.round(_check_dirs(light_dirs), 9)
        h = hashlib.sha1(np.ascontiguousarray(d).tobytes())
        h.update(repr((method, sorted(params.items()))).encode())
        return f"{method}_{h.hexdigest()[:16]}_{height}x{width}_csc"

    def get(self, light_dirs, height: int, width: int | None = None, method: str = "voronoi",
            **params) -> Transfer:
        W = int(width or 2 * height)
        k = self.key(light_dirs, height, W, method, params)  # also names the .npz file
        with self._lock:
            if k in self._items:
                self._items.move_to_end(k)
                return self._items[k]
        t = self._load(k, method, height, W)
        if t is None:
            t = build_transfer(light_dirs, height, W, method, **params)
            self.builds += 1
            self._save(k, t)
        with self._lock:
            self._items[k] = t
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return t

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def _load(self, k, method, H, W) -> Transfer | None:
        if self.directory is None:
            return None
        p = self.directory / f"{k}.npz"
        if not p.is_file():
            return None
        try:
            z = np.load(p, allow_pickle=False)
            L = int(z["n_lights"])
            m = sp.csc_matrix((z["data"], z["indices"], z["indptr"]), shape=(L, H * W))
            return Transfer(method, H, W, L, m, z["nearest"], z["nearest_angle"])
        except Exception:  # a damaged cache file is rebuilt, never trusted
            return None

    def _save(self, k, t: Transfer) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f"{k}.tmp.npz"
        np.savez(tmp, data=t.matrix.data, indices=t.matrix.indices, indptr=t.matrix.indptr,
                 n_lights=t.n_lights, nearest=t.nearest, nearest_angle=t.nearest_angle)
        tmp.replace(self.directory / f"{k}.npz")  # atomic: readers never see half a file


#: the process-wide in-memory cache used when none is passed
DEFAULT_CACHE = TransferCache()


UNCOVERED_POLICIES = ("nearest", "drop")


def _drop_angle(light_dirs, uncovered: str, max_angle_deg: float | None) -> float | None:
    if uncovered not in UNCOVERED_POLICIES:
        raise RelightError(f"uncovered must be one of {UNCOVERED_POLICIES}, got {uncovered!r}")
    if uncovered == "nearest":
        return None
    return max_angle_deg if max_angle_deg is not None else default_coverage_angle(light_dirs)


def light_weights(env: np.ndarray, light_dirs, method: str = "voronoi",
                  index_map_cache: TransferCache | None = DEFAULT_CACHE, uncovered: str = "nearest",
                  max_angle_deg: float | None = None, **params) -> np.ndarray:
    """(L, 3) float64 RGB weights ``E_i`` of ``env`` for lights at ``light_dirs`` (L, 3).

    ``uncovered``: what happens to directions farther than ``max_angle_deg`` (default
    :func:`default_coverage_angle`) from every light. ``"nearest"`` (default) gives them to the
    nearest light, so all of the map's power is used (``sum E_i`` = its integral); ``"drop"``
    ignores them, which is right when the stage cannot light the subject from there (a rig
    with lights on one side only: a sun behind it must not land on a front light).
    ``index_map_cache=None`` builds the assignment from scratch (no caching).
    """
    env = _env._check_env(env)
    H, W = env.shape[:2]
    drop = _drop_angle(light_dirs, uncovered, max_angle_deg)
    if index_map_cache is None:
        t = build_transfer(light_dirs, H, W, method, **params)
    else:
        t = index_map_cache.get(light_dirs, H, W, method, **params)
    return t.weights(env, drop)


def weights_for_rotations(env: np.ndarray, light_dirs, angles_deg: Sequence[float],
                          axis=(0.0, 1.0, 0.0), method: str = "voronoi",
                          index_map_cache: TransferCache | None = DEFAULT_CACHE,
                          uncovered: str = "nearest", max_angle_deg: float | None = None,
                          **params) -> np.ndarray:
    """(N, L, 3) weights of ``env`` turned by each angle (``envmap.rotate`` semantics).

    About +y the map's columns are shifted (exact for whole pixels, periodic linear
    interpolation otherwise) and the one cached transfer is reused (tens of ms per angle at
    1024 x 512, vs ~0.6 s to build an assignment). About any other axis the *lights* are turned
    by ``R^T`` instead (exact, one fresh assignment per angle).
    """
    env = _env._check_env(env).astype(np.float32)
    H, W = env.shape[:2]
    d = _check_dirs(light_dirs)
    drop = _drop_angle(d, uncovered, max_angle_deg)
    out = np.empty((len(angles_deg), len(d), 3))
    if _env._is_y_axis(axis):
        t = (index_map_cache or TransferCache()).get(d, H, W, method, **params)
        for n, a in enumerate(angles_deg):
            out[n] = t.weights(_env._shift_columns(env, (a / 360.0 * W) % W), drop)
        return out
    for n, a in enumerate(angles_deg):
        R = _env.rotation_matrix(axis, a)
        t = build_transfer(d @ R, H, W, method, **params)  # rows are R^T l
        out[n] = t.weights(env, drop)
    return out


# ---- coverage ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Coverage:
    """Directions no light covers: farther than ``max_angle_deg`` from every light.

    ``mask`` (H, W) bool marks them; ``solid_angle`` (sr) and ``fraction`` (of 4 pi) measure
    them; ``power_fraction`` (3,) is the share of the map's power there (NaN without a map).
    """

    max_angle_deg: float
    mask: np.ndarray
    solid_angle: float
    fraction: float
    power_fraction: np.ndarray

    def summary(self) -> str:
        p = "" if np.all(np.isnan(self.power_fraction)) else (
            f"; {100 * float(np.max(self.power_fraction)):.2f}% of the map's power falls there")
        return (f"{100 * self.fraction:.1f}% of the sphere ({self.solid_angle:.3f} sr) is more "
                f"than {self.max_angle_deg:.1f} deg from every light{p}")


def default_coverage_angle(light_dirs) -> float:
    """Degrees beyond which a direction counts as uncovered: 1.5 x the median spacing of the
    lights (a direction that far from every light lies outside the lit part of the stage)."""
    return 1.5 * math.degrees(light_spacing(light_dirs))


def coverage(light_dirs, height: int = 128, env: np.ndarray | None = None,
             max_angle_deg: float | None = None,
             index_map_cache: TransferCache | None = DEFAULT_CACHE) -> Coverage:
    """Coverage of the sphere by a light set (at ``env``'s resolution when a map is given).

    ``max_angle_deg`` defaults to :func:`default_coverage_angle`.
    """
    d = _check_dirs(light_dirs)
    if env is not None:
        env = _env._check_env(env)
        height = env.shape[0]
    H, W = int(height), 2 * int(height)
    t = (index_map_cache or TransferCache()).get(d, H, W, "voronoi")
    thr = max_angle_deg if max_angle_deg is not None else default_coverage_angle(d)
    mask = t.nearest_angle > math.radians(thr)
    omega = _env.row_solid_angles(H, W)
    sa = float((mask * omega[:, None]).sum())
    if env is None:
        pf = np.full(3, np.nan)
    else:
        tot = _env.total_power(env)
        un = np.einsum("hwc,hw,h->c", env.astype(np.float64), mask, omega)
        pf = np.where(tot > 0, un / np.where(tot > 0, tot, 1), 0.0)
    return Coverage(float(thr), mask, sa, sa / (4 * math.pi), pf)


# ---- combination -------------------------------------------------------------------------------


def _planar(olat) -> tuple[object, tuple[int, ...]]:
    """View an OLAT stack as (L, 3, P); returns it and the per-channel image shape."""
    shape = tuple(olat.shape)
    if len(shape) == 4 and shape[1] == 3:
        return olat.reshape(shape[0], 3, -1), shape[2:]
    if len(shape) == 3 and shape[1] == 3:
        return olat, shape[2:]
    if len(shape) == 2 and shape[1] % 3 == 0:
        return olat.reshape(shape[0], 3, -1), (shape[1] // 3,)
    raise RelightError(f"OLAT stack must be channel-planar (L, 3, H, W), (L, 3, P) or (L, 3*P); "
                       f"got shape {shape}")


def _weights3(weights, L: int) -> tuple[np.ndarray, bool]:
    w = np.asarray(weights, dtype=np.float32)
    single = w.ndim == 2
    if single:
        w = w[None]
    if w.ndim != 3 or w.shape[1:] != (L, 3):
        raise RelightError(f"weights must be (L, 3) or (N, L, 3) with L = {L}, got {np.shape(weights)}")
    if not np.all(np.isfinite(w)):
        raise RelightError("weights hold NaN/inf")
    return w, single


class Relighter:
    """Channel-planar OLAT combination in torch with preallocated buffers.

    Parameters
    ----------
    n_lights, n_pixels : int
        expected stack size ``(L, 3, P)`` (buffers grow if a call needs more).
    device : str or None
        ``"cuda"`` when available unless given.
    chunk_bytes : int
        size of the reused float32 buffer that float16 stacks are converted into, a few
        lights at a time (contiguous rows).
    convert_threads : int or None
        torch threads for the float16 -> float32 conversion of the torch fallback on CPU
        (``None``: leave torch's setting). torch's thread count is process-wide and is restored
        after each copy.
    threads : int or None
        threads of the fused float16 kernel (default :func:`lightstage._half.default_threads`).
    use_kernel : bool
        use the fused float16 kernel on the CPU when numba provides it (``False``: always the
        torch path; for comparisons).

    ``accumulate(out, olat, weights)`` adds ``sum_i w[n, i, c] * olat[i, c]`` into ``out``
    ``(N, 3, P)`` float32 in place. float32 stacks: BLAS GEMV for one weight set, GEMM for
    several. float16 stacks on the CPU: one fused pass (:mod:`lightstage._half`) that widens
    each value in registers and accumulates in float32, so the stack is read once at memory
    bandwidth; without numba (or on a GPU) a few lights at a time are converted into a reused
    float32 buffer for BLAS. float16 is never multiplied in half precision (weights can exceed
    its range, sums lose digits).
    """

    def __init__(self, n_lights: int, n_pixels: int, device: str | None = None,
                 chunk_bytes: int = 32 << 20, convert_threads: int | None = 1,
                 threads: int | None = None, use_kernel: bool = True):
        import torch

        self.torch = torch
        self.threads = threads
        self.use_kernel = bool(use_kernel)
        self.convert_threads = convert_threads
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.chunk_bytes = int(chunk_bytes)
        self.L, self.P = int(n_lights), int(n_pixels)
        self._buf = None

    def _buffer(self, k: int, P: int):
        if self._buf is None or self._buf.numel() < k * 3 * P:
            self._buf = self.torch.empty(k * 3 * P, dtype=self.torch.float32, device=self.device)
        return self._buf[:k * 3 * P].view(k, 3, P)

    @staticmethod
    def _gemv(out, x, w) -> None:
        N = w.shape[0]
        for c in range(3):
            if N == 1:
                out[0, c].addmv_(x[:, c].T, w[0, :, c])
            else:
                out[:, c].addmm_(w[:, :, c], x[:, c])

    def _fused_f16(self, out, olat, weights) -> bool:
        """The float16 CPU fast path (:mod:`lightstage._half`); False when it does not apply."""
        torch = self.torch
        if self.device.type != "cpu" or not self.use_kernel:
            return False
        if isinstance(olat, torch.Tensor):
            if olat.dtype != torch.float16 or olat.device.type != "cpu":
                return False
            olat = olat.numpy()
        elif olat.dtype != np.float16:
            return False
        if not (out.device.type == "cpu" and out.dtype == torch.float32 and out.is_contiguous()):
            return False
        from . import _half

        if not _half.available():
            return False
        w = weights.cpu().numpy() if isinstance(weights, torch.Tensor) else np.asarray(weights)
        _half.combine_f16(olat, w.astype(np.float32, copy=False), out.numpy(), threads=self.threads)
        return True

    def accumulate(self, out, olat, weights) -> None:
        """``out`` (N, 3, P) torch float32 += weights (N, L, 3) applied to olat (L, 3, P)."""
        torch = self.torch
        if self._fused_f16(out, olat, weights):
            return
        x = olat if isinstance(olat, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(olat))
        x = x.to(self.device, non_blocking=True)
        w = weights if isinstance(weights, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(weights))
        w = w.to(self.device, torch.float32)
        L, _, P = x.shape
        if x.dtype == torch.float32:
            self._gemv(out, x, w)
            return
        k = max(1, min(L, self.chunk_bytes // (3 * P * 4)))
        single = x.device.type == "cpu" and self.convert_threads is not None
        for l0 in range(0, L, k):
            l1 = min(l0 + k, L)
            buf = self._buffer(l1 - l0, P)
            if single:
                # the float16 -> float32 copy runs 2-8x faster on one thread on a loaded
                # machine (measured on the 2-core VM: 0.6-0.7 vs 0.08-0.29 GB/s); the GEMV keeps
                # all threads
                n = torch.get_num_threads()
                torch.set_num_threads(self.convert_threads)
                try:
                    buf.copy_(x[l0:l1])
                finally:
                    torch.set_num_threads(n)
            else:
                buf.copy_(x[l0:l1])
            self._gemv(out, buf, w[:, l0:l1])


def relight(olat, weights, out: np.ndarray | None = None, device: str | None = None) -> np.ndarray:
    """Combine a channel-planar OLAT stack with per-light RGB weights.

    Parameters
    ----------
    olat : (L, 3, H, W), (L, 3, P) or (L, 3*P) array (numpy or torch), float16 or float32
        radiance per unit light.
    weights : (L, 3) or (N, L, 3)
        ``E_i`` per light and channel (:func:`light_weights`); N sets give N images.
    out : optional preallocated float32 result of the returned shape.

    Returns
    -------
    (3, H, W) (or (N, 3, H, W)) float32: ``sum_i weights[i, c] * olat[i, c]``.
    """
    import torch

    x, img = _planar(olat)
    L, _, P = x.shape
    w, single = _weights3(weights, L)
    N = w.shape[0]
    if isinstance(x, np.ndarray) and x.dtype not in (np.float16, np.float32):
        x = x.astype(np.float32)
    r = _relighter(device)
    shape = (N, 3) + tuple(img) if not single else (3,) + tuple(img)
    if (out is not None and r.device.type == "cpu" and isinstance(out, np.ndarray)
            and out.dtype == np.float32 and out.flags.c_contiguous and out.shape == shape):
        res = torch.from_numpy(out).view(N, 3, P)  # accumulate straight into the caller's array
        res.zero_()
        r.accumulate(res, x, w)
        return out
    res = torch.zeros((N, 3, P), dtype=torch.float32, device=r.device)
    r.accumulate(res, x, w)
    res = res.cpu().numpy().reshape(shape)
    if out is not None:
        np.copyto(out, res)
        return out
    return res


_LOCAL = threading.local()


def _relighter(device: str | None) -> Relighter:
    """One Relighter (and its buffer) per thread and device, reused across calls."""
    cache = getattr(_LOCAL, "relighters", None)
    if cache is None:
        cache = _LOCAL.relighters = {}
    if device not in cache:
        cache[device] = Relighter(0, 0, device=device)
    return cache[device]


# ---- stores ------------------------------------------------------------------------------------


def _check_done(take, c: int, allow_incomplete: bool) -> None:
    if "done" not in take.group:
        return
    done = np.asarray(take.group["done"][c])
    missing = np.flatnonzero(done == 0)
    if missing.size and not allow_incomplete:
        raise RelightError(f"{take.path}: camera {take.cameras[c]!r} lacks {missing.size} OLAT "
                           f"image(s) (done == 0 for lights {missing[:12].tolist()}"
                           f"{' ...' if missing.size > 12 else ''}); pass allow_incomplete to "
                           "relight with them as black")


def relight_take(take, camera, weights, *, crop=None, max_bytes: int = 256 << 20,
                 device: str | None = None, allow_incomplete: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Relight one camera of a store take, streaming lights in chunks of at most ``max_bytes``.

    ``take`` is a :class:`lightstage.store.Take`; ``weights`` (L, 3) or (N, L, 3) in the take's
    light order; ``crop`` ``(y0, y1, x0, x1)``. The store's ``scale`` is folded into the
    weights, so stored float16 values are never rescaled in memory. ``progress(done, total)``
    is called after each chunk. Returns (3, h, w) or (N, 3, h, w) float32.
    """
    import torch

    c = take.camera_index(camera)
    arr = take.group["olat"]
    _, L, _, H, W = arr.shape
    w, single = _weights3(weights, L)
    if len(take.light_directions) != L:
        raise RelightError(f"{take.path}: {len(take.light_directions)} light directions for {L} lights")
    _check_done(take, c, allow_incomplete)
    y0, y1, x0, x1 = crop if crop is not None else (0, H, 0, W)
    if not (0 <= y0 < y1 <= H and 0 <= x0 < x1 <= W):
        raise RelightError(f"{take.path}: crop {crop} outside the {W}x{H} image")
    h, wd = y1 - y0, x1 - x0
    itemsize = np.dtype(arr.dtype).itemsize
    per_light = 3 * h * wd * (itemsize + 4)  # the stored chunk + its float32 view on device
    step = max(1, min(L, int(max_bytes // per_light)))
    w = w * np.float32(take.scale)
    r = Relighter(step, h * wd, device=device)
    out = torch.zeros((w.shape[0], 3, h * wd), dtype=torch.float32, device=r.device)
    for l0 in range(0, L, step):
        l1 = min(l0 + step, L)
        chunk = np.asarray(arr[c, l0:l1, :, y0:y1, x0:x1]).reshape(l1 - l0, 3, -1)
        r.accumulate(out, chunk, w[:, l0:l1])
        if progress is not None:
            progress(l1, L)
    res = out.cpu().numpy().reshape(w.shape[0], 3, h, wd)
    return res[0] if single else res


def relight_take_dask(take, camera, weights, lights_per_chunk: int = 16):
    """Lazy dask ``(3, H, W)`` float32 relight of one camera (for stores too big for one
    machine's memory or for a distributed cluster); ``.compute()`` it."""
    import dask.array as da

    c = take.camera_index(camera)
    arr = take.group["olat"]
    _, L, _, H, W = arr.shape
    w, single = _weights3(weights, L)
    if not single:
        raise RelightError("relight_take_dask takes one (L, 3) weight set")
    x = da.from_zarr(arr)[c].rechunk((lights_per_chunk, 3, H, W))
    ws = w[0] * np.float32(take.scale)
    return da.stack([da.tensordot(ws[:, k], x[:, k].astype(np.float32), axes=(0, 0))
                     for k in range(3)]).astype(np.float32)


class OlatSource(Protocol):
    """Anything that can relight itself: a captured take (:class:`TakeSource`) or, later, a
    single portrait lifted into the model (which synthesises OLATs for given directions)."""

    name: str

    @property
    def light_directions(self) -> np.ndarray:  # (L, 3) world frame
        ...

    def relight(self, weights: np.ndarray, progress=None) -> np.ndarray:  # (N, L, 3) -> (N, 3, H, W)
        ...

    def mask(self) -> np.ndarray | None:  # (H, W) bool foreground, or None
        ...


class TakeSource:
    """:class:`OlatSource` over one camera of a store take."""

    def __init__(self, take, camera=0, crop=None, allow_incomplete: bool = False,
                 max_bytes: int = 256 << 20):
        self.take = take
        self.camera = take.camera_index(camera)
        self.crop = crop
        self.allow_incomplete = allow_incomplete
        self.max_bytes = max_bytes
        self.name = f"{take.path} camera {take.cameras[self.camera]}"

    @property
    def light_directions(self) -> np.ndarray:
        return self.take.light_directions

    def relight(self, weights, progress=None) -> np.ndarray:
        w = np.asarray(weights)
        res = relight_take(self.take, self.camera, w if w.ndim == 3 else w[None], crop=self.crop,
                           max_bytes=self.max_bytes, allow_incomplete=self.allow_incomplete,
                           progress=progress)
        return res

    def mask(self) -> np.ndarray | None:
        if "mask" not in self.take.group:
            return None
        m = self.take.mask(self.camera)
        if self.crop is not None:
            y0, y1, x0, x1 = self.crop
            m = m[y0:y1, x0:x1]
        return m if m.any() else None
