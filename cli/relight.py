"""``ls-relight``: relight a captured subject (or, with the model installed, a portrait) under an
HDR environment.

Examples::

    ls-relight --store subjects.zarr --subject s01 --env studio --out relit/
    ls-relight --store subjects.zarr --subject s01 --env quarry_01_1k.hdr --rotate 90 \\
        --camera cam03 --tonemap filmic --exposure -1 --out relit/
    ls-relight --store subjects.zarr --subject s01 --env sun-sky --turntable 36 --out spin/
    ls-relight --list-envs

Writes linear radiance as EXR (absolute: no exposure applied), display PNGs (the named tone
mapping after ``--exposure`` stops, sRGB encoded), for a turntable an animated GIF, an MP4 (when
OpenCV can encode one offline) and a strip of frames, plus ``relight.json`` recording every
setting used (exposure included: ``--exposure auto`` is computed, reported and recorded, never
silent). An existing output is never replaced without ``--overwrite``; other files in ``--out``
are never touched.

The optional PORTRAIT argument is the single-image path (``model.portrait``: face crop and
pose, inversion into the prior, the reflectance network's basis images, OLATs for the model's
lights, relit with the same weights). It also writes the aligned crop, the prior's
reconstruction, an OLAT contact sheet, ``--views`` novel views and an ``index.html`` showing
them side by side; ``--model DIR`` picks another model than the bundled one, ``--refine N``
adds latent optimisation steps.

    ls-relight portrait.jpg --env sun-sky --turntable 24 --views -30 --views 30 --out relit/
Exit status: 0 success, 2 bad arguments or inputs.
"""

from __future__ import annotations

import importlib
import json
import math
import time
from pathlib import Path

import click
import numpy as np
from cli._progress import progress_bar
from rich.console import Console
from rich.progress import Progress

__all__ = ["main", "open_portrait_source", "PORTRAIT_BACKEND"]

#: module that, once the model is installed, provides ``portrait_source(path, **options) ->
#: lightstage.relight.OlatSource`` (OLATs synthesised for any light directions)
PORTRAIT_BACKEND = "model.portrait"


def _progress(console: Console, unit: str) -> Progress:
    return progress_bar(console, unit)


def open_portrait_source(portrait: str, **options):
    """The model's OLAT source for a single portrait, or a clear error if not installed."""
    try:
        mod = importlib.import_module(PORTRAIT_BACKEND)
        factory = getattr(mod, "portrait_source")
    except Exception as e:  # missing module/function, or a model package that fails to import
        raise click.ClickException(
            f"{portrait}: portrait relighting needs the model: not yet installed "
            f"({PORTRAIT_BACKEND}.portrait_source unavailable: {type(e).__name__}); relight a "
            "captured subject with --store/--subject instead") from None
    try:
        return factory(portrait, **options)
    except (ValueError, RuntimeError, OSError) as e:  # the model's errors name the file and reason
        raise click.ClickException(str(e)) from None


def _parse_axis(text: str) -> tuple[float, float, float]:
    named = {"x": (1.0, 0.0, 0.0), "y": (0.0, 1.0, 0.0), "z": (0.0, 0.0, 1.0)}
    if text in named:
        return named[text]
    try:
        v = tuple(float(t) for t in text.split(","))
    except ValueError:
        v = ()
    if len(v) != 3 or not any(v):
        raise click.BadParameter(f"{text!r}: give x, y, z or three comma-separated numbers",
                                 param_hint="--axis")
    return v


def _parse_crop(text: str | None):
    if text is None:
        return None
    try:
        v = tuple(int(t) for t in text.split(","))
    except ValueError:
        v = ()
    if len(v) != 4:
        raise click.BadParameter(f"{text!r}: give y0,y1,x0,x1", param_hint="--crop")
    return v


def _outputs(out: Path, n: int, video: str, mp4: bool) -> list[Path]:
    names = ["relight.json"]
    if n == 1:
        names += ["relit.exr", "relit.png"]
    else:
        for k in range(n):
            names += [f"frame_{k:03d}.exr", f"frame_{k:03d}.png"]
        names.append("strip.png")
        if video in ("gif", "both"):
            names.append("turntable.gif")
        if video in ("mp4", "both") and mp4:
            names.append("turntable.mp4")
    return [out / s for s in names]


def _strip(frames: list[np.ndarray], max_frames: int = 8, height: int = 256) -> np.ndarray:
    """A row of up to ``max_frames`` evenly spaced display frames, each scaled to ``height``."""
    from PIL import Image

    idx = np.unique(np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int))
    tiles = []
    for i in idx:
        im = Image.fromarray(frames[i])
        w = max(1, round(im.width * height / im.height))
        tiles.append(np.asarray(im.resize((w, height), Image.Resampling.BOX)))
    return np.concatenate(tiles, axis=1)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("portrait", required=False, type=click.Path())
