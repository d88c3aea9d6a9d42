"""Seconds per portrait on CPU with the bundled model: crop + inversion + the first environment
relight (one basis render), and each extra environment / rotation step (a K-term weighted sum of
the cached basis images), with the ratio extra step / first relight. A second baseline: the
same extra step done as a full recompute (geometry + network, ``model.relight_model.relight_rays``)
-- what a per-frame network pass would cost.

GPU section (:func:`gpu_section`, separate rows): with CUDA present, the ``eg3d-ffhq512``-sized
configuration (the full prior and a full-size basis-head reflectance network, seeded random
weights: the time does not depend on them) at 512 x 512 with 331 lights: one environment relight
(basis render + first sum; goal <= 1 s) and environment rotation frames per second (weights for
the angle + K-term sum on the GPU + copy to the host; goal >= 30 fps). Without CUDA it reports
"skipped: no CUDA".

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


def gpu_section(quick: bool = False, device: str = "cuda", preset: str = "eg3d-ffhq512", res: int = 512,
                n_lights: int = 331) -> list[dict]:
    """The GPU goals of issue #8 (see the module docstring). ``device``/``preset``/``res`` are
    parameters only so the code path can be exercised on a CPU at toy size."""
    from types import SimpleNamespace

    from lightstage.envmap import builtin_environment
    from lightstage.relight import light_weights, weights_for_rotations
    from model.bundle import fibonacci_lights
    from model.portrait import combine_basis, render_basis, view_label
    from model.prior import build_generator
    from model.reflectance import ReflectanceConfig, ReflectanceNet

    name = f"portrait GPU: {preset} relight at {res}^2 / rotation fps"
    if device == "cuda" and not torch.cuda.is_available():
        return [{"name": name, "skipped": "no CUDA", "goal": "relight <= 1 s, rotation >= 30 fps"}]
    dev = torch.device(device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    G = build_generator(preset, seed=0).eval().to(dev)
    torch.manual_seed(0)
    net = ReflectanceNet(ReflectanceConfig(head="basis", plane_channels=G.cfg.plane_channels,
                                           plane_mode=G.cfg.render.mode,
                                           box_warp=float(G.cfg.render.box_warp))).eval().to(dev)
    dirs = fibonacci_lights(n_lights)
    b = SimpleNamespace(G=G, net=net, light_dirs=dirs)
    ws = G.w_avg.reshape(1, 1, -1).repeat(1, G.num_ws, 1).to(dev)
    label = view_label(0.0)
    env = builtin_environment("sun-sky", height=64)
    W0 = light_weights(env, dirs)
    with torch.no_grad():
        phi = net.light_coefficients(torch.from_numpy(dirs.astype(np.float32)).to(dev)).float()

    def first():
        basis, _ = render_basis(b, ws, label, res)
        out = combine_basis(phi, basis, W0, res)
        sync()
        return basis, out

    first()  # warm-up (kernels, allocator)
    t_first, (basis, _) = _median(first, 1 if quick else 3)
    n_rot = 30 if quick else 120
    angles = [360.0 * k / n_rot for k in range(n_rot)]

    def rotate():
        for a in angles:
            combine_basis(phi, basis, weights_for_rotations(env, dirs, [a])[0], res)
        sync()

    rotate()
    t_rot, _ = _median(rotate, 1 if quick else 3)
    fps = n_rot / t_rot
    common = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev), "preset": preset,
              "resolution": res, "lights": n_lights, "K": net.cfg.n_basis}
    return [
        {"name": f"portrait GPU: {preset} one environment relight at {res}^2 (s)", "seconds": t_first,
         "ratio": t_first / 1.0, "goal": "<= 1 s (ratio = seconds / 1 s budget)", **common},
        {"name": f"portrait GPU: environment rotation at {res}^2 (frames/s)", "fps": fps,
         "ratio": 30.0 / fps, "goal": ">= 30 fps (ratio = 30 fps / measured, <= 1 meets it)", **common},
    ]


def main(quick: bool = False) -> list[dict]:
    from lightstage.envmap import builtin_environment
    from lightstage.relight import light_weights, weights_for_rotations
    from model.bundle import label_rays, load_bundle
    from model.portrait import invert_portrait, prepare, PortraitSource
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
    # the exposure convention (estimated input lighting + detail gain): once per portrait
    from model.portrait import _resize

    photo_res = _resize(prep.image, res)
    t_cal, _ = _median(lambda: src.calibrate(photo_res, None), reps)
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
              "first_relight_s": t_first, "calibrate_s": t_cal, "extra_step_s": t_step,
              "full_recompute_step_s": t_full}
    cpu_rows = [
        {"name": "portrait: crop + inversion + first relight + exposure (s/portrait)",
         "ratio": (t_crop + t_inv + t_first + t_cal) / max(t_first, 1e-9),
         "seconds": t_crop + t_inv + t_first + t_cal, "goal": "seconds on CPU (ratio: total / first relight)", **common},
        {"name": "portrait: extra environment/rotation step vs first relight", "ratio": t_step / t_first,
         "seconds": t_step, "baseline_seconds": t_first, "goal": "<< 1: a K-term sum, not a network pass", **common},
        {"name": "portrait: extra step, basis sum vs full recompute", "ratio": t_step / t_full,
         "seconds": t_step, "baseline_seconds": t_full, "goal": "<< 1", **common},
    ]
    # ---- GPU section (separate rows; "skipped: no CUDA" without a GPU) ----------------------
    return cpu_rows + gpu_section(quick)


if __name__ == "__main__":
    for row in main(quick=True):
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
