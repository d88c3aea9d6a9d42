"""``ls-demo``: the whole toolkit on the digital twin, end to end, with one HTML report.

Example::

    ls-demo demo_out/            # ~10 min on 2 CPU cores
    ls-demo demo_out/ --quick    # a frame/light subset, a few minutes (CI)

Stages (each timed, each with its numbers against the twin's ground truth):

1. simulate a small stage (``tiny`` rig, one subject, calibration shots) -- ``ls-simulate``'s
   library (:func:`lightstage.twin.capture.simulate`);
2. calibrate it -- ``ls-calibrate``'s library (:func:`calibration.pipeline.calibrate_capture`):
   reprojection RMS, colour Delta E 2000, light direction / intensity errors vs the truth. The
   ingest uses this calibration when it covers every camera and light of the capture; otherwise
   it uses the twin's truth calibration, and the report says which and why. (The tiny rig's
   128-px cameras cannot resolve the ChArUco board, so its geometry calibration fails; the
   calibration numbers then come from a 3-camera, 2-light subset of the 512-px demo rig, ~30 s.)
3. ingest it -- :func:`lightstage.ingest.ingest`: median relative OLAT error vs the truth;
4. relight the captured subject under a built-in environment and a short turntable --
   ``ls-relight``'s library (:mod:`lightstage.relight`): PSNR vs the truth store relit with the
   same weights;
5. relight a held-out twin subject from ONE rendered image with the bundled portrait model
   (:mod:`model.portrait`; a freshly trained tiny model if the bundle is missing): PSNR vs the
   twin rendered under the environment, against the scaled-input baseline.

OUT/index.html links every picture (relative paths) and lists every number; OUT/demo.json has
the numbers. A non-empty OUT is refused unless ``--overwrite`` (which deletes only what a
previous ``ls-demo`` wrote there, as listed in its demo.json).
Exit status: 0 success, 2 bad arguments, 1 a stage failed (the report says which).
"""

from __future__ import annotations

import html
import json
import math
import shutil
import time
from pathlib import Path

import click
import numpy as np
from cli._progress import progress_bar
from rich.console import Console

__all__ = ["main", "run_demo"]

_MANAGED = ["capture", "calibration_capture", "calibration.json", "calibration_report", "store.zarr", "relight", "portrait",
            "img", "index.html", "demo.json"]


def _progress(console):
    return progress_bar(console, digits=2)


