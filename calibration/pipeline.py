"""``ls-calibrate``'s engine: a calibration capture folder -> one calibration file.

Input: ``CAPTURE/calibration/shots.json`` (``lightstage-calibration-shots``; written by the
twin's ``simulate`` or by a real stage) listing every shot: its name, lights on, cameras,
exposure bracket, raw files per camera (relative to the folder) and ``truth``, of which only
``truth['kind']`` and ``truth['known']`` (what the stage knows about its equipment: chart
layout, board geometry, the reference board fixture pose, sphere radii and albedo, the flat
field's certified radiance) are read here.

Order: geometry (ChArUco boards, joint bundle adjustment, world fixed by the reference board
pose) -> vignetting (flat field about each calibrated principal point) -> colour (chart
flattened by the white card, fit, scaled to absolute radiance by the flat field) -> lights
(chrome ball: positions/directions; white ball: RGB irradiance at the rig centre).

A camera that fails a step is reported with the reason and left out; the others are still
calibrated (the caller decides whether partial results are acceptable).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lightstage.calibfile import Calibration, CameraCalibration, LightCalibration
from lightstage.targets_spec import BoardSpec, ChartSpec, colorchecker_reference

from .colour import (ChartNotFound, ColourFit, chart_from_corners, cross_camera_spread,
                     detect_chart, fit_colour, illumination_flatten, sample_patches,
                     scale_to_radiance)
from .geometry import (GeometryError, RigGeometry, calibrate_rig, charuco_pattern,
                       refine_saddle_corners)
from .lights import (CameraModel, LightError, diffuse_irradiance, find_highlight, fit_sphere,
                     light_positions, mirror_ray, silhouette_edges, triangulate_lines)
from .raw import RawDecodeError, RawImage, decode_bracket, display_u8
from .vignetting import fit_vignetting, vignetting_gain

__all__ = ["CalibrateConfig", "CalibrationRun", "CaptureError", "load_shots", "calibrate_capture",
           "triangulate_light_positions"]

SHOTS_FORMAT = "lightstage-calibration-shots"
_LUM = np.array([0.2126, 0.7152, 0.0722], np.float32)


class CaptureError(ValueError):
    """The calibration capture folder or its shots.json is unusable."""


@dataclass
class CalibrateConfig:
    """Options of a calibration run.

    colour_method : ``matrix-3x3`` | ``root-polynomial``
    distortion : lens model fitted (``calibration.geometry.DISTORTION_MODELS``); the default
        ``k1k2`` suits the stage's long lenses, whose fields of view cannot measure more
    cameras, lights : restrict to these (default all in the capture)
    chart_corners : ``{camera: (4, 2)}`` user-given chart corners (skips detection)
    refine_corners : refit every ChArUco corner with a blurred-saddle model on the linear
        image (:func:`calibration.geometry.refine_saddle_corners`); off: the detector's own
    loss_scale : soft-L1 scale (px) of the bundle adjustment: refined corners sit ~0.07 px
        from the truth, so a residual of a few tenths of a pixel is already suspect
    """

    colour_method: str = "matrix-3x3"
    distortion: str = "k1k2"
    cameras: list[str] | None = None
    lights: list[int] | None = None
    chart_corners: dict[str, np.ndarray] | None = None
    refine_corners: bool = True
    loss_scale: float = 0.3


@dataclass
class CalibrationRun:
    """Result: the calibration (only fully calibrated cameras), per-camera problems and the
    tables the report shows."""

    calibration: Calibration
    problems: dict[str, list[str]] = field(default_factory=dict)
    tables: dict[str, Any] = field(default_factory=dict)
    geometry: RigGeometry | None = None


def load_shots(path: str | Path) -> tuple[Path, dict]:
    """Find and validate ``shots.json`` (``path`` is the capture folder, its ``calibration``
    folder, or the file). Returns (folder the file paths are relative to, parsed JSON)."""
    p = Path(path)
    for cand in (p, p / "shots.json", p / "calibration" / "shots.json"):
        if cand.is_file():
            p = cand
            break
    else:
        raise CaptureError(f"{path}: no calibration/shots.json (not a calibration capture)")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CaptureError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or d.get("format") != SHOTS_FORMAT:
        raise CaptureError(f"{p}: format must be {SHOTS_FORMAT!r}")
    errs = []
    for i, s in enumerate(d.get("shots") or []):
        for k in ("name", "cameras", "files", "truth"):
            if k not in s:
                errs.append(f"shots[{i}].{k}: missing")
        if "truth" in s and "kind" not in (s.get("truth") or {}):
            errs.append(f"shots[{i}].truth.kind: missing")
    if not d.get("shots"):
        errs.append("shots: empty")
    if errs:
        raise CaptureError(f"{p}: invalid shots file:\n  " + "\n  ".join(errs))
    return p.parent, d


class _Loader:
    """Decodes (and merges the bracket of) one shot for one camera."""

    def __init__(self, root: Path):
        self.root = root

    def __call__(self, shot: dict, cam: str) -> RawImage:
        files = shot["files"].get(cam)
        if not files:
            raise CaptureError(f"shot {shot['name']}: no files for camera {cam}")
        try:
            return decode_bracket([(self.root / f["path"], f.get("exposure"), f.get("iso"))
                                   for f in files])
        except RawDecodeError as e:
            raise CaptureError(f"shot {shot['name']}, camera {cam}: {e}") from None


def _known(shot: dict) -> dict:
    return dict(shot["truth"].get("known") or {})


def _ball(shot: dict) -> int:
    """The chrome ball's mount position of a shot (0 when the capture has one)."""
    return int(_known(shot).get("ball", 0))


