"""Star-shaped surfaces: ray intersection, normals and shadow rays (internal helper of the twin).

A star-shaped surface is ``x = c + R(s) s`` for unit directions s, with the radius R tabulated
on a cube map (:mod:`lightstage.twin._cubemap`) together with g = grad_s ln R, the tangential
gradient of ln R on the unit sphere. With ``rho = |x - c|`` and ``s = (x - c) / rho`` the
implicit function is

    f(x) = rho - R(s),        grad f = s - (R / rho) g(s),

so the outward normal at the surface is ``normalize(s - g)`` (exact for the interpolated R's
smooth counterpart; a sphere, g = 0, gets its analytic normal), and along a ray x = o + t d,
``df/dt = d.s - (R / rho) d.g`` gives Newton steps. ``|df/dt| <= 1 + max|g| = L`` bounds the
slope, so marching with steps ``f / L`` never overshoots the first hit (Hart 1996).

References
----------
Hart, J. C. (1996). Sphere tracing: a geometric method for the antialiased ray tracing of
implicit surfaces. The Visual Computer 12(10).
"""

from __future__ import annotations

import numpy as np

from lightstage.twin import _kernels as _k
from lightstage.twin._cubemap import CubeMap, Lookup

__all__ = ["StarSurface"]

_NEAR = 2e-4  # m: march stops when f < this; Newton then polishes to ~1e-9 m
_NEAR_FINE = 1e-7  # m: the same for grazing rays where Newton is ill-conditioned
_RELAX = 1.6
_CRAWL_AFTER = 48  # march iterations after which the step floor starts to grow ...
_CRAWL_GROWTH = 1.06  # ... by this factor per iteration
_CREEP = 0.01  # m: how far grazing rays creep at full precision before marching on
_MIN_STEP = 1.5e-4  # m: no feature of a head is thinner (keeps grazing rays from crawling)
_STEP_ANGLE = 0.06  # rad: steps using the local slope bound stay within this cone


