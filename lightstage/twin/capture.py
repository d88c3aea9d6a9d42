"""Simulate a whole light-stage capture: raw DNGs exactly as a real stage writes them, plus the
ground truth that ingest, calibration and the model are tested against.

Output folder (the layout of :mod:`lightstage.manifest`)::

    OUT/
      simulation.json                       what this tool wrote (marks OUT as ours, see overwrite)
      rig.json                              the rig
      <subject>/<take>/capture.json         the manifest (sha256 of every raw file)
      <subject>/<take>/raw/<camera>/f<frame:04d>_e<k>.dng
      <subject>/<take>/truth/truth.zarr     lightstage.store layout, group <subject>/<take>:
                                            OLAT radiance per unit light at the rest pose,
                                            tracking (all lights, rest pose), mask, valid, done
      <subject>/<take>/truth/cameras/<camera>.npz   mask, depth, normal, albedo, position
      <subject>/<take>/truth/motion.json    per frame the 4x4 subject -> world pose
      <subject>/<take>/truth/subject.json   subject parameters, world2head
      calibration/<shot>/<camera>_e<k>.dng  every shot of targets.calibration_plan (optional)
      calibration/shots.json                shots, files, exposures, lights, truth (optional)
      calibration/truth_calibration.json    the exact calibration (lightstage-calibration), always

Frames: ``olat`` has its light on, ``tracking`` all lights, ``dark`` none. Between frames the
subject moves rigidly along a smooth seeded trajectory (sub-mm to ~2 mm, < 0.4 deg, about a
neck pivot); the *rest pose* (identity) is the pose of the central tracking frame among the
frames simulated (ingest's default motion reference), and truth is rendered there. Per unit light means divided by the light's irradiance at the rig centre
(``colour * intensity / |p|^2``, the truth calibration's light ``rgb``).

Work is split into one task per (frame, camera) (and per (calibration shot, camera)), run in
a spawn-context process pool (LibRaw + fork can deadlock). Every task's noise comes from its own
``SeedSequence`` key and writes only its own files and its own store shards, so the output bytes
depend on the seed only, never on the worker count. Nothing records wall-clock time. Frames
are rendered one at a time, so memory stays bounded by one camera image per worker.

Set-up is shared, not repeated per worker: the driver builds each subject's scene once (it
needs its parameters anyway) and pickles it into a private scratch folder outside OUT, which
workers load instead of rebuilding (a head takes seconds to build); rest-pose depth maps and
shadow tables are computed by whichever worker needs them first and shared through the same
folder (:meth:`lightstage.twin.render.StarScene.share_cache`). The folder is removed at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zipfile
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, is_dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ..calibfile import save_calibration
from ..dng import write_dng
from ..manifest import CaptureManifest, FrameRecord, RawFile
from ..rig import Rig, rig_to_dict, save_rig
from ..store import create_take, write_image
from .sensor import dng_metadata, light_irradiance, noise_rng, simulate_raw, truth_calibration, vignetting_gain

__all__ = [
    "SIMULATION_FORMAT",
    "SimulationError",
    "SubjectSpec",
    "motion_trajectory",
    "subject_seed",
    "default_subject",
    "parse_frames",
    "simulate",
]

SIMULATION_FORMAT = "lightstage-simulation"
TAKE = "t0"
MARKER = "simulation.json"
NECK_PIVOT = np.array([0.0, -0.12, 0.0])  # head rotations pivot at the neck, not the nose


class SimulationError(ValueError):
    pass


# ---- subjects and motion ----------------------------------------------------------------------


@dataclass
class SubjectSpec:
    """What a subject factory returns: the scene, JSON-able parameters, world -> head frame."""

    scene: Any
    params: dict[str, Any]
    world2head: np.ndarray | None = None


def default_subject(seed: int) -> SubjectSpec:
    """The renderer's random head (``lightstage.twin.subject``)."""
    from .subject import HeadScene, random_subject

    params = random_subject(seed)
    scene = HeadScene(params)
    if is_dataclass(params):
        pd = asdict(params)
    elif hasattr(params, "to_dict"):
        pd = params.to_dict()
    else:
        pd = dict(vars(params))
    w2h = getattr(scene, "world2head", None)
    return SubjectSpec(scene, _jsonable(pd), None if w2h is None else np.asarray(w2h, np.float64))