def _on_sphere(rl: list[tuple], R: float) -> np.ndarray:
    """The weighted mean of where rays ``(x, r, w, ...)`` meet the sphere |p| = R."""
    pts, w = [], []
    for x, r, wi, *_ in rl:
        bb = x @ r
        s = -bb + np.sqrt(max(bb * bb - (x @ x - R * R), 0.0))
        pts.append(x + s * r)
        w.append(wi)
    p = (np.array(pts) * np.array(w)[:, None]).sum(0) / sum(w)
    return p * (R / np.linalg.norm(p))


def triangulate_light_positions(rays: dict[int, list[tuple]], min_angle_deg: float = 0.5
                                ) -> dict[int, tuple[np.ndarray, str]]:
    """Light positions from mirror rays ``{light: [(x, r, weight, ball), ...]}`` of one or
    more chrome-ball mount positions.

    Rays of one ball leave it a few cm apart and fix a light's direction, hardly its range;
    rays from two ball positions ~0.1 m apart cross at a few degrees and fix the range too,
    to ~σ_ray d / sin θ (d the range, θ the widest angle between rays of different balls).
    So: every light seen on >= 2 balls (rays spanning >= ``min_angle_deg``) is triangulated
    (:func:`calibration.lights.triangulate_lines`); σ_ray is pooled from the rays' angular
    residuals. Stages mount their lights on a near-sphere, so each triangulated range is then
    combined, by inverse variance, with the median range of all of them, whose spread about
    it (less the triangulation noise) is the sphere's own scatter: lights of a spherical rig
    settle on the fitted sphere, a light truly off it keeps its own range. Lights seen on one
    ball only are placed along their rays at the median range, or, with no light triangulated
    at all, by :func:`calibration.lights.light_positions`. Returns ``{light: (position, how)}``.
    """
    tri: dict[int, tuple[np.ndarray, float, int]] = {}
    res2, dof = 0.0, 0
    for i, rl in rays.items():
        if len({t[3] for t in rl}) < 2:
            continue
        X = np.array([t[0] for t in rl])
        R = np.array([t[1] for t in rl])
        cross = [np.degrees(np.arccos(np.clip(R[a] @ R[k], -1, 1)))
                 for a in range(len(rl)) for k in range(len(rl)) if rl[a][3] != rl[k][3]]
        theta = max(cross)
        if theta < min_angle_deg:
            continue
        p, _ = triangulate_lines(X, R, np.array([t[2] for t in rl]))
        v = p - X
        along = np.einsum("ij,ij->i", v, R)
        if np.any(along <= 0):
            continue
        # angular residual of each ray (2 components), 3 dof taken by the point
        res2 += float((np.linalg.norm(np.cross(v, R), axis=1) ** 2 / along ** 2).sum())
        dof += 2 * len(rl) - 3
        tri[i] = (p, theta, len(rl))
    out: dict[int, tuple[np.ndarray, str]] = {}
    if not tri:
        return light_positions({i: [t[:3] for t in rl] for i, rl in rays.items()})
    sig_ray = np.sqrt(res2 / dof) if dof > 0 else np.radians(0.1)
    ranges = {i: float(np.linalg.norm(p)) for i, (p, _, _) in tri.items()}
    sig_t = {i: sig_ray * ranges[i] / np.sin(np.radians(tri[i][1])) for i in tri}
    Rm = float(np.median(list(ranges.values())))
    # scatter of the rig's light ranges: what the triangulated spread has beyond its noise
    # (floor 2 mm: no stage is a perfect sphere)
    excess = np.mean([(ranges[i] - Rm) ** 2 - sig_t[i] ** 2 for i in tri])
    sig_s = float(np.sqrt(max(excess, 0.002 ** 2)))
    for i, (p, theta, n) in tri.items():
        wt = 1 / sig_t[i] ** 2
        ws = 1 / sig_s ** 2
        r = (wt * ranges[i] + ws * Rm) / (wt + ws)
        out[i] = (_on_sphere(rays[i], r),
                  f"triangulated from {n} views of 2+ ball positions ({theta:.1f} deg, range "
                  f"{ranges[i]:.3f} +- {sig_t[i]:.3f} m), weighted with the {Rm:.3f} m median "
                  f"range (+- {sig_s:.3f} m)")
    for i, rl in rays.items():
        if i not in out:
            out[i] = (_on_sphere(rl, Rm),
                      f"{len(rl)} view(s), on the {Rm:.3f} m median range of the triangulated lights")
    return out


