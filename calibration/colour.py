"""Colour calibration from a ColorChecker 24: find the chart, sample its patches, fit the
camera-RGB -> linear Rec.709 correction, report CIEDE2000 errors.

Pipeline for one camera::

    H      = detect_chart(rgb) or chart_from_corners(corners)      chart metres -> pixels
    cam    = sample_patches(rgb, H, saturated)                     (24, 3) trimmed means
    fit    = fit_colour(cam, reference, "matrix-3x3" | "root-polynomial")
    fit    = scale_to_radiance(fit, flat_cam, flat_radiance)       absolute, white balanced

The chart-only fit maps camera RGB to *reflectance* (the chart's illuminant is unknown); a
flat-field source of known radiance then fixes each output row's scale, which makes the result
absolute radiance with white balance included. Both methods are exposure invariant: 3x3 is
linear, and the root-polynomial terms (sqrt(RG), ...) scale like RGB (Finlayson 2015).

References
----------
Finlayson, G. D., Mackiewicz, M., Hurlbert, A. (2015). Color correction using root-polynomial
    regression. IEEE TIP 24(5).
Sharma, G., Wu, W., Dalal, E. N. (2005). The CIEDE2000 color-difference formula.
    Color Research & Application 30(1).
"""

from __future__ import annotations

import itertools
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from lightstage.targets_spec import ChartSpec, DEFAULT_CHART, colorchecker_reference

__all__ = [
    "ChartNotFound",
    "ColourFit",
    "COLOUR_METHODS",
    "detect_chart",
    "chart_from_corners",
    "load_corners",
    "sample_patches",
    "fit_colour",
    "apply_colour",
    "scale_to_radiance",
    "delta_e2000",
    "cross_camera_spread",
    "illumination_flatten",
]


class ChartNotFound(RuntimeError):
    """The chart could not be found in an image; the message says why."""


# ---- geometry of the chart in an image --------------------------------------------------------


def chart_from_corners(corners, spec: ChartSpec = DEFAULT_CHART) -> np.ndarray:
    """Homography (3, 3) chart metres -> pixels from the 4 outer corners of the *patch grid*
    (top-left of 'dark skin', top-right, bottom-right, bottom-left of the grid, in pixels)."""
    import cv2

    c = np.asarray(corners, np.float64).reshape(4, 2)
    gap = spec.pitch - spec.patch
    x0, y0 = spec.margin, spec.margin
    x1, y1 = x0 + 6 * spec.pitch - gap, y0 + 4 * spec.pitch - gap
    src = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)
    return cv2.getPerspectiveTransform(src.astype(np.float32), c.astype(np.float32)).astype(np.float64)


