"""``ls-simulate``: write a synthetic light-stage capture (raw DNGs + ground truth) with the
digital twin.

Examples::

    ls-simulate capture/ --rig tiny --subjects 1 --seed 0
    ls-simulate capture/ --rig demo --subjects 2 --workers 2 --no-noise
    ls-simulate capture/ --rig lsx-331 --frames 0:3 --no-calibration   # a slice of a huge rig
    ls-simulate capture/ --rig my_rig.json --overwrite

The folder follows ``lightstage.manifest`` (``rig.json``, ``<subject>/<take>/capture.json``,
``raw/<camera>/f<frame>_e<k>.dng``) plus ``truth/`` per take and ``calibration/`` shots with
``truth_calibration.json``; see ``lightstage.twin.capture``. Same seed, same bytes, whatever
``--workers``. A non-empty OUT is refused; ``--overwrite`` replaces only a previous
ls-simulate output (the entries its ``simulation.json`` lists).

Exit status: 0 success, 2 bad arguments or inputs (every invalid rig field is listed), 130
interrupted.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
from cli._progress import progress_bar
from rich.console import Console

from lightstage.rig import BUILTIN_RIGS, RigError, load_rig

__all__ = ["main"]




@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--rig", "rig_spec", default="tiny", show_default=True,
              help=f"built-in rig ({', '.join(sorted(BUILTIN_RIGS))}) or a lightstage-rig JSON file")
@click.option("--subjects", type=click.IntRange(min=0), default=1, show_default=True,
              help="number of random subjects (s000, s001, ...)")
@click.option("--seed", type=int, default=0, show_default=True, help="global seed")
@click.option("--no-noise", is_flag=True, help="exact expected raw values (no shot/read noise)")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="worker processes (spawn); the output does not depend on it")
@click.option("--overwrite", is_flag=True,
              help="replace a previous ls-simulate output in OUT (nothing else is deleted)")
@click.option("--frames", default=None, metavar="A:B",
              help="only sequence frames A..B-1 (e.g. 0:10); default all")
@click.option("--calibration/--no-calibration", default=True, show_default=True,
              help="also simulate the calibration shots (charts, boards, spheres)")
def main(out: Path, rig_spec: str, subjects: int, seed: int, no_noise: bool, workers: int,
         overwrite: bool, frames: str | None, calibration: bool) -> None:
    """Simulate a light-stage capture of random subjects into OUT."""
    console = Console(stderr=True, soft_wrap=True)  # never wrap a file path or field name
    try:
        rig = load_rig(rig_spec)
    except RigError as e:
        console.print(f"[red]error:[/] rig {rig_spec!r}: {len(e.errors)} invalid field(s)",
                      highlight=False)
        for msg in e.errors:
            console.print(f"  {msg}", highlight=False, markup=False)
        sys.exit(2)

    from lightstage.twin.capture import SimulationError, simulate

    n_cams = rig.n_cameras
    t0 = time.perf_counter()
    progress = progress_bar(console, "frames", description="[bold]simulating", digits=2)
    task = None
    counted = [0]

    def on_progress(done: int, total: int) -> None:
        # the bar counts camera images (frame x camera); the rate is shown per rig frame
        nonlocal task
        if task is None:
            task = progress.add_task("simulate", total=total / n_cams)
        progress.update(task, completed=done / n_cams)
        counted[0] = total

    try:
        with progress:
            simulate(out, rig, subjects, seed, noise=not no_noise, overwrite=overwrite,
                     workers=workers, progress=on_progress, frames=frames,
                     calibration=calibration)
    except SimulationError as e:
        console.print(f"[red]error:[/] {e}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: {out} is incomplete; rerun with --overwrite")
        sys.exit(130)
    dt = time.perf_counter() - t0
    n_dng = sum(1 for _ in out.rglob("*.dng"))
    console.print(f"wrote {out}: rig {rig.name}, {subjects} subject(s), {n_dng} DNGs in {dt:.1f} s "
                  f"({counted[0] / n_cams / max(dt, 1e-9):.2f} frames/s, {workers} worker(s))",
                  highlight=False)


if __name__ == "__main__":
    main()
