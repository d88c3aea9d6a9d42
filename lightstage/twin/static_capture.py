"""Small static captures with a known answer, written through the twin's sensor model and DNG
writer (no renderer): for tests and benchmarks of ingest.

The subject is a flat radiance image per camera, the same in every frame (no motion), so a
correct ingest returns exactly that radiance per unit light for every OLAT. The files are the
ones a real stage (and :mod:`lightstage.twin.capture`) writes: ``rig.json``, the manifest
``<subject>/<take>/capture.json`` with the sha256 of every raw file,
``<subject>/<take>/raw/<camera>/f<frame:04d>_e<k>.dng``, and the twin's exact calibration.

The rig is a built-in (or given) rig with its cameras cut to ``height`` x ``width`` (intrinsics
scaled with them) so that captures are small enough for unit tests. Without ``noise_seed`` every
raw value is the rounded expected DN, so two calls with the same arguments write the same bytes.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from ..calibfile import save_calibration
from ..dng import write_dng
from ..manifest import CaptureManifest, FrameRecord, RawFile
from ..rig import Frame, Rig, builtin_rig, save_rig
from .sensor import dng_metadata, light_irradiance, noise_rng, simulate_raw, truth_calibration

__all__ = ["StaticCapture", "scaled_rig", "static_texture", "write_static_capture"]


class StaticCapture(NamedTuple):
    """What :func:`write_static_capture` wrote: the capture folder (the argument of
    ``ingest``), the calibration file, and the rig as written to ``rig.json``."""

    root: Path
    calibration: Path
    rig: Rig


def scaled_rig(rig: str | Rig, height: int, width: int, n_cameras: int | None = None) -> Rig:
    """A copy of ``rig`` whose cameras have ``height`` x ``width`` sensors.

    Parameters
    ----------
    rig : str or Rig
        A built-in rig name (``tiny``, ``demo``, ``lsx-331``) or a rig (not modified).
    height, width : int
        New sensor size in pixels; each camera's ``K`` is scaled with it (same field of view).
    n_cameras : int, optional
        Keep only the first ``n_cameras`` cameras.

    Returns
    -------
    Rig
    """
    rig = copy.deepcopy(builtin_rig(rig) if isinstance(rig, str) else rig)
    if n_cameras:
        rig.cameras = rig.cameras[:n_cameras]
    for c in rig.cameras:
        K = np.asarray(c.K)
        K[0] *= width / c.sensor.width
        K[1] *= height / c.sensor.height
        c.K = K.tolist()
        c.sensor.width, c.sensor.height = width, height
    return rig


def static_texture(height: int, width: int, camera_index: int) -> np.ndarray:
    """A smooth, textured ``(height, width, 3)`` radiance per unit light for one camera.

    Textured enough for optical flow to lock on, dim enough that a single light never clips the
    longest exposure of the built-in rigs; the camera index shifts the pattern so that cameras
    differ.
    """
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    t = (0.4 + 0.15 * np.sin(x / 7.3 + camera_index) * np.cos(y / 5.1)
         + 0.1 * np.sin((x + 2 * y) / 11.0))
    return t[..., None] * np.array([1.0, 0.8, 0.6])


def _frames(rig: Rig, frames: Sequence[int] | None, n_olat: int | None) -> list[Frame]:
    if (frames is None) == (n_olat is None):
        raise ValueError("write_static_capture: give exactly one of frames= (indices into the "
                         "rig's sequence) or n_olat= (a new sequence: tracking, n_olat OLATs, tracking)")
    if frames is not None:
        by_index = {fr.index: fr for fr in rig.sequence}
        missing = [f for f in frames if f not in by_index]
        if missing:
            raise ValueError(f"write_static_capture: rig {rig.name!r} has no frames {missing} "
                             f"in its sequence (0..{len(rig.sequence) - 1})")
        return [by_index[f] for f in frames]
    if not 1 <= n_olat <= rig.n_lights:
        raise ValueError(f"write_static_capture: n_olat={n_olat} is not in 1..{rig.n_lights} "
                         f"(lights of rig {rig.name!r})")
    tracking = [fr for fr in rig.sequence if fr.kind == "tracking"]
    if not tracking:
        raise ValueError(f"write_static_capture: rig {rig.name!r} has no tracking frame to take "
                         "the exposure bracket from")
    exps = list(tracking[0].exposures)
    seq = [Frame(0, "tracking", exps)] + [Frame(i + 1, "olat", exps, i) for i in range(n_olat)]
    seq.append(Frame(n_olat + 1, "tracking", exps))
    rig.sequence = seq  # the manifest's frames must exist in the rig it points at
    return seq


def write_static_capture(
    root: str | Path,
    *,
    height: int,
    width: int,
    rig: str | Rig = "tiny",
    n_cameras: int | None = None,
    frames: Sequence[int] | None = None,
    n_olat: int | None = None,
    radiance: Callable[[int], np.ndarray] | None = None,
    tracking_irradiance: str | Sequence[float] = "all",
    subject: str = "s000",
    take: str = "t0",
    noise_seed: int | None = None,
    calibration_name: str = "cal.json",
    overwrite: bool = False,
) -> StaticCapture:
    """Write a static synthetic capture (one subject, one take) with a known radiance.

    Every frame of camera ``c`` images ``radiance(c) * E``: ``E`` is the irradiance of the
    frame's light (OLAT frames; see :func:`lightstage.twin.sensor.light_irradiance`),
    ``tracking_irradiance`` (tracking frames) or 0 (dark frames), so the ingested per-unit-light OLATs must equal
    ``radiance(c)``.

    Parameters
    ----------
    root : str or Path
        Capture folder to create.
    height, width : int
        Image size; the rig's cameras are scaled to it (:func:`scaled_rig`).
    rig : str or Rig
        Built-in rig name or a rig; copied, never modified.
    n_cameras : int, optional
        Keep only the first ``n_cameras`` cameras.
    frames : sequence of int, optional
        Indices of frames of the rig's own sequence to write (the rig keeps its sequence, so
        frame numbers and exposures are the rig's).
    n_olat : int, optional
        Instead of ``frames``: replace the rig's sequence by frame 0 tracking, frames
        1..n_olat the OLATs of lights 0..n_olat-1, frame n_olat+1 tracking, all with the
        exposure bracket of the rig's first tracking frame. Give exactly one of the two.
    radiance : callable, optional
        ``radiance(camera_index) -> (height, width, 3)`` linear radiance per unit light;
        default :func:`static_texture`.
    tracking_irradiance : {"all", "olat"} or RGB triple
        ``"all"``: every light on (the sum of all lights' irradiance, as a rig's tracking
        frame); ``"olat"``: twice the mean irradiance of the lights the written OLAT frames
        use (keeps tracking frames of rigs with hundreds of lights out of clipping); or an
        explicit RGB irradiance.
    subject, take : str
        Names of the take in the capture and the store.
    noise_seed : int, optional
        None: no sensor noise (every raw value is the rounded expected DN). An integer: shot
        and read noise, each image from its own generator
        (:func:`lightstage.twin.sensor.noise_rng` of the seed, subject, camera, frame, bracket).
    calibration_name : str
        File name of the twin's exact calibration, written in ``root``.
    overwrite : bool
        Replace ``rig.json``, the calibration and the take folder if they exist; without it an
        existing one is an error (nothing is written).

    Returns
    -------
    StaticCapture
        ``(root, calibration, rig)``.

    Raises
    ------
    FileExistsError
        An output exists and ``overwrite`` is False.
    ValueError
        Bad frames / n_olat, an unknown ``tracking_irradiance``, or a radiance of the wrong
        shape (the camera is named).
    """
    root = Path(root)
    r = scaled_rig(rig, height, width, n_cameras)
    seq = _frames(r, frames, n_olat)
    tdir = root / subject / take
    cal = root / calibration_name
    if not overwrite:
        for p in (root / "rig.json", cal, tdir):
            if p.exists():
                raise FileExistsError(f"{p}: exists (pass overwrite=True to replace it)")
    E = light_irradiance(r)
    if isinstance(tracking_irradiance, str):
        if tracking_irradiance == "all":
            E_track = E.sum(0)
        elif tracking_irradiance == "olat":
            lights = [fr.light for fr in seq if fr.kind == "olat"]
            if not lights:
                raise ValueError("write_static_capture: tracking_irradiance='olat' needs OLAT frames")
            E_track = E[lights].mean(0) * 2
        else:
            raise ValueError(f"write_static_capture: tracking_irradiance={tracking_irradiance!r} "
                             "is not 'all', 'olat' or an RGB triple")
    else:
        E_track = np.asarray(tracking_irradiance, dtype=np.float64).reshape(3)
    tex = radiance or (lambda ci: static_texture(height, width, ci))
    per_cam = []  # radiance per unit light, once per camera (it is the same in every frame)
    for ci, cam in enumerate(r.cameras):
        a = np.asarray(tex(ci), dtype=np.float64)
        if a.shape != (height, width, 3):
            raise ValueError(f"write_static_capture: radiance({ci}) for camera {cam.name} has "
                             f"shape {a.shape}, expected {(height, width, 3)}")
        per_cam.append(a)

    # every argument checked: only now is anything written
    root.mkdir(parents=True, exist_ok=True)
    save_rig(r, root / "rig.json")
    records = []
    for fr in seq:
        files = {}
        for ci, cam in enumerate(r.cameras):
            if fr.kind == "olat":
                rad = per_cam[ci] * E[fr.light]
            else:  # tracking: lit by E_track; dark: no light at all
                rad = per_cam[ci] * (E_track if fr.kind == "tracking" else 0.0)
            lst = []
            for k, t in enumerate(fr.exposures):
                rng = None if noise_seed is None else noise_rng(noise_seed, subject, ci, fr.index, k)
                raw = simulate_raw(rad, cam, t, rng, noise=noise_seed is not None)
                rel = f"raw/{cam.name}/f{fr.index:04d}_e{k}.dng"
                (tdir / rel).parent.mkdir(parents=True, exist_ok=True)
                sha = write_dng(tdir / rel, raw, dng_metadata(cam, t))
                lst.append(RawFile(rel, t, cam.sensor.iso, sha))
            files[cam.name] = lst
        records.append(FrameRecord(fr.index, fr.kind, fr.light, files))
    CaptureManifest(root=tdir, rig=r, subject=subject, take=take, frames=records,
                    rig_ref="../../rig.json").save()
    save_calibration(truth_calibration(r), cal, overwrite=True)  # checked above
    return StaticCapture(root, cal, r)