@click.option("--store", type=click.Path(), help="OLAT store (STORE.zarr)")
@click.option("--subject", type=str, default=None, help="subject in the store")
@click.option("--take", type=str, default=None, help="take of the subject (if it has several)")
@click.option("--env", "env_spec", type=str, default=None,
              help="environment: an .exr/.hdr/.png file or a built-in name (see --list-envs)")
@click.option("--env-layout", type=click.Choice(["auto", "equirect", "mirrorball", "cross"]),
              default="auto", show_default=True, help="layout of the environment file")
@click.option("--env-height", type=click.IntRange(min=4), default=None,
              help="resample the environment to this height (power-conserving when shrinking; "
                   "default: files as they are, built-ins 256)")
@click.option("--env-exposure", type=float, default=0.0, show_default=True,
              help="scale the environment radiance by 2**EV (changes the EXR too)")
@click.option("--rotate", type=float, default=0.0, show_default=True,
              help="turn the environment by DEG about --axis (start angle of a turntable)")
@click.option("--turntable", type=click.IntRange(min=2), default=None,
              help="N frames turning the environment through 360 deg")
@click.option("--axis", default="y", show_default=True, help="rotation axis: x, y, z or 'ax,ay,az'")
@click.option("--camera", default="0", show_default=True, help="camera name or index")
@click.option("--crop", default=None, help="pixel crop y0,y1,x0,x1")
@click.option("--method", type=click.Choice(["voronoi", "vmf"]), default="voronoi", show_default=True,
              help="how environment directions are shared among lights")
@click.option("--uncovered", type=click.Choice(["nearest", "drop"]), default="nearest", show_default=True,
              help="environment directions no light covers: give them to the nearest light (use "
                   "all the map's power) or drop them (rigs lit from one side)")
@click.option("--coverage-angle", type=click.FloatRange(min=0, min_open=True), default=None,
              help="degrees from every light beyond which a direction is uncovered "
                   "(default 1.5 x the median light spacing)")
@click.option("--exposure", default="0", show_default=True,
              help="display exposure in stops, or 'auto' (median subject luminance -> 0.18; "
                   "reported and recorded)")
@click.option("--tonemap", type=click.Choice(["aces", "filmic", "reinhard", "reinhard-lum", "linear"]),
              default="aces", show_default=True, help="display tone-mapping operator")
@click.option("--video", type=click.Choice(["gif", "mp4", "both", "none"]), default="both",
              show_default=True, help="turntable animation format(s)")
@click.option("--fps", type=click.FloatRange(min=1, max=60), default=12.0, show_default=True)
@click.option("--half", is_flag=True, help="write float16 EXRs (default float32)")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="keep light-assignment maps here between runs")
@click.option("--max-memory", type=click.IntRange(min=16), default=1024, show_default=True,
              help="MiB of OLAT data and frames held at once")
@click.option("--allow-incomplete", is_flag=True, help="relight even if some OLAT images are missing")
@click.option("--out", "-o", type=click.Path(), default=None, help="output folder")
@click.option("--overwrite", is_flag=True, help="replace this command's earlier outputs in --out")
@click.option("--list-envs", is_flag=True, help="list the built-in environments and exit")
@click.option("--views", type=float, multiple=True,
              help="PORTRAIT: also render this novel view (yaw in degrees; repeat the option)")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None,
              help="PORTRAIT: model folder (default: the bundled model)")
@click.option("--refine", type=click.IntRange(min=0), default=0, show_default=True,
              help="PORTRAIT: latent optimisation steps after the encoder")
@click.option("--input-env", "input_env_spec", type=str, default=None,
              help="PORTRAIT: the photo's own lighting, if known (map file or built-in name, same "
                   "units as --env): outputs are then in the photo's exposure; default: estimated "
                   "from the photo, outputs at the model's albedo level")
@click.option("--detail/--no-detail", default=True, show_default=True,
              help="PORTRAIT: keep the photo's per-pixel detail in the relit frames")