class StarSurface:
    """Star-shaped surface around ``centre`` from a radius function on a cube map.

    Parameters
    ----------
    centre : (3,) subject-space centre the surface is star-shaped about.
    cube : CubeMap on which ``radius`` is tabulated.
    radius : (T,) radius of every texel direction (metres).
    """

    def __init__(self, centre: np.ndarray, cube: CubeMap, radius: np.ndarray):
        self.centre = np.asarray(centre, dtype=np.float64)
        self.cube = cube
        r = np.asarray(radius, dtype=np.float64)
        self.geo = np.empty((cube.size, 4), dtype=np.float32)  # R, g (3)
        self.geo[:, 0] = r
        self.geo[:, 1:] = _log_gradient(cube, r)
        self.R = np.ascontiguousarray(self.geo[:, 0])  # contiguous: np.take copies strided tables
        self.G = np.ascontiguousarray(self.geo[:, 1:])
        self.r_max = float(r.max()) * 1.002 + 1e-4
        gn = np.linalg.norm(self.geo[:, 1:], axis=1)
        # the bilinear interpolant's slope can slightly exceed the texel gradients
        self.lipschitz = 1.0 + 1.15 * float(gn.max())
        self.lloc = _local_lipschitz(cube, gn, _STEP_ANGLE)

    # ---- evaluation ------------------------------------------------------------------
    def lookup(self, rel: np.ndarray) -> Lookup:
        return self.cube.lookup(rel[:, 0], rel[:, 1], rel[:, 2])

    def f(self, x: np.ndarray) -> np.ndarray:
        """Implicit function at points (M, 3) -> (M,) (positive outside)."""
        rel = np.asarray(x, dtype=np.float64) - self.centre
        return _k.star_f(rel.reshape(-1, 3), self.R, self.cube.n, self.cube.p)

    def surface_points(self, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Surface points (M, 3) and unit normals (M, 3) along unit directions (M, 3)."""
        lk = self.lookup(dirs)
        g = lk.sample(self.geo)
        x = self.centre + dirs * g[:, :1].astype(np.float64)
        n = dirs - g[:, 1:]  # float64 - float32
        n /= np.linalg.norm(n, axis=1, keepdims=True)
        return x, n

    def normals_at(self, x: np.ndarray) -> tuple[np.ndarray, Lookup]:
        """Unit normals (M, 3) float32 at surface points and their texture lookup."""
        rel = x - self.centre
        rho = np.sqrt(np.einsum("ij,ij->i", rel, rel))
        s = (rel / rho[:, None]).astype(np.float32)
        lk = self.lookup(rel)
        n = s - lk.sample(self.G)
        n /= np.linalg.norm(n, axis=1, keepdims=True)
        return n, lk

    # ---- rays ----------------------------------------------------------------------------
    def bound(self, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Entry/exit t (M,) of rays o (M, 3), d (M, 3) with the bounding sphere (nan: miss)."""
        oc = o - self.centre
        b = np.einsum("ij,ij->i", d, oc)
        cc = np.einsum("ij,ij->i", oc, oc) - self.r_max**2
        disc = b * b - cc
        with np.errstate(invalid="ignore"):
            sq = np.sqrt(disc)
        return np.maximum(-b - sq, 0.0), -b + sq

    def newton(
        self, o: np.ndarray, d: np.ndarray, t: np.ndarray, iterations: int = 4,
        final_check: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Refine ray parameters t (M,) near a root; returns (t, |f|).

        One Newton step with the tabulated gradient, then secant steps on f itself (the
        tabulated gradient is not exactly the bilinear interpolant's, so plain Newton would
        converge only linearly). ``final_check=False`` skips the last evaluation and returns
        |f| *before* the last step (the error after it is far smaller).
        """
        d = np.ascontiguousarray(d, dtype=np.float64)
        o = np.asarray(o, dtype=np.float64)
        o = o.reshape(1, 3) if o.ndim == 1 else np.ascontiguousarray(np.broadcast_to(o, d.shape))
        t = np.ascontiguousarray(np.broadcast_to(np.asarray(t, dtype=np.float64), d.shape[:1]))
        # compiled: the same maths as the docstring, one loop per ray (_kernels.star_newton)
        return _k.star_newton(o, d, t, self.centre, self.geo, self.R, self.cube.n, self.cube.p,
                              int(iterations), bool(final_check))

    def march(
        self,
        o: np.ndarray,
        d: np.ndarray,
        t_end: np.ndarray | float | None = None,
        t_start: np.ndarray | float | None = None,
        max_steps: int = 300,
        polish: bool = True,
        near: float | None = None,
        relax: float | None = None,
    ) -> np.ndarray:
        """First hit t (M,) of rays (``inf`` where none before the bounding sphere / t_end).

        ``o`` is (M, 3) or (3,); ``d`` (M, 3) unit; ``t_start`` a lower bound on the first hit
        (where marching may begin). Over-relaxed Lipschitz steps that fall back to the safe
        step whenever two successive unbounding spheres stop overlapping (Keinert et al. 2014),
        so no hit is skipped; once within ``_NEAR`` of the surface, Newton finishes.
        """
        m = d.shape[0]
        d = np.asarray(d, dtype=np.float64)
        o = np.broadcast_to(np.asarray(o, dtype=np.float64), (m, 3))
        ts = np.broadcast_to(np.asarray(-np.inf if t_start is None else t_start, np.float64), (m,))
        te = np.broadcast_to(np.asarray(np.inf if t_end is None else t_end, np.float64), (m,))
        # compiled, one loop per ray (_kernels.star_march): the algorithm described above
        return _k.star_march(
            o, d, ts, te, int(max_steps), bool(polish), _NEAR if near is None else float(near),
            _RELAX if relax is None else float(relax), self.centre, self.geo, self.R, self.lloc,
            self.cube.n, self.cube.p, self.r_max, 1.0 / self.lipschitz,
            _STEP_ANGLE / (1 + _STEP_ANGLE), _MIN_STEP, _CRAWL_AFTER, _CRAWL_GROWTH, _NEAR_FINE,
            _NEAR, _CREEP)


def _log_gradient(cube: CubeMap, radius: np.ndarray) -> np.ndarray:
    """Tangential gradient of ln R at every texel (T, 3) by differences on the face grid.

    The padded face grid is a smooth chart: with texel directions s(u, v), the tangential
    gradient satisfies g . ds/du = d lnR/du and g . ds/dv = d lnR/dv, g . s = 0; solved per texel
    (a 3x3 system). Border texels use one-sided differences.
    """
    dirs = cube.grid(cube.texel_directions())  # (6, P, P, 3)
    lnr = np.log(cube.grid(radius))  # (6, P, P)

    def diff(a, axis):
        g = np.gradient(a, axis=axis)
        return g

    su, sv = diff(dirs, 2), diff(dirs, 1)
    lu, lv = diff(lnr, 2), diff(lnr, 1)
    A = np.stack([su, sv, dirs], axis=-2)  # rows: ds/du, ds/dv, s
    rhs = np.stack([lu, lv, np.zeros_like(lu)], axis=-1)
    g = np.linalg.solve(A, rhs[..., None])[..., 0]
    return g.reshape(-1, 3)


def _local_lipschitz(cube: CubeMap, gn: np.ndarray, step_angle: float, nc: int = 16) -> np.ndarray:
    """Per-texel slope bound 1 + max|g| over all texels within ``step_angle`` (plus bin size).

    Texels are grouped into nc x nc bins per face; a bin's bound is the max over bins whose
    angular extent comes within ``step_angle`` of it, so a march step that moves the direction
    by less than ``step_angle`` never leaves the region the bound covers.
    """
    n, p = cube.n, cube.p
    dirs = cube.texel_directions()
    face = np.repeat(np.arange(6), p * p)
    iv = np.tile(np.repeat(np.arange(p), p), 6)
    iu = np.tile(np.arange(p), 6 * p)
    bu = np.clip((iu - 1) * nc // n, 0, nc - 1)
    bv = np.clip((iv - 1) * nc // n, 0, nc - 1)
    b = face * nc * nc + bv * nc + bu
    nb = 6 * nc * nc
    bmax = np.zeros(nb)
    np.maximum.at(bmax, b, gn)
    cen = np.zeros((nb, 3))
    np.add.at(cen, b, dirs)
    cen /= np.linalg.norm(cen, axis=1, keepdims=True)
    ang = np.arccos(np.clip(np.einsum("ij,ij->i", dirs, cen[b]), -1, 1))
    rad = np.zeros(nb)
    np.maximum.at(rad, b, ang)
    cc = np.arccos(np.clip(cen @ cen.T, -1, 1))
    near = cc <= rad[:, None] + rad[None, :] + step_angle
    bd = np.where(near, bmax[None, :], 0).max(1)
    return (1.0 + 1.15 * bd[b]).astype(np.float32)
