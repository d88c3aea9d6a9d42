"""X-Trans decode + demosaic: ours (``read_raw`` -> normalised mosaic -> ``demosaic_planes``, the
path ``ls-ingest`` takes) against LibRaw's linear development of the same file
(``rawpy.imread`` + ``postprocess`` with every non-linear step off and LibRaw's linear
interpolation, the settings of our fallback, then to float32 like ours), and against LibRaw's
default X-Trans demosaic (what the previous non-Bayer fallback ran). The DNG is written by the
twin's writer from a smooth synthetic radiance; both developments are compared with each other
(median and 99th percentile of the relative difference) as a check that they compute the same
thing: they differ by LibRaw's 16-bit output quantisation at measured photosites, and by the
two linear interpolations elsewhere.

Ratio = LibRaw linear seconds / our seconds, best of N, interleaved (the machine is shared)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np


def _write(path: Path, h: int, w: int) -> None:
    from lightstage.cfa import XTRANS
    from lightstage.dng import DNGMetadata, write_dng
    from lightstage.raw import mosaic_from_rgb

    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([0.5 + 0.3 * np.sin(x / 97.0 + c) * np.cos(y / 61.0 - c) for c in range(3)])
    dn = mosaic_from_rgb(rgb.astype(np.float32), XTRANS) * 3500 + 256
    write_dng(path, np.rint(dn).astype(np.uint16),
              DNGMetadata(XTRANS, black_level=256, white_level=4095, exposure_time=1 / 100))


def _ours(path: Path) -> np.ndarray:
    from lightstage.raw import demosaic_planes, read_raw

    fr = read_raw(path)
    return demosaic_planes(fr.data, fr.cfa)


def _libraw(path: Path, linear: bool) -> np.ndarray:
    import rawpy

    with rawpy.imread(str(path)) as r:
        kw = {"demosaic_algorithm": rawpy.DemosaicAlgorithm.LINEAR} if linear else {}
        rgb = r.postprocess(gamma=(1, 1), no_auto_bright=True, output_bps=16,
                            adjust_maximum_thr=0.0, user_wb=[1.0, 1.0, 1.0, 1.0], user_flip=0,
                            output_color=rawpy.ColorSpace.raw, use_camera_wb=False,
                            use_auto_wb=False, **kw)
    return rgb.astype(np.float32) / np.float32(65535.0)


def main(quick: bool = False) -> list[dict]:
    h, w = (1024, 1536) if quick else (4000, 6000)  # full: a 24 MP X-Trans sensor
    reps = 3
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "xtrans.dng"
        _write(p, h, w)
        _ours(p)  # first call builds the pattern's plan (cached per frame size, like ingest)
        t_ours, t_lin, t_def = [], [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            ours = _ours(p)
            t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            lin = _libraw(p, linear=True)
            t_lin.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _libraw(p, linear=False)
            t_def.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        from lightstage.raw import read_raw

        read_raw(p)
        t_read = time.perf_counter() - t0
    ours = np.stack(ours)[:, 8:-8, 8:-8].astype(np.float64)
    lin = np.moveaxis(lin, -1, 0)[:, 8:-8, 8:-8].astype(np.float64)
    rel = np.abs(ours - lin) / np.maximum(lin, 1e-6)
    diff = [float(v) for v in np.percentile(rel, [50, 99])]
    common = {"pixels": h * w, "reps": reps, "loadavg_before": load,
              "loadavg_after": os.getloadavg(), "ours_s": min(t_ours),
              "ours_decode_only_s": t_read, "rel_diff_vs_libraw_linear_p50_p99": diff}
    return [
        {"name": "xtrans_decode_demosaic_vs_libraw_linear", "ratio": min(t_lin) / min(t_ours),
         "goal": "> 1 (faster than LibRaw's linear postprocess on the same file)",
         "libraw_linear_s": min(t_lin), **common},
        {"name": "xtrans_decode_demosaic_vs_libraw_default", "ratio": min(t_def) / min(t_ours),
         "goal": "(reported) vs LibRaw's default X-Trans demosaic, the previous fallback",
         "libraw_default_s": min(t_def), **common},
    ]


if __name__ == "__main__":
    for r in main(quick=False):
        print(r)
