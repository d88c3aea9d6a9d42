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
    nbad = 0
    for y0 in range(0, H, band):
        y1 = min(H, y0 + band)
        for r in range(y1 - y0 + 2):
            ry = _reflect(y0 - 1 + r, H)
            mr = m[r]
            zr = z[r]
            for x in range(W):
                num = np.float32(0.0)
                den = np.float32(0.0)
                for k in range(K):
                    ok = np.float32(1.0) - np.float32(sats[k][ry, x])
                    num += ok * ((np.float32(dns[k][ry, x]) - bf[k]) * af[k])
                    den += ok * ef[k]
                if den > 0:
                    mr[x + 1] = num / den
                    zr[x + 1] = 0
                else:
                    mr[x + 1] = (np.float32(dns[shortest][ry, x]) - bf[shortest]) * af[shortest] * inv_es
                    zr[x + 1] = 1
            mr[0] = mr[2]
            mr[W + 1] = mr[W - 1]
            zr[0] = zr[2]
            zr[W + 1] = zr[W - 1]
        q = np.float32(0.25)
        hf = np.float32(0.5)
        for y in range(y0, y1):
            r = y - y0 + 1
            up = m[r - 1]
            mid = m[r]
            dn = m[r + 1]
            zu = z[r - 1]
            zm = z[r]
            zd = z[r + 1]
            py = y & 1
            for x in range(W):
                X = x + 1
                c = cfa[py, x & 1]
                centre = mid[X]
                horiz = mid[X - 1] + mid[X + 1]
                vert = up[X] + dn[X]
                diag = (up[X - 1] + up[X + 1]) + (dn[X - 1] + dn[X + 1])
                if c == 1:  # green site: R and B each on one axis
                    g = centre
                    if cfa[py, (x + 1) & 1] == 0:  # R left/right, B above/below
                        rr = hf * horiz
                        bb = hf * vert
                    else:
                        rr = hf * vert
                        bb = hf * horiz
                else:
                    g = q * (horiz + vert)
                    if c == 0:
                        rr = centre
                        bb = q * diag
                    else:
                        bb = centre
                        rr = q * diag
                iv = inv_vig[y, x]
                rr *= iv
                g *= iv
                bb *= iv
                out[0, y, x] = M[0, 0] * rr + M[0, 1] * g + M[0, 2] * bb
                out[1, y, x] = M[1, 0] * rr + M[1, 1] * g + M[1, 2] * bb
                out[2, y, x] = M[2, 0] * rr + M[2, 1] * g + M[2, 2] * bb
                zb = (zu[X - 1] | zu[X] | zu[X + 1]) | (zm[X - 1] | zm[X] | zm[X + 1]) \
                    | (zd[X - 1] | zd[X] | zd[X + 1])
                bad[y, x] = zb
                nbad += zb
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
    gx_i = np.empty(W, np.int64)
    gx_t = np.empty(W, np.float64)
    gy_i = np.empty(H, np.int64)
    gy_t = np.empty(H, np.float64)
    _axis(W, w, stride, gx_i, gx_t)
    _axis(H, h, stride, gy_i, gy_t)
    row = np.empty((2, w), np.float64)
    for y in range(H):
        j0 = gy_i[y]
        j1 = min(j0 + 1, h - 1)
        ty0 = gy_t[y]
        for c in range(2):
            for i in range(w):
                row[c, i] = (1 - ty0) * grid[c, j0, i] + ty0 * grid[c, j1, i]
        for x in range(W):
            i0 = gx_i[x]
            i1 = min(i0 + 1, w - 1)
            tx0 = gx_t[x]
            mx = np.float32(x + ((1 - tx0) * row[0, i0] + tx0 * row[0, i1]))
            my = np.float32(y + ((1 - tx0) * row[1, i0] + tx0 * row[1, i1]))
            ok = cons[y, x] != 0 and mx >= 0 and mx <= W - 1 and my >= 0 and my <= H - 1
            x0 = int(np.floor(mx))
            y0 = int(np.floor(my))
            tx = mx - np.float32(x0)
            ty = my - np.float32(y0)
            xa = min(max(x0, 0), W - 1)
            xb = min(max(x0 + 1, 0), W - 1)
            ya = min(max(y0, 0), H - 1)
            yb = min(max(y0 + 1, 0), H - 1)
            w00 = (1 - ty) * (1 - tx)
            w01 = (1 - ty) * tx
            w10 = ty * (1 - tx)
            w11 = ty * tx
            for c in range(3):
                v = (w00 * planes[c, ya, xa] + w01 * planes[c, ya, xb]
                     + w10 * planes[c, yb, xa] + w11 * planes[c, yb, xb])
                v = min(max(v, -flim), flim)
                out[c, y, x] = _f2h(np.float32(v))
            if ok and use_valid:
                vv = (w00 * valid[ya, xa] + w01 * valid[ya, xb]
                      + w10 * valid[yb, xa] + w11 * valid[yb, xb])
                ok = vv > 0.999
            vmask[y, x] = 255 if ok else 0