def calibrate_capture(path: str | Path, config: CalibrateConfig | None = None,
                      progress: Callable[[str, int, int], None] | None = None,
                      rig_name: str | None = None) -> CalibrationRun:
    """Calibrate a stage from its calibration capture. ``progress(stage, done, total)``."""
    cfg = config or CalibrateConfig()
    t_start = time.time()
    root, sj = load_shots(path)
    load = _Loader(root)
    shots = sj["shots"]
    by_kind: dict[str, list[dict]] = {}
    for s in shots:
        by_kind.setdefault(s["truth"]["kind"], []).append(s)
    all_cams = sorted({c for s in shots for c in s["cameras"]})
    cams = [c for c in all_cams if cfg.cameras is None or c in cfg.cameras]
    if cfg.cameras:
        missing = sorted(set(cfg.cameras) - set(all_cams))
        if missing:
            raise CaptureError(f"cameras {missing} are not in the capture (has {all_cams})")
    problems: dict[str, list[str]] = {c: [] for c in cams}
    tables: dict[str, Any] = {}

    def tick(stage, i, n):
        if progress:
            progress(stage, i, n)

    # ---- geometry -------------------------------------------------------------------
    boards = by_kind.get("board", [])
    if not boards:
        raise CaptureError("no ChArUco board shots (kind 'board'): cannot calibrate geometry")
    spec = BoardSpec.from_dict(_known(boards[0])["board"])
    pattern = charuco_pattern(spec)
    detections: dict[str, dict[int, Any]] = {c: {} for c in cams}
    sizes: dict[str, tuple[int, int]] = {}
    reference = None
    jobs = [(s, c) for s in boards for c in s["cameras"] if c in cams]
    # marker-free square around each chessboard corner: the saddle fit's window
    clear = (spec.square - spec.marker) / 2
    n_det = n_kept = 0
    for j, (s, c) in enumerate(jobs):
        im = load(s, c)
        sizes[c] = im.rgb.shape[:2]
        v = int(s["truth"].get("pose_index", boards.index(s)))
        lum = im.rgb @ _LUM
        det = pattern.detect(display_u8(lum, 99.0))
        if det is not None and cfg.refine_corners:
            n_det += len(det.ids)
            det = refine_saddle_corners(lum, det, pattern.object_points[det.ids, :2], clear)
            n_kept += 0 if det is None else len(det.ids)
        detections[c][v] = det
        if "board2world" in _known(s):
            reference = (v, np.asarray(_known(s)["board2world"], np.float64))
        tick("boards", j + 1, len(jobs))
    if cfg.refine_corners:
        tables["corners_refined"] = {"detected": n_det, "kept": n_kept}
    for c in cams:
        seen = sum(d is not None for d in detections[c].values())
        if seen < len(detections[c]):
            problems[c].append(f"board not found in {len(detections[c]) - seen} of "
                               f"{len(detections[c])} views")
    try:
        geo = calibrate_rig(pattern, {c: d for c, d in detections.items() if d}, sizes, reference,
                            distortion=cfg.distortion, loss_scale=cfg.loss_scale)
    except GeometryError as e:
        raise CaptureError(f"geometry: {e}") from None
    for c, why in geo.failed.items():
        problems.setdefault(c, []).append(f"geometry: {why}")
    for c in cams:
        if c not in geo.names and not any("geometry" in p for p in problems[c]):
            problems[c].append("geometry: no board views")
    ok_cams = [c for c in cams if c in geo.names]
    models = {c: CameraModel(geo.K[c], geo.dist[c], geo.cam2world[c]) for c in ok_cams}
    tick("geometry", 1, 1)

    # ---- vignetting -----------------------------------------------------------------
    vig: dict[str, np.ndarray] = {}
    flat_k: dict[str, np.ndarray] = {}
    flats = by_kind.get("flat-field", [])
    flat_radiance = np.asarray(_known(flats[0])["radiance_rgb"], np.float64) if flats else None
    for c in ok_cams:
        shot = next((s for s in flats if c in s["cameras"]), None)
        if shot is None:
            problems[c].append("vignetting: no flat-field shot (assumed none)")
            vig[c] = np.zeros(2)
            continue
        im = load(shot, c)
        try:
            vig[c], flat_k[c] = fit_vignetting(im.rgb, geo.K[c][:2, 2], im.saturated)
        except ValueError as e:
            problems[c].append(f"vignetting: {e}")
            vig[c] = np.zeros(2)
    tick("vignetting", 1, 1)

    # ---- colour ---------------------------------------------------------------------
    charts = by_kind.get("chart", [])
    cards = {s["name"]: s for s in by_kind.get("chart-card", [])}
    fits: dict[str, ColourFit] = {}
    chart_rel: dict[str, np.ndarray] = {}
    cam_patches: dict[str, np.ndarray] = {}
    for j, c in enumerate(ok_cams):
        shot = next((s for s in charts if c in s["cameras"]), None)
        if shot is None:
            problems[c].append("colour: no chart shot")
            continue
        kn = _known(shot)
        cspec = ChartSpec(**{k: v for k, v in (kn.get("chart") or {}).items()
                             if k in ChartSpec.__dataclass_fields__})
        ref = colorchecker_reference(cspec.reference)
        im = load(shot, c)
        gain = vignetting_gain(im.rgb.shape[:2], geo.K[c][:2, 2], vig[c])
        img = im.rgb / gain[..., None]
        card = cards.get(kn.get("card_shot", ""))
        if card is not None and c in card["cameras"]:
            img = illumination_flatten(img, load(card, c).rgb / gain[..., None])
        try:
            if cfg.chart_corners and c in cfg.chart_corners:
                H = chart_from_corners(cfg.chart_corners[c], cspec)
            else:
                H = detect_chart(img, cspec, im.saturated)
            cam = sample_patches(img, H, cspec, im.saturated)
            fit = fit_colour(cam, ref, cfg.colour_method)
        except (ChartNotFound, ValueError) as e:
            problems[c].append(f"colour: chart {shot['name']}: {e}")
            continue
        chart_rel[c] = fit.apply(cam)
        cam_patches[c] = cam
        if flat_radiance is not None and c in flat_k:
            fit = scale_to_radiance(fit, flat_k[c], flat_radiance)
        else:
            problems[c].append("colour: no flat field of known radiance: relative scale only")
        fits[c] = fit
        tick("colour", j + 1, len(ok_cams))
    tables["colour_spread"] = cross_camera_spread(chart_rel)
    tables["chart_patches"] = {c: v.tolist() for c, v in chart_rel.items()}

    # ---- lights ---------------------------------------------------------------------
    lights_out: list[LightCalibration] = []
    light_rows: list[dict] = []
    want = None if cfg.lights is None else set(int(i) for i in cfg.lights)
    chrome_amb = by_kind.get("chrome-ambient", [])
    chromes = [s for s in by_kind.get("chrome", []) if want is None or s["truth"]["light"] in want]
    diffuses = [s for s in by_kind.get("diffuse", []) if want is None or s["truth"]["light"] in want]
    light_problems: list[str] = []
    if chromes and chrome_amb:
        # one silhouette fit per ball mount position (``known['ball']``, default 0)
        balls: dict[int, tuple[np.ndarray, float]] = {}
        for amb in chrome_amb:
            b = _ball(amb)
            radius = float(_known(amb)["radius"])
            edges = {}
            for c in amb["cameras"]:
                if c not in models:
                    continue
                try:
                    edges[c] = silhouette_edges(load(amb, c).rgb @ _LUM)
                except LightError as e:
                    light_problems.append(f"chrome ball {b} silhouette, {c}: {e}")
            if not edges:
                light_problems.append(f"chrome ball {b}: silhouette found in no calibrated camera")
                continue
            centre, fit_rms = fit_sphere(edges, models, radius)
            balls[b] = (centre, radius)
            tables.setdefault("chrome_centres", {})[b] = centre.tolist()
            if b == min(_ball(a) for a in chrome_amb):
                tables["chrome_centre"] = centre.tolist()
                tables["chrome_fit_rms_mm"] = fit_rms * 1000
        if not balls:
            raise CaptureError("lights: chrome ball silhouette found in no calibrated camera")
        rays: dict[int, list] = {}
        for j, s in enumerate(chromes):
            i = int(s["truth"]["light"])
            b = _ball(s)
            rays.setdefault(i, [])
            if b not in balls:
                continue
            centre, radius = balls[b]
            found = []
            for c in s["cameras"]:
                if c not in models:
                    continue
                h = find_highlight(load(s, c).rgb @ _LUM, _disc(models[c], centre, radius,
                                                                 sizes[c]))
                if h is not None:
                    found.append((c, h))
            # a highlight far dimmer than the light's best view is a stray (the true one is
            # hidden behind the rim): every view of one light sees the same mirror radiance
            top = max((h[1] for _, h in found), default=0.0)
            for c, h in found:
                if h[1] < 0.1 * top:
                    continue
                mr = mirror_ray(models[c], h[0], centre, radius)
                if mr is not None:
                    rays[i].append((*mr, b))
            tick("chrome", j + 1, len(chromes))
        for i, r in rays.items():
            if not r:
                light_problems.append(f"light {i}: no highlight on the chrome ball in any camera")
        positions = triangulate_light_positions({i: r for i, r in rays.items() if r})
    else:
        positions = {}
        if chromes or diffuses:
            light_problems.append("no chrome-ball shots (or no ambient silhouette shot): "
                                  "light positions unknown")
    # white ball
    intens: dict[int, tuple[np.ndarray, int]] = {}
    if diffuses and positions:
        dall = by_kind.get("diffuse-all", [])
        kn = _known(diffuses[0])
        dradius, albedo = float(kn["radius"]), float(kn["albedo"])
        if dall:
            edges = {}
            for c in dall[0]["cameras"]:
                if c in models:
                    try:
                        edges[c] = silhouette_edges(load(dall[0], c).rgb @ _LUM)
                    except LightError as e:
                        light_problems.append(f"white ball silhouette, {c}: {e}")
            dcentre = fit_sphere(edges, models, dradius)[0] if edges else np.asarray(
                tables.get("chrome_centre", [0, 0, 0]))
        else:
            dcentre = np.asarray(tables.get("chrome_centre", [0, 0, 0]))
        tables["diffuse_centre"] = np.asarray(dcentre).tolist()
        for j, s in enumerate(diffuses):
            i = int(s["truth"]["light"])
            if i not in positions:
                continue
            acc, n_acc = np.zeros(3), 0
            for c in s["cameras"]:
                if c not in models or c not in fits:
                    continue
                im = load(s, c)
                gain = vignetting_gain(im.rgb.shape[:2], geo.K[c][:2, 2], vig[c])
                rad = fits[c].apply(im.rgb / gain[..., None]).astype(np.float32)
                E, n = diffuse_irradiance(rad, models[c], dcentre, dradius, albedo,
                                          positions[i][0], im.saturated)
                acc += E * n
                n_acc += n
            if n_acc:
                intens[i] = (acc / n_acc, n_acc)
            else:
                light_problems.append(f"light {i}: white ball not lit where any camera sees it")
            tick("white ball", j + 1, len(diffuses))
    for i in sorted(positions):
        p, how = positions[i]
        if i not in intens:
            continue
        rgb = intens[i][0]
        if np.any(rgb <= 0):
            light_problems.append(f"light {i}: non-positive intensity {rgb}")
            continue
        lights_out.append(LightCalibration(i, p / np.linalg.norm(p), rgb, p))
        light_rows.append({"index": i, "position": p.tolist(), "how": how,
                           "rgb": rgb.tolist(), "pixels": intens[i][1]})
    tables["lights"] = light_rows
    tables["light_problems"] = light_problems

    # ---- assemble -------------------------------------------------------------------
    cameras: dict[str, CameraCalibration] = {}
    cam_rows = []
    for c in cams:
        row = {"camera": c, "problems": problems.get(c, [])}
        if c in geo.names:
            row.update(rms=geo.rms[c], views=geo.n_views[c], K=geo.K[c].tolist(),
                       dist=geo.dist[c].tolist(), centre=geo.cam2world[c][:3, 3].tolist(),
                       vignetting=vig.get(c, np.zeros(2)).tolist())
        if c in fits:
            row.update(fits[c].residuals)
        cam_rows.append(row)
        if c in geo.names and c in fits:
            f = fits[c]
            cameras[c] = CameraCalibration(
                K=geo.K[c], distortion=geo.dist[c], cam2world=geo.cam2world[c],
                image_size=tuple(int(v) for v in sizes[c]), colour_matrix=f.matrix,
                colour_method=f.method, colour_terms=f.terms, vignetting=vig[c],
                residuals={"reprojection_rms_px": geo.rms[c], **f.residuals})
    tables["cameras"] = cam_rows
    tables["board_poses"] = {int(v): m.tolist() for v, m in geo.board2world.items()}
    prov = {"tool": "ls-calibrate", "capture": str(Path(path)), "colour_method": cfg.colour_method,
            "distortion": cfg.distortion, "seconds": round(time.time() - t_start, 2),
            "world_frame": ("reference board pose (view %s)" % (reference[0],)) if reference
            else "first board view", "problems": {c: p for c, p in problems.items() if p},
            "light_problems": light_problems}
    cal = Calibration(rig=rig_name or str(sj.get("rig", "")), cameras=cameras, lights=lights_out,
                      source="ls-calibrate", provenance=prov)
    return CalibrationRun(cal, {c: p for c, p in problems.items() if p}, tables, geo)


def _disc(cam: CameraModel, centre, radius, size) -> np.ndarray:
    """(H, W) bool: pixels whose rays hit the ball (slightly shrunk: the rim is unreliable)."""
    H, W = size
    w2c = np.linalg.inv(cam.cam2world)
    pc = w2c[:3, :3] @ centre + w2c[:3, 3]
    uv = cam.K @ (pc / pc[2])
    rpx = cam.K[0, 0] * radius / math.sqrt(max(pc @ pc - radius * radius, 1e-12))
    v, u = np.mgrid[0:H, 0:W]
    return (u - uv[0]) ** 2 + (v - uv[1]) ** 2 < (rpx * 1.02) ** 2
