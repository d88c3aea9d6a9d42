"""The numba kernels behind :mod:`lightstage._fused` (imported only when an ingest develops a
frame, so ``import lightstage`` never pays for numba). Module-level so that numba's on-disk
cache is shared by every worker process.

Both kernels walk the image in bands of rows whose working set stays in the core's L2 cache,
so each full-size array is read or written once; see :mod:`lightstage._fused` for why.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

__all__ = ["develop_bayer", "warp_store"]


@intrinsic
def _f2h(typingctx, value):
    """IEEE half bits (uint16) of a float32, rounded to nearest even (``vcvtps2ph`` on x86 with
    F16C): the conversion numpy's ``astype(float16)`` and OpenCV's ``CV_16F`` perform."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


@numba.njit(inline="always")
def _reflect(i, n):  # pragma: no cover - compiled
    """OpenCV's BORDER_REFLECT_101 index (…, 2, 1 | 0, 1, …, n-1 | n-2, …), for |overshoot| < n."""
    if i < 0:
        return -i
    if i >= n:
        return 2 * n - 2 - i
    return i


@numba.njit(inline="always")
def _demosaic_class(up, mid, dn, zu, zm, zd, px, W, wt, iv, M, o0, o1, o2, bad):  # pragma: no cover
    """One site class (columns px, px+2, ...) of one row: each colour is a fixed weighting
    ``wt[colour]`` of the centre, horizontal pair, vertical pair and diagonal sums, so the loop
    has no branch."""
    r0, r1, r2, r3 = wt[0, 0], wt[0, 1], wt[0, 2], wt[0, 3]
    g0, g1, g2, g3 = wt[1, 0], wt[1, 1], wt[1, 2], wt[1, 3]
    b0, b1, b2, b3 = wt[2, 0], wt[2, 1], wt[2, 2], wt[2, 3]
    m00 = M[0, 0]
    m01 = M[0, 1]
    m02 = M[0, 2]
    m10 = M[1, 0]
    m11 = M[1, 1]
    m12 = M[1, 2]
    m20 = M[2, 0]
    m21 = M[2, 1]
    m22 = M[2, 2]
    for x in range(px, W, 2):
        X = x + 1
        c = mid[X]
        h = mid[X - 1] + mid[X + 1]
        v = up[X] + dn[X]
        d = (up[X - 1] + up[X + 1]) + (dn[X - 1] + dn[X + 1])
        g = iv[x]
        rr = (r0 * c + r1 * h + r2 * v + r3 * d) * g
        gg = (g0 * c + g1 * h + g2 * v + g3 * d) * g
        bb = (b0 * c + b1 * h + b2 * v + b3 * d) * g
        o0[x] = m00 * rr + m01 * gg + m02 * bb
        o1[x] = m10 * rr + m11 * gg + m12 * bb
        o2[x] = m20 * rr + m21 * gg + m22 * bb
        bad[x] = (zu[X - 1] | zu[X] | zu[X + 1]) | (zm[X - 1] | zm[X] | zm[X + 1]) \
            | (zd[X - 1] | zd[X] | zd[X + 1])


