"""Procedural human heads for the digital twin: per-subject shape, skin, eyes, lips, ears, hair.

A head is a star-shaped surface about a centre at eye level (see :mod:`lightstage.twin._star`):
a smooth union of a cranium ellipsoid, a jaw/face ellipsoid and a neck cylinder (each convex
and containing the centre, so the union is star-shaped), plus radial displacements for the
brow ridge, eye sockets with glossy eyeballs, nose (bridge, tip, alae), cheekbones, lips,
chin, ears and a hair cap. Materials are per texel: skin (a range of tones in linear Rec.709,
redder lips and cheeks, wrapped diffuse for subsurface softening), eyes (white sclera, dark
iris, black pupil; very glossy), hair and eyebrows (hair albedo, rougher). Everything is a
deterministic function of :class:`SubjectParams`, which :func:`random_subject` draws from a seed.

Frames. Subject space equals the world frame at rest: metres, y up, the face looks along +z,
the head (crown to chin ~0.24 m, plus neck) centred near the origin. :attr:`HeadScene.world2head`
maps world to the EG3D head frame by the similarity ``p_head = (p - o) / (0.35 * scale)``
where ``o`` is the point at the height of the upper nose on the head's vertical axis (where
FFHQ/EG3D crops put the image centre) and ``scale`` the subject's head scale: 1 head unit is
0.35 m for an average head, so the head spans ~0.67 units and fills the [-0.5, 0.5]^3 box with
hair to spare, the face front at z ~ +0.27, as EG3D's FFHQ heads do (frontal camera at
radius 2.7, focal 4.2647: the head is ~2/3 of the image width).

Skin albedo endpoints follow measured linear-sRGB skin reflectances (very light ~(0.62, 0.44,
0.35), very dark ~(0.11, 0.065, 0.045)), interpolated in log space.

References
----------
Weyrich, T. et al. (2006). Analysis of human faces using a measurement-based skin reflectance
model. ACM TOG 25(3) (skin F0 ~ 0.028, roughness range, albedo range).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from lightstage.twin._cubemap import CubeMap
from lightstage.twin._star import StarSurface
from lightstage.twin.render import MAT_CHANNELS, StarScene

__all__ = ["SubjectParams", "random_subject", "HeadScene", "HEAD_UNIT_M", "head_radius_field"]

HEAD_UNIT_M = 0.35  #: metres per EG3D head unit for a head of scale 1

_CENTRE_Y = 0.02  # star centre at eye level (m, before scale)


@dataclass(frozen=True)
class SubjectParams:
    """All per-subject variety (lengths in metres for a head of ``scale`` 1; colours linear)."""

    seed: int = 0
    scale: float = 1.0  # overall head size
    width: float = 1.0  # ear-to-ear multiplier
    depth: float = 1.0  # front-to-back multiplier
    jaw_width: float = 1.0
    chin_drop: float = 0.0  # m, longer (+) or shorter face
    nose_length: float = 1.0
    nose_height: float = 0.024  # protrusion of the tip (m)
    nose_width: float = 1.0
    eye_spacing: float = 0.032  # half interpupillary distance (m)
    eye_size: float = 1.0
    socket_depth: float = 0.008
    lip_fullness: float = 1.0
    cheekbones: float = 0.006
    ear_size: float = 1.0
    ear_protrusion: float = 0.018
    skin_tone: float = 0.5  # 0 very light .. 1 very dark
    skin_hue: float = 0.0  # -1 yellower .. +1 redder
    skin_alpha: float = 0.3  # GGX alpha of skin
    skin_f0: float = 0.028
    sss: float = 1.0  # subsurface wrap strength multiplier
    iris_rgb: tuple[float, float, float] = (0.06, 0.035, 0.02)
    eye_alpha: float = 0.03
    hair_rgb: tuple[float, float, float] = (0.03, 0.018, 0.01)
    hair_alpha: float = 0.4
    hair_thickness: float = 0.010  # m; 0 = bald
    hairline: float = 0.09  # m above the centre at the forehead
    brow_strength: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


def random_subject(seed: int) -> SubjectParams:
    """Draw a subject deterministically from ``seed`` (same seed -> identical parameters)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EAD]))
    u = lambda a, b: float(rng.uniform(a, b))  # noqa: E731
    hair_kind = rng.integers(0, 4)  # black, brown, blond, grey
    hair = {
        0: (0.012, 0.010, 0.009),
        1: (0.06, 0.035, 0.02),
        2: (0.32, 0.22, 0.12),
        3: (0.28, 0.27, 0.26),
    }[int(hair_kind)]
    # one brightness factor and a slight tint: grey stays grey, brown stays brown
    hair = np.asarray(hair) * rng.uniform(0.8, 1.2) * (1 + rng.normal(0, 0.03, 3))
    hair = tuple(float(c) for c in hair)
    iris_kind = rng.integers(0, 3)
    iris = {0: (0.05, 0.025, 0.012), 1: (0.08, 0.06, 0.03), 2: (0.045, 0.07, 0.10)}[int(iris_kind)]
    bald = rng.uniform() < 0.12
    return SubjectParams(
        seed=int(seed),
        scale=u(0.93, 1.07),
        width=u(0.93, 1.07),
        depth=u(0.94, 1.06),
        jaw_width=u(0.88, 1.1),
        chin_drop=u(-0.008, 0.01),
        nose_length=u(0.88, 1.12),
        nose_height=u(0.018, 0.028),
        nose_width=u(0.85, 1.25),
        eye_spacing=u(0.029, 0.034),
        eye_size=u(0.9, 1.1),
        socket_depth=u(0.005, 0.010),
        lip_fullness=u(0.7, 1.3),
        cheekbones=u(0.003, 0.008),
        ear_size=u(0.9, 1.12),
        ear_protrusion=u(0.012, 0.022),
        skin_tone=u(0.0, 1.0),
        skin_hue=u(-1.0, 1.0),
        skin_alpha=u(0.22, 0.4),
        skin_f0=u(0.025, 0.032),
        sss=u(0.7, 1.3),
        iris_rgb=iris,
        eye_alpha=u(0.02, 0.05),
        hair_rgb=hair,
        hair_alpha=u(0.3, 0.5),
        hair_thickness=0.0 if bald else u(0.004, 0.016),
        hairline=u(0.075, 0.1),
        brow_strength=u(0.6, 1.0),
    )