def _psnr(pred, truth, mask=None) -> float:
    p, t = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
    if mask is not None:
        m = np.broadcast_to(mask, t.shape)
        p, t = p[m], t[m]
    mse = float(np.mean((p - t) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(float(t.max()) ** 2 / mse)


def _rot_deg(A, B) -> float:
    R = np.asarray(A)[:3, :3].T @ np.asarray(B)[:3, :3]
    return math.degrees(math.acos(float(np.clip((np.trace(R) - 1) / 2, -1, 1))))


def _calibration_errors(cal, truth) -> dict:
    """Per camera (reprojection RMS, Delta E, centre / rotation error) and per light errors."""
    cams = {}
    for name, c in cal.cameras.items():
        t = truth.cameras.get(name)
        r = c.residuals or {}
        row = {"reprojection_rms_px": r.get("reprojection_rms_px"), "delta_e2000_mean": r.get("delta_e2000_mean"),
               "delta_e2000_max": r.get("delta_e2000_max")}
        if t is not None:
            row["centre_err_mm"] = 1000 * float(np.linalg.norm(c.cam2world[:3, 3] - t.cam2world[:3, 3]))
            row["rotation_err_deg"] = _rot_deg(c.cam2world, t.cam2world)
            row["focal_rel_err"] = float(abs(c.K[0, 0] / t.K[0, 0] - 1))
        cams[name] = row
    tl = {l.index: l for l in truth.lights}
    lights = {}
    for l in cal.lights:
        t = tl.get(l.index)
        if t is None:
            continue
        lights[int(l.index)] = {
            "direction_err_deg": math.degrees(math.acos(float(np.clip(np.dot(l.direction, t.direction), -1, 1)))),
            "rgb_rel_err": float(np.abs(np.asarray(l.rgb) / np.asarray(t.rgb) - 1).max())}
    return {"cameras": cams, "lights": lights}


def _display(x, ev=0.0):
    from lightstage.tonemap import to_display

    return to_display(np.ascontiguousarray(x, np.float32), "aces", ev)


def _finite(d):
    """All numbers in a nested structure, for the report's 'numbers are finite' check."""
    if isinstance(d, dict):
        for v in d.values():
            yield from _finite(v)
    elif isinstance(d, (list, tuple)):
        for v in d:
            yield from _finite(v)
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        yield float(d)


def run_demo(out: Path, quick: bool, seed: int, console: Console, model_dir: str | None = None) -> dict:
    """Run every stage into ``out`` (see the module docstring); returns the numbers."""
    from lightstage import envmap as E
    from lightstage import relight as R
    from lightstage.calibfile import load_calibration, save_calibration
    from lightstage.imageio import write_gif, write_png
    from lightstage.rig import builtin_rig
    from lightstage.store import open_take
    from lightstage.twin.capture import simulate

    res: dict = {"quick": quick, "seed": seed, "seconds": {}, "notes": []}
    img = out / "img"
    img.mkdir(parents=True, exist_ok=True)
    rig = builtin_rig("tiny")
    frames = "0:11" if quick else None
    cal_plan = ({"lights": [0, 1], "n_board_poses": 6, "chrome_cameras": 2, "diffuse_cameras": 2}
                if quick else {"n_board_poses": 12})
    T = res["seconds"]

    # ---- 1. simulate ---------------------------------------------------------------------
    t0 = time.perf_counter()
    cap = out / "capture"
    with _progress(console) as pr:
        task = pr.add_task("1/5 simulate", total=None)
        simulate(cap, rig, 1, seed, noise=True, frames=frames, calibration=cal_plan,
                 progress=lambda d, n: pr.update(task, completed=d, total=n))
    T["simulate"] = time.perf_counter() - t0
    truth_cal_path = cap / "calibration" / "truth_calibration.json"
    truth_cal = load_calibration(truth_cal_path)

    # ---- 2. calibrate --------------------------------------------------------------------
    t0 = time.perf_counter()
    use_cal = truth_cal_path
    res["calibration_used"] = "twin truth"
    try:
        from calibration.pipeline import calibrate_capture

        with _progress(console) as pr:
            tasks: dict = {}

            def cb(stage, done, total):
                if stage not in tasks:
                    tasks[stage] = pr.add_task(f"2/5 calibrate: {stage}", total=total)
                pr.update(tasks[stage], completed=done, total=total)

            run = calibrate_capture(cap, progress=cb, rig_name=rig.name)
        cal = run.calibration
        res["calibration"] = _calibration_errors(cal, truth_cal)
        res["calibration"]["problems"] = {k: list(v) for k, v in run.problems.items()}
        missing_c = sorted({c.name for c in rig.cameras} - set(cal.cameras))
        missing_l = sorted({int(l.index) for l in truth_cal.lights} - {int(l.index) for l in cal.lights})
        if cal.cameras:
            save_calibration(cal, out / "calibration.json", overwrite=True)
            try:
                from calibration.report import write_report

                write_report(out / "calibration_report", cal, run.tables, run.problems, overwrite=True)
                res["calibration_report"] = "calibration_report/index.html"
            except Exception as e:  # the report is a bonus; the numbers are in ours
                res["notes"].append(f"calibration report not written: {type(e).__name__}: {e}")
        if not missing_c and not missing_l:
            use_cal = out / "calibration.json"
            res["calibration_used"] = "ls-calibrate result"
        else:
            why = []
            if missing_c:
                why.append(f"cameras not calibrated: {missing_c}")
            if missing_l:
                why.append(f"{len(missing_l)} of {len(truth_cal.lights)} lights not calibrated"
                           + (" (quick mode calibrates lights 0 and 1 only)" if quick else ""))
            res["notes"].append("ingest used the twin's truth calibration: " + "; ".join(why))
    except Exception as e:  # any calibration failure: fall back to the truth, and say so
        res["notes"].append(f"calibration failed ({type(e).__name__}: {e}); ingest used the twin's truth calibration")
    if not res.get("calibration", {}).get("cameras"):
        # The tiny rig's 128-px cameras cannot resolve the ChArUco board: show the calibration
        # on a 3-camera, 2-light subset of the 512-px demo rig instead (~30 s), against its truth.
        try:
            from calibration.pipeline import calibrate_capture

            ccap = out / "calibration_capture"
            with _progress(console) as pr:
                task = pr.add_task("2/5 calibration shots (demo rig subset)", total=None)
                simulate(ccap, builtin_rig("demo"), 0, seed + 3, calibration={
                    "cameras": ["cam01", "cam02", "cam05"], "lights": [60, 140], "n_board_poses": 10,
                    "chrome_cameras": 3, "diffuse_cameras": 2},
                    progress=lambda d, n: pr.update(task, completed=d, total=n))
                tasks2: dict = {}

                def cb2(stage, done, total):
                    if stage not in tasks2:
                        tasks2[stage] = pr.add_task(f"2/5 calibrate: {stage}", total=total)
                    pr.update(tasks2[stage], completed=done, total=total)

                run = calibrate_capture(ccap, progress=cb2, rig_name="demo")
            cal = run.calibration
            res["calibration"] = _calibration_errors(cal, load_calibration(ccap / "calibration" / "truth_calibration.json"))
            res["calibration"]["problems"] = {k: list(v) for k, v in run.problems.items()}
            res["calibration"]["rig"] = "demo (cameras cam01, cam02, cam05; lights 60, 140)"
            res["notes"].append("calibration numbers: a 3-camera, 2-light subset of the demo rig (512 px), "
                                "because the tiny rig's 128 px cameras cannot resolve the ChArUco board")
            try:
                from calibration.report import write_report

                write_report(out / "calibration_report", cal, run.tables, run.problems, overwrite=True)
                res["calibration_report"] = "calibration_report/index.html"
            except Exception as e:
                res["notes"].append(f"calibration report not written: {type(e).__name__}: {e}")
        except Exception as e:
            res["notes"].append(f"demo-rig calibration failed too ({type(e).__name__}: {e})")
    T["calibrate"] = time.perf_counter() - t0

    # ---- 3. ingest -----------------------------------------------------------------------
    from lightstage.ingest import ingest

    t0 = time.perf_counter()
    store = out / "store.zarr"
    with _progress(console) as pr:
        task = pr.add_task("3/5 ingest", total=None)

        def icb(event, done, total):
            if event == "image":
                pr.update(task, completed=done, total=total)

        rep = ingest(cap, use_cal, store, progress=icb)
    T["ingest"] = time.perf_counter() - t0
    if not rep.ok:
        res["notes"].append(f"ingest errors: {rep.errors}")
    take = open_take(store, "s000")
    truth = open_take(cap / "s000" / "t0" / "truth" / "truth.zarr")
    lights_t = [int(x) for x in truth.attrs["lights"]]
    lights_s = [int(x) for x in take.attrs["lights"]]
    idx_t = [lights_t.index(l) for l in lights_s]
    errs = []
    valid = take.group["valid"]
    for c in range(len(take.cameras)):
        ob = take.olat(c)
        tr = truth.olat(c, lights=idx_t)
        fg = truth.mask(c)
        for li in range(len(lights_s)):
            v = np.asarray(valid[c][li]) > 0
            lit = (tr[li].min(0) > 0.05 * tr[li].max()) & fg & v
            if lit.any():
                errs.append((np.abs(ob[li] - tr[li])[:, lit] / tr[li][:, lit]).ravel())
    e = np.concatenate(errs) if errs else np.array([np.nan])
    res["ingest"] = {"lights": len(lights_s), "cameras": len(take.cameras),
                     "median_rel_err": float(np.median(e)), "p90_rel_err": float(np.percentile(e, 90))}

    # ---- 4. relight the captured subject ---------------------------------------------------
    t0 = time.perf_counter()
    env_name = "studio"
    env = E.builtin_environment(env_name, height=64)
    n_turn = 4 if quick else 12
    angles = [360.0 * k / n_turn for k in range(n_turn)]
    cam = 0
    w = R.weights_for_rotations(env, take.light_directions, angles)
    src = R.TakeSource(take, cam, allow_incomplete=True)
    tsrc = R.TakeSource(truth, cam, allow_incomplete=True)
    with _progress(console) as pr:
        task = pr.add_task("4/5 relight capture", total=2)
        relit = np.asarray(src.relight(w))
        pr.advance(task)
        # the truth store has all the rig's lights: relight it with the same (subset) lights
        wt = np.zeros((n_turn, len(lights_t), 3), np.float32)
        wt[:, idx_t] = w
        relit_t = np.asarray(tsrc.relight(wt))
        pr.advance(task)
    mask = truth.mask(cam)
    ps = [_psnr(relit[k].transpose(1, 2, 0), relit_t[k].transpose(1, 2, 0), mask[..., None]) for k in range(n_turn)]
    from lightstage.tonemap import auto_exposure

    ev = auto_exposure(relit_t[0].transpose(1, 2, 0), mask)
    frames_d = [_display(r.transpose(1, 2, 0), ev) for r in relit]
    (out / "relight").mkdir(exist_ok=True)
    write_png(out / "relight" / "relit.png", frames_d[0])
    write_png(out / "relight" / "truth.png", _display(relit_t[0].transpose(1, 2, 0), ev))
    write_gif(out / "relight" / "turntable.gif", frames_d, fps=4)
    T["relight"] = time.perf_counter() - t0
    res["relight"] = {"environment": env_name, "frames": n_turn, "lights": len(lights_s),
                      "psnr_db_mean": float(np.mean(ps)), "psnr_db_min": float(np.min(ps)),
                      "exposure_ev": float(ev)}

    # ---- 5. portrait from a single image ---------------------------------------------------
    t0 = time.perf_counter()
    from model.bundle import BundleConfig, BundleError, build_bundle, load_bundle
    from model.portrait import twin_evaluation

    try:
        bundle = load_bundle(model_dir)
        res["portrait_model"] = str(bundle.path if model_dir else "bundled (model/assets/default)")
    except BundleError as e:
        res["notes"].append(f"bundled model unavailable ({e}); trained a quick tiny one")
        with _progress(console) as pr:
            tasks5: dict = {}

            def bcb(stage, done, total, info):
                if stage not in tasks5:
                    tasks5[stage] = pr.add_task(f"5/5 model: {stage}", total=total)
                pr.update(tasks5[stage], completed=done)

            build_bundle(out / "portrait" / "model", BundleConfig.quick(seed=seed), overwrite=True, progress=bcb)
        bundle = load_bundle(out / "portrait" / "model")
        res["portrait_model"] = "quick tiny model trained by ls-demo"
    held_out = [10_000_019 + seed]  # never a training subject (those seeds are < 1e6 + 40)
    envs = {env_name: E.builtin_environment(env_name, height=64)}
    with _progress(console) as pr:
        task = pr.add_task("5/5 portrait", total=len(held_out))
        ev_res = twin_evaluation(bundle, held_out, envs, keep_images=True,
                                 progress=lambda d, n: pr.update(task, completed=d))
    (out / "portrait").mkdir(exist_ok=True)
    if ev_res["per_subject"]:
        ims = ev_res["per_subject"][0].pop("images")
        ev_p = auto_exposure(ims["truth_input"], ims["mask_input"])
        for k, v in ims.items():
            if k.startswith("mask"):
                continue
            write_png(out / "portrait" / f"{k}.png", _display(v, ev_p))
        res["portrait_images"] = sorted(k for k in ims if not k.startswith("mask"))
    else:
        res["notes"].append("the held-out twin subject rendered empty; no portrait numbers")
    res["portrait"] = ev_res["mean"]
    T["portrait"] = time.perf_counter() - t0
    T["total"] = sum(v for k, v in T.items())
    return res


def _report(out: Path, res: dict) -> None:
    """OUT/index.html: every stage's pictures and numbers (relative links)."""

    def img(p, cap):
        return (f'<figure><img src="{html.escape(p)}" alt="{html.escape(cap)}"><figcaption>{html.escape(cap)}'
                "</figcaption></figure>")

    def table(d: dict) -> str:
        rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>" for k, v in d.items())
        return f"<table>{rows}</table>"

    cal = res.get("calibration", {})
    cam_rows = "".join(f"<tr><td>{html.escape(c)}</td>" + "".join(f"<td>{_fmt(r.get(k))}</td>" for k in
                       ("reprojection_rms_px", "delta_e2000_mean", "delta_e2000_max", "centre_err_mm",
                        "rotation_err_deg", "focal_rel_err")) + "</tr>"
                       for c, r in cal.get("cameras", {}).items())
    light_rows = "".join(f"<tr><td>{i}</td><td>{_fmt(r['direction_err_deg'])}</td><td>{_fmt(r['rgb_rel_err'])}</td></tr>"
                         for i, r in cal.get("lights", {}).items())
    portrait_imgs = "".join(img(f"portrait/{k}.png", k.replace("_", " ")) for k in res.get("portrait_images", []))
    cal_link = (f'<p><a href="{res["calibration_report"]}">full calibration report</a></p>'
                if res.get("calibration_report") else "")
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in res["notes"]) or "<li>none</li>"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>lightstage demo</title>
<style>body{{font-family:sans-serif;margin:1em;max-width:1100px}} td,th{{padding:2px 8px;border-bottom:1px solid #ddd}}
figure{{display:inline-block;margin:4px;text-align:center}} img{{height:192px;image-rendering:pixelated}}</style></head><body>
<h1>lightstage demo {'(quick)' if res['quick'] else ''}</h1>
<p>Digital twin, tiny rig, seed {res['seed']}. All images are linear HDR until this page's display
(ACES tone mapping, sRGB). Notes:</p><ul>{notes}</ul>
<h2>Timings (s)</h2>{table(res['seconds'])}
<h2>1-2. Calibration vs truth</h2><p>calibration used by the ingest: <b>{html.escape(res['calibration_used'])}</b>;
calibrated rig: {html.escape(str(cal.get('rig', 'tiny')))}</p>
<table><tr><th>camera</th><th>reproj. RMS px</th><th>&Delta;E00 mean</th><th>&Delta;E00 max</th><th>centre err mm</th><th>rotation err deg</th><th>focal rel. err</th></tr>{cam_rows}</table>
<table><tr><th>light</th><th>direction err deg</th><th>RGB rel. err</th></tr>{light_rows}</table>{cal_link}
<h2>3. Ingest vs truth</h2>{table(res['ingest'])}
<h2>4. Relight of the captured subject</h2>{table(res['relight'])}
{img('relight/relit.png', 'relit from the store')}{img('relight/truth.png', 'truth store, same weights')}{img('relight/turntable.gif', 'turntable')}
<h2>5. Single-image portrait relight (held-out twin subject)</h2><p>model: {html.escape(str(res.get('portrait_model')))}.
PSNR over the head, peak = truth max; baseline = the unrelit input scaled per channel to the truth's mean
(an oracle exposure). model = the pipeline's absolute output, its exposure defined by the input's known lighting
(as <code>ls-relight --input-env</code>), with the photo's per-pixel detail; model matched = the same with the
baseline's oracle exposure; exposure only = without the detail; uncalibrated = the network's raw units;
estimated matched = with the input lighting estimated from the image (the default when it is unknown).</p>
{table(res.get('portrait', {}))}{portrait_imgs}
</body></html>
"""
    (out / "index.html").write_text(page)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--quick", is_flag=True, help="frame/light subset (minutes; CI)")
@click.option("--overwrite", is_flag=True, help="replace a previous ls-demo output in OUT")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None,
              help="portrait model folder (default: the bundled one)")
def main(out: Path, quick: bool, overwrite: bool, seed: int, model_dir: str | None) -> None:
    """Simulate, calibrate, ingest and relight a small twin stage, then relight a held-out
    subject from one image; writes OUT/index.html."""
    console = Console(stderr=True, soft_wrap=True)
    if out.exists() and not out.is_dir():
        raise click.UsageError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise click.UsageError(f"{out}: not empty; pass --overwrite to replace a previous ls-demo output")
        if not (out / "demo.json").is_file():
            raise click.UsageError(f"{out}: not an ls-demo output (no demo.json); refusing to delete anything")
        for name in _MANAGED:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps({"status": "running"}) + "\n")  # marks OUT as ours
    t0 = time.perf_counter()
    try:
        res = run_demo(out, quick, seed, console, model_dir)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]; rerun with --overwrite")
        raise SystemExit(130)
    _report(out, res)
    (out / "demo.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    bad = [v for v in _finite(res) if not math.isfinite(v)]
    console.print(f"wrote {out / 'index.html'} in {time.perf_counter() - t0:.0f} s"
                  + (f" ([yellow]{len(bad)} non-finite number(s)[/])" if bad else ""), highlight=False)


if __name__ == "__main__":
    main()