def subject_seed(seed: int, index: int) -> int:
    """The seed of subject ``index`` of a simulation seeded ``seed``."""
    # modulo 2^64: SeedSequence takes non-negative entropy only, any int seed is accepted
    return int(np.random.SeedSequence([int(seed) % (1 << 64), 0x5B1EC7, int(index)]).generate_state(1)[0])


def _rotation(rv: np.ndarray) -> np.ndarray:
    th = float(np.linalg.norm(rv))
    if th < 1e-15:
        return np.eye(3)
    k = rv / th
    Kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(th) * Kx + (1 - math.cos(th)) * Kx @ Kx  # Rodrigues


def motion_trajectory(n_frames: int, seed: int, rest_frame: int = 0,
                      max_translation: float = 0.002, max_rotation_deg: float = 0.4) -> np.ndarray:
    """(n_frames, 4, 4) smooth random rigid subject -> world poses, identity at ``rest_frame``.

    Each of the 6 degrees of freedom is a sum of three low-frequency sinusoids (random
    amplitudes and phases), scaled so the largest excursion from the rest pose is a random
    30-100 % of ``max_translation`` (metres) / ``max_rotation_deg``. Rotation pivots at the
    neck (:data:`NECK_PIVOT`).
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) % (1 << 64), 0x0707]))
    t = np.linspace(0.0, 1.0, max(n_frames, 1))
    k = np.arange(1, 4)
    amp = rng.uniform(0.2, 1.0, (6, 3)) / k  # lower frequencies dominate: smooth drift
    phase = rng.uniform(0, 2 * np.pi, (6, 3))
    # sig[d, f] = sum_k amp[d, k] sin(2 pi k t_f + phase[d, k])
    sig = (amp[:, None, :] * np.sin(2 * np.pi * t[None, :, None] * k[None, None, :]
                                    + phase[:, None, :])).sum(-1)
    sig -= sig[:, rest_frame:rest_frame + 1]
    peak = np.abs(sig).max(axis=1, keepdims=True)
    sig = sig / np.where(peak > 0, peak, 1.0)
    limits = np.array([max_translation] * 3 + [math.radians(max_rotation_deg)] * 3)
    sig *= (limits * rng.uniform(0.3, 1.0, 6))[:, None]
    poses = np.tile(np.eye(4), (n_frames, 1, 1))
    for f in range(n_frames):
        R = _rotation(sig[3:, f])
        poses[f, :3, :3] = R
        poses[f, :3, 3] = NECK_PIVOT - R @ NECK_PIVOT + sig[:3, f]
    return poses


# ---- helpers ------------------------------------------------------------------------------------


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return v.item()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if is_dataclass(v) and not isinstance(v, type):
        return _jsonable(asdict(v))
    if isinstance(v, Path):
        return str(v)
    return v


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=1) + "\n")
    tmp.replace(path)


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but with fixed zip timestamps: same arrays, same bytes."""
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with z.open(info, "w") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arrays[name]), allow_pickle=False)
    tmp.replace(path)


