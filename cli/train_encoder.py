"""``ls-train encoder``: train the portrait encoder (image -> W+) for a trained head prior.

Thin command: parses and validates options, loads the prior, calls
:func:`model.train_encoder.train_encoder`, reports held-out PSNR (encoder vs the mean-latent
baseline) and writes ``OUT/encoder.safetensors`` + ``OUT/encoder.json``.

Example::

    ls-train encoder --prior runs/prior --out runs/encoder --steps 2000 --twin-subjects 16
    python -m cli.train_encoder --prior runs/prior --out runs/encoder --steps 50
"""

from __future__ import annotations

import time
from pathlib import Path

import click

__all__ = ["main", "resolve_prior"]


def resolve_prior(path: str | Path) -> Path:
    """Checkpoint stem for ``--prior``: a folder holding ``prior.safetensors``/``prior.json``
    (what ``ls-train prior --out`` writes), or a stem / .json / .safetensors path."""
    p = Path(path)
    if p.is_dir():
        stem = p / "prior"
        if not (p / "prior.json").is_file():
            jsons = sorted(q for q in p.glob("*.json") if q.with_suffix(".safetensors").is_file())
            if len(jsons) != 1:
                raise click.BadParameter(
                    f"{p}: no prior.json/prior.safetensors here"
                    + (f" and {len(jsons)} other checkpoints: name one" if jsons else ""),
                    param_hint="--prior")
            stem = jsons[0].with_suffix("")
        return stem
    return p.with_suffix("") if p.suffix in (".json", ".safetensors") else p


@click.command("encoder")
@click.option("--prior", "prior_path", required=True, type=click.Path(exists=True),
              help="Prior checkpoint folder (from `ls-train prior --out`) or checkpoint stem.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder for encoder.safetensors + encoder.json.")
@click.option("--steps", default=2000, show_default=True, type=click.IntRange(1))
@click.option("--batch", default=8, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--image-every", default=4, show_default=True, type=click.IntRange(0),
              help="Apply the image reconstruction loss every N steps (0: latent loss only).")
@click.option("--pool", "pool_size", default=256, show_default=True, type=click.IntRange(1),
              help="Rendered prior samples kept in the training pool.")
@click.option("--refresh", default=1, show_default=True, type=click.IntRange(0),
              help="Fresh prior samples rendered into the pool per step.")
@click.option("--twin-subjects", default=0, show_default=True, type=click.IntRange(0),
              help="Digital-twin subjects rendered for training (image loss only).")
@click.option("--twin-views", default=4, show_default=True, type=click.IntRange(1))
@click.option("--twin-every", default=4, show_default=True, type=click.IntRange(1),
              help="Use a twin batch every N steps (when --twin-subjects > 0).")
@click.option("--eval-subjects", default=4, show_default=True, type=click.IntRange(0),
              help="Held-out twin subjects for the final PSNR report (0: prior samples only).")
@click.option("--plane-residual/--no-plane-residual", default=False, show_default=True,
              help="Also predict a triplane residual (GOAE/TriPlaneNet-style refinement).")
@click.option("--display-operator", default=None,
              type=click.Choice(["linear", "reinhard", "reinhard-lum", "aces", "filmic"]),
              help="Display transform of the prior's training images (default: from the prior's "
                   "metadata, else aces).")
@click.option("--exposure-ev", default=None, type=float, help="Display exposure (default: prior's, else 0).")
@click.option("--latents", default="auto", show_default=True, type=click.Choice(["auto", "mapping", "codes"]),
              help="Prior latents to train on: the mapping network (GAN priors), the auto-decoder "
                   "codes in train_state.safetensors beside the prior (`ls-train prior`), or auto.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--threads", default=None, type=click.IntRange(1), help="torch CPU threads.")
