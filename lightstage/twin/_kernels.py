"""Compiled per-pixel loops of the twin's renderer (numba; internal helper).

The renderer's algorithms are described in :mod:`lightstage.twin.render` and
:mod:`lightstage.twin._star`; these kernels run the hot ones as scalar loops instead of many
whole-array numpy passes (each numpy pass over ~80k pixels reads and writes every temporary,
so a Newton step costs ~20 passes; here it is one loop with everything in registers):

* cube-map bilinear lookups (the same face / texel / weight rules as
  :meth:`lightstage.twin._cubemap.CubeMap.lookup`),
* the star surface's implicit function and its Newton/secant refinement
  (:meth:`StarSurface.newton`),
* the moved-subject geometry pass (splat the rest pass's points with a depth test, Newton
  along every pixel's own ray; :meth:`StarScene._posed_t`),
* G-buffer assembly (normals, materials, visibility lookups),
* shadow maps and their PCF test (:meth:`StarScene._compute_visibility`),
* shading (:func:`lightstage.twin.render._shade`): per light, per pixel, the same float32
  expression whichever other lights are rendered with it (superposition stays exact), summed
  into float64.

All kernels are compiled with ``cache=True`` (the machine code is stored next to this file
in ``__pycache__``, so only the first run on a machine pays the compile) and without
fastmath, so results are IEEE-deterministic: same inputs, same bytes, in any process.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

__all__ = [
    "star_f",
    "star_f_lloc",
    "star_newton",
    "rest_shift",
    "posed_geometry",
    "gbuffer",
    "shadow_table",
    "shade",
]

_jit = nb.njit(cache=True, nogil=True, error_model="numpy")


@nb.njit(cache=True, nogil=True)
def _lookup(x, y, z, n, p):
    """Cube-map bilinear lookup of direction (x, y, z): base texel index and weights (wu, wv)
    (corners base, base + 1, base + p, base + p + 1)."""
    ax, ay, az = abs(x), abs(y), abs(z)
    if ax >= ay and ax >= az:
        major, sb, sc, face = x, y, z, 0
    elif ay >= az:
        major, sb, sc, face = y, z, x, 2
    else:
        major, sb, sc, face = z, x, y, 4
    if major < 0:
        face += 1
    h = n * 0.5
    inv = h / abs(major)
    fu = sb * inv + (h + 0.5)
    fv = sc * inv + (h + 0.5)
    iu = min(int(fu), n)
    iv = min(int(fv), n)
    return face * (p * p) + iv * p + iu, fu - iu, fv - iv


@nb.njit(cache=True, nogil=True)
def _sample1(tab, b, wu, wv, p):
    return ((1 - wu) * (1 - wv) * tab[b] + wu * (1 - wv) * tab[b + 1]
            + (1 - wu) * wv * tab[b + p] + wu * wv * tab[b + p + 1])


@nb.njit(cache=True, nogil=True)
def _f_at(ox, oy, oz, dx, dy, dz, t, c, R, n, p):
    rx = ox + dx * t - c[0]
    ry = oy + dy * t - c[1]
    rz = oz + dz * t - c[2]
    rho = math.sqrt(rx * rx + ry * ry + rz * rz)
    b, wu, wv = _lookup(rx, ry, rz, n, p)
    return rho - _sample1(R, b, wu, wv, p)


@_jit
def star_f(rel, R, n, p):
    """f = |rel| - R(rel / |rel|) at points relative to the centre, rel (M, 3) -> (M,)."""
    m = rel.shape[0]
    out = np.empty(m)
    for i in range(m):
        x, y, z = rel[i, 0], rel[i, 1], rel[i, 2]
        b, wu, wv = _lookup(x, y, z, n, p)
        out[i] = math.sqrt(x * x + y * y + z * z) - _sample1(R, b, wu, wv, p)
    return out


@_jit
def star_f_lloc(rel, R, lloc, n, p):
    """f (as :func:`star_f`) and the local slope bound of the lookup's first texel, (M,) each."""
    m = rel.shape[0]
    f = np.empty(m)
    bl = np.empty(m, np.float32)
    for i in range(m):
        x, y, z = rel[i, 0], rel[i, 1], rel[i, 2]
        b, wu, wv = _lookup(x, y, z, n, p)
        f[i] = math.sqrt(x * x + y * y + z * z) - _sample1(R, b, wu, wv, p)
        bl[i] = lloc[b]
    return f, bl


@nb.njit(cache=True, nogil=True)
def _newton_first(ox, oy, oz, dx, dy, dz, t, c, geo, n, p):
    """The first (analytic-derivative) Newton step of one ray from t: returns (f at t, the
    stepped t). Shared by the single-ray and lockstep-batch refinements."""
    rx = ox + dx * t - c[0]
    ry = oy + dy * t - c[1]
    rz = oz + dz * t - c[2]
    rho = math.sqrt(rx * rx + ry * ry + rz * rz)
    b, wu, wv = _lookup(rx, ry, rz, n, p)
    w00, w01, w10, w11 = (1 - wu) * (1 - wv), wu * (1 - wv), (1 - wu) * wv, wu * wv
    q0, q1, q2, q3 = b, b + 1, b + p, b + p + 1
    g0 = w00 * geo[q0, 0] + w01 * geo[q1, 0] + w10 * geo[q2, 0] + w11 * geo[q3, 0]
    g1 = w00 * geo[q0, 1] + w01 * geo[q1, 1] + w10 * geo[q2, 1] + w11 * geo[q3, 1]
    g2 = w00 * geo[q0, 2] + w01 * geo[q1, 2] + w10 * geo[q2, 2] + w11 * geo[q3, 2]
    g3 = w00 * geo[q0, 3] + w01 * geo[q1, 3] + w10 * geo[q2, 3] + w11 * geo[q3, 3]
    f = rho - g0
    dfdt = (dx * rx + dy * ry + dz * rz) / rho - (g0 / rho) * (dx * g1 + dy * g2 + dz * g3)
    if abs(dfdt) < 0.05:  # a tangent ray: damp instead of flying off
        dfdt = 0.05 if dfdt >= 0 else -0.05
    return f, t - f / dfdt