@numba.njit(nogil=True, cache=True, boundscheck=False)
def develop_bayer(dns, sats, a, b, e, shortest, cfa, inv_vig, M, out, bad, band):  # pragma: no cover
    """Merge a raw bracket, demosaic (bilinear), de-vignette and colour-correct, band by band.

    dns : tuple of K ``(H, W)`` uint16 raw mosaics (DN); sats : tuple of K ``(H, W)`` bool
    clipped-photosite masks; a, b, e : ``(K,)`` float64 ``1 / (white - black)``, black level
    and relative exposure; shortest : index of the shortest exposure; cfa : ``(2, 2)`` int64
    colour index (0 R, 1 G, 2 B) of the top-left 2x2; inv_vig : ``(H, W)`` float32;
    M : ``(3, 3)`` float32 colour matrix (gains folded in); out : ``(3, H, W)`` float32,
    written; bad : ``(H, W)`` uint8, written 1 where a photosite of the pixel's 3x3
    neighbourhood has no unclipped exposure. Returns the number of such pixels.

    The merge is the "snr" merge of :func:`lightstage.hdr.merge_raw_snr`:
    ``sum_k v_k [unclipped] / sum_k e_k [unclipped]`` with ``v_k = (dn - black) a_k``, and the
    shortest exposure's ``v / e`` where every exposure clipped. The demosaic is the bilinear
    normalised convolution of :func:`lightstage.raw.demosaic_planes` written per site class:
    a site keeps its own colour, takes the mean of its 4 edge neighbours for the colour on
    them (G at R/B sites; R or B at G sites, 2 neighbours) and of its 4 diagonals for the
    opposite colour; borders mirror about the edge photosite (BORDER_REFLECT_101).
    """
    K = len(dns)
    H, W = dns[0].shape
    # merged mosaic rows y0-1 .. y1, each padded by one mirrored photosite per side
    m = np.empty((band + 2, W + 2), np.float32)
    z = np.empty((band + 2, W + 2), np.uint8)  # 1: no unclipped exposure at that photosite
    af = np.empty(K, np.float32)
    bf = np.empty(K, np.float32)
    ef = np.empty(K, np.float32)
    for k in range(K):
        af[k] = a[k]
        bf[k] = b[k]
        ef[k] = e[k]
    inv_es = np.float32(1.0) / ef[shortest]
    # per site class (row parity, column parity): the weights of (centre, horizontal pair,
    # vertical pair, diagonal sum) for R, G, B (Malvar et al. 2004's bilinear kernels)
    wts = np.zeros((2, 2, 3, 4), np.float32)
    for py in range(2):
        for px in range(2):
            c = cfa[py, px]
            if c == 1:
                wts[py, px, 1, 0] = 1.0
                if cfa[py, 1 - px] == 0:  # R left/right, B above/below
                    wts[py, px, 0, 1] = 0.5
                    wts[py, px, 2, 2] = 0.5
                else:
                    wts[py, px, 0, 2] = 0.5
                    wts[py, px, 2, 1] = 0.5
            else:
                wts[py, px, c, 0] = 1.0
                wts[py, px, 1, 1] = 0.25
                wts[py, px, 1, 2] = 0.25
                wts[py, px, 2 - c, 3] = 0.25
    num = np.empty(W, np.float32)
    den = np.empty(W, np.float32)
    nbad = 0
    for y0 in range(0, H, band):
        y1 = min(H, y0 + band)
        for r in range(y1 - y0 + 2):
            ry = _reflect(y0 - 1 + r, H)
            for x in range(W):
                num[x] = 0.0
                den[x] = 0.0
            for k in range(K):  # one streaming pass per exposure (vectorises)
                d = dns[k][ry]
                sk = sats[k][ry]
                ak = af[k]
                bk = bf[k]
                ek = ef[k]
                for x in range(W):
                    ok = np.float32(1.0) - np.float32(sk[x])
                    num[x] += ok * ((np.float32(d[x]) - bk) * ak)
                    den[x] += ok * ek
            mr = m[r]
            zr = z[r]
            ds = dns[shortest][ry]
            for x in range(W):
                if den[x] > 0:
                    mr[x + 1] = num[x] / den[x]
                    zr[x + 1] = 0
                else:
                    mr[x + 1] = (np.float32(ds[x]) - bf[shortest]) * af[shortest] * inv_es
                    zr[x + 1] = 1
            mr[0] = mr[2]
            mr[W + 1] = mr[W - 1]
            zr[0] = zr[2]
            zr[W + 1] = zr[W - 1]
        for y in range(y0, y1):
            r = y - y0 + 1
            py = y & 1
            for px in range(2):
                _demosaic_class(m[r - 1], m[r], m[r + 1], z[r - 1], z[r], z[r + 1], px, W,
                                wts[py, px], inv_vig[y], M, out[0, y], out[1, y], out[2, y], bad[y])
        for y in range(y0, y1):
            for x in range(W):
                nbad += bad[y, x]
    return nbad


@numba.njit(inline="always")
def _axis(n_out, n_grid, s, idx, t):  # pragma: no cover - compiled
    """Grid index and weight per output position along one axis: bilinear with half-pixel
    centres, edges clamped (the rule of :func:`lightstage.align.decode_flow`)."""
    for i in range(n_out):
        f = (i + 0.5) / s - 0.5
        j = int(np.floor(f))
        u = f - j
        if j < 0:
            j = 0
            u = 0.0
        if j >= n_grid - 1:
            j = n_grid - 1
            u = 0.0
        idx[i] = j
        t[i] = u