def load_corners(path: str | Path) -> dict[str, np.ndarray]:
    """User-given chart corners: JSON ``{"<camera or image>": [[x, y] x 4], ...}`` in the
    order of :func:`chart_from_corners`."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read chart corners ({e})") from None
    out = {}
    for k, v in d.items():
        a = np.asarray(v, np.float64)
        if a.shape != (4, 2) or not np.all(np.isfinite(a)):
            raise ValueError(f"{path}: {k}: expected 4 [x, y] corners, got shape {a.shape}")
        out[k] = a
    return out


def _warp(H, pts):
    p = np.c_[pts, np.ones(len(pts))] @ np.asarray(H).T
    return p[:, :2] / p[:, 2:3]


def _candidate_quads(grey: np.ndarray, min_side: float, max_side: float):
    """Convex quadrilaterals of patch size in an 8-bit image: (centre (2,), corners (4, 2))."""
    import cv2

    quads = []
    blur = cv2.GaussianBlur(grey, (3, 3), 0)
    binaries = []
    for block in (max(int(max_side) | 1, 11), max(int(2 * max_side) | 1, 21)):
        for C in (-2, 2):
            binaries.append(cv2.adaptiveThreshold(blur, 255, cv2.ADAPTIVE_THRESH_MEAN_C,
                                                  cv2.THRESH_BINARY, block, C))
    edges = cv2.Canny(blur, 10, 40)
    binaries.append(255 - cv2.dilate(edges, np.ones((2, 2), np.uint8)))
    for b in binaries:
        contours, _ = cv2.findContours(b, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        for c in contours:
            area = cv2.contourArea(c)
            if not min_side ** 2 <= area <= max_side ** 2:
                continue
            approx = cv2.approxPolyDP(c, 0.08 * cv2.arcLength(c, True), True)
            if len(approx) != 4 or not cv2.isContourConvex(approx):
                continue
            q = approx.reshape(4, 2).astype(np.float64)
            sides = np.linalg.norm(q - np.roll(q, 1, 0), axis=1)
            if sides.max() > 2.5 * sides.min():
                continue
            # a patch is uniform: reject textured blobs (mask over the quad's box only)
            x0, y0, bw, bh = cv2.boundingRect(approx)
            m = np.zeros((bh, bw), np.uint8)
            cv2.fillConvexPoly(m, approx.reshape(4, 2) - [x0, y0], 1)
            m = cv2.erode(m, np.ones((3, 3), np.uint8))
            vals = grey[y0:y0 + bh, x0:x0 + bw][m > 0]
            if vals.size < 4 or vals.std() > 12:
                continue
            quads.append((q.mean(0), q, area))
    # merge duplicates found by several binarisations
    out: list = []
    for cen, q, area in sorted(quads, key=lambda t: -t[2]):
        if all(np.linalg.norm(cen - o[0]) > 0.3 * np.sqrt(area) for o in out):
            out.append((cen, q, area))
    return out


def _order_quad(q):
    """Corners ordered around the centroid (consistent orientation)."""
    c = q.mean(0)
    a = np.arctan2(q[:, 1] - c[1], q[:, 0] - c[0])
    return q[np.argsort(a)]


def detect_chart(rgb: np.ndarray, spec: ChartSpec = DEFAULT_CHART,
                 saturated: np.ndarray | None = None, min_patches: int = 10,
                 max_colour_error: float = 0.6) -> np.ndarray:
    """Find a ColorChecker 24 in a linear image; returns the homography chart metres -> pixels.

    Patches are found as uniform convex quads (adaptive thresholds and edges on a display
    rendering), put on an integer grid through one patch's own perspective, fitted with a
    RANSAC homography, and the grid's placement/orientation among the 8 symmetries and all
    shifts is chosen by how well a 3x3 colour fit explains the patch colours (the chart's
    colours identify its orientation). Raises :class:`ChartNotFound` with the reason.
    """
    import cv2

    from .raw import display_u8

    lum = np.asarray(rgb, np.float32) @ np.array([0.2126, 0.7152, 0.0722], np.float32)
    grey = display_u8(lum, 99.0)
    H_img, W_img = grey.shape
    quads = _candidate_quads(grey, min_side=max(6, min(H_img, W_img) / 80),
                             max_side=min(H_img, W_img) / 4)
    if len(quads) < min_patches:
        raise ChartNotFound(f"found {len(quads)} patch-like squares, need {min_patches}")
    areas = np.array([a for _, _, a in quads])
    # keep the dominant patch size (the chart's patches have similar areas)
    # (noise in dark regions makes small spurious squares: a cluster scores by its size too)
    best_group: list = []
    best_score = 0.0
    for ref in np.unique(np.round(np.log(areas), 1)):
        g = [q for q in quads if abs(np.log(q[2]) - ref) < 0.6]
        score = len(g) * np.sqrt(np.median([q[2] for q in g]))
        if score > best_score:
            best_group, best_score = g, score
    quads = best_group
    if len(quads) < min_patches:
        raise ChartNotFound(f"only {len(quads)} patch-like squares of a common size, need {min_patches}")
    cens = np.array([q[0] for q in quads])
    ratio = spec.pitch / spec.patch
    best = None
    # try the quads closest to the median as the reference patch
    order = np.argsort(np.abs(np.log([q[2] for q in quads]) - np.median(np.log([q[2] for q in quads]))))
    for qi in order[:6]:
        q = _order_quad(quads[qi][1])
        unit = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]]) * (1 / ratio)
        Hq = cv2.getPerspectiveTransform(unit.astype(np.float32), q.astype(np.float32))
        g = _warp(np.linalg.inv(Hq), cens)
        gi = np.round(g)
        ok = np.all(np.abs(g - gi) < 0.25, axis=1)
        if ok.sum() < min_patches:
            continue
        span = gi[ok].max(0) - gi[ok].min(0) + 1
        if max(span) > 6 or min(span) > 4:
            continue
        Hg, inl = cv2.findHomography(gi[ok].astype(np.float32), cens[ok].astype(np.float32),
                                     cv2.RANSAC, max(2.0, np.sqrt(np.median(areas)) * 0.15))
        if Hg is None:
            continue
        n_in = int(inl.sum())
        if best is None or n_in > best[0]:
            best = (n_in, gi[ok][inl.ravel() > 0], cens[ok][inl.ravel() > 0], Hg)
    if best is None or best[0] < min_patches:
        raise ChartNotFound("patch-like squares do not form a 6 x 4 grid")
    _, gi, gc, Hg = best
    ref = colorchecker_reference(spec.reference)
    chart_centres = spec.patch_centres()
    fits: list = []
    for swap, sa, sb in itertools.product((False, True), (1, -1), (1, -1)):
        a, b = (gi[:, 1], gi[:, 0]) if swap else (gi[:, 0], gi[:, 1])
        a, b = sa * a, sb * b
        for c0 in range(int(5 - (a.max() - a.min())) + 1):
            for r0 in range(int(3 - (b.max() - b.min())) + 1):
                col = (a - a.min() + c0).astype(int)
                row = (b - b.min() + r0).astype(int)
                idx = row * 6 + col
                Hc, _ = cv2.findHomography(chart_centres[idx].astype(np.float32),
                                           gc.astype(np.float32), 0)
                if Hc is None:
                    continue
                cam = sample_patches(rgb, Hc, spec, saturated, fraction=0.4)
                good = np.isfinite(cam).all(1)
                if good.sum() < min_patches:
                    continue
                X, Y = cam[good], ref[good]
                Mx, *_ = np.linalg.lstsq(X, Y, rcond=None)
                err = float(np.mean(((X @ Mx - Y) / (np.abs(Y) + 0.05)) ** 2))
                fits.append((err, Hc))
    fits.sort(key=lambda f: f[0])
    best_fit = fits[0] if fits else None
    if best_fit is None:
        raise ChartNotFound("no placement of the 6 x 4 grid fits the detected patches")
    if best_fit[0] > max_colour_error:
        raise ChartNotFound(f"patch colours do not match the chart (relative error {best_fit[0]:.3f})")
    if len(fits) > 1 and fits[1][0] < 1.5 * best_fit[0]:
        raise ChartNotFound("chart orientation is ambiguous (two placements fit the colours "
                            f"almost equally: {best_fit[0]:.3f} vs {fits[1][0]:.3f})")
    return best_fit[1]


# ---- sampling ---------------------------------------------------------------------------------


def sample_patches(rgb: np.ndarray, H: np.ndarray, spec: ChartSpec = DEFAULT_CHART,
                   saturated: np.ndarray | None = None, fraction: float = 0.5,
                   trim: float = 0.1, min_pixels: int = 9, floor: float = 0.004) -> np.ndarray:
    """(24, 3) trimmed-mean camera RGB of every patch (NaN where a patch is outside the image,
    saturated, or too small).

    Parameters
    ----------
    rgb : (H, W, 3) linear image
    H : homography chart metres -> pixels
    fraction : side of the sampled central square, as a fraction of the patch side (stays
        clear of the edges, blur and homography error)
    trim : fraction of pixels dropped at each end (by luminance) before averaging
    floor : a patch with a channel below ``floor`` x that channel's brightest patch is
        dropped (NaN): a sensor cannot record a response below zero, so such means are
        clipped, not measured (saturation is handled by the ``saturated`` mask)
    """
    import cv2

    rgb = np.asarray(rgb, np.float32)
    h, w = rgb.shape[:2]
    half = spec.patch * fraction / 2
    out = np.full((24, 3), np.nan)
    for k, (cx, cy) in enumerate(spec.patch_centres()):
        quad = _warp(H, np.array([[cx - half, cy - half], [cx + half, cy - half],
                                  [cx + half, cy + half], [cx - half, cy + half]]))
        if np.any(quad < 0) or np.any(quad[:, 0] > w - 1) or np.any(quad[:, 1] > h - 1):
            continue
        x0, y0 = np.floor(quad.min(0)).astype(int)
        x1, y1 = np.ceil(quad.max(0)).astype(int) + 1
        m = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillConvexPoly(m, np.round((quad - [x0, y0]) * 16).astype(np.int32), 1, shift=4)
        sel = m > 0
        if saturated is not None:
            sel &= ~saturated[y0:y1, x0:x1]
        px = rgb[y0:y1, x0:x1][sel]
        if len(px) < min_pixels:
            continue
        lum = px @ np.array([0.2126, 0.7152, 0.0722], np.float32)
        lo, hi = np.quantile(lum, [trim, 1 - trim])
        keep = (lum >= lo) & (lum <= hi)
        out[k] = px[keep].mean(0) if keep.sum() >= 3 else px.mean(0)
    if floor > 0 and np.isfinite(out).any():
        top = np.nanmax(out, axis=0)
        out[np.any(out < floor * top, axis=1)] = np.nan
    return out


def illumination_flatten(chart_rgb: np.ndarray, card_rgb: np.ndarray) -> np.ndarray:
    """Divide the chart image by the white card's relative brightness at the same pose (the
    card's luminance normalised to its median), removing illumination fall-off and
    vignetting so every patch is seen under the same light."""
    lum = np.asarray(card_rgb, np.float64) @ np.array([0.2126, 0.7152, 0.0722])
    valid = lum > 0.05 * np.percentile(lum, 99)
    g = np.where(valid, lum / np.median(lum[valid]), np.inf)  # off the card -> 0
    return (np.asarray(chart_rgb) / g[..., None]).astype(np.float32)


# ---- fitting ----------------------------------------------------------------------------------


@dataclass
class ColourFit:
    """A colour correction: ``method``, the (3, 3) matrix on RGB and, for root-polynomial
    methods, the (k, 3) coefficients of the extra terms (``colour_terms`` in calibfile)."""

    method: str
    matrix: np.ndarray
    terms: np.ndarray | None = None
    residuals: dict[str, float] = field(default_factory=dict)

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        return apply_colour(rgb, self.matrix, self.method, self.terms)


def _root_poly_terms(rgb: np.ndarray) -> np.ndarray:
    """Degree-2 root-polynomial extra terms (sqrt(RG), sqrt(GB), sqrt(RB)), in the order of
    colour-science's ``matrix_augmented_Finlayson2015`` (degree 2, root expansion)."""
    r, g, b = np.moveaxis(np.clip(np.asarray(rgb, np.float64), 0, None), -1, 0)
    return np.stack([np.sqrt(r * g), np.sqrt(g * b), np.sqrt(r * b)], axis=-1)