@nb.njit(cache=True, nogil=True)
def _newton1(ox, oy, oz, dx, dy, dz, t, c, geo, R, n, p, iterations):
    """One ray's Newton + secant refinement (the maths of StarSurface.newton); returns
    (t, f before the last step)."""
    f, t_new = _newton_first(ox, oy, oz, dx, dy, dz, t, c, geo, n, p)
    t_prev, f_prev = t, f
    t = t_new
    for _ in range(1, iterations):
        f = _f_at(ox, oy, oz, dx, dy, dz, t, c, R, n, p)
        den = f - f_prev
        step = f * (t - t_prev) / den if abs(den) > 1e-15 else 0.0
        t_prev, f_prev = t, f
        t = t - step
    return t, f_prev


@nb.njit(cache=True, nogil=True)
def _newton_batch(o, d, t0, c, geo, R, n, p, iterations, t_out, err_out, final_check):
    """_newton1 for many rays, run in lockstep over chunks of rays: each step's texture
    lookups of a chunk are independent, so their cache misses overlap (one ray's steps form
    a dependency chain and would wait for every miss in turn). o (M, 3) or (1, 3)."""
    m = d.shape[0]
    B = 32
    tb = np.empty(B)
    tp = np.empty(B)
    fp = np.empty(B)
    one_o = o.shape[0] == 1
    for s0 in range(0, m, B):
        nb_ = min(B, m - s0)
        for k in range(nb_):
            i = s0 + k
            oi = 0 if one_o else i
            ox, oy, oz = o[oi, 0], o[oi, 1], o[oi, 2]
            dx, dy, dz = d[i, 0], d[i, 1], d[i, 2]
            t = t0[i]
            f, tn = _newton_first(ox, oy, oz, dx, dy, dz, t, c, geo, n, p)
            tb[k] = tn
            tp[k] = t
            fp[k] = f
        for _ in range(1, iterations):
            for k in range(nb_):
                i = s0 + k
                oi = 0 if one_o else i
                t = tb[k]
                f = _f_at(o[oi, 0], o[oi, 1], o[oi, 2], d[i, 0], d[i, 1], d[i, 2], t, c, R, n, p)
                den = f - fp[k]
                step = f * (t - tp[k]) / den if abs(den) > 1e-15 else 0.0
                tp[k] = t
                fp[k] = f
                tb[k] = t - step
        for k in range(nb_):
            i = s0 + k
            oi = 0 if one_o else i
            t_out[i] = tb[k]
            if final_check:
                err_out[i] = abs(_f_at(o[oi, 0], o[oi, 1], o[oi, 2], d[i, 0], d[i, 1], d[i, 2],
                                       tb[k], c, R, n, p))
            else:
                err_out[i] = abs(fp[k])


@_jit
def star_newton(o, d, t0, c, geo, R, n, p, iterations, final_check):
    """Newton/secant refinement of t0 (M,) along rays o (M, 3) or (1, 3), d (M, 3): (t, |f|)."""
    m = d.shape[0]
    t_out = np.empty(m)
    err = np.empty(m)
    _newton_batch(o, d, t0, c, geo, R, n, p, iterations, t_out, err, final_check)
    return t_out, err


@nb.njit(cache=True, nogil=True)
def _project(o_w, d_src, j, tt, T, w2c, K, dist):
    """Pixel (u, v) and camera depth z of rest point o_w + t d_src[j] moved by T."""
    X0 = o_w[0] + d_src[j, 0] * tt
    X1 = o_w[1] + d_src[j, 1] * tt
    X2 = o_w[2] + d_src[j, 2] * tt
    Y0 = T[0, 0] * X0 + T[0, 1] * X1 + T[0, 2] * X2 + T[0, 3]
    Y1 = T[1, 0] * X0 + T[1, 1] * X1 + T[1, 2] * X2 + T[1, 3]
    Y2 = T[2, 0] * X0 + T[2, 1] * X1 + T[2, 2] * X2 + T[2, 3]
    px = w2c[0, 0] * Y0 + w2c[0, 1] * Y1 + w2c[0, 2] * Y2 + w2c[0, 3]
    py = w2c[1, 0] * Y0 + w2c[1, 1] * Y1 + w2c[1, 2] * Y2 + w2c[1, 3]
    z = w2c[2, 0] * Y0 + w2c[2, 1] * Y1 + w2c[2, 2] * Y2 + w2c[2, 3]
    if not z > 0:
        return False, 0.0, 0.0, z
    k1, k2, p1, p2, k3 = dist[0], dist[1], dist[2], dist[3], dist[4]
    x = px / z
    y = py / z
    r2 = x * x + y * y
    rad = 1 + k1 * r2 + k2 * r2 * r2 + k3 * r2 * r2 * r2
    xd = x * rad + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * rad + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return True, K[0, 0] * xd + K[0, 1] * yd + K[0, 2], K[1, 1] * yd + K[1, 2], z