# ---------------------------------------------------------------------------- shape pieces


def _ellipsoid_r(s, c, e, a):
    """Radial distance from interior point c along unit dirs s (M, 3) to an ellipsoid."""
    sa = s / a
    ca = (c - e) / a
    A = (sa * sa).sum(1)
    B = sa @ ca
    C = ca @ ca - 1.0
    if C >= 0:
        raise ValueError("ellipsoid does not contain the star centre")
    return (-B + np.sqrt(B * B - A * C)) / A


def _smax(rs, k):
    """Smooth maximum (log-sum-exp with softness k metres)."""
    m = np.max(rs, axis=0)
    return m + k * np.log(np.exp((np.asarray(rs) - m) / k).sum(0))


def _smoothstep(e0, e1, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


class _Local:
    """Metric coordinates (du, dv) on the head around an anchor point, from directions.

    ``ang`` is the (azimuth, elevation) pair of the directions, computed once per field.
    """

    def __init__(self, ang, c, anchor):
        az, el = ang
        a = np.asarray(anchor, float) - c
        r = np.linalg.norm(a)
        az0, el0 = np.arctan2(a[0], a[2]), np.arcsin(a[1] / r)
        daz = az - az0
        if abs(az0) > 1.0:  # only anchors away from the front can meet the +-pi seam
            daz = (daz + np.pi) % (2 * np.pi) - np.pi
        self.du = daz * (r * np.cos(el0))
        self.dv = (el - el0) * r


def _gauss(loc, su, sv):
    return np.exp(-0.5 * ((loc.du / su) ** 2 + (loc.dv / sv) ** 2))


def _cap(loc, su, sv, soft=0.35):
    """Flat-topped bump: 1 inside the ellipse (su, sv), smooth fall to 0 over ``soft``."""
    q = np.sqrt((loc.du / su) ** 2 + (loc.dv / sv) ** 2)
    return 1 - _smoothstep(1 - soft, 1 + soft, q)


def head_radius_field(p: SubjectParams, s: np.ndarray) -> tuple[np.ndarray, dict]:
    """Radius R(s) (M,) of the head along unit directions s (M, 3) from the star centre, and
    region weights (dict of (M,) arrays in [0, 1]) for the materials. Lengths are for scale 1.
    """
    c = np.array([0.0, _CENTRE_Y, 0.0])
    W, D = p.width, p.depth
    ang = (np.arctan2(s[:, 0], s[:, 2]), np.arcsin(np.clip(s[:, 1], -1, 1)))
    cran = _ellipsoid_r(s, c, np.array([0, 0.035, -0.012]), np.array([0.074 * W, 0.102, 0.097 * D]))
    jaw = _ellipsoid_r(
        s, c, np.array([0, -0.022 - p.chin_drop / 2, 0.012 * D]),
        np.array([0.061 * W * p.jaw_width, 0.082 + p.chin_drop / 2, 0.084 * D]),
    )
    # a long ellipsoid rather than a capped cylinder: smooth everywhere, ~cylindrical in frame
    neck = _ellipsoid_r(s, c, np.array([0, -0.12, -0.018 * D]), np.array([0.054 * W, 0.18, 0.054 * W]))
    R = _smax([cran, jaw, neck], 0.007)
    region = {}
    face_z = 0.085 * D  # approximate face-front z at eye level

    # brow ridge
    for sx in (-1, 1):
        loc = _Local(ang, c, (sx * 0.03 * W, 0.038, face_z))
        R = R + 0.004 * _gauss(loc, 0.022, 0.008)
    # eye sockets and eyeballs
    eye = np.zeros(len(s))
    iris = np.zeros(len(s))
    pupil = np.zeros(len(s))
    for sx in (-1, 1):
        anchor = (sx * p.eye_spacing * W, 0.02, face_z - 0.004)
        loc = _Local(ang, c, anchor)
        R = R - p.socket_depth * _gauss(loc, 0.017, 0.012)
        es = p.eye_size
        lens = np.clip(1 - (loc.du / (0.0145 * es)) ** 2 - (loc.dv / (0.0062 * es)) ** 2, 0, None)
        R = R + (p.socket_depth * 0.95) * lens * _cap(loc, 0.0145 * es, 0.0062 * es, 0.2)
        e_w = _cap(loc, 0.0140 * es, 0.0058 * es, 0.15)
        eye = np.maximum(eye, e_w)
        rr = np.hypot(loc.du, loc.dv)
        iris = np.maximum(iris, e_w * (1 - _smoothstep(0.0052, 0.0062, rr)))
        pupil = np.maximum(pupil, e_w * (1 - _smoothstep(0.0020, 0.0026, rr)))
        # eyebrows (material only)
        bl = _Local(ang, c, (sx * 0.030 * W, 0.045, face_z))
        region.setdefault("brow", np.zeros(len(s)))
        region["brow"] = np.maximum(
            region["brow"],
            p.brow_strength * _cap(bl, 0.022, 0.0045, 0.4) * _smoothstep(-0.03, 0.0, sx * bl.du + 0.02),
        )
    region.update(eye=eye, iris=iris, pupil=pupil)

    # nose: bridge to tip along the mid line, widening; alae beside the tip
    nl = p.nose_length
    top_y, tip_y = 0.03, 0.02 - 0.037 * nl
    loc = _Local(ang, c, (0.0, tip_y, face_z))
    y_rel = loc.dv  # metres along the face, 0 at the tip, + upwards
    span = top_y - tip_y
    prof = np.clip(1 - y_rel / span, 0, 1) ** 1.3 * (y_rel >= 0) + np.exp(
        -0.5 * (np.minimum(y_rel, 0) / 0.0045) ** 2
    ) * (y_rel < 0)
    prof = prof * _smoothstep(-0.014, -0.004, y_rel) * _smoothstep(span + 0.004, span - 0.006, y_rel)
    half_w = (0.0055 + 0.007 * np.clip(1 - y_rel / span, 0, 1) ** 2) * p.nose_width
    nose = p.nose_height * prof * np.exp(-0.5 * (loc.du / half_w) ** 2)
    for sx in (-1, 1):
        al = _Local(ang, c, (sx * 0.0125 * p.nose_width, tip_y - 0.001, face_z))
        nose = nose + 0.0075 * _gauss(al, 0.006 * p.nose_width, 0.005)
    R = R + nose
    nostril = np.zeros(len(s))
    for sx in (-1, 1):
        nlc = _Local(ang, c, (sx * 0.0075 * p.nose_width, tip_y - 0.0075, face_z + 0.01))
        nostril = np.maximum(nostril, _gauss(nlc, 0.0035, 0.0018))
    R = R - 0.003 * nostril
    region["nostril"] = nostril
    region["nose"] = np.clip(nose / max(p.nose_height, 1e-6), 0, 1)

    # cheekbones
    for sx in (-1, 1):
        loc = _Local(ang, c, (sx * 0.045 * W, -0.005, face_z - 0.02))
        R = R + p.cheekbones * _gauss(loc, 0.016, 0.012)
    region["cheek"] = np.zeros(len(s))
    for sx in (-1, 1):
        loc = _Local(ang, c, (sx * 0.040 * W, -0.02, face_z - 0.01))
        region["cheek"] = np.maximum(region["cheek"], _gauss(loc, 0.018, 0.014))

    # lips and chin
    mouth_y = tip_y - 0.030 - 0.3 * p.chin_drop
    lf = p.lip_fullness
    up = _Local(ang, c, (0.0, mouth_y + 0.0055, face_z))
    lo = _Local(ang, c, (0.0, mouth_y - 0.0075, face_z))
    upper = _cap(up, 0.024, 0.0055 * lf, 0.5)
    lower = _cap(lo, 0.021, 0.0070 * lf, 0.5)
    R = R + 0.003 * lf * upper + 0.0036 * lf * lower
    seam = _Local(ang, c, (0.0, mouth_y, face_z))
    R = R - 0.0022 * np.exp(-0.5 * (seam.dv / 0.0012) ** 2) * _cap(seam, 0.024, 0.01, 0.4)
    region["lips"] = np.clip(np.maximum(upper, lower), 0, 1)
    chin = _Local(ang, c, (0.0, mouth_y - 0.038 - p.chin_drop, face_z - 0.01))
    R = R + 0.006 * _gauss(chin, 0.018, 0.012)

    # ears: flat plates on the sides, tilted back, with a concha hollow
    ear_w = np.zeros(len(s))
    for sx in (-1, 1):
        loc = _Local(ang, c, (sx * 0.075 * W, 0.01, -0.012 * D))
        du, dv = loc.du, loc.dv
        # tilt backwards ~12 degrees; du points towards the face for both ears
        ca, sa = np.cos(0.2), np.sin(0.2)
        du2, dv2 = du * ca - sx * dv * sa, sx * du * sa + dv * ca
        es = p.ear_size
        plate = _cap(type("L", (), {"du": du2, "dv": dv2})(), 0.015 * es, 0.031 * es, 0.3)
        concha = _gauss(type("L", (), {"du": du2 + 0.002, "dv": dv2 + 0.006})(), 0.006 * es, 0.009 * es)
        R = R + p.ear_protrusion * plate - 0.45 * p.ear_protrusion * concha * plate
        ear_w = np.maximum(ear_w, plate)
    region["ear"] = ear_w

    # hair cap: above a hairline that falls from the forehead to the nape
    x = c + R[:, None] * s
    phi = np.arctan2(x[:, 0], x[:, 2])
    front = np.sqrt((1 + np.cos(phi)) / 2)
    y_line = -0.07 + (p.hairline + 0.02 - (-0.07)) * front
    hair = _smoothstep(y_line - 0.004, y_line + 0.008, x[:, 1]) * (p.hair_thickness > 0)
    # fine strand relief so highlights break up along the hair (deterministic from the seed)
    rng = np.random.default_rng(np.random.SeedSequence([p.seed, 0x4A12]))
    k = rng.normal(size=(6, 3)) * 60.0
    ph = rng.uniform(0, 2 * np.pi, 6)
    relief = np.sin(s @ k.T + ph).sum(1) / 6
    R = R + hair * (p.hair_thickness * (1 + 0.15 * relief))
    region["hair"] = hair * (1 - ear_w)
    return R, region


class HeadScene(StarScene):
    """A procedural head (implements :class:`lightstage.twin.scene.Scene`).

    Parameters
    ----------
    params : SubjectParams (see :func:`random_subject`).
    cube_n : geometry/material cube-map resolution per face edge (256: ~0.6 mm texels).
    vis_n : shadow-visibility cube-map resolution per face edge.
    """

    def __init__(self, params: SubjectParams, cube_n: int = 256, vis_n: int = 96):
        self.params = params
        cube = CubeMap(cube_n)
        s = cube.texel_directions()
        R, reg = head_radius_field(params, s)
        sc = params.scale
        centre = np.array([0.0, _CENTRE_Y * sc, 0.0])
        surf = StarSurface(centre, cube, R * sc)
        super().__init__(surf, _materials(params, s, reg), vis_n=vis_n)

    @property
    def world2head(self) -> np.ndarray:
        """(4, 4) similarity mapping world (rest pose) to the EG3D head frame."""
        k = 1.0 / (HEAD_UNIT_M * self.params.scale)
        o = np.array([0.0, 0.005 * self.params.scale, 0.0])
        m = np.eye(4)
        m[:3, :3] *= k
        m[:3, 3] = -k * o
        return m


def _skin_albedo(tone: float, hue: float) -> np.ndarray:
    light = np.log(np.array([0.62, 0.44, 0.35]))
    dark = np.log(np.array([0.11, 0.065, 0.045]))
    a = np.exp((1 - tone) * light + tone * dark)
    return a * np.array([1 + 0.04 * hue, 1.0, 1 - 0.06 * hue])


def _materials(p: SubjectParams, s: np.ndarray, reg: dict) -> np.ndarray:
    M = len(s)
    mat = np.zeros((M, len(MAT_CHANNELS)), np.float64)
    skin = _skin_albedo(p.skin_tone, p.skin_hue)
    # low-frequency blotchiness (+-6 %) and flushed cheeks / nose, darker redder lips
    rng = np.random.default_rng(np.random.SeedSequence([p.seed, 0xA1BE]))
    k = rng.normal(size=(5, 3)) * 9.0
    ph = rng.uniform(0, 2 * np.pi, 5)
    blotch = 1 + 0.06 * np.sin(s @ k.T + ph).mean(1)
    flush = 0.5 * reg["cheek"] + 0.4 * reg["nose"]
    alb = skin[None] * blotch[:, None] * (1 + flush[:, None] * np.array([0.08, -0.08, -0.08]))
    lips = reg["lips"][:, None]
    alb = alb * (1 - lips) + lips * skin * np.array([0.85, 0.5, 0.52])
    alb = alb * (1 - 0.85 * reg["nostril"][:, None])
    alpha = np.full(M, p.skin_alpha)
    alpha = alpha * (1 - 0.25 * reg["nose"]) * (1 - 0.3 * reg["lips"])  # oilier nose, wet lips
    f0 = np.full(M, p.skin_f0)
    ks = np.ones(M)
    wrap = np.array([0.22, 0.10, 0.06]) * p.sss
    wr = np.ones(M)
    # hair and eyebrows
    hair_w = np.clip(np.maximum(reg["hair"], reg["brow"] * 0.8), 0, 1)
    hair = np.asarray(p.hair_rgb)
    alb = alb * (1 - hair_w[:, None]) + hair_w[:, None] * hair
    alpha = alpha * (1 - hair_w) + hair_w * p.hair_alpha
    f0 = f0 * (1 - hair_w) + hair_w * 0.046
    wr = wr * (1 - hair_w)
    # eyes: sclera, iris, pupil; glossy, no subsurface wrap
    eye, iris, pupil = reg["eye"], reg["iris"], reg["pupil"]
    sclera = np.array([0.62, 0.57, 0.52])
    eye_alb = sclera * (1 - iris[:, None]) + iris[:, None] * np.asarray(p.iris_rgb)
    eye_alb = eye_alb * (1 - pupil[:, None]) + pupil[:, None] * 0.008
    e = eye[:, None]
    alb = alb * (1 - e) + e * eye_alb
    alpha = alpha * (1 - eye) + eye * p.eye_alpha
    f0 = f0 * (1 - eye) + eye * 0.025
    wr = wr * (1 - eye)
    mat[:, 0:3] = alb
    mat[:, 3] = alpha
    mat[:, 4] = f0
    mat[:, 5] = ks
    mat[:, 6:9] = wr[:, None] * wrap
    return mat.astype(np.float32)
