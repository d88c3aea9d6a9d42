"""Reflectance network benchmarks: basis vs concat environment relighting, data loading rate.

``python -m benchmarks.run_all --only reflectance [--quick]``

1. Environment relight with 300 lights, both heads at the same scale (tiny config: 16-channel
   64^2 triplanes, same rays and fixed geometry). The concat head (3DPR's design) runs its conv
   trunk and decoder once per light; the basis head once. Goal: basis >= 50x faster.
2. Data loading straight from a Zarr store (twin subject, tiny rig: 4 cameras, 32 lights,
   128^2, float16, streamed without the in-memory cache) against the rate one training step
   consumes items (``ls-train reflectance`` defaults: 2 items x 512 rays x 4 lights, prior
   geometry of the tiny prior). Goal: loader >= 3x the consumption rate.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from model.reflectance import ReflectanceConfig, ReflectanceNet
from model.relight_model import DensityGeometry, relight_rays


def _relight_bench(quick: bool) -> list[dict]:
    torch.manual_seed(0)
    res = 32 if quick else 64
    L = 300
    # a frontal pinhole at EG3D's radius looking at a head-sized sphere
    u = (torch.arange(res) + 0.5) / res - 0.5
    v, uu = torch.meshgrid(u, u, indexing="ij")
    d = torch.nn.functional.normalize(torch.stack([uu / 4.26, -v / 4.26, -torch.ones_like(uu)], -1), dim=-1)
    dirs = d.reshape(-1, 3)
    origins = torch.tensor([0.0, 0.0, 2.7]).expand_as(dirs).contiguous()
    planes = [torch.randn(1, 3, 16, 64, 64)]
    geo = DensityGeometry(planes, lambda p: 200.0 * (p.norm(dim=-1) < 0.3).float(), 2.2, 3.2, 48, 8)
    ld = torch.nn.functional.normalize(torch.randn(L, 3), dim=-1)
    E = torch.rand(L, 3) * 4 * np.pi / L
    times, outs = {}, {}
    for head in ("basis", "concat"):
        net = ReflectanceNet(ReflectanceConfig.tiny(head=head, plane_channels=16)).eval()
        relight_rays(net, geo, 0, origins[:64], dirs[:64], ld[:2], E[:2])  # warm-up
        t = []
        outs[head] = relight_rays(net, geo, 0, origins, dirs, ld, E, timing=t)
        times[head] = t[0]
    ratio = times["concat"].network_s / times["basis"].network_s
    print(f"   relight {L} lights, {res}x{res} rays: basis {times['basis'].network_s * 1e3:.1f} ms, "
          f"concat {times['concat'].network_s * 1e3:.1f} ms (network); geometry "
          f"{times['basis'].geometry_s * 1e3:.1f} ms (shared)", flush=True)
    return [{"name": "env relight 300 lights: concat time / basis time", "ratio": ratio, "goal": ">= 50",
             "basis_s": times["basis"].network_s, "concat_s": times["concat"].network_s,
             "geometry_s": times["basis"].geometry_s, "rays": res * res, "lights": L}]


def _twin_store(path: Path, n_subjects: int = 2) -> Path:
    from lightstage.rig import builtin_rig
    from lightstage.store import create_take
    from lightstage.twin.subject import HeadScene, random_subject

    rig = builtin_rig("tiny")
    dirs = rig.light_directions()
    for s in range(n_subjects):
        scene = HeadScene(random_subject(s))
        H, W = rig.cameras[0].resolution
        g = create_take(path, f"s{s}", "t0", cameras=[c.name for c in rig.cameras], n_lights=len(dirs),
                        n_tracking=1, height=H, width=W, dtype="float16",
                        attrs=dict(light_directions=dirs, light_rgb=np.ones((len(dirs), 3)),
                                   K=np.stack([c.K_array for c in rig.cameras]),
                                   distortion=np.stack([np.asarray(c.distortion) for c in rig.cameras]),
                                   cam2world=np.stack([c.cam2world_array for c in rig.cameras]),
                                   world2head=scene.world2head))
        for k, cam in enumerate(rig.cameras):
            imgs = np.stack([scene.radiance(cam, dirs[i:i + 1], np.ones((1, 3)), distant=True)
                             for i in range(len(dirs))])
            g["olat"][k] = imgs.transpose(0, 3, 1, 2).astype(np.float16)
            g["tracking"][k, 0] = imgs.sum(0).transpose(2, 0, 1).astype(np.float16)
            g["mask"][k] = scene.truth(cam)["mask"].astype(np.uint8) * 255
            g["valid"][k] = 255
        g["done"][:] = 1
    return path


def _loader_bench(quick: bool) -> list[dict]:
    from model.fitting import mean_face_ws
    from model.olat_data import DataConfig, OlatDataset, collate
    from model.prior import build_generator
    from model.relight_model import PriorGeometry
    from model.train_reflectance import ReflectanceTrainer, TrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        store = _twin_store(Path(tmp) / "twin.zarr")
        cfg = DataConfig(rays_per_item=512, lights_per_item=4, cache=False)
        ds = OlatDataset(store, config=cfg)
        G = build_generator("tiny", seed=0)
        geo = PriorGeometry(G, [mean_face_ws(G)[0]] * len(ds.takes), max_samples=12)
        tcfg = TrainConfig(steps=10, batch=2, rays=512, lights_per_item=4, val_every=0, ckpt_every=0)
        ncfg = ReflectanceConfig.tiny(head="basis", plane_channels=G.cfg.plane_channels,
                                      plane_mode=G.cfg.render.mode, radiance_scale=0.05)
        tr = ReflectanceTrainer(tcfg, ncfg, ds, geo, Path(tmp) / "run")
        n = 5 if quick else 15
        rng = np.random.default_rng(0)
        ds.sample(rng)
        t0 = time.perf_counter()
        batches = [collate([ds.sample(rng) for _ in range(2)]) for _ in range(n)]
        load_s = (time.perf_counter() - t0) / n
        tr.train_step(batches[0])  # warm-up
        t0 = time.perf_counter()
        for b in batches[1:]:
            tr.train_step(b)
        step_s = (time.perf_counter() - t0) / (n - 1)
    ratio = step_s / load_s
    print(f"   loading {load_s * 1e3:.1f} ms / batch (streamed from Zarr), train step {step_s * 1e3:.1f} ms",
          flush=True)
    return [{"name": "data loading rate / train step consumption", "ratio": ratio, "goal": ">= 3",
             "load_s_per_batch": load_s, "step_s": step_s}]


def main(quick: bool = False) -> list[dict]:
    return _relight_bench(quick) + _loader_bench(quick)


if __name__ == "__main__":
    import sys

    for r in main(quick="--quick" in sys.argv):
        print(r)