def apply_colour(rgb: np.ndarray, matrix: np.ndarray, method: str = "matrix-3x3",
                 terms: np.ndarray | None = None) -> np.ndarray:
    """Apply a stored correction to (..., 3) camera RGB -> (..., 3) linear Rec.709."""
    out = np.asarray(rgb, np.float64) @ np.asarray(matrix).T
    if method.startswith("root-polynomial") and terms is not None:
        out = out + _root_poly_terms(rgb) @ np.asarray(terms)
    return out


def _fit_3x3(cam, ref, weights):
    w = np.sqrt(weights)[:, None]
    X, *_ = np.linalg.lstsq(cam * w, ref * w, rcond=None)
    return ColourFit("matrix-3x3", X.T)


def _fit_root_poly(cam, ref, weights):
    import colour

    # colour-science's Finlayson 2015 root-polynomial regression (degree 2: 6 terms)
    M = colour.characterisation.matrix_colour_correction(
        cam, ref, method="Finlayson 2015", degree=2, root_polynomial_expansion=True)
    M = np.asarray(M, np.float64)  # (3, 6): R, G, B, sqrt(RG), sqrt(GB), sqrt(RB)
    check = colour.characterisation.polynomial_expansion_Finlayson2015(
        np.array([[1.0, 4.0, 9.0]]), degree=2, root_polynomial_expansion=True)
    expect = np.c_[np.array([[1.0, 4.0, 9.0]]), _root_poly_terms(np.array([[1.0, 4.0, 9.0]]))]
    if not np.allclose(check, expect):
        raise RuntimeError("colour-science root-polynomial term order changed")
    return ColourFit("root-polynomial-2", M[:, :3], M[:, 3:].T)


