"""Light-stage rig description: cameras, sensors, lights and the capture sequence.

The rig file is versioned, human-readable JSON (``"format": "lightstage-rig"``). Every field is
validated on load and *all* problems are reported together, each naming its field path, so a
user fixing a hand-written rig sees every mistake at once.

Conventions (see ``docs/conventions.md``): world frame right-handed, metres, y up, subject looks
towards +z, rig centre at the origin. Cameras follow OpenCV (x right, y down, z forward) and are
stored as ``cam2world`` 4x4 plus pixel intrinsics ``K`` 3x3 and OpenCV distortion
``(k1, k2, p1, p2, k3)``. Lights are point sources at ``position`` (metres) with linear RGB
``colour`` and scalar ``intensity`` (radiant intensity, W/sr up to a global scale): the
irradiance a light delivers at the rig centre, facing it, is ``intensity * colour / |position|^2``.

References
----------
Debevec, P. et al. (2000). Acquiring the reflectance field of a human face. SIGGRAPH.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .cfa import CFAError, cfa_string, parse_cfa

__all__ = [
    "RIG_FORMAT",
    "RIG_VERSION",
    "RigError",
    "Sensor",
    "Camera",
    "Light",
    "Frame",
    "Rig",
    "look_at",
    "fibonacci_sphere",
    "builtin_rig",
    "BUILTIN_RIGS",
    "load_rig",
    "save_rig",
    "rig_from_dict",
    "rig_to_dict",
]

RIG_FORMAT = "lightstage-rig"
RIG_VERSION = 1
CFA_PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")
FRAME_KINDS = ("olat", "tracking", "dark")


class RigError(ValueError):
    """An invalid rig description; ``errors`` lists one message per bad field."""

    def __init__(self, errors: list[str], source: str | None = None):
        self.errors = list(errors)
        where = f" in {source}" if source else ""
        super().__init__(
            f"{len(self.errors)} invalid field(s){where}:\n  " + "\n  ".join(self.errors)
        )


@dataclass
class Sensor:
    """Sensor of one camera.

    ``colour_response`` is the 3x3 matrix M mapping linear Rec.709/D65 scene radiance to camera
    RGB (``cam = M @ rgb``) before white balance, i.e. the camera's spectral response reduced
    to the working space. ``gain`` is the analogue gain (ISO = 100 * gain). ``electrons_per_dn``
    and ``read_noise_dn`` drive the shot + read noise model; ``full_scale`` is the radiance x
    seconds that maps to the white level at gain 1 (sets the sensor's sensitivity).
    ``cfa_pattern`` is the colour filter array from the top-left photosite in
    :mod:`lightstage.cfa` spelling: a Bayer ``"RGGB"``/``"BGGR"``/``"GRBG"``/``"GBRG"``, or the
    rows of any periodic pattern separated by ``/`` (``"X-Trans"`` is accepted in a rig file and
    stored as Fujifilm's 6x6 pattern, :data:`lightstage.cfa.XTRANS`).
    """

    width: int
    height: int
    cfa_pattern: str = "RGGB"
    bit_depth: int = 12
    black_level: int = 256
    white_level: int = 4095
    colour_response: list[list[float]] = field(
        default_factory=lambda: np.eye(3).tolist()
    )
    gain: float = 1.0
    electrons_per_dn: float = 4.0
    read_noise_dn: float = 1.5
    full_scale: float = 0.05
    vignetting: float = 0.0
    f_number: float = 8.0

    @property
    def iso(self) -> int:
        return int(round(100 * self.gain))


@dataclass
class Camera:
    """One camera: name, pixel intrinsics ``K``, distortion, ``cam2world`` pose and sensor."""

    name: str
    K: list[list[float]]
    distortion: list[float]
    cam2world: list[list[float]]
    sensor: Sensor

    @property
    def K_array(self) -> np.ndarray:
        return np.asarray(self.K, dtype=np.float64)

    @property
    def cam2world_array(self) -> np.ndarray:
        return np.asarray(self.cam2world, dtype=np.float64)

    @property
    def centre(self) -> np.ndarray:
        return self.cam2world_array[:3, 3].copy()

    @property
    def resolution(self) -> tuple[int, int]:
        """(height, width)."""
        return self.sensor.height, self.sensor.width


@dataclass
class Light:
    """One light: ``position`` (m, world), linear RGB ``colour`` and scalar ``intensity``."""

    index: int
    position: list[float]
    colour: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    intensity: float = 1.0

    @property
    def direction(self) -> np.ndarray:
        """Unit direction from the rig centre (subject) to the light."""
        p = np.asarray(self.position, dtype=np.float64)
        return p / np.linalg.norm(p)


@dataclass
class Frame:
    """One frame of the capture sequence.

    ``kind`` is ``olat`` (``light`` names the rig light index), ``tracking`` (all lights) or
    ``dark``; ``exposures`` is the bracket of exposure times in seconds, longest first.
    """

    index: int
    kind: str
    exposures: list[float]
    light: int | None = None


@dataclass
class Rig:
    name: str
    cameras: list[Camera]
    lights: list[Light]
    sequence: list[Frame]
    description: str = ""

    # ---- convenience -------------------------------------------------------------------
    @property
    def n_cameras(self) -> int:
        return len(self.cameras)

    @property
    def n_lights(self) -> int:
        return len(self.lights)

    def light_directions(self) -> np.ndarray:
        """(L, 3) unit directions subject -> light."""
        return np.stack([l.direction for l in self.lights])

    def light_positions(self) -> np.ndarray:
        return np.asarray([l.position for l in self.lights], dtype=np.float64)

    def light_rgb(self) -> np.ndarray:
        """(L, 3) linear RGB radiant intensity of each light (colour x intensity)."""
        return np.asarray([np.asarray(l.colour) * l.intensity for l in self.lights])

    def olat_frames(self) -> list[Frame]:
        return [f for f in self.sequence if f.kind == "olat"]

    def tracking_frames(self) -> list[Frame]:
        return [f for f in self.sequence if f.kind == "tracking"]

    def iter_frames(self) -> Iterator[Frame]:
        """Frames one at a time (the sequence is small; frames' pixels are never held)."""
        yield from self.sequence

    def camera(self, name: str) -> Camera:
        for c in self.cameras:
            if c.name == name:
                return c
        raise KeyError(f"rig {self.name!r} has no camera {name!r}")


# ---- geometry helpers ------------------------------------------------------------------


def look_at(eye: np.ndarray, target: np.ndarray, up=(0.0, 1.0, 0.0)) -> np.ndarray:
    """OpenCV cam2world (x right, y down, z forward) for a camera at ``eye`` aimed at ``target``."""
    eye = np.asarray(eye, dtype=np.float64)
    fwd = np.asarray(target, dtype=np.float64) - eye
    fwd /= np.linalg.norm(fwd)
    up = np.asarray(up, dtype=np.float64)
    right = np.cross(fwd, up)
    if np.linalg.norm(right) < 1e-9:  # looking straight up/down
        right = np.cross(fwd, np.array([0.0, 0.0, 1.0]))
    right /= np.linalg.norm(right)
    down = np.cross(fwd, right)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = right, down, fwd, eye
    return m


def fibonacci_sphere(n: int, min_elevation_deg: float = -90.0) -> np.ndarray:
    """(n, 3) near-uniform unit directions (y up), optionally above ``min_elevation_deg``."""
    s_min = math.sin(math.radians(min_elevation_deg))
    i = np.arange(n) + 0.5
    y = 1 - (1 - s_min) * i / n  # uniform in y between 1 and s_min: equal area bands
    r = np.sqrt(np.clip(1 - y * y, 0, None))
    phi = i * math.pi * (3 - math.sqrt(5))
    return np.stack([r * np.sin(phi), y, r * np.cos(phi)], axis=1)


# ---- built-in rigs -----------------------------------------------------------------------


def _camera_ring(
    n: int,
    radius: float,
    width: int,
    height: int,
    head_fraction: float,
    rng: np.random.Generator,
    bit_depth: int,
    yaw_span_deg: float = 150.0,
    rows: int = 2,
) -> list[Camera]:
    cams = []
    target = np.array([0.0, 0.0, 0.0])
    # focal length chosen so a 0.30 m tall head spans ``head_fraction`` of the short side
    f = head_fraction * min(width, height) * radius / 0.30
    per_row = int(math.ceil(n / rows))
    for k in range(n):
        row, col = divmod(k, per_row)
        yaw = (
            math.radians(-yaw_span_deg / 2 + yaw_span_deg * (col + 0.5) / per_row)
            if per_row > 1
            else 0.0
        )
        elev = math.radians((-10.0 + 25.0 * row / max(rows - 1, 1)) if rows > 1 else 5.0)
        eye = radius * np.array(
            [math.sin(yaw) * math.cos(elev), math.sin(elev), math.cos(yaw) * math.cos(elev)]
        )
        c2w = look_at(eye, target)
        # every camera responds differently: a near-identity, row-mixed camera-RGB response
        mix = np.eye(3) + rng.normal(0, 0.06, (3, 3))
        mix[np.diag_indices(3)] = 1.0 + rng.normal(0, 0.03, 3)
        mix = mix * np.array([[0.55], [1.0], [0.75]])  # raw-like: weak red and blue
        white = (1 << bit_depth) - 1
        black = 64 if bit_depth == 12 else 256
        sensor = Sensor(
            width=width,
            height=height,
            cfa_pattern=CFA_PATTERNS[k % 4],
            bit_depth=bit_depth,
            black_level=black,
            white_level=white,
            colour_response=mix.round(6).tolist(),
            gain=[1.0, 2.0][k % 2],
            electrons_per_dn=4.0 if bit_depth == 12 else 1.0,
            read_noise_dn=1.5 if bit_depth == 12 else 4.0,
            full_scale=0.05,
            vignetting=0.25,
            f_number=8.0,
        )
        K = [
            [f * (1 + rng.normal(0, 0.01)), 0.0, width / 2 - 0.5 + rng.normal(0, 2)],
            [0.0, f * (1 + rng.normal(0, 0.01)), height / 2 - 0.5 + rng.normal(0, 2)],
            [0.0, 0.0, 1.0],
        ]
        dist = [float(rng.normal(-0.05, 0.02)), float(rng.normal(0.02, 0.01)), 0.0, 0.0, 0.0]
        cams.append(
            Camera(
                name=f"cam{k:02d}",
                K=np.asarray(K).round(4).tolist(),
                distortion=np.asarray(dist).round(5).tolist(),
                cam2world=c2w.round(9).tolist(),
                sensor=sensor,
            )
        )
    return cams


def _lights(n: int, radius: float, rng: np.random.Generator) -> list[Light]:
    dirs = fibonacci_sphere(n, min_elevation_deg=-55.0)
    lights = []
    for i, d in enumerate(dirs):
        colour = (1.0 + rng.normal(0, 0.02, 3)).round(5).tolist()
        lights.append(
            Light(
                index=i,
                position=(d * radius).round(6).tolist(),
                colour=colour,
                intensity=float(np.round(radius**2 * (1.0 + rng.normal(0, 0.05)), 6)),
            )
        )
    return lights


def _sequence(
    n_lights: int, tracking_every: int, exposures: list[float], dark: bool = True
) -> list[Frame]:
    frames: list[Frame] = []

    def add(kind, light=None, exp=exposures):
        frames.append(Frame(index=len(frames), kind=kind, exposures=list(exp), light=light))

    if dark:
        add("dark", exp=[exposures[0]])
    add("tracking")
    for i in range(n_lights):
        add("olat", light=i)
        if (i + 1) % tracking_every == 0 and i + 1 < n_lights:
            add("tracking")
    add("tracking")
    return frames


def _tiny() -> Rig:
    rng = np.random.default_rng(1)
    return Rig(
        name="tiny",
        description="4 cameras, 32 lights, 128x128 px: a capture in seconds",
        cameras=_camera_ring(4, 1.0, 128, 128, 0.8, rng, 12, yaw_span_deg=90, rows=1),
        lights=_lights(32, 1.5, rng),
        sequence=_sequence(32, 8, [1 / 30, 1 / 240]),
    )


def _demo() -> Rig:
    rng = np.random.default_rng(2)
    return Rig(
        name="demo",
        description="8 cameras, 150 lights, 512x512 px",
        cameras=_camera_ring(8, 1.0, 512, 512, 0.8, rng, 12, yaw_span_deg=120, rows=2),
        lights=_lights(150, 1.5, rng),
        sequence=_sequence(150, 15, [1 / 30, 1 / 120, 1 / 480]),
    )


def _lsx331() -> Rig:
    rng = np.random.default_rng(3)
    return Rig(
        name="lsx-331",
        description="40 cameras, 331 lights on a sphere, 4096x2160 (like the 3DPR stage)",
        cameras=_camera_ring(40, 1.2, 4096, 2160, 0.7, rng, 14, yaw_span_deg=160, rows=3),
        lights=_lights(331, 1.65, rng),
        sequence=_sequence(331, 20, [1 / 60, 1 / 480]),
    )


BUILTIN_RIGS = {"tiny": _tiny, "demo": _demo, "lsx-331": _lsx331}


def builtin_rig(name: str) -> Rig:
    try:
        return BUILTIN_RIGS[name]()
    except KeyError:
        raise KeyError(f"no built-in rig {name!r}; choose one of {sorted(BUILTIN_RIGS)}") from None


# ---- serialisation + validation -------------------------------------------------------------


def rig_to_dict(rig: Rig) -> dict[str, Any]:
    d = asdict(rig)
    return {"format": RIG_FORMAT, "version": RIG_VERSION, **d}


def save_rig(rig: Rig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(rig_to_dict(rig), indent=1) + "\n")


class _Checker:
    def __init__(self):
        self.errors: list[str] = []

    def err(self, path: str, msg: str):
        self.errors.append(f"{path}: {msg}")

    def get(self, d: dict, key: str, path: str, typ, required=True, default=None):
        if not isinstance(d, dict):
            self.err(path, "expected an object")
            return default
        if key not in d:
            if required:
                self.err(f"{path}.{key}" if path else key, "missing")
            return default
        v = d[key]
        p = f"{path}.{key}" if path else key
        if typ is float:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                self.err(p, f"expected a finite number, got {v!r}")
                return default
            return float(v)
        if typ is int:
            if isinstance(v, bool) or not isinstance(v, int):
                self.err(p, f"expected an integer, got {v!r}")
                return default
            return v
        if typ is str:
            if not isinstance(v, str):
                self.err(p, f"expected a string, got {v!r}")
                return default
            return v
        return v

    def matrix(self, d, key, path, shape, required=True, default=None):
        v = self.get(d, key, path, list, required=required, default=None)
        p = f"{path}.{key}"
        if v is None:
            return default
        try:
            a = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError):
            self.err(p, f"expected a numeric array of shape {shape}")
            return default
        if a.shape != shape:
            self.err(p, f"expected shape {shape}, got {a.shape}")
            return default
        if not np.all(np.isfinite(a)):
            self.err(p, "contains non-finite values")
            return default
        return a.tolist()


def _sensor_from(c: _Checker, d: dict, path: str) -> Sensor | None:
    if not isinstance(d, dict):
        c.err(path, "expected an object")
        return None
    width = c.get(d, "width", path, int)
    height = c.get(d, "height", path, int)
    for k, v in (("width", width), ("height", height)):
        if v is not None and v <= 0:
            c.err(f"{path}.{k}", f"must be positive, got {v}")
    cfa = c.get(d, "cfa_pattern", path, str, required=False, default="RGGB")
    if cfa is not None:
        try:  # Bayer "RGGB" ..., "X-Trans", or any periodic pattern as rows separated by "/"
            cfa = cfa_string(parse_cfa(cfa))
        except CFAError as e:
            c.err(f"{path}.cfa_pattern", f"must be one of {CFA_PATTERNS}, 'X-Trans' or rows of "
                                         f"R/G/B letters separated by '/' ({e})")
    bits = c.get(d, "bit_depth", path, int, required=False, default=12)
    if bits is not None and not 8 <= bits <= 16:
        c.err(f"{path}.bit_depth", f"must be 8..16, got {bits}")
    black = c.get(d, "black_level", path, int, required=False, default=0)
    white = c.get(d, "white_level", path, int, required=False, default=(1 << (bits or 12)) - 1)
    if black is not None and white is not None:
        if black < 0:
            c.err(f"{path}.black_level", f"must be >= 0, got {black}")
        if white <= (black or 0):
            c.err(f"{path}.white_level", f"must exceed black_level ({black}), got {white}")
        if bits is not None and white > (1 << bits) - 1:
            c.err(f"{path}.white_level", f"exceeds {bits}-bit range, got {white}")
    resp = c.matrix(d, "colour_response", path, (3, 3), required=False, default=np.eye(3).tolist())
    if resp is not None and abs(np.linalg.det(np.asarray(resp))) < 1e-9:
        c.err(f"{path}.colour_response", "is singular")
    floats = {}
    for key, dflt, lo in (
        ("gain", 1.0, 0.0),
        ("electrons_per_dn", 4.0, 0.0),
        ("read_noise_dn", 1.0, -1e-12),
        ("full_scale", 0.05, 0.0),
        ("vignetting", 0.0, -1e-12),
        ("f_number", 8.0, 0.0),
    ):
        v = c.get(d, key, path, float, required=False, default=dflt)
        if v is not None and v <= lo:
            c.err(f"{path}.{key}", f"must be {'positive' if lo == 0 else 'non-negative'}, got {v}")
        floats[key] = v
    if c.errors:
        # construct anyway so later checks can continue; the caller raises at the end
        pass
    return Sensor(
        width=width or 1,
        height=height or 1,
        cfa_pattern=cfa or "RGGB",
        bit_depth=bits or 12,
        black_level=black or 0,
        white_level=white or 1,
        colour_response=resp,
        **{k: (v if v is not None else 1.0) for k, v in floats.items()},
    )


def rig_from_dict(d: Any, source: str | None = None) -> Rig:
    """Build and validate a :class:`Rig`; raises :class:`RigError` listing every bad field."""
    c = _Checker()
    if not isinstance(d, dict):
        raise RigError(["(root): expected a JSON object"], source)
    fmt = d.get("format")
    if fmt != RIG_FORMAT:
        c.err("format", f"expected {RIG_FORMAT!r}, got {fmt!r}")
    ver = d.get("version")
    if ver != RIG_VERSION:
        c.err("version", f"unsupported version {ver!r} (this package reads {RIG_VERSION})")
    name = c.get(d, "name", "", str) or "?"
    cams_raw = c.get(d, "cameras", "", list, default=[])
    if not isinstance(cams_raw, list) or not cams_raw:
        c.err("cameras", "expected a non-empty list")
        cams_raw = []
    cameras: list[Camera] = []
    seen = set()
    for i, cd in enumerate(cams_raw):
        p = f"cameras[{i}]"
        if not isinstance(cd, dict):
            c.err(p, "expected an object")
            continue
        cname = c.get(cd, "name", p, str)
        if cname in seen:
            c.err(f"{p}.name", f"duplicate camera name {cname!r}")
        seen.add(cname)
        K = c.matrix(cd, "K", p, (3, 3))
        if K is not None:
            Ka = np.asarray(K)
            if Ka[0, 0] <= 0 or Ka[1, 1] <= 0:
                c.err(f"{p}.K", "focal lengths must be positive")
            if not np.allclose(Ka[2], [0, 0, 1]):
                c.err(f"{p}.K", "last row must be [0, 0, 1]")
        dist = c.get(cd, "distortion", p, list, required=False, default=[0.0] * 5)
        if not (isinstance(dist, list) and len(dist) in (4, 5, 8) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in dist
        )):
            c.err(f"{p}.distortion", "expected 4, 5 or 8 numbers (OpenCV order)")
            dist = [0.0] * 5
        c2w = c.matrix(cd, "cam2world", p, (4, 4))
        if c2w is not None:
            R = np.asarray(c2w)[:3, :3]
            if not np.allclose(R @ R.T, np.eye(3), atol=1e-5) or np.linalg.det(R) < 0:
                c.err(f"{p}.cam2world", "rotation part is not a proper rotation")
            if not np.allclose(np.asarray(c2w)[3], [0, 0, 0, 1]):
                c.err(f"{p}.cam2world", "last row must be [0, 0, 0, 1]")
        sensor = _sensor_from(c, cd.get("sensor"), f"{p}.sensor") if "sensor" in cd else None
        if "sensor" not in cd:
            c.err(f"{p}.sensor", "missing")
        if K is not None and c2w is not None and sensor is not None and cname is not None:
            cameras.append(Camera(cname, K, [float(x) for x in dist], c2w, sensor))
    lights_raw = c.get(d, "lights", "", list, default=[])
    if not isinstance(lights_raw, list) or not lights_raw:
        c.err("lights", "expected a non-empty list")
        lights_raw = []
    lights: list[Light] = []
    for i, ld in enumerate(lights_raw):
        p = f"lights[{i}]"
        if not isinstance(ld, dict):
            c.err(p, "expected an object")
            continue
        idx = c.get(ld, "index", p, int)
        if idx is not None and idx != i:
            c.err(f"{p}.index", f"must equal its position {i}, got {idx}")
        pos = c.matrix(ld, "position", p, (3,))
        if pos is not None and np.linalg.norm(pos) < 1e-6:
            c.err(f"{p}.position", "must not be at the rig centre")
        col = c.matrix(ld, "colour", p, (3,), required=False, default=[1.0, 1.0, 1.0])
        if col is not None and min(col) < 0:
            c.err(f"{p}.colour", "must be non-negative")
        inten = c.get(ld, "intensity", p, float, required=False, default=1.0)
        if inten is not None and inten <= 0:
            c.err(f"{p}.intensity", f"must be positive, got {inten}")
        if pos is not None and idx is not None:
            lights.append(Light(idx, pos, col or [1.0, 1.0, 1.0], inten or 1.0))
    seq_raw = c.get(d, "sequence", "", list, default=[])
    if not isinstance(seq_raw, list) or not seq_raw:
        c.err("sequence", "expected a non-empty list")
        seq_raw = []
    seq: list[Frame] = []
    for i, fd in enumerate(seq_raw):
        p = f"sequence[{i}]"
        if not isinstance(fd, dict):
            c.err(p, "expected an object")
            continue
        idx = c.get(fd, "index", p, int)
        if idx is not None and idx != i:
            c.err(f"{p}.index", f"must equal its position {i}, got {idx}")
        kind = c.get(fd, "kind", p, str)
        if kind is not None and kind not in FRAME_KINDS:
            c.err(f"{p}.kind", f"must be one of {FRAME_KINDS}, got {kind!r}")
        exps = c.get(fd, "exposures", p, list)
        if exps is not None:
            if not (isinstance(exps, list) and exps and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in exps
            )):
                c.err(f"{p}.exposures", "expected a non-empty list of positive seconds")
                exps = None
        light = fd.get("light")
        if kind == "olat":
            if not isinstance(light, int) or isinstance(light, bool):
                c.err(f"{p}.light", f"an olat frame needs an integer light index, got {light!r}")
                light = None
            elif lights_raw and not 0 <= light < len(lights_raw):
                c.err(f"{p}.light", f"index {light} out of range 0..{len(lights_raw) - 1}")
        elif light is not None:
            c.err(f"{p}.light", f"a {kind} frame has no single light")
        if idx is not None and kind is not None and exps is not None:
            seq.append(Frame(idx, kind, [float(x) for x in exps], light))
    if c.errors:
        raise RigError(c.errors, source)
    return Rig(name=name, cameras=cameras, lights=lights, sequence=seq,
               description=d.get("description", "") or "")


def load_rig(spec: str | Path) -> Rig:
    """A built-in rig by name, or a rig file path."""
    s = str(spec)
    if s in BUILTIN_RIGS:
        return builtin_rig(s)
    path = Path(s)
    if not path.exists():
        raise RigError([f"(file): no built-in rig or file named {s!r} "
                        f"(built-ins: {', '.join(sorted(BUILTIN_RIGS))})"], s)
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RigError([f"(file): not valid JSON: {e}"], s) from None
    return rig_from_dict(d, source=s)