def main(portrait, store, subject, take, env_spec, env_layout, env_height, env_exposure, rotate,
         turntable, axis, camera, crop, method, uncovered, coverage_angle, exposure, tonemap, video, fps, half, cache_dir,
         max_memory, allow_incomplete, out, overwrite, list_envs, views, model_dir, refine, input_env_spec, detail):
    """Relight a captured subject from an OLAT store (or a PORTRAIT, with the model) under an
    HDR environment map."""
    from lightstage import envmap as E
    from lightstage import relight as R
    from lightstage.imageio import ImageIOError, mp4_available, write_exr, write_gif, write_mp4, write_png
    from lightstage.store import StoreError, open_take
    from lightstage.tonemap import auto_exposure, to_display

    console = Console(stderr=True)
    if list_envs:
        for name in sorted(E.BUILTIN_ENVIRONMENTS):
            f = E.BUILTIN_ENVIRONMENTS[name]
            doc = (getattr(f, "__doc__", None) or getattr(getattr(f, "func", None), "__doc__", "") or "")
            click.echo(f"{name:10s} {doc.strip().splitlines()[0] if doc.strip() else ''}")
        return
    # ---- validate arguments -------------------------------------------------------------------
    if env_spec is None:
        raise click.UsageError("--env is required (a map file or one of: "
                               f"{', '.join(sorted(E.BUILTIN_ENVIRONMENTS))})")
    if out is None:
        raise click.UsageError("--out is required")
    if portrait and store:
        raise click.UsageError("give either PORTRAIT or --store, not both")
    if not portrait and not store:
        raise click.UsageError("give --store STORE.zarr --subject S (or a PORTRAIT image)")
    auto = exposure.strip().lower() == "auto"
    if not auto:
        try:
            ev = float(exposure)
        except ValueError:
            raise click.BadParameter(f"{exposure!r}: a number of stops or 'auto'", param_hint="--exposure") from None
        if not math.isfinite(ev):
            raise click.BadParameter("must be finite", param_hint="--exposure")
    ax = _parse_axis(axis)
    crop_t = _parse_crop(crop)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise click.UsageError(f"--out {out_dir}: exists and is not a folder")
    n_frames = turntable or 1
    mp4 = mp4_available()
    targets = _outputs(out_dir, n_frames, video, mp4)
    if portrait:
        targets.append(out_dir / "index.html")
    clash = [p for p in targets if p.exists()]
    if clash and not overwrite:
        raise click.UsageError(f"--out {out_dir}: would replace {len(clash)} existing file(s) "
                               f"({', '.join(p.name for p in clash[:4])}{' ...' if len(clash) > 4 else ''}); "
                               "pass --overwrite or choose another folder")

    # ---- inputs -------------------------------------------------------------------------------
    try:
        env = E.load_environment(env_spec, height=env_height, layout=env_layout)
    except E.EnvMapError as e:
        raise click.BadParameter(str(e), param_hint="--env") from None
    if env_exposure:
        env = E.exposure(env, env_exposure)
    if portrait:
        input_env = None
        if input_env_spec is not None:
            try:
                input_env = E.load_environment(input_env_spec, height=env_height, layout=env_layout)
            except E.EnvMapError as e:
                raise click.BadParameter(str(e), param_hint="--input-env") from None
        with console.status("lifting the portrait into the model (face, inversion, basis, exposure)"):
            source = open_portrait_source(portrait, camera=camera, model=model_dir, refine=refine,
                                          views=views, input_env=input_env, detail=detail)
        cal = getattr(source, "calibration", {}) or {}
        if cal:
            console.print(f"exposure convention: input lighting {cal['input_lighting']} "
                          f"({'photo units' if cal['input_lighting'] == 'known' else 'model albedo level'}); "
                          f"model vs photo under it {cal['fit_psnr_db']:.1f} dB")
    elif input_env_spec is not None:
        raise click.UsageError("--input-env is for a PORTRAIT (a capture's lighting is measured)")
    else:
        try:
            tk = open_take(store, subject, take)
            problems = tk.validate()
            if problems:
                raise StoreError("; ".join(problems))
            cam = int(camera) if camera.isdigit() else camera
            source = R.TakeSource(tk, cam, crop=crop_t, allow_incomplete=allow_incomplete,
                                  max_bytes=max_memory << 20)
        except StoreError as e:
            raise click.BadParameter(str(e), param_hint="--store/--subject/--take/--camera") from None
    dirs = source.light_directions

    # ---- weights ------------------------------------------------------------------------------
    angles = [rotate + 360.0 * k / n_frames for k in range(n_frames)]
    cache = R.TransferCache(directory=cache_dir) if cache_dir else R.DEFAULT_CACHE
    t0 = time.perf_counter()
    try:
        weights = R.weights_for_rotations(env, dirs, angles, axis=ax, method=method,
                                          index_map_cache=cache, uncovered=uncovered,
                                          max_angle_deg=coverage_angle)
    except R.RelightError as e:
        raise click.ClickException(str(e)) from None
    t_weights = time.perf_counter() - t0
    cov = R.coverage(dirs, env=env, max_angle_deg=coverage_angle, index_map_cache=cache)
    power = E.total_power(env)
    console.print(f"environment {env_spec}: {env.shape[1]}x{env.shape[0]}, integral "
                  f"{np.array2string(power, precision=4)} (RGB, radiance x sr)")
    console.print(f"{len(dirs)} lights, method {method}: {cov.summary()} "
                  f"({'given to the nearest light' if uncovered == 'nearest' else 'dropped'})")

    # ---- relight ------------------------------------------------------------------------------
    try:
        mask = source.mask()
    except Exception:
        mask = None
    frames_lin = []
    t1 = time.perf_counter()
    try:
        # group frames so that one group's float32 results stay within --max-memory
        probe_px = None
        with _progress(console, "lights") as prog:
            task = prog.add_task("relight", total=None)
            k = 0
            while k < n_frames:
                if probe_px is None:
                    group = 1
                else:
                    group = max(1, min(n_frames - k, (max_memory << 20) // (probe_px * 12)))
                done_before = k
                res = source.relight(weights[k:k + group],
                                     progress=lambda i, n: prog.update(
                                         task, total=n * n_frames, completed=done_before * n + i * group))
                res = np.asarray(res)
                if res.ndim == 3:
                    res = res[None]
                probe_px = res.shape[2] * res.shape[3]
                frames_lin.extend(np.ascontiguousarray(r.transpose(1, 2, 0)) for r in res)
                k += group
    except R.RelightError as e:
        raise click.ClickException(str(e)) from None
    t_relight = time.perf_counter() - t1
    if auto:
        ev = auto_exposure(frames_lin[0], mask)
        console.print(f"[bold]exposure auto[/bold]: {ev:+.2f} EV (median subject luminance -> 0.18), "
                      "applied to every frame")

    # ---- write --------------------------------------------------------------------------------
    out_dir.mkdir(parents=True, exist_ok=True)
    display = [to_display(f, tonemap, ev) for f in frames_lin]
    try:
        if n_frames == 1:
            write_exr(out_dir / "relit.exr", frames_lin[0], half=half)
            write_png(out_dir / "relit.png", display[0])
        else:
            with _progress(console, "frames") as prog:
                task = prog.add_task("write", total=n_frames)
                for i, (lin, disp) in enumerate(zip(frames_lin, display)):
                    write_exr(out_dir / f"frame_{i:03d}.exr", lin, half=half)
                    write_png(out_dir / f"frame_{i:03d}.png", disp)
                    prog.advance(task)
            write_png(out_dir / "strip.png", _strip(display))
            if video in ("gif", "both"):
                write_gif(out_dir / "turntable.gif", display, fps=fps)
            if video in ("mp4", "both"):
                if mp4:
                    write_mp4(out_dir / "turntable.mp4", display, fps=fps)
                else:
                    console.print("[yellow]no offline MP4 writer here: wrote the GIF only[/yellow]")
    except ImageIOError as e:
        raise click.ClickException(str(e)) from None
    extra = []
    if portrait:
        from model.portrait import write_portrait_report

        rel = [p.name for p in targets if p.exists() and p.name in ("relit.png", "strip.png", "turntable.gif")]
        extra = write_portrait_report(source, out_dir, weights[0], tonemap, ev, rel, str(env_spec))
    report = {
        "source": source.name,
        "environment": str(env_spec),
        "environment_size": [int(env.shape[0]), int(env.shape[1])],
        "environment_exposure_ev": env_exposure,
        "environment_integral_rgb": power.tolist(),
        "method": method,
        "rotation_axis": list(ax),
        "angles_deg": angles,
        "n_lights": int(len(dirs)),
        "weights_sum_rgb": weights[0].sum(0).tolist(),
        "coverage": {"max_angle_deg": cov.max_angle_deg, "uncovered_sr": cov.solid_angle,
                     "uncovered_power_fraction": cov.power_fraction.tolist(),
                     "uncovered_policy": uncovered},
        "exposure_ev": ev,
        "exposure_mode": "auto" if auto else "manual",
        "tonemap": tonemap,
        "display_encoding": "sRGB (IEC 61966-2-1)",
        "exr": "linear radiance, no exposure applied, " + ("float16" if half else "float32"),
        "linear_stats": {"min": float(min(f.min() for f in frames_lin)),
                         "max": float(max(f.max() for f in frames_lin)),
                         "mean_frame0": float(frames_lin[0].mean())},
        "seconds": {"weights": t_weights, "relight": t_relight},
        "files": sorted({p.name for p in targets if p.exists() or p.name == "relight.json"} | set(extra)),
    }
    if portrait:
        report["portrait"] = {"views": list(source.views), "camera": source.camera,
                              "reconstruction_psnr_db": source.recon_psnr, "refine_steps": refine,
                              "exposure": getattr(source, "calibration", {}),
                              "model": str(source.bundle.path), "seconds": source.timings}
    (out_dir / "relight.json").write_text(json.dumps(report, indent=1) + "\n")
    console.print(f"wrote {n_frames} frame(s) to {out_dir} (display: {tonemap}, {ev:+.2f} EV; "
                  f"weights {1e3 * t_weights:.0f} ms, relight {t_relight:.2f} s)")


if __name__ == "__main__":
    main()