def parse_frames(spec: str | None, n_frames: int) -> list[int]:
    """Frame subset ``"a:b"`` (python slice semantics, b exclusive), ``"a"`` or ``None`` (all)."""
    if spec is None or spec == "":
        return list(range(n_frames))
    try:
        if ":" in spec:
            a, b = spec.split(":", 1)
            sl = slice(int(a) if a.strip() else None, int(b) if b.strip() else None)
            frames = list(range(n_frames))[sl]
        else:
            i = int(spec)
            if not 0 <= i < n_frames:
                raise SimulationError(f"--frames: frame {i} out of range 0..{n_frames - 1}")
            frames = [i]
    except ValueError:
        raise SimulationError(f"--frames: expected 'a:b' or a frame index, got {spec!r}") from None
    if not frames:
        raise SimulationError(f"--frames: {spec!r} selects no frame of 0..{n_frames - 1}")
    return frames


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty OUT; with overwrite, delete only what a previous run listed as its own."""
    if out.exists() and not out.is_dir():
        raise SimulationError(f"{out}: exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    marker = out / MARKER
    if not overwrite:
        raise SimulationError(f"{out}: not empty; choose an empty folder or pass --overwrite "
                              "(replaces a previous ls-simulate output only)")
    try:
        m = json.loads(marker.read_text())
        entries = m["entries"] if m.get("format") == SIMULATION_FORMAT else None
    except (OSError, ValueError, KeyError, TypeError):
        entries = None
    if not isinstance(entries, list):
        raise SimulationError(f"{out}: not empty and not written by ls-simulate (no valid {MARKER}); "
                              "refusing to delete anything there")
    for name in entries:
        # only plain names directly inside OUT: a tampered marker cannot reach elsewhere
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            raise SimulationError(f"{marker}: invalid entry {name!r}; refusing to delete")
    for name in entries:
        p = out / name
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
    if marker.exists():
        marker.unlink()


# ---- worker side ----------------------------------------------------------------------------------

_W: dict[str, Any] = {}  # per-process state: rig, settings, caches of scenes and vignetting


def _init_worker(state: dict[str, Any]) -> None:
    _W.clear()
    _W.update(state)
    _W["scenes"] = {}
    _W["vig"] = {}
    _W["groups"] = {}
    _W["rest_img"] = {}
    _W["plan"] = state.get("plan")  # in-process runs reuse the caller's plan


def _scene(subject_index: int):
    cache = _W["scenes"]
    if subject_index not in cache:
        cache.clear()  # one subject at a time: scenes may be large
        _W["rest_img"].clear()
        shared = _W.get("cache_dir")
        scene = None
        if shared is not None:
            # the scene the driver built (a head costs seconds to build; loading it, ms). The
            # file was written moments ago by this run's own driver into its private
            # temporary folder, so unpickling it runs no foreign code.
            f = Path(shared) / f"scene_{subject_index}.pkl"
            if f.exists():
                import pickle

                with open(f, "rb") as fh:
                    scene = pickle.load(fh)
        if scene is None:
            scene = _W["factory"](subject_seed(_W["seed"], subject_index)).scene
        if shared is not None and _W.get("workers", 1) > 1 and hasattr(scene, "share_cache"):
            # rest-pose depth maps and shadow tables: computed once, by whichever worker
            # needs them first, for every worker (one process keeps its own in memory)
            scene.share_cache(Path(shared) / f"s{subject_index}")
        cache[subject_index] = scene
    return cache[subject_index]


def _publish_scene(scene, folder: Path, subject_index: int) -> None:
    """Pickle a subject's scene for the workers (skipped if it cannot be pickled: they then
    build it themselves)."""
    import pickle

    f = folder / f"scene_{subject_index}.pkl"
    tmp = folder / f"scene_{subject_index}.tmp"
    try:
        with open(tmp, "wb") as fh:
            pickle.dump(scene, fh, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.replace(f)
    except Exception:  # e.g. a test's scene holding a lambda
        tmp.unlink(missing_ok=True)


def _truth_group(subject: str):
    """The take's group of the truth store, opened once per worker and subject."""
    g = _W["groups"].get(subject)
    if g is None:
        import zarr

        path = _W["out"] / subject / TAKE / "truth" / "truth.zarr"
        g = zarr.open_group(str(path), mode="r+")[f"{subject}/{TAKE}"]
        _W["groups"] = {subject: g}
    return g


_REST_IMG_BYTES = 64 << 20  # rest-pose renders kept per worker (tracking truth repeats)


def _rest_render(si: int, scene, cam, ci: int, rig: Rig, on: list[int]) -> np.ndarray:
    """The rest-pose radiance truth; every tracking frame of a camera has the same one, so
    it is rendered once per worker and camera while it fits ``_REST_IMG_BYTES``."""
    if len(on) <= 1:
        return _render(scene, cam, rig, on, pose=None)
    memo = _W["rest_img"]
    key = (si, ci, tuple(on))
    img = memo.get(key)
    if img is None:
        img = _render(scene, cam, rig, on, pose=None)
        if sum(a.nbytes for a in memo.values()) + img.nbytes <= _REST_IMG_BYTES:
            memo[key] = img
    return img


def _vignetting(ci: int) -> np.ndarray:
    cache = _W["vig"]
    if ci not in cache:
        g = vignetting_gain(_W["rig"].cameras[ci])
        # bounded: 40 lsx-331 cameras would hold 1.4 GB; recomputing costs far less than a render
        if sum(a.nbytes for a in cache.values()) + g.nbytes > 256 << 20:
            cache.clear()
        cache[ci] = g
    return cache[ci]