@numba.njit(nogil=True, cache=True, boundscheck=False)
def warp_store(planes, grid, stride, cons, valid, use_valid, lim, out, vmask):  # pragma: no cover
    """Warp three planes into the reference frame and write them as float16, with the validity.

    planes : ``(3, H, W)`` float32 (stored units); grid : ``(2, h, w)`` float32 flow grid (x, y
    components, pixels) of stride ``stride``; cons : ``(H, W)`` uint8 flow consistency (255
    good); valid : ``(H, W)`` uint8 (1 valid) pixel validity before warping, read only when
    ``use_valid``; lim : largest finite stored magnitude (values are clipped to +-lim);
    out : ``(3, H, W)`` uint16 float16 bits, written; vmask : ``(H, W)`` uint8, written 255
    where the source lies inside the image, the flow is consistent and (``use_valid``) the
    bilinear source footprint is valid (its interpolated validity > 0.999).

    Sampling is bilinear with exact weights and BORDER_REPLICATE (:func:`lightstage.align.warp`
    with OpenCV quantises the weights to 1/32 pixel)."""
    _, H, W = planes.shape
    h, w = grid.shape[1], grid.shape[2]
    flim = np.float32(lim)
    one = np.float32(1.0)
    gx_i = np.empty(W, np.int64)
    gx_t = np.empty(W, np.float64)
    gy_i = np.empty(H, np.int64)
    gy_t = np.empty(H, np.float64)
    _axis(W, w, stride, gx_i, gx_t)
    _axis(H, h, stride, gy_i, gy_t)
    gx_i1 = np.empty(W, np.int64)
    gx_tf = np.empty(W, np.float32)
    for x in range(W):
        gx_i1[x] = min(gx_i[x] + 1, w - 1)
        gx_tf[x] = gx_t[x]
    rx = np.empty(w, np.float32)
    ry = np.empty(w, np.float32)
    fx = np.empty(W, np.float32)
    fy = np.empty(W, np.float32)
    p0 = planes[0]
    p1 = planes[1]
    p2 = planes[2]
    o0 = out[0]
    o1 = out[1]
    o2 = out[2]
    xmax = np.float32(W - 1)
    ymax = np.float32(H - 1)
    for y in range(H):
        j0 = gy_i[y]
        j1 = min(j0 + 1, h - 1)
        ty0 = np.float32(gy_t[y])
        for i in range(w):
            rx[i] = (one - ty0) * grid[0, j0, i] + ty0 * grid[0, j1, i]
            ry[i] = (one - ty0) * grid[1, j0, i] + ty0 * grid[1, j1, i]
        for x in range(W):
            t = gx_tf[x]
            fx[x] = (one - t) * rx[gx_i[x]] + t * rx[gx_i1[x]]
            fy[x] = (one - t) * ry[gx_i[x]] + t * ry[gx_i1[x]]
        yf = np.float32(y)
        for x in range(W):
            mx = np.float32(x) + fx[x]
            my = yf + fy[x]
            ok = cons[y, x] != 0 and mx >= 0 and mx <= xmax and my >= 0 and my <= ymax
            # BORDER_REPLICATE: any source beyond the edge samples the edge pixel, so clamp
            # first (also keeps the integer conversion in range)
            cx = min(max(mx, np.float32(-1.0)), np.float32(W))
            cy = min(max(my, np.float32(-1.0)), np.float32(H))
            x0 = int(cx + one) - 1
            y0 = int(cy + one) - 1
            tx = cx - np.float32(x0)
            ty = cy - np.float32(y0)
            # unsigned indices: numba then skips its negative-index wraparound test per load
            xa = np.uint64(min(max(x0, 0), W - 1))
            xb = np.uint64(min(x0 + 1, W - 1))
            ya = np.uint64(min(max(y0, 0), H - 1))
            yb = np.uint64(min(y0 + 1, H - 1))
            w00 = (one - ty) * (one - tx)
            w01 = (one - ty) * tx
            w10 = ty * (one - tx)
            w11 = ty * tx
            v = w00 * p0[ya, xa] + w01 * p0[ya, xb] + w10 * p0[yb, xa] + w11 * p0[yb, xb]
            o0[y, x] = _f2h(min(max(v, -flim), flim))
            v = w00 * p1[ya, xa] + w01 * p1[ya, xb] + w10 * p1[yb, xa] + w11 * p1[yb, xb]
            o1[y, x] = _f2h(min(max(v, -flim), flim))
            v = w00 * p2[ya, xa] + w01 * p2[ya, xb] + w10 * p2[yb, xa] + w11 * p2[yb, xb]
            o2[y, x] = _f2h(min(max(v, -flim), flim))
            if ok and use_valid:
                vv = (w00 * valid[ya, xa] + w01 * valid[ya, xb]
                      + w10 * valid[yb, xa] + w11 * valid[yb, xb])
                ok = vv > np.float32(0.999)
            vmask[y, x] = 255 if ok else 0
