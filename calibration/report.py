"""HTML report of a calibration run: per-camera tables (reprojection RMS, intrinsics, colour
CIEDE2000 per patch), cross-camera colour agreement, lights, a picture of the rig and a map of
the lights. Pictures are drawn with OpenCV (matplotlib is not a dependency)."""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np

from lightstage.calibfile import Calibration
from lightstage.targets_spec import colorchecker_reference

from .colour import delta_e2000

__all__ = ["draw_rig", "draw_light_map", "write_report"]


def _canvas(w, h):
    return np.full((h, w, 3), 255, np.uint8)


def draw_rig(cal: Calibration, size: int = 900) -> np.ndarray:
    """(H, W, 3) BGR picture: top view (x-z) and front view (x-y) of cameras (blue frusta with
    names) and lights (dots shaded by intensity), metres on a grid."""
    import cv2

    img = _canvas(size * 2, size)
    pts = [c.cam2world[:3, 3] for c in cal.cameras.values()]
    pts += [l.position for l in cal.lights if l.position is not None]
    extent = max(1.0, float(np.max(np.abs(np.asarray(pts)))) * 1.1) if pts else 1.5
    rgb = np.array([l.rgb for l in cal.lights]) if cal.lights else np.ones((0, 3))
    lum = rgb @ [0.2126, 0.7152, 0.0722] if len(rgb) else rgb
    for panel, (ax_u, ax_v, title, flip_v) in enumerate(((0, 2, "top view (x right, z down)", False),
                                                        (0, 1, "front view (x right, y up)", True))):
        ox = panel * size

        def to_px(p):
            u = ox + size / 2 + p[ax_u] / extent * size * 0.45
            v = size / 2 + (-1 if flip_v else 1) * p[ax_v] / extent * size * 0.45
            return int(round(u)), int(round(v))

        for g in np.arange(-math.floor(extent), math.floor(extent) + 1):
            a, b = to_px(np.array([g, g, g]) * 0 + np.eye(3)[ax_u] * g - np.eye(3)[ax_v] * extent), \
                to_px(np.eye(3)[ax_u] * g + np.eye(3)[ax_v] * extent)
            cv2.line(img, a, b, (230, 230, 230), 1)
            a, b = to_px(np.eye(3)[ax_v] * g - np.eye(3)[ax_u] * extent), \
                to_px(np.eye(3)[ax_v] * g + np.eye(3)[ax_u] * extent)
            cv2.line(img, a, b, (230, 230, 230), 1)
        cv2.putText(img, title + f"  grid 1 m", (ox + 10, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.6,
                    (0, 0, 0), 1, cv2.LINE_AA)
        for l, y in zip(cal.lights, lum):
            if l.position is None:
                continue
            s = float(y / max(lum.max(), 1e-12))
            cv2.circle(img, to_px(l.position), 4, (0, int(200 * (1 - s)), int(255 * s)), -1,
                       cv2.LINE_AA)
        cv2.circle(img, to_px(np.zeros(3)), 5, (0, 0, 0), 1, cv2.LINE_AA)
        for name, c in cal.cameras.items():
            C = c.cam2world[:3, 3]
            R = c.cam2world[:3, :3]
            s = 0.12 * extent
            corners = [C + s * (R @ np.array([x, y, 1.0])) for x, y in ((-.5, -.5), (.5, -.5), (.5, .5), (-.5, .5))]
            for q in corners:
                cv2.line(img, to_px(C), to_px(q), (200, 80, 0), 1, cv2.LINE_AA)
            for a, b in zip(corners, corners[1:] + corners[:1]):
                cv2.line(img, to_px(a), to_px(b), (200, 80, 0), 1, cv2.LINE_AA)
            cv2.putText(img, name, to_px(C + np.array([0.03, 0.03, 0.03])), cv2.FONT_HERSHEY_SIMPLEX,
                        0.4, (120, 40, 0), 1, cv2.LINE_AA)
    return img


def draw_light_map(cal: Calibration, width: int = 1024) -> np.ndarray:
    """(H, W, 3) BGR lat-long map (azimuth about +y, elevation) of light directions; each dot
    is coloured by the light's calibrated RGB (normalised to the brightest) and labelled."""
    import cv2

    h = width // 2
    img = np.full((h, width, 3), 40, np.uint8)
    for el in (-60, -30, 0, 30, 60):
        v = int((0.5 - el / 180) * h)
        cv2.line(img, (0, v), (width, v), (70, 70, 70), 1)
    for az in range(-180, 181, 45):
        u = int((az + 180) / 360 * width)
        cv2.line(img, (u, 0), (u, h), (70, 70, 70), 1)
    if not cal.lights:
        return img
    rgb = np.array([l.rgb for l in cal.lights])
    peak = rgb.max()
    for l, c in zip(cal.lights, rgb):
        d = l.direction
        az = math.degrees(math.atan2(d[0], d[2]))
        el = math.degrees(math.asin(np.clip(d[1], -1, 1)))
        u, v = int((az + 180) / 360 * width), int((0.5 - el / 180) * h)
        col = np.clip(c / peak, 0, 1) ** (1 / 2.2) * 255
        cv2.circle(img, (u, v), 7, (int(col[2]), int(col[1]), int(col[0])), -1, cv2.LINE_AA)
        cv2.putText(img, str(l.index), (u + 8, v + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35,
                    (220, 220, 220), 1, cv2.LINE_AA)
    cv2.putText(img, "light directions: azimuth atan2(x, z) -180..180, elevation -90..90",
                (8, h - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (220, 220, 220), 1, cv2.LINE_AA)
    return img


def _table(rows: list[list], header: list[str]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>")
    return "\n".join(out) + "</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def write_report(out_dir: str | Path, cal: Calibration, tables: dict, problems: dict,
                 overwrite: bool = False) -> Path:
    """Write ``index.html``, ``rig.png`` and ``lights.png`` into ``out_dir``; refuses to touch
    an existing report unless ``overwrite``."""
    import cv2

    out = Path(out_dir)
    index = out / "index.html"
    if index.exists() and not overwrite:
        raise FileExistsError(f"{index}: exists (use --overwrite to replace it)")
    out.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out / "rig.png"), draw_rig(cal))
    cv2.imwrite(str(out / "lights.png"), draw_light_map(cal))
    parts = ["<!doctype html><meta charset='utf-8'><title>lightstage calibration</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             ".bad{color:#b00}</style>",
             f"<h1>Calibration of rig {html.escape(cal.rig)}</h1>",
             f"<p>{len(cal.cameras)} camera(s), {len(cal.lights)} light(s). "
             f"World frame: {html.escape(str(cal.provenance.get('world_frame', '')))}. "
             f"Colour method: {html.escape(str(cal.provenance.get('colour_method', '')))}.</p>"]
    if problems or tables.get("light_problems"):
        parts.append("<h2 class='bad'>Problems</h2><ul class='bad'>")
        for c, ps in problems.items():
            for p in ps:
                parts.append(f"<li>{html.escape(c)}: {html.escape(p)}</li>")
        for p in tables.get("light_problems", []):
            parts.append(f"<li>{html.escape(p)}</li>")
        parts.append("</ul>")
    rows = []
    for r in tables.get("cameras", []):
        K = r.get("K")
        rows.append([r["camera"], r.get("views", "-"), r.get("rms", "-"),
                     K[0][0] if K else "-", K[1][1] if K else "-", K[0][2] if K else "-",
                     K[1][2] if K else "-", r.get("dist", [])[:2], r.get("vignetting", "-"),
                     r.get("delta_e2000_mean", "-"), r.get("delta_e2000_max", "-")])
    parts.append("<h2>Cameras</h2>")
    parts.append(_table(rows, ["camera", "board views", "reproj. RMS px", "fx", "fy", "cx", "cy",
                               "k1, k2", "vignetting a1, a2", "chart dE00 mean", "chart dE00 max"]))
    sp = tables.get("colour_spread", {})
    parts.append(f"<p>Cross-camera colour agreement (chart, dE00 of each camera against the mean "
                 f"of all cameras): mean {sp.get('delta_e2000_mean', 0):.3f}, max "
                 f"{sp.get('delta_e2000_max', 0):.3f} over {sp.get('cameras', 0)} cameras.</p>")
    patches = tables.get("chart_patches", {})
    if patches:
        ref = colorchecker_reference()
        names = sorted(patches)
        de = {c: delta_e2000(np.asarray(patches[c]), ref) for c in names}
        rows = [[k] + [float(de[c][k]) for c in names] for k in range(24)]
        parts.append("<h2>Chart: dE00 per patch (fitted vs reference)</h2>")
        parts.append(_table(rows, ["patch"] + names))
    parts.append("<h2>Rig</h2><img src='rig.png' width='100%'>")
    parts.append("<h2>Lights</h2><img src='lights.png' width='100%'>")
    lrows = [[l["index"], l["position"], l["how"], l["rgb"], l["pixels"]] for l in tables.get("lights", [])]
    parts.append(_table(lrows, ["light", "position m", "how", "rgb (irradiance at centre)", "pixels"]))
    if "chrome_centre" in tables:
        parts.append(f"<p>Chrome ball centre {_fmt(tables['chrome_centre'])} m "
                     f"(silhouette fit RMS {tables.get('chrome_fit_rms_mm', 0):.3f} mm); white ball "
                     f"centre {_fmt(tables.get('diffuse_centre', []))} m.</p>")
    if len(tables.get("chrome_centres", {})) > 1:
        parts.append("<p>Chrome ball mount positions (light ranges triangulated across them): " +
                     "; ".join(f"{b}: {_fmt(c)} m" for b, c in sorted(tables["chrome_centres"].items()))
                     + ".</p>")
    if "corners_refined" in tables:
        cr = tables["corners_refined"]
        parts.append(f"<p>ChArUco corners refitted as blurred saddles on linear data: "
                     f"{cr['kept']} of {cr['detected']} kept.</p>")
    tmp = index.with_suffix(".html.tmp")
    tmp.write_text("\n".join(parts) + "\n")
    tmp.replace(index)
    return index
