"""``ls-calibrate``: calibrate a light stage (cameras, colour, lights) from its calibration
capture, or calibrate cameras from ordinary photos of a ChArUco board or chessboard.

Examples::

    ls-calibrate capture/ --out calibration.json --report report/
    ls-calibrate capture/ --out cal.json --colour-method root-polynomial --allow-partial
    ls-calibrate charuco img_*.jpg --board 5x7:0.04:0.02:DICT_6X6_250 --out cam.json
    ls-calibrate chessboard left*.jpg --inner 9x6 --square 1.0 --out left.json
    ls-calibrate chessboard left*.jpg --second right*.jpg --inner 9x6 --out stereo.json
    ls-calibrate chart photo.png --corners corners.json     # patch means + fit, printed

CAPTURE is a folder with ``calibration/shots.json`` (what ``ls-simulate`` writes; a real stage
writes the same, see ``calibration.pipeline``). A chart or board not found in a camera is
reported by camera with the reason; the other cameras are still calibrated, and the exit
status is non-zero unless ``--allow-partial``. An existing output is never replaced without
``--overwrite``.

Exit status: 0 success, 1 partial calibration (without --allow-partial), 2 bad arguments or
unusable inputs, 130 interrupted.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from cli._progress import progress_bar

__all__ = ["main"]

_console = Console(stderr=True, soft_wrap=True)


def _err(msg: str, code: int = 2):
    _console.print(f"[red]error:[/] {msg}", highlight=False)
    sys.exit(code)


def _check_out(out: Path, overwrite: bool):
    if out.exists() and not overwrite:
        _err(f"{out}: exists (use --overwrite to replace it)")
    if out.exists() and out.is_dir():
        _err(f"{out}: is a folder, expected a file path for the calibration JSON")


class _DefaultGroup(click.Group):
    """``ls-calibrate CAPTURE ...`` runs the ``capture`` command; named modes (``charuco``,
    ``chessboard``, ``chart``) are subcommands."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["capture"] + list(args)
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Calibrate a light stage from a calibration capture (default), or cameras from photos."""


def _progress() -> Progress:
    # one bar per stage (boards, colour, chrome ...), each counting images of that stage
    return progress_bar(_console, "img", "[bold]{task.description:<11}", digits=2)


@main.command("capture")
@click.argument("capture_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="calibration JSON to write (lightstage-calibration)")
@click.option("--report", "report", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="folder for the HTML report (index.html, rig.png, lights.png)")
@click.option("--colour-method", type=click.Choice(["matrix-3x3", "root-polynomial"]),
              default="matrix-3x3", show_default=True, help="camera RGB -> Rec.709 fit")
@click.option("--distortion", type=click.Choice(["none", "k1", "k1k2", "k1k2p1p2", "k1k2p1p2k3"]),
              default="k1k2", show_default=True, help="lens distortion coefficients fitted")
@click.option("--cameras", default=None, help="comma-separated subset of cameras")
@click.option("--lights", default=None, help="subset of lights: 0,5,9 or 0:40")
@click.option("--chart-corners", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help='JSON {"<camera>": [[x,y] x4]}: patch-grid corners (no detection)')
@click.option("--rig-name", default=None, help="rig name recorded in the file (default: capture's)")
@click.option("--allow-partial", is_flag=True, help="exit 0 even if some cameras failed")
@click.option("--overwrite", is_flag=True, help="replace an existing --out / report")
def capture_cmd(capture_dir: Path, out: Path, report: Path | None, colour_method: str,
                distortion: str, cameras: str | None, lights: str | None,
                chart_corners: Path | None, rig_name: str | None, allow_partial: bool,
                overwrite: bool) -> None:
    """Calibrate cameras (geometry, colour, vignetting) and lights from CAPTURE_DIR."""
    from calibration.colour import load_corners
    from calibration.pipeline import CalibrateConfig, CaptureError, calibrate_capture
    from calibration.report import write_report
    from lightstage.calibfile import save_calibration

    _check_out(out, overwrite)
    if report is not None and (report / "index.html").exists() and not overwrite:
        _err(f"{report / 'index.html'}: exists (use --overwrite to replace it)")
    try:
        light_list = _parse_lights(lights)
        corners = load_corners(chart_corners) if chart_corners else None
    except ValueError as e:
        _err(str(e))
    cfg = CalibrateConfig(colour_method=colour_method, distortion=distortion,
                          cameras=[c.strip() for c in cameras.split(",")] if cameras else None,
                          lights=light_list, chart_corners=corners)
    progress = _progress()
    tasks: dict[str, int] = {}

    def on_progress(stage, done, total):
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total)
        progress.update(tasks[stage], completed=done, total=total)

    t0 = time.perf_counter()
    try:
        with progress:
            run = calibrate_capture(capture_dir, cfg, on_progress, rig_name)
    except CaptureError as e:
        _err(f"{capture_dir}: {e}")
    except KeyboardInterrupt:
        _err("interrupted", 130)
    cal = run.calibration
    if not cal.cameras:
        for c, ps in run.problems.items():
            for p in ps:
                _console.print(f"  {c}: {p}", highlight=False, markup=False)
        _err("no camera could be fully calibrated; nothing written")
    save_calibration(cal, out, overwrite=overwrite)
    if report is not None:
        write_report(report, cal, run.tables, run.problems, overwrite=overwrite)
    _summary(run)
    _console.print(f"wrote {out}" + (f" and {report / 'index.html'}" if report else "") +
                   f" in {time.perf_counter() - t0:.1f} s", highlight=False)
    failed = [c for c in run.problems if c not in cal.cameras]
    if failed and not allow_partial:
        _err(f"cameras not calibrated: {', '.join(failed)} (see above; --allow-partial accepts "
             "a partial calibration)", 1)


def _parse_lights(spec: str | None):
    if not spec:
        return None
    out: list[int] = []
    try:
        for part in spec.split(","):
            if ":" in part:
                a, b = part.split(":")
                out += list(range(int(a), int(b)))
            else:
                out.append(int(part))
    except ValueError:
        raise ValueError(f"--lights {spec!r}: expected e.g. 0,5,9 or 0:40") from None
    return out


def _summary(run) -> None:
    t = Table(title="cameras", show_lines=False)
    for h in ("camera", "views", "reproj. RMS px", "fx", "dE00 mean", "dE00 max", "problems"):
        t.add_column(h)
    for r in run.tables.get("cameras", []):
        t.add_row(r["camera"], str(r.get("views", "-")),
                  f"{r['rms']:.3f}" if "rms" in r else "-",
                  f"{r['K'][0][0]:.1f}" if "K" in r else "-",
                  f"{r['delta_e2000_mean']:.3f}" if "delta_e2000_mean" in r else "-",
                  f"{r['delta_e2000_max']:.3f}" if "delta_e2000_max" in r else "-",
                  "; ".join(r["problems"]))
    _console.print(t)
    sp = run.tables.get("colour_spread", {})
    _console.print(f"cross-camera colour spread dE00: mean {sp.get('delta_e2000_mean', 0):.3f}, "
                   f"max {sp.get('delta_e2000_max', 0):.3f}; lights calibrated: "
                   f"{len(run.calibration.lights)}", highlight=False)
    for p in run.tables.get("light_problems", []):
        _console.print(f"  [yellow]{p}[/]", highlight=False)


def _images(paths, what):
    from calibration.raw import RawDecodeError, display_u8, load_image

    out = []
    for p in paths:
        try:
            im = load_image(p)
        except RawDecodeError as e:
            _err(str(e))
        out.append((Path(p), display_u8(im.rgb @ np.array([0.2126, 0.7152, 0.0722], np.float32),
                                        100.0)))
    if not out:
        _err(f"no {what} images given")
    return out


def _single_camera(pattern, images, name):
    """Detect in every image, calibrate; returns (detections, rms, K, dist, poses)."""
    from calibration.geometry import GeometryError, calibrate_camera

    dets = []
    for p, g in images:
        d = pattern.detect(g)
        if d is None or len(d.ids) < pattern.min_corners:
            _console.print(f"  [yellow]{p}: {pattern.name} not found[/]", highlight=False)
            dets.append(None)
        else:
            dets.append(d)
    sizes = {g.shape for _, g in images}
    if len(sizes) > 1:
        _err(f"{name}: images differ in size {sorted(sizes)}")
    try:
        res = calibrate_camera(pattern, [d for d in dets if d is not None], images[0][1].shape,
                               name, "k1k2p1p2k3")
    except GeometryError as e:
        _err(str(e))
    return dets, res


def _camera_json(name, K, dist, size, rms, views):
    return {"camera": name, "K": np.asarray(K).tolist(), "distortion": np.asarray(dist).tolist(),
            "image_size": list(size), "reprojection_rms_px": rms, "views": views}


def _write_json(out: Path, obj, overwrite: bool):
    _check_out(out, overwrite)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(out)


@main.command("charuco")
@click.argument("images", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("--board", required=True, help="COLSxROWS:SQUARE:MARKER:DICT, e.g. 5x7:0.04:0.02:DICT_6X6_250")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON with K, distortion, RMS (default: print only)")
@click.option("--overwrite", is_flag=True)
def charuco_cmd(images, board, out, overwrite):
    """Intrinsics of one camera from photos of a ChArUco board."""
    from calibration.geometry import charuco_pattern, parse_board

    try:
        spec = parse_board(board)
    except ValueError as e:
        _err(str(e))
    if out is not None:
        _check_out(out, overwrite)
    ims = _images(images, "board")
    dets, (rms, K, dist, _) = _single_camera(charuco_pattern(spec), ims, "camera")
    n = sum(d is not None for d in dets)
    _console.print(f"{n}/{len(ims)} views, RMS {rms:.3f} px, fx {K[0, 0]:.2f} fy {K[1, 1]:.2f} "
                   f"cx {K[0, 2]:.2f} cy {K[1, 2]:.2f}, distortion {np.round(dist, 5).tolist()}",
                   highlight=False)
    if out is not None:
        _write_json(out, _camera_json("camera", K, dist, ims[0][1].shape, rms, n), overwrite)


@main.command("chessboard")
@click.argument("images", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("--second", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="images of a second camera, paired in order with IMAGES (stereo)")
@click.option("--inner", default="9x6", show_default=True, help="inner corners COLSxROWS")
@click.option("--square", type=float, default=1.0, show_default=True, help="square size")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--overwrite", is_flag=True)
def chessboard_cmd(images, second, inner, square, out, overwrite):
    """Intrinsics of one camera (or a stereo pair, jointly) from chessboard photos."""
    from calibration.geometry import GeometryError, calibrate_rig, chessboard_pattern

    try:
        cols, rows = (int(v) for v in inner.lower().split("x"))
    except ValueError:
        _err(f"--inner {inner!r}: expected COLSxROWS, e.g. 9x6")
    if out is not None:
        _check_out(out, overwrite)
    pat = chessboard_pattern((cols, rows), square)
    first = _images(images, "chessboard")
    if not second:
        dets, (rms, K, dist, _) = _single_camera(pat, first, "camera")
        _console.print(f"RMS {rms:.3f} px, fx {K[0, 0]:.2f} fy {K[1, 1]:.2f} cx {K[0, 2]:.2f} "
                       f"cy {K[1, 2]:.2f}", highlight=False)
        if out is not None:
            _write_json(out, _camera_json("camera", K, dist, first[0][1].shape, rms,
                                          sum(d is not None for d in dets)), overwrite)
        return
    sec = _images(second, "second-camera")
    if len(sec) != len(first):
        _err(f"--second has {len(sec)} images, IMAGES has {len(first)}: they must pair up")
    dets = {"cam0": {i: pat.detect(g) for i, (_, g) in enumerate(first)},
            "cam1": {i: pat.detect(g) for i, (_, g) in enumerate(sec)}}
    sizes = {"cam0": first[0][1].shape, "cam1": sec[0][1].shape}
    try:
        geo = calibrate_rig(pat, dets, sizes, None, distortion="k1k2p1p2k3", robust=False)
    except GeometryError as e:
        _err(str(e))
    for c in geo.names:
        _console.print(f"{c}: RMS {geo.rms[c]:.3f} px, fx {geo.K[c][0, 0]:.2f}, centre "
                       f"{np.round(geo.cam2world[c][:3, 3], 4).tolist()}", highlight=False)
    if geo.failed:
        _err("; ".join(geo.failed.values()), 1)
    if out is not None:
        _write_json(out, {"cameras": [dict(_camera_json(c, geo.K[c], geo.dist[c], sizes[c],
                                                        geo.rms[c], geo.n_views[c]),
                                           cam2world=geo.cam2world[c].tolist())
                                      for c in geo.names]}, overwrite)


@main.command("chart")
@click.argument("images", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("--corners", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help='JSON {"<image file name>": [[x,y] x4]} instead of detection')
@click.option("--colour-method", type=click.Choice(["matrix-3x3", "root-polynomial"]),
              default="matrix-3x3", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--overwrite", is_flag=True)
def chart_cmd(images, corners, colour_method, out, overwrite):
    """Find a ColorChecker 24 in photos; print patch means and the fitted correction."""
    from calibration.colour import (ChartNotFound, chart_from_corners, detect_chart, fit_colour,
                                    load_corners, sample_patches)
    from calibration.raw import RawDecodeError, load_image
    from lightstage.targets_spec import colorchecker_reference

    if out is not None:
        _check_out(out, overwrite)
    try:
        given = load_corners(corners) if corners else {}
    except ValueError as e:
        _err(str(e))
    results, failed = {}, []
    for p in images:
        try:
            im = load_image(p)
            key = Path(p).name
            H = chart_from_corners(given[key]) if key in given else detect_chart(im.rgb, saturated=im.saturated)
            cam = sample_patches(im.rgb, H, saturated=im.saturated)
            fit = fit_colour(cam, colorchecker_reference(), colour_method)
        except (RawDecodeError, ChartNotFound, ValueError) as e:
            _console.print(f"  [yellow]{p}: chart not found or unusable: {e}[/]", highlight=False)
            failed.append(p)
            continue
        results[str(p)] = {"patches": cam.tolist(), "matrix": fit.matrix.tolist(),
                           "terms": None if fit.terms is None else fit.terms.tolist(),
                           **fit.residuals}
        _console.print(f"{p}: dE00 mean {fit.residuals['delta_e2000_mean']:.2f}, max "
                       f"{fit.residuals['delta_e2000_max']:.2f}", highlight=False)
    if out is not None and results:
        _write_json(out, results, overwrite)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
