"""Seconds per portrait on CPU with the bundled model: crop + inversion + the first environment
relight (one basis render), and each extra environment / rotation step (a K-term weighted sum of
the cached basis images), with the ratio extra step / first relight. A second baseline: the
same extra step done as a full recompute (geometry + network, ``model.relight_model.relight_rays``)
-- what a per-frame network pass would cost.

``python -m benchmarks.bench_portrait_relight`` (or via ``benchmarks.run_all``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch


def _photo() -> str | None:
    import os

    for c in ([Path(os.environ["LIGHTSTAGE_REAL_DATA"])] if os.environ.get("LIGHTSTAGE_REAL_DATA") else []) + [
            Path(__file__).resolve().parents[2] / "shared" / "data" / "real"]:
        p = c / "portraits" / "astronaut_eileen_collins.png"
        if p.is_file():
            return str(p)
    try:
        from matplotlib import cbook

        return cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    except Exception:
        return None


def _median(f, n):
    ts, out = [], None
    for _ in range(n):
        t0 = time.perf_counter()
        out = f()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), out


def main(quick: bool = False) -> list[dict]:
    from lightstage.envmap import builtin_environment
    from lightstage.relight import light_weights, weights_for_rotations
    from model.bundle import label_rays, load_bundle
    from model.portrait import invert_portrait, prepare, render_basis, PortraitSource
    from model.relight_model import PriorGeometry, relight_rays

    photo = _photo()
    if photo is None:
        return [{"name": "portrait relight", "error": "no portrait photo (real data or matplotlib) available"}]
    b = load_bundle()
    reps = 1 if quick else 3
    res = 2 * b.resolution
    env = builtin_environment("sun-sky", height=64)
    t_crop, (prep, small) = _median(lambda: prepare(photo, b), reps)
    t_inv, inv = _median(lambda: invert_portrait(b, small, prep.label), reps)
    W0 = light_weights(env, b.light_dirs)
    src = PortraitSource(name=photo, bundle=b, ws=inv.ws, res=res)

    def first():
        src.views.clear()
        src._phi = None
        src.add_view("input", prep.label)
        return src.relight(W0)

    t_first, _ = _median(first, reps)
    n_rot = 8 if quick else 36
    W = weights_for_rotations(env, b.light_dirs, [360.0 * k / n_rot for k in range(n_rot)])
    t_rot, _ = _median(lambda: src.relight(W), reps)
    t_step = t_rot / n_rot
    geo = PriorGeometry(b.G, [inv.ws[0]], max_samples=12)
    o, d = label_rays(prep.label, res)
    ld = torch.from_numpy(b.light_dirs.astype(np.float32))
    t_full, _ = _median(lambda: relight_rays(b.net, geo, 0, o, d, ld, torch.from_numpy(W[1].astype(np.float32))), reps)
    common = {"photo": Path(photo).name, "resolution": res, "lights": len(b.light_dirs), "K": b.net.cfg.n_basis,
              "threads": torch.get_num_threads(), "crop_s": t_crop, "inversion_s": t_inv,
              "first_relight_s": t_first, "extra_step_s": t_step, "full_recompute_step_s": t_full}
    return [
        {"name": "portrait: crop + inversion + first relight (s/portrait)", "ratio": (t_crop + t_inv + t_first) / max(t_first, 1e-9),
         "seconds": t_crop + t_inv + t_first, "goal": "seconds on CPU (ratio: total / first relight)", **common},
        {"name": "portrait: extra environment/rotation step vs first relight", "ratio": t_step / t_first,
         "seconds": t_step, "baseline_seconds": t_first, "goal": "<< 1: a K-term sum, not a network pass", **common},
        {"name": "portrait: extra step, basis sum vs full recompute", "ratio": t_step / t_full,
         "seconds": t_step, "baseline_seconds": t_full, "goal": "<< 1", **common},
    ]


if __name__ == "__main__":
    for row in main(quick=True):
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
