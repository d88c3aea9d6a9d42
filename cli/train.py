"""``ls-train``: training commands (a click group).

``ls-train prior``  the generative head prior (EG3D-compatible triplane generator) as a
multi-view auto-decoder on an EG3D-style image folder, or on twin portraits rendered on the fly.
Other subcommands (``encoder``, ``reflectance``) are registered from their own modules
(``cli/train_encoder.py``, ``cli/train_reflectance.py``) when present.

Examples::

    ls-train prior --data twin --config tiny --out runs/prior --steps 2000
    ls-train prior --data runs/prior/data --out runs/prior --steps 4000 --resume
    torchrun --nproc_per_node 4 -m cli.train prior --data DIR --config small --out runs/p
    python -m cli.train prior --data twin --out /tmp/p --steps 20 --subjects 4 --views 3

Exit status: 0 success, 2 bad arguments or inputs (named), 130 interrupted (the last
checkpoint is kept; ``--resume`` continues).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

__all__ = ["main", "prior"]


def _progress(console):
    from cli._progress import progress_bar

    return progress_bar(console, "it", digits=2, info=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Train the head prior, the reflectance network or the encoder."""


@main.command("prior")
@click.option("--data", required=True,
              help="EG3D-style image folder (dataset.json with camera labels), or 'twin' to render "
                   "twin portraits into OUT/data first.")
@click.option("--config", "config_name", default="tiny", show_default=True,
              help="generator preset: tiny, small or eg3d-ffhq512")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="checkpoint folder")
@click.option("--steps", default=2000, show_default=True, type=click.IntRange(1), help="total optimiser steps")
@click.option("--batch", default=4, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=2e-3, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--lr-codes", default=1e-2, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--ckpt-every", default=250, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", is_flag=True, help="continue from the checkpoint in OUT")
@click.option("--overwrite", is_flag=True, help="start again, replacing the checkpoint in OUT")
@click.option("--subjects", default=48, show_default=True, type=click.IntRange(1), help="twin subjects (--data twin)")
@click.option("--views", default=5, show_default=True, type=click.IntRange(1), help="views per twin subject")
@click.option("--threads", default=None, type=click.IntRange(1), help="torch CPU threads")
def prior(data, config_name, out, steps, batch, lr, lr_codes, ckpt_every, seed, resume, overwrite,
          subjects, views, threads):
    """Train the generative head prior (multi-view auto-decoder; see model.train_prior)."""
    from rich.console import Console

    import torch

    from model.checkpoint import CheckpointError
    from model.configs import PRESETS, get_config
    from model.data import DatasetError, TwinDatasetConfig, render_twin_dataset
    from model.train_prior import TrainConfig, train_prior

    console = Console(stderr=True)
    if threads:
        torch.set_num_threads(threads)
    if config_name not in PRESETS:
        raise click.BadParameter(f"unknown config {config_name!r}; choose from {', '.join(PRESETS)}",
                                 param_hint="--config")
    if resume and overwrite:
        raise click.BadParameter("--resume and --overwrite exclude each other", param_hint="--resume")
    cfg = get_config(config_name)
    out = Path(out)
    try:
        if data == "twin":
            data_dir = out / "data"
            if not (data_dir / "dataset.json").exists():
                tc = TwinDatasetConfig(n_subjects=subjects, views=views, resolution=cfg.img_resolution, seed=seed)
                with _progress(console) as pr:
                    task = pr.add_task("render twin", total=subjects * views, info="")
                    render_twin_dataset(data_dir, tc, progress=lambda d, n: pr.update(task, completed=d))
            else:
                console.print(f"using existing twin renders in {data_dir}")
        else:
            data_dir = Path(data)
            if not data_dir.is_dir():
                raise click.BadParameter(f"{data_dir}: not a folder (or use 'twin')", param_hint="--data")
        tcfg = TrainConfig(steps=steps, batch=batch, lr=lr, lr_codes=lr_codes, ckpt_every=ckpt_every, seed=seed)
        with _progress(console) as pr:
            task = pr.add_task("train prior", total=steps, info="")

            def on_step(step, total, parts):
                pr.update(task, completed=step,
                          info=f"loss {parts['loss']:.4f}  l1 {parts['l1']:.4f}  raw {parts['raw']:.4f}")

            res = train_prior(data_dir, out, cfg, tcfg, resume=resume, overwrite=overwrite, on_step=on_step)
    except (CheckpointError, DatasetError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}")
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted; the last checkpoint is kept (rerun with --resume)")
        sys.exit(130)
    last = res.history[-1][1] if res.history else float("nan")
    console.print(f"prior at step {res.step}: {res.checkpoint} (last loss {last:.4f})")


def _register_optional(module: str, attr: str = "main") -> None:
    """Add another engineer's subcommand when its module exists (only a *missing* module is skipped)."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            return
        raise
    cmd = getattr(mod, attr, None)
    if isinstance(cmd, click.Command) and cmd.name not in main.commands:
        main.add_command(cmd)


_register_optional("cli.train_encoder")
_register_optional("cli.train_reflectance")


if __name__ == "__main__":
    main()
