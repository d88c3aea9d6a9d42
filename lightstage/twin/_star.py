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
        rel = x - self.centre
        rho = np.sqrt(np.einsum("ij,ij->i", rel, rel))
        return rho - self.lookup(rel).sample1(self.R)

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
        t = np.array(t, dtype=np.float64)
        x = o + d * t[:, None]
        rel = x - self.centre
        rho = np.sqrt(np.einsum("ij,ij->i", rel, rel))
        g = self.lookup(rel).sample(self.geo)  # R, g: one record gather per corner
        f = rho - g[:, 0]
        dfdt = np.einsum("ij,ij->i", d, rel) / rho - (g[:, 0] / rho) * np.einsum(
            "ij,ij->i", d, g[:, 1:]
        )
        # a tangent ray has dfdt ~ 0: damp instead of flying off
        dfdt = np.where(np.abs(dfdt) < 0.05, np.copysign(0.05, dfdt), dfdt)
        t_prev, f_prev = t, f
        t = t - f / dfdt
        for k in range(1, iterations):
            f = self.f(o + d * t[:, None])
            den = f - f_prev
            ok = np.abs(den) > 1e-15
            step = np.where(ok, f * (t - t_prev) / np.where(ok, den, 1.0), 0.0)
            t_prev, f_prev = t, f
            t = t - step
        if not final_check:
            return t, np.abs(f_prev)
        return t, np.abs(self.f(o + d * t[:, None]))

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
        o = np.broadcast_to(np.asarray(o, dtype=np.float64), (m, 3))
        t0, t1 = self.bound(o, d)
        if t_start is not None:
            t0 = np.maximum(t0, t_start)
        if t_end is not None:
            t1 = np.minimum(t1, t_end)
        out = np.full(m, np.inf)
        act = np.flatnonzero(np.isfinite(t0) & (t1 > t0))
        t = t0[act]
        t_prev = t.copy()
        f_prev = np.zeros(act.size)  # f at the last accepted point (0: none yet)
        near = _NEAR if near is None else near
        creep = relax == 1.0 and near < _NEAR
        relax = np.full(act.size, _RELAX if relax is None else relax)
        inv_l = 1.0 / self.lipschitz
        cap = _STEP_ANGLE / (1 + _STEP_ANGLE)
        R = self.R
        lloc = self.lloc
        found_i, found_t, found_a, found_fa, found_fb = [], [], [], [], []
        min_step = _MIN_STEP
        for it in range(max_steps):
            if act.size == 0:
                break
            if it >= _CRAWL_AFTER:
                # the few rays still going are crawling along a surface they graze: let the
                # step floor grow so they finish (slivers thinner than it may be skipped)
                min_step *= _CRAWL_GROWTH
            rel = o[act] + d[act] * t[:, None] - self.centre
            rho = np.sqrt(np.einsum("ij,ij->i", rel, rel))
            lk = self.lookup(rel)
            f = rho - lk.sample1(R)
            bound_l = lloc[lk.idx[0]]
            # relaxed step too long: unbounding spheres do not overlap -> redo it safely
            bad = (relax > 1) & ((np.abs(f) + f_prev) / bound_l < t - t_prev)
            hit = ~bad & (f < near)
            if creep:
                # a grazing ray that moves away from the surface again has passed it
                gone = ~hit & (f > f_prev) & (f_prev > 0)
            else:
                gone = None
            if hit.any():
                found_i.append(act[hit])
                found_t.append(t[hit])
                found_a.append(t_prev[hit])
                found_fa.append(f_prev[hit])
                found_fb.append(f[hit])
            # safe step from the last accepted point for the bad ones
            safe = np.maximum(f_prev / bound_l, min_step)
            step = np.minimum(f / bound_l, cap * rho)
            step = np.maximum(np.maximum(step, f * inv_l), min_step)
            t_new = np.where(bad, t_prev + safe, t + relax * step)
            relax = np.where(bad, 1.0, relax)
            t_prev = np.where(bad, t_prev, t)
            f_prev = np.where(bad, f_prev, f)
            keep = ~hit & (t_new < t1[act])
            if gone is not None:
                keep &= ~gone
            act, t, t_prev, f_prev, relax = act[keep], t_new[keep], t_prev[keep], f_prev[keep], relax[keep]
        if not found_i:
            return out
        idx = np.concatenate(found_i)
        tt = np.concatenate(found_t)
        fb = np.concatenate(found_fb)
        cross = fb < -_NEAR_FINE
        if cross.any():
            # the step crossed the surface (a kink of the bilinear surface can beat the slope
            # bound slightly): Illinois regula falsi inside [last outside point, t]
            ci = np.flatnonzero(cross)
            a = np.concatenate(found_a)[ci]
            fa = np.concatenate(found_fa)[ci]
            b, fb_ = tt[ci], fb[ci]
            oc, dc = o[idx[ci]], d[idx[ci]]
            for _ in range(12):
                tm = b - fb_ * (b - a) / (fb_ - fa)
                fm = self.f(oc + dc * tm[:, None])
                inside = fm < 0
                fa = np.where(inside, fa * 0.5, fm)
                a = np.where(inside, a, tm)
                b = np.where(inside, tm, b)
                fb_ = np.where(inside, fm, fb_ * 0.5)
            tt[ci] = np.where(np.abs(fa) < np.abs(fb_), a, b)
        if polish:
            tn, err = self.newton(o[idx], d[idx], tt, iterations=3)
            # Newton from within _NEAR converges to this first hit unless the ray is grazing;
            # there keep the marched point (within _NEAR of the surface)
            ok = (err < 1e-6) & (tn > tt - 4 * near) & (tn < tt + 4 * near)
            out[idx[ok]] = tn[ok]
            if not ok.all() and near > _NEAR_FINE:
                # grazing rays: creep on with safe steps from the (safe) marched point over a
                # short stretch; beyond it, march normally (the ray may hit something behind)
                j = idx[~ok]
                tj = tt[~ok]
                te = tj + _CREEP
                if t_end is not None:
                    te = np.minimum(te, np.broadcast_to(t_end, (m,))[j])
                tc = self.march(o[j], d[j], t_end=te, t_start=tj, polish=False,
                                near=_NEAR_FINE, relax=1.0, max_steps=max_steps)
                out[j] = tc
                on = np.isinf(tc)
                if on.any():
                    k = j[on]
                    out[k] = self.march(o[k], d[k], t_start=te[on], max_steps=max_steps,
                                        t_end=None if t_end is None else np.broadcast_to(t_end, (m,))[k])
            return out
        out[idx] = tt
        return out


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