COLOUR_METHODS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], ColourFit]] = {
    "matrix-3x3": _fit_3x3,
    "root-polynomial": _fit_root_poly,
}


def fit_colour(cam: np.ndarray, reference: np.ndarray, method: str = "matrix-3x3",
               weights: np.ndarray | None = None) -> ColourFit:
    """Fit camera RGB (N, 3) -> reference linear Rec.709 (N, 3); rows with NaN are skipped.

    ``method`` is a key of :data:`COLOUR_METHODS`. Residuals (CIEDE2000 of the fitted patches
    against the reference) are attached."""
    if method not in COLOUR_METHODS:
        raise ValueError(f"colour method {method!r}: choose one of {sorted(COLOUR_METHODS)}")
    cam = np.asarray(cam, np.float64)
    reference = np.asarray(reference, np.float64)
    ok = np.isfinite(cam).all(1) & np.isfinite(reference).all(1)
    need = 3 if method == "matrix-3x3" else 6
    if ok.sum() < max(need, 6):
        raise ValueError(f"colour fit needs >= {max(need, 6)} valid patches, got {int(ok.sum())}")
    w = np.ones(len(cam)) if weights is None else np.asarray(weights, np.float64)
    fit = COLOUR_METHODS[method](cam[ok], reference[ok], w[ok])
    de = delta_e2000(fit.apply(cam[ok]), reference[ok])
    fit.residuals = {"delta_e2000_mean": float(de.mean()), "delta_e2000_max": float(de.max())}
    return fit