def _lights_on(rig: Rig, kind: str, light: int | None) -> list[int]:
    if kind == "olat":
        return [int(light)]
    if kind == "tracking":
        return list(range(rig.n_lights))
    return []


def _render(scene, camera, rig: Rig, on: list[int], pose=None, emissive: bool = False) -> np.ndarray:
    H, W = camera.resolution
    if not on and not emissive:
        return np.zeros((H, W, 3), np.float32)  # a dark frame of a dark stage: nothing to render
    pos = rig.light_positions()[on]
    rgb = rig.light_rgb()[on]
    img = scene.radiance(camera, pos, rgb, pose=pose, distant=False)
    return np.asarray(img, dtype=np.float32)


def _frame_task(task: tuple) -> tuple:
    """Render one (subject, frame, camera): every bracket's DNG plus the truth image."""
    si, subject, frame_index, ci, pose, olat_slot, track_slot = task
    rig: Rig = _W["rig"]
    out: Path = _W["out"]
    cam = rig.cameras[ci]
    fr = rig.sequence[frame_index]
    scene = _scene(si)
    on = _lights_on(rig, fr.kind, fr.light)
    radiance = _render(scene, cam, rig, on, pose=np.asarray(pose))
    files = []
    for k, t in enumerate(fr.exposures):
        rng = noise_rng(_W["seed"], si, ci, frame_index, k) if _W["noise"] else None
        raw = simulate_raw(radiance, cam, t, rng, noise=_W["noise"], vignetting=_vignetting(ci))
        rel = f"raw/{cam.name}/f{frame_index:04d}_e{k}.dng"
        digest = write_dng(out / subject / TAKE / rel, raw, dng_metadata(cam, t))
        files.append((rel, float(t), int(cam.sensor.iso), digest))
    del radiance
    if olat_slot is not None or track_slot is not None:
        g = _truth_group(subject)
        rest = _rest_render(si, scene, cam, ci, rig, on)
        # whole-shard writes (one image = one shard), bypassing zarr's per-chunk event loop
        if olat_slot is not None:
            E = light_irradiance(rig, on)[0].astype(np.float32)
            write_image(g["olat"], (ci, olat_slot), np.moveaxis(rest / E, -1, 0))
            write_image(g["valid"], (ci, olat_slot), np.full(cam.resolution, 255, np.uint8))
        else:
            write_image(g["tracking"], (ci, track_slot), np.moveaxis(rest, -1, 0))
    return ("frame", si, frame_index, cam.name, files)


def _truth_task(task: tuple) -> tuple:
    """Per-camera geometry truth at the rest pose: npz + the store's mask."""
    si, subject, ci = task
    rig: Rig = _W["rig"]
    cam = rig.cameras[ci]
    truth = _W["out"] / subject / TAKE / "truth"
    tr = _scene(si).truth(cam, pose=None)
    _write_npz(truth / "cameras" / f"{cam.name}.npz", {k: np.asarray(v) for k, v in tr.items()})
    import zarr

    g = zarr.open_group(str(truth / "truth.zarr"), mode="r+")[f"{subject}/{TAKE}"]
    # mask chunks are one camera each: parallel tasks never share a chunk
    g["mask"][ci] = np.where(np.asarray(tr["mask"]) > 0, 255, 0).astype(np.uint8)
    return ("truth", si, cam.name, None)


def _calibration_plan():
    if _W["plan"] is None:
        from .targets import calibration_plan

        _W["plan"] = calibration_plan(_W["rig"], _W["seed"], **_W["calibration"])
    return _W["plan"]


def _calibration_task(task: tuple) -> tuple:
    shot_index, cam_name = task
    rig: Rig = _W["rig"]
    shot = _calibration_plan()[shot_index]
    ci = [c.name for c in rig.cameras].index(cam_name)
    cam = rig.cameras[ci]
    radiance = _render(shot.scene, cam, rig, list(shot.lights), emissive=True)  # e.g. flat field
    files = []
    for k, t in enumerate(shot.exposures):
        rng = noise_rng(_W["seed"], "calibration", shot.name, ci, k) if _W["noise"] else None
        raw = simulate_raw(radiance, cam, t, rng, noise=_W["noise"], vignetting=_vignetting(ci))
        rel = f"{shot.name}/{cam.name}_e{k}.dng"
        digest = write_dng(_W["out"] / "calibration" / rel, raw, dng_metadata(cam, t))
        files.append((rel, float(t), int(cam.sensor.iso), digest))
    return ("calibration", shot_index, cam_name, files)


