"""``ls-train reflectance``: train the triplane reflectance network straight from a store.

Registered into the ``ls-train`` group by ``cli/train.py``; also runs alone::

    python -m cli.train_reflectance --store S.zarr --prior runs/prior --out runs/refl --head basis
    torchrun --nproc_per_node 4 -m cli.train_reflectance --store S.zarr --prior P --out R

Steps: validate the store (refused with every problem listed), fit each subject's prior latent
to its fully lit tracking frames (stored in OUT/latents.safetensors, reused on --resume), train,
checkpoint (OUT/reflectance.safetensors + .json), write validation images (OUT/val/*.png).

Exit status: 0 success, 2 bad arguments or inputs (named), 130 interrupted (the last checkpoint
is kept; ``--resume`` continues to the same step count).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

__all__ = ["reflectance", "main"]


def _prior_stem(path: Path) -> Path:
    """A prior checkpoint stem from a folder (``<dir>/prior``), a stem or a file of the pair."""
    if path.is_dir():
        cands = sorted(path.glob("*.json"))
        if (path / "prior.json").exists():
            return path / "prior"
        for c in cands:
            try:
                if json.loads(c.read_text()).get("format") == "lightstage-prior":
                    return c.with_suffix("")
            except (OSError, ValueError):
                continue
        raise click.BadParameter(f"{path}: no prior checkpoint (prior.json + prior.safetensors) in this folder",
                                 param_hint="--prior")
    return path.with_suffix("") if path.suffix in (".json", ".safetensors") else path


@click.command("reflectance")
@click.option("--store", required=True, type=click.Path(exists=True, file_okay=False), help="Zarr OLAT store")
@click.option("--prior", "prior_path", required=True, type=click.Path(exists=True),
              help="prior checkpoint folder (from `ls-train prior`) or its stem")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="run folder")
@click.option("--head", type=click.Choice(["basis", "concat"]), default="basis", show_default=True)
@click.option("--steps", default=2000, show_default=True, type=click.IntRange(1))
@click.option("--batch", default=2, show_default=True, type=click.IntRange(1))
@click.option("--rays", default=512, show_default=True, type=click.IntRange(1), help="rays per item")
@click.option("--lights", "lights_per_item", default=4, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=5e-3, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--n-basis", default=16, show_default=True, type=click.IntRange(1), help="K (basis head)")
@click.option("--fit-steps", default=200, show_default=True, type=click.IntRange(0),
              help="latent-fitting steps per subject")
@click.option("--holdout-lights", default=0.15, show_default=True, type=click.FloatRange(0, 0.9))
@click.option("--holdout-subjects", default=1, show_default=True, type=click.IntRange(0))
@click.option("--val-every", default=250, show_default=True, type=click.IntRange(0))
@click.option("--ckpt-every", default=250, show_default=True, type=click.IntRange(0))
@click.option("--max-samples", default=12, show_default=True, type=click.IntRange(0),
              help="heaviest prior samples kept per ray (0: all)")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", is_flag=True, help="continue the run in OUT")
@click.option("--overwrite", is_flag=True, help="start again, replacing the run in OUT")
@click.option("--threads", default=None, type=click.IntRange(1), help="torch CPU threads")
def reflectance(store, prior_path, out, head, steps, batch, rays, lights_per_item, lr, n_basis, fit_steps,
                holdout_lights, holdout_subjects, val_every, ckpt_every, max_samples, seed, resume,
                overwrite, threads):
    """Train the reflectance network (concat or basis head) on a light-stage store."""
    import torch
    from rich.console import Console
    from safetensors.torch import load_file, save_file

    from lightstage.store import StoreError
    from model.checkpoint import CheckpointError, load_generator
    from model.olat_data import DataConfig, OlatDataset, make_splits, open_takes, validate_takes
    from model.reflectance import ReflectanceConfig
    from model.relight_model import PriorGeometry
    from model.train_reflectance import (ReflectanceTrainer, TrainConfig, load_reflectance, radiance_scale_of,
                                         tracking_views)

    console = Console(stderr=True)
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other")
    has_run = (out / "reflectance.json").exists()
    if has_run and not (resume or overwrite):
        raise click.UsageError(f"{out} already holds a reflectance run; pass --resume to continue it "
                               "or --overwrite to start again")
    # 1. the store, before anything expensive
    try:
        takes = open_takes(store)
        validate_takes(takes)
        splits = make_splits(store, holdout_lights, holdout_subjects, seed)
    except StoreError as e:
        console.print(f"[red]error:[/red] {e}")
        sys.exit(2)
    if not splits.train_lights or not splits.train_takes:
        console.print("[red]error:[/red] nothing left to train on after the hold-outs")
        sys.exit(2)
    try:
        G = load_generator(_prior_stem(Path(prior_path)))
    except (CheckpointError, ValueError) as e:
        console.print(f"[red]error:[/red] --prior: {e}")
        sys.exit(2)
    if overwrite:
        for f in ("reflectance.json", "reflectance.safetensors", "log.jsonl", "latents.safetensors", "latents.json"):
            (out / f).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    # 2. latents: fitted once per take to its fully lit views, kept for --resume
    from model.fitting import FitConfig, fit_latent

    names = [tk.path.split(":")[-1] for tk in takes]
    lat_path = out / "latents.safetensors"
    latents = load_file(str(lat_path)) if lat_path.exists() else {}
    lat_meta = json.loads((out / "latents.json").read_text()) if (out / "latents.json").exists() else {}
    todo = [i for i, n in enumerate(names) if n not in latents]
    if todo:
        from cli.train import _progress

        with _progress(console) as prog:
            task = prog.add_task("fit latents", total=len(todo) * max(fit_steps, 1), info="")
            for i in todo:
                imgs, labels, ev = tracking_views(takes[i], G.cfg.img_resolution)
                res = fit_latent(G, imgs, labels, FitConfig(steps=fit_steps),
                                 on_step=lambda s, n, l, name=names[i]: prog.update(
                                     task, advance=1, info=f"{name} loss {l:.4f}"))
                latents[names[i]] = res.ws[0].detach().cpu().contiguous()
                lat_meta[names[i]] = {"exposure_ev": ev, "fit_steps": fit_steps,
                                      "final_loss": res.losses[-1] if res.losses else None}
                if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank fits the
                    # same (deterministic) latents; only rank 0 writes them
                    save_file(latents, str(lat_path))
                    (out / "latents.json").write_text(json.dumps(lat_meta, indent=1) + "\n")
                if not fit_steps:
                    prog.update(task, advance=1)

    # 3. data and geometry
    dcfg = DataConfig(rays_per_item=rays, lights_per_item=lights_per_item)
    train = OlatDataset(store, splits.train_takes, splits.train_lights, config=dcfg, seed=seed)

    def geometry(ds):
        return PriorGeometry(G, [latents[n] for n in ds.names], max_samples=max_samples)

    val = {}
    if splits.val_lights:
        v = OlatDataset(store, splits.train_takes[:2], splits.val_lights, config=dcfg)
        val["heldout_lights"] = (v, geometry(v))
    if splits.val_takes:
        v = OlatDataset(store, splits.val_takes[:2], None, config=dcfg)
        val["heldout_subjects"] = (v, geometry(v))
    tcfg = TrainConfig(steps=steps, batch=batch, rays=rays, lights_per_item=lights_per_item, lr=lr,
                       holdout_light_fraction=holdout_lights, holdout_subjects=holdout_subjects, seed=seed,
                       val_every=val_every, ckpt_every=ckpt_every)
    if resume and has_run:
        _, doc, _ = load_reflectance(out)
        ncfg = ReflectanceConfig.from_dict(doc["config"])
    else:
        ncfg = ReflectanceConfig.tiny(head=head, plane_channels=G.cfg.plane_channels, n_basis=n_basis,
                                      plane_mode=G.cfg.render.mode, box_warp=float(G.cfg.render.box_warp),
                                      radiance_scale=radiance_scale_of(train, seed=seed))
    meta = {"splits": splits.to_dict(), "store": str(Path(store).resolve()),
            "prior": str(_prior_stem(Path(prior_path)).resolve()), "latents": lat_meta}
    trainer = ReflectanceTrainer(tcfg, ncfg, train, geometry(train), out, val=val, meta=meta)
    if resume and trainer.resume():
        console.print(f"resumed at step {trainer.step} of {steps}")

    from cli.train import _progress

    with _progress(console) as prog:
        task = prog.add_task(f"train {ncfg.head}", total=steps, completed=trainer.step, info="")

        def on_step(step, logs):
            info = f"loss {logs['loss']:.4f}"
            for k, v in logs.items():
                if k.endswith("/psnr"):
                    info += f"  {k.split('/')[0]} {v:.2f} dB"
            prog.update(task, completed=step, info=info)

        try:
            trainer.fit(on_step=on_step)
        except KeyboardInterrupt:
            trainer.save()
            console.print(f"interrupted at step {trainer.step}; checkpoint kept in {out} (--resume continues)")
            sys.exit(130)
    last = {k: v for e in trainer.history for k, v in e.items() if "/" in k}
    for k, v in sorted(last.items()):
        console.print(f"  {k}: {v:.3f}")
    console.print(f"done: {trainer.step} steps; checkpoint {out / 'reflectance.safetensors'}")


main = reflectance  # the name cli/train.py registers into `ls-train`

if __name__ == "__main__":
    reflectance()