@click.option("--overwrite", is_flag=True, help="Replace an existing encoder in --out.")
def main(prior_path, out_dir, steps, batch, lr, image_every, pool_size, refresh, twin_subjects,
         twin_views, twin_every, eval_subjects, plane_residual, display_operator, exposure_ev,
         latents, seed, threads, overwrite):
    """Train the portrait encoder for the prior PRIOR on its own samples (and twin renders)."""
    import numpy as np
    import torch
    from rich.console import Console

    from cli._progress import progress_bar
    from model.checkpoint import CheckpointError, load_checkpoint, load_generator
    from model.encoder import EncoderConfig, EncoderError, save_encoder
    from model.train_encoder import (EncoderTrainConfig, LatentSampler, config_dict,
                                     evaluate_inversion, look_at_labels, render_twin_views,
                                     sample_prior_batch, train_encoder)

    console = Console(stderr=True)
    if threads:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    if (out / "encoder.json").exists() and not overwrite:
        raise click.ClickException(f"{out / 'encoder.json'} exists; refusing to overwrite (pass --overwrite)")
    stem = resolve_prior(prior_path)
    try:
        G = load_generator(stem)
        pmeta = load_checkpoint(stem).meta
    except CheckpointError as e:
        raise click.ClickException(str(e)) from None
    try:
        sampler = LatentSampler.for_prior(stem) if latents != "mapping" else LatentSampler()
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    if latents == "codes" and sampler.kind != "codes":
        raise click.ClickException(f"{stem.parent / 'train_state.safetensors'}: no auto-decoder 'codes' "
                                   "found (needed by --latents codes)")
    disp = pmeta.get("display") if isinstance(pmeta.get("display"), dict) else {}
    operator = display_operator or disp.get("operator", "aces")
    ev = exposure_ev if exposure_ev is not None else float(disp.get("exposure_ev", 0.0))
    try:
        cfg = EncoderTrainConfig(steps=steps, batch=batch, lr=lr, image_every=image_every,
                                 pool_size=pool_size, refresh=refresh, twin_subjects=twin_subjects,
                                 twin_views=twin_views, twin_every=twin_every if twin_subjects else 0,
                                 seed=seed)
        enc_cfg = EncoderConfig.for_generator(G, plane_residual=plane_residual)
    except (ValueError, EncoderError) as e:
        raise click.ClickException(str(e)) from None
    R = G.cfg.img_resolution
    console.print(f"prior {stem} ({G.cfg.img_resolution} px, {G.num_ws} x {G.cfg.w_dim} W+); "
                  f"display transform {operator} @ EV {ev:g}; latents from "
                  + ("the mapping network" if sampler.kind == "mapping" else f"{len(sampler.codes)} subject codes"))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 7)

    def twin_set(seeds_base, n_subj, views, what, progress):
        seeds = [seeds_base + i for i in range(n_subj) for _ in range(views)]
        labels = look_at_labels(rng.uniform(-0.5, 0.5, len(seeds)), rng.uniform(-0.25, 0.25, len(seeds)))
        task = progress.add_task(what, total=len(seeds), info="")
        imgs, masks = render_twin_views(seeds, labels, R, operator=operator, exposure_ev=ev,
                                        progress=lambda i, n: progress.update(task, completed=i))
        return imgs, torch.from_numpy(labels), masks

    t0 = time.perf_counter()
    with progress_bar(console, "it", digits=2, info=True) as progress:
        twin = None
        if twin_subjects:
            ti, tl, _ = twin_set(10_000, twin_subjects, twin_views, "twin renders (train)", progress)
            twin = (ti, tl)
        task = progress.add_task("training", total=steps, info="")

        def report(step, total, m):
            info = " ".join(f"{k}={v:.4g}" for k, v in m.items() if k != "seconds")
            progress.update(task, completed=step, info=info)

        encoder, hist = train_encoder(G, cfg, enc_cfg, twin=twin, progress=report, sampler=sampler)
        # Held-out evaluation: fresh prior samples (different seed) and unseen twin subjects.
        gen = torch.Generator().manual_seed(seed + 1_000_003)
        img, c, _ = sample_prior_batch(G, 16, gen, np.random.default_rng(seed + 1_000_003), cfg, sampler)
        metrics = {"prior_samples": evaluate_inversion(encoder, G, img, c)}
        if eval_subjects:
            ei, el, em = twin_set(90_000, eval_subjects, 2, "twin renders (held out)", progress)
            metrics["twin_heldout"] = evaluate_inversion(encoder, G, ei, el, masks=em)
    seconds = time.perf_counter() - t0
    meta = {"prior": str(stem), "latents": sampler.kind, "train": config_dict(cfg), "display": {"operator": operator, "exposure_ev": ev},
            "metrics": metrics, "seconds": seconds, "final_loss": hist[-1]["loss"] if hist else None}
    try:
        wpath, _ = save_encoder(out, encoder, meta, overwrite=overwrite)
    except EncoderError as e:
        raise click.ClickException(str(e)) from None
    for name, m in metrics.items():
        console.print(f"{name}: PSNR encoder {m['psnr_encoder']:.2f} dB vs mean latent "
                      f"{m['psnr_mean_latent']:.2f} dB (n={m['n']})")
    console.print(f"wrote {wpath} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