_TASKS = {"frame": _frame_task, "truth": _truth_task, "calibration": _calibration_task}


def _run_task(task: tuple) -> tuple:
    return _TASKS[task[0]](task[1])


# ---- driver -----------------------------------------------------------------------------------------


def _warm(_: int) -> int:
    """Import the renderer in a fresh worker while the driver builds the subjects."""
    from . import _kernels, render, subject  # noqa: F401

    return os.getpid()


def _start_pool(state: dict, workers: int):
    """The worker pool, started before the driver builds the subjects' scenes so the workers'
    start-up (interpreter, imports) overlaps that serial work."""
    ctx = get_context("spawn")  # LibRaw + fork can deadlock (DESIGN.md)
    ex = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(state,))
    for k in range(workers):
        ex.submit(_warm, k)
    return ex


def _run(tasks: list[tuple], state: dict, workers: int, on_result: Callable[[tuple], None],
         plan: list | None = None, pool=None) -> None:
    if workers <= 1:
        _init_worker({**state, "plan": plan})
        for t in tasks:
            on_result(_run_task(t))
        return
    with pool if pool is not None else _start_pool(state, workers) as ex:
        pending = set()
        it = iter(tasks)
        window = 4 * workers  # bounded queue: the task list may be huge (lsx-331)
        for t in it:
            pending.add(ex.submit(_run_task, t))
            if len(pending) >= window:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for d in done:
                    on_result(d.result())
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for d in done:
                on_result(d.result())


