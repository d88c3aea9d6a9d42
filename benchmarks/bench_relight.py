"""Relighting speed: OLAT combination against this machine's copy bandwidth, and environment ->
light weights with and without the cached assignment.

``python -m benchmarks.run_all --only relight [--quick]`` (quick: 256^2 pixels instead of 512^2).

Rows
----
copy-bandwidth
    ``np.copyto`` of a buffer as large as the float32 stack (one thread, and split over two
    threads): bytes copied per second, the reference of every ratio below.
olat-f32 / olat-f16
    331 lights x 3 x P pixels combined by ``lightstage.relight.relight`` (float32: torch GEMV;
    float16: the fused numba kernel of :mod:`lightstage._half`, or the torch fallback when numba
    is missing — ``path`` says which). ``ratio`` = (bytes of the stack read + bytes of the
    float32 image written) per second / one-thread copy bandwidth measured in the same run.
    Goal >= 0.7. ``ratio_vs_2thread_copy`` uses the two-thread copy instead, and
    ``ratio_vs_copy_read_plus_write`` counts the copy's reads and writes (STREAM's convention).
olat-f16-Nthread / olat-f16-8envs
    the fused kernel with the other thread count (2 where the default is 1, else 1); eight
    weight sets (e.g. turntable frames) in one pass.
torch-f16
    the previous float16 path (torch: a few lights converted into a float32 buffer, then GEMV).
    ``ratio`` = its time / ours.
einsum-interleaved
    the naive baseline: ``einsum('lpc,lc->pc')`` over an interleaved (light, pixel, channel)
    float32 stack. ``ratio`` = its time / ours (speed-up of the channel-planar GEMV).
numpy-f16
    baseline float16 path: numpy ``astype(float32)`` then GEMV. ``ratio`` = its time / ours.
weights-cached
    environment (1024 x 512) -> (331, 3) weights with the cached Voronoi assignment.
    ``ratio`` = from-scratch time / cached time; goal >= 10 and cached <= 20 ms.
turntable-weights
    36 turns about +y from the cached assignment vs rebuilding the assignment for each turned
    light set. ``ratio`` = rebuild / cached.
"""

from __future__ import annotations

import gc
import time

import numpy as np

__all__ = ["main"]


