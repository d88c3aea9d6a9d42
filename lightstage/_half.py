"""Fused float16 OLAT combination on the CPU: ``out[n, c] += sum_i w[n, c, i] * float(x[i, c])``.

Why a kernel of our own: a float16 stack must be read once, at memory bandwidth, with float32
arithmetic. torch's CPU half GEMV and its half -> float copy, and numpy's ``astype``, run at
0.03-0.3 of the machine's copy bandwidth on the development VM (benchmarks/bench_relight.py),
because they either compute in half precision element by element or write (and re-read) a
float32 copy of the whole stack. Here each float16 value is widened in registers (one
``fpext half -> float`` in LLVM IR, i.e. the F16C ``vcvtph2ps`` instruction on x86) and
multiplied into float32 accumulators that stay in L1 for a block of pixels, so the stack is
streamed exactly once and nothing is written but the result.

numba is optional: :func:`available` says whether the kernel compiled *and* reproduced numpy's
float16 conversion on a probe (so a CPU or LLVM without half support falls back to torch, never
to wrong numbers). The float16 data are passed as their ``uint16`` bit patterns because numba
has no float16 array type on the CPU.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ._probe import VerifiedKernel

__all__ = ["available", "why_unavailable", "combine_f16", "default_threads"]

_LOCK = threading.Lock()


def _build():
    """Import the compiled kernel (numba, cached on disk) and verify it; returns it or raises."""
    from ._half_kernel import kernel

    # probe: every half class (normal, subnormal, signed zero, the largest, inf), each alone
    w = np.ones((1, 3, 1), np.float32)
    for v in np.array([0.0, -0.0, 1.0, -2.5, 6.1e-5, 5.96e-8, 3.0e-6, 65504.0, -np.inf, 0.333],
                      dtype=np.float16):
        o = np.zeros((1, 3, 5), np.float32)
        kernel(np.full((1, 3, 5), v, np.float16).view(np.uint16), w, o, 0, 5, 4)
        if not np.array_equal(o, np.full((1, 3, 5), np.float32(v))):
            raise RuntimeError(f"float16 widening is wrong for {v!r}: got {o[0, 0, 0]!r}")
    return kernel


_KERNEL = VerifiedKernel(_build)


def available() -> bool:
    """Whether the compiled float16 kernel can be used here (numba present, kernel verified)."""
    return _KERNEL.available()


def why_unavailable() -> str:
    """Empty when :func:`available`, else the reason."""
    available()
    return _KERNEL.why


def default_threads() -> int:
    """Threads for one combination: the cores this process may use, at most 4.

    Measured on the 2-core development VM (benchmarks/bench_relight.py): on a quiet machine one
    thread already streams the stack at np.copyto's bandwidth and two tie with it; under heavy
    load (load average 8-16) two threads were faster more often than not (median 1.28 vs 1.16 x
    the copy bandwidth over 10 runs each, 512^2 and 256^2 stacks), since the work is split into many small ranges that
    whichever thread is scheduled takes. More cores help where memory outruns one core.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(4, n))


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _pool(n: int) -> ThreadPoolExecutor:
    # keyed by process id: a pool inherited through fork() (Dask or multiprocessing workers)
    # has no threads in the child and would never run a task
    key = (os.getpid(), n)
    with _LOCK:
        if key not in _POOLS:
            _POOLS[key] = ThreadPoolExecutor(n, thread_name_prefix="ls-f16")
        return _POOLS[key]


def combine_f16(x: np.ndarray, w: np.ndarray, out: np.ndarray, threads: int | None = None,
                block: int | None = None) -> None:
    """``out (N, 3, P) float32 += w (N, L, 3) applied to x (L, 3, P) float16``, in place.

    Pixels are split into up to ``8 x threads`` contiguous ranges taken by ``threads`` workers
    (the kernel releases the GIL) and processed in blocks of ``block`` pixels whose accumulators stay in L1/L2 (default 4096
    pixels for one weight set, fewer for several so that ``N x block`` floats stay ~64 KB).
    Call :func:`available` first.
    """
    kernel = _KERNEL.kernel
    if kernel is None:
        raise RuntimeError(f"float16 kernel unavailable ({_KERNEL.why})")
    if x.dtype != np.float16 or x.ndim != 3 or x.shape[1] != 3:
        raise ValueError(f"x must be (L, 3, P) float16, got {x.shape} {x.dtype}")
    if out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous float32")
    xb = np.ascontiguousarray(x).view(np.uint16)
    N, L, _ = w.shape
    wt = np.ascontiguousarray(np.asarray(w, np.float32).transpose(0, 2, 1))  # (N, 3, L)
    P = x.shape[2]
    blk = int(block or max(256, min(4096, 16384 // max(N, 1))))
    t = int(threads or default_threads())
    t = max(1, min(t, P // (4 * blk) or 1))  # tiny images: one thread
    if t == 1:
        kernel(xb, wt, out, 0, P, blk)
        return
    # many small ranges pulled by the pool's threads as they come free: a thread descheduled by
    # other work on a busy machine then delays only its current range, not half of the image
    nb = -(-P // blk)
    tasks = max(t, min(8 * t, nb // 2))
    edges = sorted({min(P, (nb * k // tasks) * blk) for k in range(tasks)} | {P})
    futs = [_pool(t).submit(kernel, xb, wt, out, a, b, blk) for a, b in zip(edges[:-1], edges[1:])]
    for f in futs:
        f.result()