def _provenance(seed: int, noise: bool, frames: list[int], n_frames: int) -> dict[str, Any]:
    """Deterministic provenance (no timestamps: same seed -> same bytes)."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("lightstage", "numpy", "zarr"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    sub = None if frames == list(range(n_frames)) else [frames[0], frames[-1] + 1] \
        if frames == list(range(frames[0], frames[-1] + 1)) else frames
    return {"tool": "ls-simulate", "seed": int(seed), "noise": bool(noise),
            "frames": sub, "versions": versions}


def simulate(
    out: str | Path,
    rig: Rig,
    n_subjects: int = 1,
    seed: int = 0,
    *,
    noise: bool = True,
    overwrite: bool = False,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
    frames: Iterable[int] | str | None = None,
    calibration: bool | dict[str, Any] = True,
    subject_factory: Callable[[int], SubjectSpec] | None = None,
) -> Path:
    """Simulate a capture of ``n_subjects`` subjects (and the calibration shots) into ``out``.

    Parameters
    ----------
    out : output folder; must be empty or absent. With ``overwrite`` a previous ls-simulate
        output is replaced (only the entries its ``simulation.json`` lists are deleted; a
        folder not written by this tool is refused).
    rig : the rig to simulate
    n_subjects : number of random subjects ``s000, s001, ...`` (one take ``t0`` each)
    seed : global seed; same seed (and arguments) -> same bytes, for any ``workers``
    noise : False gives the exact expected (rounded) raw values
    workers : processes (spawn context); 1 runs in this process
    progress : ``progress(done, total)`` after every finished task (one camera's frame, one
        camera's truth or one camera's calibration shot)
    frames : subset of sequence frame indices (``"a:b"`` or an iterable); default all
    calibration : simulate ``targets.calibration_plan`` shots (a dict passes keyword arguments
        to it, e.g. ``{"lights": [0, 1], "n_board_poses": 2}``); skipped if the targets module
        is not available
    subject_factory : ``f(seed) -> SubjectSpec``; default :func:`default_subject`. Must be a
        module-level function when ``workers > 1`` (it is pickled to spawned workers).

    Returns
    -------
    The output folder.
    """
    out = Path(out)
    if n_subjects < 0:
        raise SimulationError(f"--subjects must be >= 0, got {n_subjects}")
    if workers < 1:
        raise SimulationError(f"--workers must be >= 1, got {workers}")
    n_frames = len(rig.sequence)
    if frames is None or isinstance(frames, str):
        frame_list = parse_frames(frames, n_frames)
    else:
        frame_list = sorted(set(int(f) for f in frames))
        bad = [f for f in frame_list if not 0 <= f < n_frames]
        if bad or not frame_list:
            raise SimulationError(f"frames: {bad or 'none'} not in 0..{n_frames - 1}")
    shapes = {c.resolution for c in rig.cameras}
    if n_subjects and len(shapes) > 1:
        raise SimulationError(f"rig {rig.name!r}: the truth store needs one resolution for all "
                              f"cameras, got {sorted(shapes)}")
    factory = subject_factory or default_subject
    if workers > 1:
        import pickle

        try:
            pickle.dumps(factory)
        except Exception as e:  # lambdas, closures: spawned workers could not rebuild them
            raise SimulationError(f"subject_factory {factory!r} cannot be sent to worker "
                                  f"processes ({e}); use a module-level function or workers=1") from None
    cal_kwargs: dict[str, Any] | None = None
    if calibration:
        cal_kwargs = dict(calibration) if isinstance(calibration, dict) else {}
        try:
            from .targets import calibration_plan  # noqa: F401
        except ImportError:
            cal_kwargs = None  # targets not available: no calibration shots
    _check_out(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)

    subjects = [f"s{i:03d}" for i in range(n_subjects)]
    entries = [MARKER, "rig.json", "calibration"] + subjects
    prov = _provenance(seed, noise, frame_list, n_frames)
    # the marker goes first: even an interrupted run can be replaced with --overwrite
    _write_json(out / MARKER, {"format": SIMULATION_FORMAT, "version": 1, "rig": rig.name,
                               "subjects": subjects, "take": TAKE, "entries": entries,
                               "calibration": cal_kwargs, **prov})
    save_rig(rig, out / "rig.json")

    # per-run scratch (outside OUT, removed at the end): the subjects' scenes as the driver
    # built them, and the caches every worker shares (rest-pose depth, shadow tables)
    import tempfile

    cache_dir = Path(tempfile.mkdtemp(prefix="ls-simulate-"))
    state = {"rig": rig, "out": out, "seed": int(seed), "noise": bool(noise),
             "factory": factory, "calibration": cal_kwargs or {}, "cache_dir": str(cache_dir),
             "workers": int(workers)}
    pool = _start_pool(state, workers) if workers > 1 else None
    try:
        return _simulate(out, rig, subjects, seed, factory, state, cache_dir, frame_list,
                         n_frames, workers, progress, cal_kwargs, prov, pool)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)  # no-op after _run's own shutdown
        shutil.rmtree(cache_dir, ignore_errors=True)


def _simulate(out, rig, subjects, seed, factory, state, cache_dir, frame_list, n_frames,
              workers, progress, cal_kwargs, prov, pool=None) -> Path:
    cal_truth = truth_calibration(rig, provenance=prov)
    tasks: list[tuple] = []
    results: dict[tuple, list] = {}
    cal_shots = []
    if cal_kwargs is not None:
        from .targets import calibration_plan

        cal_shots = calibration_plan(rig, seed, **cal_kwargs)
        (out / "calibration").mkdir(exist_ok=True)
        for s_i, shot in enumerate(cal_shots):
            (out / "calibration" / shot.name).mkdir(parents=True, exist_ok=True)
            for cam in shot.cameras:
                tasks.append(("calibration", (s_i, cam)))

    olat_frames = [f.index for f in rig.sequence if f.kind == "olat"]
    track_frames = [f.index for f in rig.sequence if f.kind == "tracking"]
    # rest pose = the central tracking frame *of the frames simulated*: ingest's default motion
    # reference for this capture, so its store and this truth align without any warping
    sim_track = [f for f in track_frames if f in set(frame_list)] or track_frames
    rest_frame = sim_track[(len(sim_track) - 1) // 2] if sim_track else 0
    take_info = []
    for si, subject in enumerate(subjects):
        spec = factory(subject_seed(seed, si))
        tdir = out / subject / TAKE
        truth = tdir / "truth"
        (truth / "cameras").mkdir(parents=True, exist_ok=True)
        for cam in rig.cameras:
            (tdir / "raw" / cam.name).mkdir(parents=True, exist_ok=True)
        poses = motion_trajectory(n_frames, subject_seed(seed, si), rest_frame)
        _write_json(truth / "motion.json", {
            "convention": "per frame the 4x4 rigid subject -> world motion; identity = rest pose "
                          "(the central simulated tracking frame), at which truth is rendered",
            "rest_frame": rest_frame,
            "frames": [{"index": f, "pose": poses[f]} for f in range(n_frames)]})
        _write_json(truth / "subject.json", {"subject": subject, "seed": subject_seed(seed, si),
                                             "params": spec.params, "world2head": spec.world2head})
        H, W = rig.cameras[0].resolution
        E = light_irradiance(rig)
        olat_lights = [rig.sequence[f].light for f in olat_frames]
        attrs = {
            "lights": olat_lights,
            "light_directions": rig.light_directions()[olat_lights] if olat_lights else np.zeros((0, 3)),
            "light_rgb": E[olat_lights] if olat_lights else np.zeros((0, 3)),
            "K": [c.K for c in rig.cameras],
            "distortion": [list(c.distortion) + [0.0] * (5 - len(c.distortion)) for c in rig.cameras],
            "cam2world": [c.cam2world for c in rig.cameras],
            "world2head": spec.world2head,
            "rig": rig_to_dict(rig),
            "calibration": cal_truth.to_dict(),
            "exposures": {str(f.index): f.exposures for f in rig.sequence},
            "tracking_frames": track_frames,
            "olat_frames": olat_frames,
            "provenance": {**prov, "truth": "twin ground truth, rest pose, per unit light"},
        }
        g = create_take(truth / "truth.zarr", subject, TAKE, cameras=[c.name for c in rig.cameras],
                        n_lights=len(olat_frames), n_tracking=len(track_frames), height=H, width=W,
                        attrs=attrs, dtype="float32", scale=1.0)
        _publish_scene(spec.scene, cache_dir, si)  # workers load it instead of rebuilding
        del spec
        for ci in range(rig.n_cameras):
            tasks.append(("truth", (si, subject, ci)))
        for f in frame_list:
            fr = rig.sequence[f]
            o_slot = olat_frames.index(f) if fr.kind == "olat" else None
            t_slot = track_frames.index(f) if fr.kind == "tracking" else None
            for ci in range(rig.n_cameras):
                tasks.append(("frame", (si, subject, f, ci, poses[f], o_slot, t_slot)))
        take_info.append((si, subject, g))

    total = len(tasks)
    n_done = 0

    def on_result(r: tuple) -> None:
        nonlocal n_done
        results[r[:-1]] = r[-1]
        n_done += 1
        if progress is not None:
            progress(n_done, total)

    if progress is not None:
        progress(0, total)
    # spawned workers rebuild the calibration plan (cheaper than pickling its textures)
    _run(tasks, state, workers, on_result, plan=cal_shots or None, pool=pool)

    # manifests, done flags and calibration index, in a fixed order (bytes do not depend on
    # which worker finished first)
    for si, subject, g in take_info:
        done = np.zeros(g["done"].shape, np.uint8)
        records = []
        for f in frame_list:
            fr = rig.sequence[f]
            files = {}
            for ci, cam in enumerate(rig.cameras):
                lst = results[("frame", si, f, cam.name)]
                files[cam.name] = [RawFile(p, e, iso, h) for p, e, iso, h in lst]
                if fr.kind == "olat":
                    done[ci, olat_frames.index(f)] = 255
            records.append(FrameRecord(f, fr.kind, fr.light, files))
        g["done"][...] = done
        CaptureManifest(root=out / subject / TAKE, rig=rig, subject=subject, take=TAKE,
                        frames=records, provenance=prov, rig_ref="../../rig.json").save()
    if cal_kwargs is not None:
        shots_json = []
        for s_i, shot in enumerate(cal_shots):
            files = {cam: [{"path": p, "exposure": e, "iso": iso, "sha256": h}
                           for p, e, iso, h in results[("calibration", s_i, cam)]]
                     for cam in shot.cameras}
            shots_json.append({"name": shot.name, "lights": list(shot.lights),
                               "cameras": list(shot.cameras), "exposures": list(shot.exposures),
                               "files": files, "truth": shot.truth})
        _write_json(out / "calibration" / "shots.json",
                    {"format": "lightstage-calibration-shots", "version": 1, "rig": rig.name,
                     "paths": "relative to this folder", "shots": shots_json, "provenance": prov})
    # always: the exact calibration lets ingest run before (or without) ls-calibrate
    (out / "calibration").mkdir(exist_ok=True)
    save_calibration(cal_truth, out / "calibration" / "truth_calibration.json", overwrite=True)
    return out