def _best(f, repeat: int = 3) -> float:
    f()  # warm-up (allocations, thread pools, caches)
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main(quick: bool = False) -> list[dict]:
    import torch

    from lightstage import envmap as E
    from lightstage import relight as R
    from lightstage.rig import builtin_rig

    rows: list[dict] = []
    side = 256 if quick else 512
    L, P = 331, side * side
    rng = np.random.default_rng(0)
    w = rng.random((L, 3)).astype(np.float32)
    olat32 = rng.random((L, 3, P), dtype=np.float32)

    # ---- the floor: copy bandwidth of a buffer as large as the float32 stack ---------------
    dst = np.empty_like(olat32)
    t_copy = _best(lambda: np.copyto(dst, olat32))
    # the same copy split over two threads (np.copyto releases the GIL): the machine's
    # bandwidth when both cores stream, reported so the one-thread reference is not flattering
    from concurrent.futures import ThreadPoolExecutor

    half = olat32.shape[2] // 2
    with ThreadPoolExecutor(2) as pool:
        def copy2():
            fs = [pool.submit(np.copyto, dst[:, :, s], olat32[:, :, s])
                  for s in (slice(0, half), slice(half, None))]
            for f in fs:
                f.result()

        t_copy2 = _best(copy2)
    del dst
    copy_bw = olat32.nbytes / t_copy
    copy2_bw = olat32.nbytes / t_copy2
    rows.append({"name": "copy-bandwidth", "ratio": 1.0, "goal": "reference (np.copyto)",
                 "bytes": olat32.nbytes, "seconds": t_copy, "GB_per_s": copy_bw / 1e9,
                 "GB_per_s_2threads": copy2_bw / 1e9})

    # ---- float32: torch GEMV ------------------------------------------------------------------
    out = np.empty((3, P), np.float32)
    t32 = _best(lambda: R.relight(olat32, w, out=out))
    bw32 = (olat32.nbytes + out.nbytes) / t32  # stack read + image written
    rows.append({"name": "olat-f32", "ratio": bw32 / copy_bw, "goal": ">= 0.7 of copy bandwidth",
                 "lights": L, "pixels": P, "seconds": t32, "GB_per_s": bw32 / 1e9,
                 "copy_GB_per_s": copy_bw / 1e9, "torch_threads": torch.get_num_threads()})

    # ---- naive interleaved einsum baseline -----------------------------------------------------
    inter = np.ascontiguousarray(olat32.transpose(0, 2, 1))  # (L, P, 3)
    t_ein = _best(lambda: np.einsum("lpc,lc->pc", inter, w), repeat=1)
    ref = np.einsum("lpc,lc->pc", inter, w).T
    err = float(np.abs(ref - R.relight(olat32, w)).max() / np.abs(ref).max())
    del inter
    rows.append({"name": "einsum-interleaved", "ratio": t_ein / t32,
                 "goal": "speed-up of channel-planar GEMV over interleaved einsum (DESIGN: ~13x)",
                 "seconds_einsum": t_ein, "seconds_ours": t32, "max_rel_diff": err})

    # ---- float16 --------------------------------------------------------------------------------
    # bytes counted: the float16 stack read + the float32 image written
    olat16 = olat32.astype(np.float16)
    del olat32
    gc.collect()
    from lightstage import _half

    fused = _half.available()
    t16 = _best(lambda: R.relight(olat16, w, out=out), repeat=5)
    moved16 = olat16.nbytes + out.nbytes
    bw16 = moved16 / t16
    rows.append({"name": "olat-f16", "ratio": bw16 / copy_bw, "goal": ">= 0.7 of copy bandwidth",
                 "path": "fused numba kernel" if fused else f"torch fallback ({_half.why_unavailable()})",
                 "threads": _half.default_threads(), "bytes": moved16, "seconds": t16,
                 "GB_per_s": bw16 / 1e9, "copy_GB_per_s": copy_bw / 1e9,
                 "ratio_vs_2thread_copy": bw16 / copy2_bw,
                 "ratio_vs_copy_read_plus_write": bw16 / (2 * copy_bw)})
    if fused:
        out1 = np.zeros((1, 3, P), np.float32)  # the kernel adds into it: values don't matter here
        other = 2 if _half.default_threads() == 1 else 1
        t1 = _best(lambda: _half.combine_f16(olat16, w[None], out1, threads=other), repeat=3)
        rows.append({"name": f"olat-f16-{other}thread", "ratio": moved16 / t1 / copy_bw,
                     "goal": f"the fused kernel on {other} thread(s) instead of the default, vs copy bandwidth",
                     "seconds": t1, "GB_per_s": moved16 / t1 / 1e9})
        w8 = np.stack([w * (k + 1) for k in range(8)])
        out8 = np.empty((8, 3, P), np.float32)
        t8 = _best(lambda: R.relight(olat16, w8, out=out8), repeat=3)
        rows.append({"name": "olat-f16-8envs", "ratio": (olat16.nbytes + out8.nbytes) / t8 / copy_bw,
                     "goal": "8 weight sets in one pass (turntable frames), bytes read+written vs copy",
                     "seconds": t8, "seconds_per_image": t8 / 8})

    fallback = R.Relighter(L, P, device="cpu", use_kernel=False)
    out_t = torch.from_numpy(out).view(1, 3, P)

    def torch_f16():
        out_t.zero_()
        fallback.accumulate(out_t, olat16, w[None])

    t_torch16 = _best(torch_f16, repeat=1)
    rows.append({"name": "torch-f16", "ratio": t_torch16 / t16,
                 "goal": "speed-up of the fused kernel over the previous path (torch, light-chunked "
                         "conversion into a float32 buffer + GEMV)",
                 "seconds_torch": t_torch16, "seconds_ours": t16,
                 "torch_ratio_vs_copy": moved16 / t_torch16 / copy_bw})

    def numpy_f16():
        x = olat16.astype(np.float32)
        for c in range(3):
            out[c] = w[:, c] @ x[:, c]

    t_np16 = _best(numpy_f16, repeat=1)
    rows.append({"name": "numpy-f16", "ratio": t_np16 / t16,
                 "goal": "speed-up of the float16 path over numpy astype + GEMV",
                 "seconds_numpy": t_np16, "seconds_ours": t16})
    del olat16
    gc.collect()

    # ---- environment -> weights ------------------------------------------------------------------
    dirs = builtin_rig("lsx-331").light_directions()
    env = E.sun_sky_environment(512)  # 1024 x 512
    t_scratch = _best(lambda: R.light_weights(env, dirs, index_map_cache=None), repeat=1)
    cache = R.TransferCache()
    R.light_weights(env, dirs, index_map_cache=cache)
    t_cached = _best(lambda: R.light_weights(env, dirs, index_map_cache=cache), repeat=10)
    rows.append({"name": "weights-cached", "ratio": t_scratch / t_cached,
                 "goal": ">= 10x faster than from scratch, cached <= 20 ms (1024x512, 331 lights)",
                 "ms_cached": 1e3 * t_cached, "ms_scratch": 1e3 * t_scratch,
                 "cached_within_20ms": t_cached <= 0.020})

    angles = np.arange(0, 360, 10.0)
    t_turn = _best(lambda: R.weights_for_rotations(env, dirs, angles, index_map_cache=cache), repeat=1)
    rows.append({"name": "turntable-weights", "ratio": (t_scratch * len(angles)) / t_turn,
                 "goal": "36 turns from the cached assignment vs rebuilding it per turn",
                 "ms_per_angle": 1e3 * t_turn / len(angles), "ms_rebuild_per_angle": 1e3 * t_scratch})
    for r in rows:
        print("   ", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    return rows


if __name__ == "__main__":
    main(quick=True)