@_jit
def rest_shift(t_src, d_src, src_row0, W, o_w, T, w2c, K, dist):
    """Largest image shift (px) under motion T of the rest points of rows from ``src_row0``
    (t_src (S,), d_src (S, 3)): how far the visible surface moves in the image."""
    shift = 0.0
    for j in range(t_src.shape[0]):
        ts = t_src[j]
        if not math.isfinite(ts):
            continue
        ok, u, v, z = _project(o_w, d_src, j, np.float64(ts), T, w2c, K, dist)
        if not ok:
            continue
        q = j + src_row0 * W
        du = u - (q % W)
        dv = v - (q // W)
        shift = max(shift, math.sqrt(du * du + dv * dv))
    return shift


@_jit
def posed_geometry(t_src, d_src, src_row0, o_w, T, w2c, K, dist, d_blk, r0, r1, W,
                   Ti, c, geo, R, n, p, err_tol, dt_tol):
    """Moved-subject geometry of image rows [r0, r1) (see StarScene._posed_t).

    t_src (S,) rest ray parameters of the source rows (from ``src_row0``), d_src (S, 3) their
    world directions; o_w camera centre; T subject motion (4, 4); w2c world -> camera; K, dist
    the camera model; d_blk ((r1 - r0) W, 3) world directions of the block's pixels; Ti
    inverse motion. Returns t (nb,) (inf: miss or undecided), bad (nb,) bool (Newton failed:
    march these) and lo (nb,), the 3x3 minimum of the splatted guesses (march start).
    """
    nbk = (r1 - r0) * W
    bestq = np.full(nbk, np.inf)
    bestj = np.full(nbk, -1, np.int64)
    for j in range(t_src.shape[0]):
        ts = t_src[j]
        if not math.isfinite(ts):
            continue
        tt = np.float64(ts)
        ok, u, v, z = _project(o_w, d_src, j, tt, T, w2c, K, dist)
        if not ok:
            continue
        iu = int(np.rint(u))
        iv = int(np.rint(v))
        if iu < 0 or iu >= W or iv < r0 or iv >= r1:
            continue
        # depth test on the quantised depth; ties go to the first sample (row-major order)
        zq = math.floor(z * 1e6)
        k = (iv - r0) * W + iu
        if zq < bestq[k]:
            bestq[k] = zq
            bestj[k] = j
    H = r1 - r0
    # pinholes between splats take the nearest of their 3x3 neighbourhood
    srcj = bestj.copy()
    for yy in range(H):
        for xx in range(W):
            k = yy * W + xx
            if bestj[k] >= 0:
                continue
            bq = np.inf
            bj = -1
            for ny in range(max(yy - 1, 0), min(yy + 2, H)):
                for nx in range(max(xx - 1, 0), min(xx + 2, W)):
                    kk = ny * W + nx
                    if bestj[kk] >= 0 and (bestq[kk] < bq or (bestq[kk] == bq and bestj[kk] < bj)):
                        bq = bestq[kk]
                        bj = bestj[kk]
            srcj[k] = bj
    os0 = Ti[0, 0] * o_w[0] + Ti[0, 1] * o_w[1] + Ti[0, 2] * o_w[2] + Ti[0, 3]
    os1 = Ti[1, 0] * o_w[0] + Ti[1, 1] * o_w[1] + Ti[1, 2] * o_w[2] + Ti[1, 3]
    os2 = Ti[2, 0] * o_w[0] + Ti[2, 1] * o_w[1] + Ti[2, 2] * o_w[2] + Ti[2, 3]
    t_out = np.full(nbk, np.inf)
    guess = np.full(nbk, np.inf)
    bad = np.zeros(nbk, np.bool_)
    cnt = 0
    for k in range(nbk):
        if srcj[k] >= 0:
            cnt += 1
    pix = np.empty(cnt, np.int64)
    ds = np.empty((cnt, 3))
    g_ = np.empty(cnt)
    cnt = 0
    for k in range(nbk):
        j = srcj[k]
        if j < 0:
            continue
        dw0, dw1, dw2 = d_blk[k, 0], d_blk[k, 1], d_blk[k, 2]
        ds0 = Ti[0, 0] * dw0 + Ti[0, 1] * dw1 + Ti[0, 2] * dw2
        ds1 = Ti[1, 0] * dw0 + Ti[1, 1] * dw1 + Ti[1, 2] * dw2
        ds2 = Ti[2, 0] * dw0 + Ti[2, 1] * dw1 + Ti[2, 2] * dw2
        tt = np.float64(t_src[j])
        # the rest point is the subject-space point this pixel's splat came from
        g = (ds0 * (o_w[0] + d_src[j, 0] * tt - os0) + ds1 * (o_w[1] + d_src[j, 1] * tt - os1)
             + ds2 * (o_w[2] + d_src[j, 2] * tt - os2))
        guess[k] = g
        pix[cnt] = k
        ds[cnt, 0], ds[cnt, 1], ds[cnt, 2] = ds0, ds1, ds2
        g_[cnt] = g
        cnt += 1
    o1 = np.empty((1, 3))
    o1[0, 0], o1[0, 1], o1[0, 2] = os0, os1, os2
    tn = np.empty(cnt)
    err = np.empty(cnt)
    _newton_batch(o1, ds, g_, c, geo, R, n, p, 3, tn, err, True)
    for q in range(cnt):
        k = pix[q]
        if err[q] < err_tol and abs(tn[q] - g_[q]) < dt_tol:
            t_out[k] = tn[q]
        else:
            bad[k] = True
    lo = np.full(nbk, np.inf)
    for k in range(nbk):
        if not bad[k]:
            continue
        yy, xx = k // W, k % W
        m = np.inf
        for ny in range(max(yy - 1, 0), min(yy + 2, H)):
            for nx in range(max(xx - 1, 0), min(xx + 2, W)):
                m = min(m, guess[ny * W + nx])
        lo[k] = m
    return t_out, bad, lo


@_jit
def gbuffer(o_s, Rm, d_w, t, c, G, mat, n, p, vn, vp):
    """Surface data of M hit pixels along subject-space rays o_s + t Rm d_w (d_w (M, 3) world
    directions, Rm the world -> subject rotation): point x (M, 3) float64, normal (M, 3)
    float32, material (M, C) float32, view vector (M, 3) float32, n.v (M,) float32 and the
    visibility cube map's lookup (4 texel indices (4, M) int64, 4 weights (4, M) float32)."""
    m = t.shape[0]
    C = mat.shape[1]
    x = np.empty((m, 3))
    nrm = np.empty((m, 3), np.float32)
    mo = np.empty((m, C), np.float32)
    v = np.empty((m, 3), np.float32)
    ndv = np.empty(m, np.float32)
    vidx = np.empty((4, m), np.int64)
    vw = np.empty((4, m), np.float32)
    for i in range(m):
        a, b_, c_ = d_w[i, 0], d_w[i, 1], d_w[i, 2]
        e0 = Rm[0, 0] * a + Rm[0, 1] * b_ + Rm[0, 2] * c_
        e1 = Rm[1, 0] * a + Rm[1, 1] * b_ + Rm[1, 2] * c_
        e2 = Rm[2, 0] * a + Rm[2, 1] * b_ + Rm[2, 2] * c_
        x0 = o_s[0] + e0 * t[i]
        x1 = o_s[1] + e1 * t[i]
        x2 = o_s[2] + e2 * t[i]
        x[i, 0], x[i, 1], x[i, 2] = x0, x1, x2
        r0, r1, r2 = x0 - c[0], x1 - c[1], x2 - c[2]
        rho = math.sqrt(r0 * r0 + r1 * r1 + r2 * r2)
        b, wu, wv = _lookup(r0, r1, r2, n, p)
        w00 = np.float32((1 - wu) * (1 - wv))
        w01 = np.float32(wu * (1 - wv))
        w10 = np.float32((1 - wu) * wv)
        w11 = np.float32(wu * wv)
        s0, s1, s2 = np.float32(r0 / rho), np.float32(r1 / rho), np.float32(r2 / rho)
        g0 = w00 * G[b, 0] + w01 * G[b + 1, 0] + w10 * G[b + p, 0] + w11 * G[b + p + 1, 0]
        g1 = w00 * G[b, 1] + w01 * G[b + 1, 1] + w10 * G[b + p, 1] + w11 * G[b + p + 1, 1]
        g2 = w00 * G[b, 2] + w01 * G[b + 1, 2] + w10 * G[b + p, 2] + w11 * G[b + p + 1, 2]
        a0, a1, a2 = s0 - g0, s1 - g1, s2 - g2
        inv = np.float32(1) / np.float32(math.sqrt(a0 * a0 + a1 * a1 + a2 * a2))
        nrm[i, 0], nrm[i, 1], nrm[i, 2] = a0 * inv, a1 * inv, a2 * inv
        for k in range(C):
            mo[i, k] = (w00 * mat[b, k] + w01 * mat[b + 1, k] + w10 * mat[b + p, k]
                        + w11 * mat[b + p + 1, k])
        v0, v1, v2 = np.float32(-e0), np.float32(-e1), np.float32(-e2)
        v[i, 0], v[i, 1], v[i, 2] = v0, v1, v2
        ndv[i] = nrm[i, 0] * v0 + nrm[i, 1] * v1 + nrm[i, 2] * v2
        vb, vu, vv = _lookup(r0, r1, r2, vn, vp)
        vidx[0, i], vidx[1, i], vidx[2, i], vidx[3, i] = vb, vb + 1, vb + vp, vb + vp + 1
        vw[0, i] = np.float32((1 - vu) * (1 - vv))
        vw[1, i] = np.float32(vu * (1 - vv))
        vw[2, i] = np.float32((1 - vu) * vv)
        vw[3, i] = np.float32(vu * vv)
    return x, nrm, mo, v, ndv, vidx, vw


@_jit
def shadow_table(occ, x, nrm, q, B, origin, distant, D, px, offset, bias0, max_wrap):
    """One light's visibility table (T_vis,) uint8 (255 = lit): splat the occluder points
    (3, N) float32 into a D x D shadow map (nearest depth, 2x2 pinhole closing), then a
    normal-offset, slope-biased 2x2 PCF test of every receiver x (T_vis, 3) with normal nrm.
    B (3, 3) rows are the map's u, v and depth axes about ``origin`` (the light for a point
    light, the subject centre for a distant one); px the map's pixel size (angle or metres)."""
    f32 = np.float32
    Bf = B.astype(np.float32)
    o0 = f32(B[0, 0] * origin[0] + B[0, 1] * origin[1] + B[0, 2] * origin[2])
    o1 = f32(B[1, 0] * origin[0] + B[1, 1] * origin[1] + B[1, 2] * origin[2])
    o2 = f32(B[2, 0] * origin[0] + B[2, 1] * origin[1] + B[2, 2] * origin[2])
    half = f32(D / 2)
    ipx = f32(1 / px)
    pxf = f32(px)
    depth = np.full((D, D), np.inf, np.float32)
    for i in range(occ.shape[1]):
        a, b_, c_ = occ[0, i], occ[1, i], occ[2, i]
        w0 = a * Bf[0, 0] + b_ * Bf[0, 1] + c_ * Bf[0, 2] - o0
        w1 = a * Bf[1, 0] + b_ * Bf[1, 1] + c_ * Bf[1, 2] - o1
        w2 = a * Bf[2, 0] + b_ * Bf[2, 1] + c_ * Bf[2, 2] - o2
        if distant:
            u = w0 * ipx + half
            v = w1 * ipx + half
        else:
            inv = f32(1) / (w2 * pxf)
            u = w0 * inv + half
            v = w1 * inv + half
        iu = min(max(int(u), 0), D - 1)
        iv = min(max(int(v), 0), D - 1)
        if w2 < depth[iv, iu]:
            depth[iv, iu] = w2
    for iv in range(D - 1):
        for iu in range(D - 1):
            depth[iv, iu] = min(min(depth[iv, iu], depth[iv + 1, iu]),
                                min(depth[iv, iu + 1], depth[iv + 1, iu + 1]))
    m = x.shape[0]
    tab = np.zeros(m, np.uint8)
    for i in range(m):
        if distant:
            l0, l1, l2 = q[0], q[1], q[2]
        else:
            l0, l1, l2 = q[0] - x[i, 0], q[1] - x[i, 1], q[2] - x[i, 2]
            ln = math.sqrt(l0 * l0 + l1 * l1 + l2 * l2)
            l0, l1, l2 = l0 / ln, l1 / ln, l2 / ln
        ndl = nrm[i, 0] * l0 + nrm[i, 1] * l1 + nrm[i, 2] * l2
        if not ndl > -max_wrap - 0.05:
            continue
        a = f32(x[i, 0] + offset * nrm[i, 0])
        b_ = f32(x[i, 1] + offset * nrm[i, 1])
        c_ = f32(x[i, 2] + offset * nrm[i, 2])
        w0 = a * Bf[0, 0] + b_ * Bf[0, 1] + c_ * Bf[0, 2] - o0
        w1 = a * Bf[1, 0] + b_ * Bf[1, 1] + c_ * Bf[1, 2] - o1
        z = a * Bf[2, 0] + b_ * Bf[2, 1] + c_ * Bf[2, 2] - o2
        if distant:
            u = w0 * ipx + half
            v = w1 * ipx + half
            foot = px
        else:
            inv = f32(1) / (z * pxf)
            u = w0 * inv + half
            v = w1 * inv + half
            foot = px * z
        tan = math.sqrt(min(max(1 - ndl * ndl, 0.0), 1.0)) / max(abs(ndl), 0.2)
        zb = z - (bias0 + 1.5 * foot * tan)
        u0 = u - 0.5
        v0 = v - 0.5
        iu = min(max(int(math.floor(u0)), 0), D - 2)
        iv = min(max(int(math.floor(v0)), 0), D - 2)
        wu = min(max(u0 - iu, 0.0), 1.0)
        wv = min(max(v0 - iv, 0.0), 1.0)
        lit = ((1 - wu) * (1 - wv) * (zb <= depth[iv, iu]) + wu * (1 - wv) * (zb <= depth[iv, iu + 1])
               + (1 - wu) * wv * (zb <= depth[iv + 1, iu]) + wu * wv * (zb <= depth[iv + 1, iu + 1]))
        tab[i] = np.uint8(np.rint(lit * 255))
    return tab


@_jit
def _light_terms(P, V, lx0, ly0, lz0, distant, T):
    """One light's float32 terms T (3, m) from the per-pixel planes P (21, m) (rows: normal,
    view vector, point, albedo_c / pi / (1 + w_c), wrap w_c, a^2, a^2 - 1, 1 - a^2, f0, 1 - f0,
    the light-independent specular factor) and visibility V (m,). Everything in one (K, m)
    array and one output array: few enough pointers for LLVM to vectorise the loop."""
    f32 = np.float32
    m = P.shape[1]
    for i in range(m):
        nx = P[0, i]; ny = P[1, i]; nz = P[2, i]
        vx = P[3, i]; vy = P[4, i]; vz = P[5, i]
        if distant:
            lx = lx0; ly = ly0; lz = lz0
            E = V[i]
        else:
            lx = lx0 - P[6, i]; ly = ly0 - P[7, i]; lz = lz0 - P[8, i]
            inv = f32(1) / np.sqrt(lx * lx + ly * ly + lz * lz)
            lx = lx * inv; ly = ly * inv; lz = lz * inv
            E = inv * inv * V[i]
        ndl = nx * lx + ny * ly + nz * lz
        hx = lx + vx; hy = ly + vy; hz = lz + vz
        h2 = hx * hx + hy * hy + hz * hz
        ndh = nx * hx + ny * hy + nz * hz
        vdh = (vx * hx + vy * hy + vz * hz) / np.sqrt(h2)
        ndh2 = ndh * ndh / h2
        den = ndh2 * P[16, i] + f32(1)
        den = den * den
        mm = f32(1) - min(max(vdh, f32(0)), f32(1))
        m2 = mm * mm
        F = P[19, i] * (mm * m2 * m2) + P[18, i]
        ndl_c = max(ndl, f32(0))
        g1l = f32(2) * ndl_c / (ndl_c + np.sqrt(P[15, i] + P[17, i] * ndl_c * ndl_c) + f32(1e-12))
        spec = P[20, i] * g1l * F / den
        T[0, i] = (max(ndl + P[12, i], f32(0)) * P[9, i] + spec) * E
        T[1, i] = (max(ndl + P[13, i], f32(0)) * P[10, i] + spec) * E
        T[2, i] = (max(ndl + P[14, i], f32(0)) * P[11, i] + spec) * E

@_jit
def shade(nrm, v, x, mat, ndv, vidx, vw, lp, rgb, vis, use_vis, distant):
    """Radiance (3, M) float64 of M surface pixels summed over lights (see render._shade).

    Per light and pixel, in float32: ``T_c = E V [albedo_c / pi * wrap_c(n.l) + ks D G F /
    (4 n.v)]``, added into float64 as ``rgb_c * T_c``. Each light's term is the same
    expression whichever lights are rendered with it, so superposition is exact to float64
    summation. Lights are the outer loop so the pixel loops run over contiguous planes.
    """
    f32 = np.float32
    m = nrm.shape[0]
    L = lp.shape[0]
    acc = np.zeros((3, m))
    P = np.empty((21, m), np.float32)
    ipi = f32(1 / np.pi)
    for i in range(m):
        for k in range(3):
            P[k, i] = nrm[i, k]
            P[3 + k, i] = v[i, k]
            P[6 + k, i] = np.float32(x[i, k])
            P[9 + k, i] = (mat[i, k] * ipi) / (f32(1) + mat[i, 6 + k])
            P[12 + k, i] = mat[i, 6 + k]
        al = mat[i, 3]
        a2 = al * al
        P[15, i] = a2
        P[16, i] = a2 - f32(1)
        P[17, i] = f32(1) - a2
        P[18, i] = mat[i, 4]
        P[19, i] = f32(1) - mat[i, 4]
        nv = max(ndv[i], f32(1e-4))
        g1v = f32(2) * nv / (nv + np.sqrt(a2 + (f32(1) - a2) * nv * nv))
        P[20, i] = mat[i, 5] * g1v / (f32(4) * nv) * ipi * a2 if ndv[i] > 0 else f32(0)
    V = np.empty(m, np.float32)
    T = np.empty((3, m), np.float32)
    s255 = f32(1 / 255)
    W4 = vw * s255
    I4 = vidx.astype(np.int32)
    for j in range(L):
        if use_vis:
            tab = vis[j]
            for i in range(m):
                V[i] = (f32(tab[I4[0, i]]) * W4[0, i] + f32(tab[I4[1, i]]) * W4[1, i]
                        + f32(tab[I4[2, i]]) * W4[2, i] + f32(tab[I4[3, i]]) * W4[3, i])
        else:
            V[:] = f32(1)
        _light_terms(P, V, lp[j, 0], lp[j, 1], lp[j, 2], distant, T)
        for c in range(3):
            cc = np.float64(rgb[j, c])
            for i in range(m):
                acc[c, i] += cc * T[c, i]
    return acc


@nb.njit(cache=True, nogil=True)
def _march_core(ox, oy, oz, dx, dy, dz, t0, t1, max_steps, near, relax0, creep, c, R, lloc,
                n, p, inv_l, cap, min_step0, crawl_after, crawl_growth, near_fine):
    """One ray's relaxed sphere tracing from t0 to t1 (StarSurface.march's main loop) and the
    regula-falsi fix of a step that crossed the surface: (found, t)."""
    t = t0
    t_prev = t
    f_prev = 0.0
    relax = relax0
    min_step = min_step0
    for it in range(max_steps):
        if it >= crawl_after:
            min_step *= crawl_growth
        rx = ox + dx * t - c[0]
        ry = oy + dy * t - c[1]
        rz = oz + dz * t - c[2]
        rho = math.sqrt(rx * rx + ry * ry + rz * rz)
        b, wu, wv = _lookup(rx, ry, rz, n, p)
        f = rho - _sample1(R, b, wu, wv, p)
        bound_l = np.float64(lloc[b])
        bad = relax > 1 and (abs(f) + f_prev) / bound_l < t - t_prev
        hit = (not bad) and f < near
        if hit:
            if f < -near_fine:
                # the step crossed the surface: Illinois regula falsi in [last outside, t]
                a, fa, bb, fb = t_prev, f_prev, t, f
                for _ in range(12):
                    tm = bb - fb * (bb - a) / (fb - fa)
                    fm = _f_at(ox, oy, oz, dx, dy, dz, tm, c, R, n, p)
                    if fm < 0:
                        fa = fa * 0.5
                        bb = tm
                        fb = fm
                    else:
                        fa = fm
                        a = tm
                        fb = fb * 0.5
                t = a if abs(fa) < abs(fb) else bb
            return True, t
        gone = creep and f > f_prev and f_prev > 0
        safe = max(f_prev / bound_l, min_step)
        step = min(f / bound_l, cap * rho)
        step = max(max(step, f * inv_l), min_step)
        if bad:
            t_new = t_prev + safe
            relax = 1.0
        else:
            t_new = t + relax * step
            t_prev = t
            f_prev = f
        if not t_new < t1 or gone:
            return False, np.inf
        t = t_new
    return False, np.inf


@_jit
def star_march(o, d, t_start, t_end, max_steps, polish, near, relax0, c, geo, R, lloc, n, p,
               r_max, inv_l, cap, min_step, crawl_after, crawl_growth, near_fine, near_default,
               creep_len):
    """First hit t (M,) of rays o (M, 3), d (M, 3) within [t_start, t_end] (M,) each
    (StarSurface.march: march, regula falsi, Newton polish; grazing rays creep on at full
    precision over ``creep_len`` and then march on)."""
    m = d.shape[0]
    out = np.full(m, np.inf)
    creep0 = relax0 == 1.0 and near < near_default
    for i in range(m):
        ox, oy, oz = o[i, 0], o[i, 1], o[i, 2]
        dx, dy, dz = d[i, 0], d[i, 1], d[i, 2]
        # bounding sphere
        qx, qy, qz = ox - c[0], oy - c[1], oz - c[2]
        bq = dx * qx + dy * qy + dz * qz
        disc = bq * bq - (qx * qx + qy * qy + qz * qz - r_max * r_max)
        if not disc >= 0:
            continue
        sq = math.sqrt(disc)
        tb0 = max(-bq - sq, 0.0)
        tb1 = -bq + sq
        ts = max(tb0, t_start[i])
        te_all = min(tb1, t_end[i])
        while True:
            if not (math.isfinite(ts) and te_all > ts):
                break
            found, tt = _march_core(ox, oy, oz, dx, dy, dz, ts, te_all, max_steps, near, relax0,
                                    creep0, c, R, lloc, n, p, inv_l, cap, min_step, crawl_after,
                                    crawl_growth, near_fine)
            if not found:
                break
            if not polish:
                out[i] = tt
                break
            tn, _ = _newton1(ox, oy, oz, dx, dy, dz, tt, c, geo, R, n, p, 3)
            err = abs(_f_at(ox, oy, oz, dx, dy, dz, tn, c, R, n, p))
            if err < 1e-6 and tn > tt - 4 * near and tn < tt + 4 * near:
                out[i] = tn
                break
            if not near > near_fine:
                break
            # grazing: creep on with safe steps over a short stretch at full precision; beyond
            # it, march normally (the ray may hit something behind)
            te = min(tt + creep_len, t_end[i])
            te_c = min(tb1, te)
            if te_c > tt:
                found, tc = _march_core(ox, oy, oz, dx, dy, dz, tt, te_c, max_steps, near_fine, 1.0,
                                        True, c, R, lloc, n, p, inv_l, cap, min_step, crawl_after,
                                        crawl_growth, near_fine)
                if found:
                    out[i] = tc
                    break
            ts = max(tb0, te)
    return out


@nb.njit(inline="always", error_model="numpy")
def _plane_hit(xy, Jinv, iy, ix, ddx, ddy, Rc, origin, Rb, tb, z0, z1, z2, tz, size):
    """Board coordinates (lx, ly) where the sub-sample (ddx, ddy) of pixel (iy, ix) hits the
    plane's printed face, and whether it does (in front of the camera, inside ``size``)."""
    x = xy[iy, ix, 0] + Jinv[iy, ix, 0, 0] * ddx + Jinv[iy, ix, 0, 1] * ddy
    y = xy[iy, ix, 1] + Jinv[iy, ix, 1, 0] * ddx + Jinv[iy, ix, 1, 1] * ddy
    d0 = Rc[0, 0] * x + Rc[0, 1] * y + Rc[0, 2]
    d1 = Rc[1, 0] * x + Rc[1, 1] * y + Rc[1, 2]
    d2 = Rc[2, 0] * x + Rc[2, 1] * y + Rc[2, 2]
    dn = math.sqrt(d0 * d0 + d1 * d1 + d2 * d2)
    d0, d1, d2 = d0 / dn, d1 / dn, d2 / dn
    den = d0 * z0 + d1 * z1 + d2 * z2
    if not den > 1e-9:
        return False, 0.0, 0.0
    s = tz / den
    if not s > 0:
        return False, 0.0, 0.0
    p0 = origin[0] + s * d0 - tb[0]
    p1 = origin[1] + s * d1 - tb[1]
    p2 = origin[2] + s * d2 - tb[2]
    lx = p0 * Rb[0, 0] + p1 * Rb[1, 0] + p2 * Rb[2, 0]
    ly = p0 * Rb[0, 1] + p1 * Rb[1, 1] + p2 * Rb[2, 1]
    if not (lx >= 0 and lx <= size[0] and ly >= 0 and ly <= size[1]):
        return False, 0.0, 0.0
    return True, lx, ly


@_jit
def plane_albedo(xy, Jinv, offs, K, Rc, origin, Rb, tb, size, idx, levels):
    """Supersampled albedo (h, w, 3) float64 of a textured plane over an image window.

    For each pixel of the window and each sub-pixel offset (dx, dy) in ``offs`` x ``offs``:
    the undistorted normalised coordinate is ``xy + Jinv @ (ddx, ddy)`` (first order in the
    offset, as ``targets._window_rays``), the world ray ``Rc (x, y, 1)`` normalised, its hit
    with the plane (board2world rotation Rb, origin tb; printed face only, inside
    ``size``) and the texture sampled bilinearly with replicated borders at texel centres.
    The texture is an index image idx (h_t, w_t) into a palette ``levels`` (L, 3): a ChArUco
    board has two grey levels, and 1 byte per texel instead of 12 keeps the texture in
    cache (the lookups are memory-bound). The mean over sub-samples is returned (misses
    count as 0).
    """
    h, w = xy.shape[0], xy.shape[1]
    th, tw = idx.shape[0], idx.shape[1]
    out = np.zeros((h, w, 3))
    ns = offs.shape[0]
    z0, z1, z2 = Rb[0, 2], Rb[1, 2], Rb[2, 2]
    tz = (tb[0] - origin[0]) * z0 + (tb[1] - origin[1]) * z1 + (tb[2] - origin[2]) * z2
    sx = tw / size[0]
    sy = th / size[1]
    inv_n = 1.0 / (ns * ns)
    for iy in range(h):
        for ix in range(w):
            # a pixel whose whole footprint falls on texels of one level is that level: test
            # the texel box spanned by its four extreme sub-samples (the plane's projective
            # map keeps the others inside their convex hull)
            uni = True
            bx0, bx1, by0, by1 = tw, -1, th, -1
            for ky in (0, ns - 1):
                ddy = offs[ky] / K[1, 1]
                for kx in (0, ns - 1):
                    ddx = (offs[kx] - K[0, 1] * ddy) / K[0, 0]
                    hit, lx, ly = _plane_hit(xy, Jinv, iy, ix, ddx, ddy, Rc, origin, Rb, tb,
                                             z0, z1, z2, tz, size)
                    if not hit:
                        uni = False
                        break
                    fx = int(math.floor(lx * sx - 0.5))
                    fy = int(math.floor(ly * sy - 0.5))
                    bx0, bx1 = min(bx0, fx), max(bx1, fx + 1)
                    by0, by1 = min(by0, fy), max(by1, fy + 1)
                if not uni:
                    break
            if uni:
                bx0, bx1 = min(max(bx0, 0), tw - 1), min(max(bx1, 0), tw - 1)
                by0, by1 = min(max(by0, 0), th - 1), min(max(by1, 0), th - 1)
                first = idx[by0, bx0]
                for ty in range(by0, by1 + 1):
                    for tx in range(bx0, bx1 + 1):
                        if idx[ty, tx] != first:
                            uni = False
                            break
                    if not uni:
                        break
            if uni:
                out[iy, ix, 0] = levels[first, 0]
                out[iy, ix, 1] = levels[first, 1]
                out[iy, ix, 2] = levels[first, 2]
                continue
            a0 = 0.0
            a1 = 0.0
            a2 = 0.0
            for ky in range(ns):
                ddy = offs[ky] / K[1, 1]
                for kx in range(ns):
                    ddx = (offs[kx] - K[0, 1] * ddy) / K[0, 0]
                    hit, lx, ly = _plane_hit(xy, Jinv, iy, ix, ddx, ddy, Rc, origin, Rb, tb,
                                             z0, z1, z2, tz, size)
                    if not hit:
                        continue
                    mx = lx * sx - 0.5
                    my = ly * sy - 0.5
                    fx = math.floor(mx)
                    fy = math.floor(my)
                    wx = mx - fx
                    wy = my - fy
                    x0 = min(max(int(fx), 0), tw - 1)
                    x1 = min(max(int(fx) + 1, 0), tw - 1)
                    y0 = min(max(int(fy), 0), th - 1)
                    y1 = min(max(int(fy) + 1, 0), th - 1)
                    w00 = (1 - wx) * (1 - wy)
                    w01 = wx * (1 - wy)
                    w10 = (1 - wx) * wy
                    w11 = wx * wy
                    i00, i01 = idx[y0, x0], idx[y0, x1]
                    i10, i11 = idx[y1, x0], idx[y1, x1]
                    for ch in range(3):
                        v = (w00 * levels[i00, ch] + w01 * levels[i01, ch] + w10 * levels[i10, ch]
                             + w11 * levels[i11, ch])
                        if ch == 0:
                            a0 += v
                        elif ch == 1:
                            a1 += v
                        else:
                            a2 += v
            out[iy, ix, 0] = a0 * inv_n
            out[iy, ix, 1] = a1 * inv_n
            out[iy, ix, 2] = a2 * inv_n
    return out


@_jit
def chrome_lights(x, r, ok, lp, lrgb, light_radius, scale, distant):
    """Sum over lights of a mirror's reflected light discs at sample points x (..., 3) with
    reflected directions r (..., 3) (flattened (S, 3)); ok (S,) marks hits. A point light is
    seen iff the reflected ray passes within ``light_radius`` of it (distant: within that
    angle); its radiance is ``scale * rgb`` (scale = albedo / disc area). Returns (S, 3)."""
    m = x.shape[0]
    out = np.zeros((m, 3))
    cos_lr = math.cos(light_radius)
    for j in range(lp.shape[0]):
        p0, p1, p2 = lp[j, 0], lp[j, 1], lp[j, 2]
        if distant:
            pn = math.sqrt(p0 * p0 + p1 * p1 + p2 * p2)
            p0, p1, p2 = p0 / pn, p1 / pn, p2 / pn
        for i in range(m):
            if not ok[i]:
                continue
            if distant:
                hit = r[i, 0] * p0 + r[i, 1] * p1 + r[i, 2] * p2 > cos_lr
            else:
                v0, v1, v2 = p0 - x[i, 0], p1 - x[i, 1], p2 - x[i, 2]
                dist = math.sqrt(v0 * v0 + v1 * v1 + v2 * v2)
                cosr = (r[i, 0] * v0 + r[i, 1] * v1 + r[i, 2] * v2) / dist
                hit = cosr > 0 and dist * math.sqrt(max(1 - cosr * cosr, 0.0)) < light_radius
            if hit:
                out[i, 0] += scale * lrgb[j, 0]
                out[i, 1] += scale * lrgb[j, 1]
                out[i, 2] += scale * lrgb[j, 2]
    return out
