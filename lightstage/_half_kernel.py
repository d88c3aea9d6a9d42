"""The numba kernel behind :mod:`lightstage._half` (imported only when a float16 stack is
relit on the CPU, so ``import lightstage`` never pays for numba). Module-level so that numba's
on-disk cache is reused across processes."""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

__all__ = ["kernel"]


@intrinsic
def _h2f(typingctx, bits):
    """float32 value of the IEEE half whose bits are ``bits`` (uint16)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        # reinterpret the 16 bits as half and widen exactly (subnormals, inf, NaN kept); on x86
        # with F16C LLVM emits vcvtph2ps, eight values per instruction
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@numba.njit(nogil=True, cache=True, boundscheck=False)
def kernel(x, w, out, p0, p1, block):  # pragma: no cover - compiled
    """``out[n, c, p] += sum_l w[n, c, l] * half(x[l, c, p])`` for pixels ``p0 <= p < p1``.

    x (L, 3, P) uint16 (float16 bits), w (N, 3, L) float32, out (N, 3, P) float32; pixels in
    blocks of ``block`` whose float32 accumulators stay in cache while all lights stream by.
    """
    L = x.shape[0]
    N = w.shape[0]
    acc = np.empty((N, block), np.float32)
    for c in range(3):
        for b0 in range(p0, p1, block):
            b1 = min(b0 + block, p1)
            m = b1 - b0
            for n in range(N):
                for i in range(m):
                    acc[n, i] = out[n, c, b0 + i]
            i4 = L - L % 4
            for l in range(0, i4, 4):  # four lights per pass: a quarter of the acc traffic
                r0 = x[l, c, b0:b1]
                r1 = x[l + 1, c, b0:b1]
                r2 = x[l + 2, c, b0:b1]
                r3 = x[l + 3, c, b0:b1]
                for n in range(N):
                    w0 = w[n, c, l]
                    w1 = w[n, c, l + 1]
                    w2 = w[n, c, l + 2]
                    w3 = w[n, c, l + 3]
                    a = acc[n]
                    for i in range(m):
                        a[i] += ((w0 * _h2f(r0[i]) + w1 * _h2f(r1[i]))
                                 + (w2 * _h2f(r2[i]) + w3 * _h2f(r3[i])))
            for l in range(i4, L):
                r0 = x[l, c, b0:b1]
                for n in range(N):
                    w0 = w[n, c, l]
                    a = acc[n]
                    for i in range(m):
                        a[i] += w0 * _h2f(r0[i])
            for n in range(N):
                for i in range(m):
                    out[n, c, b0 + i] = acc[n, i]
