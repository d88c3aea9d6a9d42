"""Reflectance network benchmarks: basis vs concat environment relighting, data loading rate.

``python -m benchmarks.run_all --only reflectance [--quick]``

1. Environment relight with 300 lights, both heads at the same scale (tiny config: 16-channel
   64^2 triplanes, same rays and fixed geometry). The concat head (3DPR's design) runs its conv
   trunk and decoder once per light; the basis head once. Goal: basis >= 50x faster.
2. Data loading straight from a Zarr store (twin subject, tiny rig: 4 cameras, 32 lights,
   128^2, float16, streamed without the in-memory cache) against the rate one training step
   consumes items (``ls-train reflectance`` defaults: 2 items x 512 rays x 4 lights, prior
   geometry of the tiny prior). Goal: loader >= 3x the consumption rate.

Quality numbers (minutes, not part of ``run_all``): train both heads on a twin capture with
``ls-train reflectance`` and measure OLAT / environment-relit PSNR::

    python -m benchmarks.bench_reflectance --quality CAPTURE_DIR PRIOR_DIR OUT_DIR [STEPS]
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
        # the default: decoded images kept in memory after their first read (small stores)
        ds_c = OlatDataset(store, config=DataConfig(rays_per_item=512, lights_per_item=4, cache=True))
        for ti in range(len(ds_c.takes)):
            for cam in range(len(ds_c.takes[ti].cameras)):
                ds_c.images(ti, cam, ds_c.lights)
                ds_c._valid(ti, cam, ds_c.lights)
        t0 = time.perf_counter()
        for _ in range(n):
            collate([ds_c.sample(rng) for _ in range(2)])
        cached_s = (time.perf_counter() - t0) / n
    print(f"   loading {load_s * 1e3:.1f} ms / batch streamed from Zarr, {cached_s * 1e3:.1f} ms cached; "
          f"train step {step_s * 1e3:.1f} ms", flush=True)
    return [{"name": "data loading rate (streamed) / train step consumption", "ratio": step_s / load_s,
             "goal": ">= 3", "load_s_per_batch": load_s, "step_s": step_s},
            {"name": "data loading rate (in-memory cache, default) / train step consumption",
             "ratio": step_s / cached_s, "goal": ">= 3", "load_s_per_batch": cached_s, "step_s": step_s}]


def main(quick: bool = False) -> list[dict]:
    return _relight_bench(quick) + _loader_bench(quick)




# ---- quality numbers on a twin capture (minutes; not part of run_all) --------------------------


def merge_truth_stores(capture: Path, out: Path) -> Path:
    """Copy every ``<capture>/<subject>/<take>/truth/truth.zarr`` take into one store ``out``."""
    import zarr

    from lightstage.store import create_take, list_takes

    for tz in sorted(Path(capture).glob("*/*/truth/truth.zarr")):
        for s, t in list_takes(tz):
            src = zarr.open_group(str(tz), mode="r")[f"{s}/{t}"]
            C, L, _, H, W = src["olat"].shape
            a = dict(src.attrs)
            g = create_take(out, s, t, cameras=a.pop("cameras"), n_lights=L, n_tracking=src["tracking"].shape[1],
                            height=H, width=W, attrs=a, dtype=str(src["olat"].dtype), scale=a.pop("scale"),
                            overwrite=True)
            for name in ("olat", "tracking", "mask", "valid", "done"):
                g[name][...] = src[name][...]
    return out


def quality(capture: str, prior: str, out: str, steps: int = 300, fit_steps: int = 50) -> list[dict]:
    """Train both heads with ``ls-train reflectance`` on a twin capture, then measure OLAT PSNR on
    held-out lights and subjects, environment-relit PSNR against the twin's truth
    (``sum_i E_i OLAT_i`` of the noise-free truth OLATs) and the time per environment relight."""
    import shutil

    import subprocess
    import sys

    from safetensors.torch import load_file

    from lightstage.envmap import builtin_environment
    from model.checkpoint import load_generator
    from model.olat_data import OlatDataset, make_splits
    from model.relight_model import PriorGeometry, light_weights, olat_rays
    from model.train_reflectance import load_reflectance, psnr

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "twin.zarr"
    if not store.exists():
        merge_truth_stores(Path(capture), store)
    rows = []
    for head in ("basis", "concat"):
        run = out / f"run_{head}"
        if head == "concat" and (out / "run_basis" / "latents.safetensors").exists() and not run.exists():
            run.mkdir()
            for f in ("latents.safetensors", "latents.json"):  # the same fitted latents for both heads
                shutil.copy(out / "run_basis" / f, run / f)
        args = ["--store", store, "--prior", prior, "--out", run, "--head", head, "--steps", steps,
                "--fit-steps", fit_steps, "--val-every", steps, "--ckpt-every", 100, "--threads", 1]
        if (run / "reflectance.json").exists():
            args.append("--resume")
        t0 = time.perf_counter()
        # run the command as a user would (nothing imports cli)
        r = subprocess.run([sys.executable, "-m", "cli.train", "reflectance", *map(str, args)],
                           capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(r.stdout + r.stderr)
        train_s = time.perf_counter() - t0
        net, doc, _ = load_reflectance(run)
        net.eval()
        G = load_generator(doc["prior"])
        lat = load_file(str(run / "latents.safetensors"))
        sp = make_splits(store, 0.15, 1, seed=0)
        row = {"name": f"{head}: quality on twin", "head": head, "steps": doc["step"], "train_s": train_s}
        sets = {"heldout_lights": OlatDataset(store, sp.train_takes, sp.val_lights),
                "heldout_subjects": OlatDataset(store, sp.val_takes, None)}
        for name, ds in sets.items():
            geo = PriorGeometry(G, [lat[n] for n in ds.names], max_samples=12)
            P, T, M, B = [], [], [], []
            for ti in range(len(ds.takes)):
                for cam in range(len(ds.takes[ti].cameras)):
                    it = ds.full_image(ti, cam, ds.lights[:8])
                    P.append(olat_rays(net, geo, ti, it["origins"], it["dirs"], it["light_dirs"]).numpy())
                    T.append(it["target"].numpy())
                    M.append(np.broadcast_to(it["mask"].numpy()[None, :, None] > 0, P[-1].shape))
                    # baseline ignoring the light: mean OLAT over the training lights, same view
                    mean = np.mean([ds.image(ti, cam, int(l)) for l in sp.train_lights], 0)
                    B.append(np.broadcast_to(mean.reshape(3, -1).T[None], P[-1].shape))
            row[f"{name}_olat_psnr"] = psnr(np.concatenate(P), np.concatenate(T), np.concatenate(M))
            row[f"{name}_mean_olat_psnr"] = psnr(np.concatenate(B), np.concatenate(T), np.concatenate(M))
        # environment relight of every subject (train and held out), every camera
        all_ds = OlatDataset(store)
        geo = PriorGeometry(G, [lat[n] for n in all_ds.names], max_samples=12)
        for env_name in ("studio", "sunset"):
            env = builtin_environment(env_name, height=64)
            P, T, M, times = [], [], [], []
            for ti, tk in enumerate(all_ds.takes):
                E = light_weights(env, tk.light_directions)  # world frame, the stage's lights
                Et = torch.from_numpy(E).float()
                for cam in range(len(tk.cameras)):
                    truth = np.einsum("lc,lchw->hwc", E, tk.olat(cam)).reshape(-1, 3)
                    o, d = all_ds.rays(ti, cam)
                    tm: list = []
                    pred = relight_rays(net, geo, ti, torch.from_numpy(np.broadcast_to(o, (d.shape[0] * d.shape[1], 3)).copy()),
                                        torch.from_numpy(d.reshape(-1, 3)), torch.from_numpy(all_ds.light_dirs(ti)), Et,
                                        timing=tm)
                    times.append((tm[0].geometry_s, tm[0].network_s))
                    P.append(pred.numpy())
                    T.append(truth)
                    M.append(np.broadcast_to(all_ds.mask(ti, cam)[0].reshape(-1, 1), truth.shape))
            row[f"env_{env_name}_psnr"] = psnr(np.concatenate(P), np.concatenate(T), np.concatenate(M))
            row["relight_geometry_s_per_view"] = float(np.median([t[0] for t in times]))
            row["relight_network_s_per_view"] = float(np.median([t[1] for t in times]))
        print("  ", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__" and "--quality" in __import__("sys").argv:
    import sys

    i = sys.argv.index("--quality")
    cap, pri, o = sys.argv[i + 1:i + 4]
    st = int(sys.argv[i + 4]) if len(sys.argv) > i + 4 else 300
    quality(cap, pri, o, steps=st)
elif __name__ == "__main__":
    import sys

    for r in main(quick="--quick" in sys.argv):
        print(r)