def scale_to_radiance(fit: ColourFit, flat_cam: np.ndarray, flat_radiance) -> ColourFit:
    """Scale each output row so the flat-field source's camera RGB maps to its known linear
    Rec.709 radiance: absolute radiometry and white balance in one step."""
    pred = fit.apply(np.asarray(flat_cam, np.float64)[None])[0]
    s = np.asarray(flat_radiance, np.float64) / pred
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"flat field gives a non-positive colour scale {s}")
    terms = None if fit.terms is None else fit.terms * s[None, :]
    return ColourFit(fit.method, fit.matrix * s[:, None], terms, dict(fit.residuals))


# ---- errors -----------------------------------------------------------------------------------


def _lab(rgb: np.ndarray) -> np.ndarray:
    import colour

    cs = colour.RGB_COLOURSPACES["sRGB"]
    XYZ = colour.RGB_to_XYZ(np.asarray(rgb, np.float64), cs, illuminant=cs.whitepoint)
    return colour.XYZ_to_Lab(XYZ, cs.whitepoint)


def delta_e2000(rgb_a: np.ndarray, rgb_b: np.ndarray) -> np.ndarray:
    """CIEDE2000 between linear Rec.709 colours (..., 3) (Y = 1 is the reference white)."""
    import colour

    return np.asarray(colour.delta_E(_lab(rgb_a), _lab(rgb_b), method="CIE 2000"))


def cross_camera_spread(corrected: dict[str, np.ndarray]) -> dict[str, float]:
    """How well cameras agree: CIEDE2000 of each camera's corrected patches against the
    per-patch mean over cameras; mean and max over cameras and patches."""
    names = [n for n, v in corrected.items() if v is not None]
    if len(names) < 2:
        return {"delta_e2000_mean": 0.0, "delta_e2000_max": 0.0, "cameras": len(names)}
    stack = np.stack([corrected[n] for n in names])
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a patch clipped in every camera
        mean = np.nanmean(stack, axis=0)
    de = np.stack([delta_e2000(s, mean) for s in stack])
    return {"delta_e2000_mean": float(np.nanmean(de)), "delta_e2000_max": float(np.nanmax(de)),
            "cameras": len(names)}
