"""``ls-ingest``: raw OLAT captures -> calibrated, motion-compensated Zarr v3 store.

Examples::

    ls-ingest CAPTURE --calibration cal.json --out subjects.zarr --workers 4
    ls-ingest CAP1 CAP2 --calibration cal.json --out subjects.zarr --rename s000/t0=s001/t0
    ls-ingest CAP3 --calibration cal.json --out subjects.zarr     # adds CAP3's takes
    ls-ingest CAPTURE --calibration cal.json --out subjects.zarr --scheduler tcp://host:8786
    ls-ingest --verify subjects.zarr

An interrupted run (Ctrl-C, kill) continues when the same command is run again.
Exit status: 0 success, 1 some frames failed (named on stderr; a rerun retries them) or
verification found problems, 2 bad arguments or inputs, 130 interrupted.
"""

from __future__ import annotations

import sys

import click
from cli._progress import progress_bar
from rich.console import Console
from rich.progress import Progress

__all__ = ["main"]


def _progress(console: Console) -> Progress:
    return progress_bar(console, "frames")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("capture", nargs=-1, type=click.Path(exists=True, file_okay=True))
@click.option("--calibration", "-c", type=click.Path(exists=True, dir_okay=False),
              help="calibration file (lightstage-calibration JSON)")
@click.option("--out", "-o", type=click.Path(), help="output store (STORE.zarr)")
@click.option("--workers", "-j", type=click.IntRange(min=0), default=None,
              help="LocalCluster of N worker processes (0 = in this process; default 1)")
@click.option("--scheduler", type=str, default=None,
              help="address of a running Dask scheduler (tcp://...); overrides --workers")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--scale", type=float, default=None,
              help="stored = radiance / scale (default: chosen from the calibration)")
@click.option("--skip-bad", is_flag=True, help="record bad raw files in provenance and go on (exit 0)")
@click.option("--overwrite", is_flag=True, help="replace existing takes in the store")
@click.option("--subjects", type=str, default=None, help="comma-separated subjects to ingest")
@click.option("--rename", "renames", multiple=True, metavar="SUBJECT/TAKE=SUBJECT/TAKE",
              help="store a captured take under another name (repeatable), e.g. when two "
                   "captures both hold s000/t0")
@click.option("--reference", type=str, default="central", show_default=True,
              help="tracking frame to align to: central, first or a tracking position")
@click.option("--flow-model", type=click.Choice(["dense", "homography"]), default="dense",
              show_default=True, help="dense optical flow, or a per-camera homography (rigid)")
@click.option("--no-motion", is_flag=True, help="store frames as captured (no motion compensation)")
@click.option("--faceolat", is_flag=True,
              help="CAPTURE is a FaceOLAT-style EXR tree (CamXX/<ID>/<ID>.<frame>.exr, lights/)")
@click.option("--colour-matrix", type=click.Path(exists=True, dir_okay=False), default=None,
              help="FaceOLAT: 3x4 [black | 3x3] or 3x3 colour matrix file (JSON/NPY/text)")
@click.option("--verify", "verify", type=click.Path(exists=True), default=None,
              help="check a store's completeness and checksums instead of ingesting")
def main(capture, calibration, out, workers, scheduler, dtype, scale, skip_bad, overwrite,
         subjects, renames, reference, flow_model, no_motion, faceolat, colour_matrix, verify):
    """Ingest the raw captures under CAPTURE... into a calibrated Zarr v3 store (one group per
    subject/take; takes already in the store are left untouched)."""
    from lightstage.align import FlowConfig
    from lightstage.calibfile import CalibrationError
    from lightstage.ingest import IngestConfig, IngestError, ingest, verify_store
    from lightstage.manifest import ManifestError
    from lightstage.rig import RigError
    from lightstage.store import StoreError

    console = Console(stderr=True)
    if verify:
        if capture or out:
            raise click.UsageError("--verify STORE takes no CAPTURE or --out")
        with _progress(console) as prog:
            task = prog.add_task("verify", total=None)
            problems = verify_store(verify, lambda ev, k, n: prog.update(task, completed=k, total=n))
        if problems:
            for p in problems[:200]:
                console.print(f"[red]x[/red] {p}")
            if len(problems) > 200:
                console.print(f"... and {len(problems) - 200} more")
            console.print(f"[red]{verify}: {len(problems)} problem(s)[/red]")
            sys.exit(1)
        console.print(f"[green]{verify}: complete, every checksum matches[/green]")
        return
    if not capture:
        raise click.UsageError("give CAPTURE (or --verify STORE)")
    if faceolat:
        from lightstage.importers.faceolat import import_faceolat

        if not out:
            raise click.UsageError("--out is required")
        if len(capture) != 1:
            raise click.UsageError("--faceolat takes one CAPTURE tree")
        try:
            grp = import_faceolat(capture[0], out, colour_matrix=colour_matrix, calibration=calibration,
                                  dtype=dtype, scale=scale, motion=not no_motion, overwrite=overwrite,
                                  flow=FlowConfig(model=flow_model))
        except (IngestError, StoreError, CalibrationError) as e:
            console.print(f"[red]error:[/red] {e}")
            sys.exit(2)
        console.print(f"{out}: imported FaceOLAT take {grp}")
        return
    if not calibration:
        raise click.UsageError("--calibration is required")
    if not out:
        raise click.UsageError("--out is required")
    ref: str | int = reference
    if reference not in ("central", "first"):
        try:
            ref = int(reference)
        except ValueError:
            raise click.BadParameter("central, first or an integer", param_hint="--reference") from None
    rename = {}
    for r in renames:
        src, sep, dst = r.partition("=")
        if not sep or src.count("/") != 1 or dst.count("/") != 1:
            raise click.BadParameter(f"{r!r}: expected SUBJECT/TAKE=SUBJECT/TAKE", param_hint="--rename")
        rename[src] = dst
    cfg = IngestConfig(dtype=dtype, scale=scale, skip_bad=skip_bad, overwrite=overwrite,
                       subjects=[s for s in subjects.split(",") if s] if subjects else None,
                       rename=rename or None,
                       motion=not no_motion, reference=ref, flow=FlowConfig(model=flow_model))
    n_workers = 1 if workers is None else workers
    try:
        with _progress(console) as prog:
            task = prog.add_task("ingest", total=None)

            def cb(event, k, n):
                if event.startswith("dashboard:"):
                    prog.console.print(f"Dask dashboard: {event.split(':', 1)[1]}")
                else:
                    prog.update(task, completed=k, total=n)

            report = ingest(list(capture), calibration, out, config=cfg, workers=n_workers,
                            scheduler=scheduler, progress=cb)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: rerun the same command to resume[/yellow]")
        sys.exit(130)
    except (IngestError, StoreError, CalibrationError, ManifestError, RigError) as e:
        console.print(f"[red]error:[/red] {e}")
        sys.exit(2)
    for e in report.errors:
        console.print(f"[red]x[/red] {e}")
    n_skip = sum(1 for _ in report.skipped)
    console.print(f"{out}: {len(report.takes)} take(s), {report.written} image(s) written, "
                  f"{report.resumed} already done, {n_skip} skipped, {report.seconds:.1f} s")
    if not report.ok:
        console.print(f"[red]{len(report.errors)} error(s): those images are not in the store; "
                      "fix the inputs and rerun (or --skip-bad)[/red]")
        sys.exit(1)


if __name__ == "__main__":
    main()
