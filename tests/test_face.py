"""Portrait preprocessing (model/face.py): loading, MTCNN, FFHQ/EG3D alignment, pose.

Truth used: analytic cases (sRGB curve, synthetic landmarks under known similarity transforms,
template points projected by known cameras), the reference MTCNN implementation inside the
facenet-pytorch package (run through a minimal torchvision stand-in), and real photos
(the public-domain NASA portrait in shared/data/real, matplotlib's Grace Hopper sample).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from lightstage.camera import EG3D_FRONT_CAM2WORLD, eg3d_label
from model import face as F

needs_detector = pytest.mark.skipif(not F.detector_available(),
                                    reason="facenet-pytorch (MTCNN weights) not installed")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one intra-op thread, restored after


@pytest.fixture(scope="module")
def detector():
    if not F.detector_available():
        pytest.skip("facenet-pytorch (MTCNN weights) not installed")
    return F.MTCNNDetector()


@pytest.fixture(scope="module")
def astronaut(real_data) -> Path:
    p = real_data / "portraits" / "astronaut_eileen_collins.png"
    if not p.is_file():
        pytest.skip("astronaut portrait missing from the real data")
    return p


# ------------------------------------------------------------------ loading


def test_srgb_curve_matches_standard_points():
    # IEC 61966-2-1: 0.04045 is the breakpoint; mid-grey 0.5 -> 0.21404.
    v = np.array([0.0, 0.04045, 0.5, 1.0])
    lin = F.srgb_decode(v)
    np.testing.assert_allclose(lin, [0.0, 0.04045 / 12.92, 0.214041, 1.0], rtol=1e-5, atol=1e-7)
    x = np.linspace(0, 1, 101)
    np.testing.assert_allclose(F.srgb_decode(F.srgb_encode(x)), x, atol=2e-6)


def test_load_8_and_16_bit_png_decode_to_the_same_linear_values(tmp_path):
    rng = np.random.default_rng(0)
    code8 = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    p8, p16 = tmp_path / "a8.png", tmp_path / "a16.png"
    cv2.imwrite(str(p8), code8[..., ::-1])
    cv2.imwrite(str(p16), (code8.astype(np.uint16) * 257)[..., ::-1])  # 257 = 65535 / 255
    a, b = F.load_portrait(p8), F.load_portrait(p16)
    np.testing.assert_allclose(a, F.srgb_decode(code8 / 255.0), atol=1e-6)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert a.dtype == np.float32 and a.shape == (20, 24, 3)


def test_load_grey_rgba_and_float_tiff(tmp_path):
    import tifffile

    grey = np.full((18, 20), 128, np.uint8)
    cv2.imwrite(str(tmp_path / "g.png"), grey)
    g = F.load_portrait(tmp_path / "g.png")
    assert g.shape == (18, 20, 3)
    np.testing.assert_allclose(g, F.srgb_decode(128 / 255.0), atol=1e-6)

    rgba = np.zeros((18, 20, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:, :10, 3] = 255  # left half opaque white, right half transparent
    cv2.imwrite(str(tmp_path / "a.png"), rgba[..., [2, 1, 0, 3]])
    a = F.load_portrait(tmp_path / "a.png")
    np.testing.assert_allclose(a[:, :10], 1.0, atol=1e-6)
    np.testing.assert_allclose(a[:, 10:], 0.0, atol=1e-6)

    lin = np.random.default_rng(1).uniform(0, 4, size=(17, 19, 3)).astype(np.float32)
    tifffile.imwrite(tmp_path / "f.tif", lin)
    np.testing.assert_array_equal(F.load_portrait(tmp_path / "f.tif"), lin)  # linear kept

    code16 = np.random.default_rng(3).integers(0, 65536, size=(17, 19, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "i16.tif", code16)
    np.testing.assert_allclose(F.load_portrait(tmp_path / "i16.tif"), F.srgb_decode(code16 / 65535.0),
                               atol=1e-6)


def test_load_exr_is_linear(tmp_path):
    OpenEXR = pytest.importorskip("OpenEXR")
    lin = np.random.default_rng(4).uniform(0, 20, size=(18, 21, 3)).astype(np.float32)
    with OpenEXR.File({"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage},
                      {"RGB": np.ascontiguousarray(lin)}) as f:
        f.write(str(tmp_path / "a.exr"))
    np.testing.assert_array_equal(F.load_portrait(tmp_path / "a.exr"), lin)


def test_load_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(F.PortraitError, match="no such file"):
        F.load_portrait(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(F.PortraitError, match="bad.png"):
        F.load_portrait(bad)
    bad_jpg = tmp_path / "bad.jpg"
    bad_jpg.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(F.PortraitError, match="bad.jpg"):
        F.load_portrait(bad_jpg)
    tiny = tmp_path / "tiny.png"
    cv2.imwrite(str(tiny), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(F.PortraitError, match="too small"):
        F.load_portrait(tiny)


# ------------------------------------------------------------------ alignment maths


def _rot(yaw, pitch, roll):
    cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    Rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return Rz @ Rx @ Ry


def test_pos_fit_recovers_weak_perspective_scale_and_translation():
    R = _rot(0.3, -0.2, 0.1)
    s, t = 173.0, np.array([311.0, 205.0])
    pts = s * (F.LM3D_STD @ R.T)[:, :2] + t
    t_est, s_est = F.pos_fit(pts, F.LM3D_STD)
    np.testing.assert_allclose(t_est, t, atol=1e-6)
    # s is the mean norm of the affine rows: exact for an orthographic rotation
    assert s_est == pytest.approx(s, rel=1e-9)


@pytest.mark.parametrize("zoom", [0.4, 2.5])
def test_align_face_maps_a_frontal_face_onto_the_canonical_landmarks(zoom):
    size = 128
    canon = F.canonical_landmarks(size)
    # Put a frontal face into a larger image with a known similarity (scale + shift).
    shift = np.array([301.3, 187.9])
    lm = (canon - (0.5 * size - 0.5)) * zoom + shift
    al = F.align_face(lm, (600, 700), size)
    np.testing.assert_allclose(al.apply_points(lm), canon, atol=1e-9)
    np.testing.assert_allclose(al.inverse_points(canon), lm, atol=1e-9)
    assert al.scale == pytest.approx(1 / zoom, rel=1e-9)


@pytest.mark.parametrize("zoom", [0.3, 1.0, 3.0])
def test_alignment_warp_moves_image_content_where_the_points_go(zoom):
    """Draw Gaussian dots at the landmarks; after the warp, their centroids sit at the mapped
    landmark positions (checks pixel-centre conventions in both the pre-shrink and warp)."""
    size = 96
    canon = F.canonical_landmarks(size)
    shift = np.array([150.2, 131.7])
    lm = (canon - (0.5 * size - 0.5)) * zoom + shift
    H, W = 300, 320
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    sigma = 2.5 * zoom
    img = np.zeros((H, W, 3), np.float32)
    for x, y in lm:
        img[..., 0] += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)).astype(np.float32)
    al = F.align_face(lm, (H, W), size)
    out = al.warp(img)[..., 0]
    assert out.shape == (size, size)
    oy, ox = np.mgrid[0:size, 0:size]
    for x, y in canon:
        win = (np.abs(ox - x) < 6) & (np.abs(oy - y) < 6)
        w = out * win
        cx, cy = (w * ox).sum() / w.sum(), (w * oy).sum() / w.sum()
        assert abs(cx - x) < 0.25 and abs(cy - y) < 0.25, (zoom, x, y, cx, cy)
    # total energy scales with the area ratio (the warp preserves radiance, not counts)
    ratio = out.sum() / img[..., 0].sum()
    assert ratio == pytest.approx(al.scale**2, rel=0.05)


def test_alignment_warp_rejects_a_different_image_size():
    al = F.align_face(F.canonical_landmarks(64) + 10, (100, 100), 64)
    with pytest.raises(F.PortraitError, match="differs"):
        al.warp(np.zeros((90, 100, 3), np.float32))


def test_box_alignment_maps_box_to_the_full_crop():
    al = F.alignment_from_box((100, 50, 300, 250), (400, 400), size=64)
    corners = al.apply_points(np.array([[99.5, 49.5], [299.5, 249.5]]))
    np.testing.assert_allclose(corners, [[-0.5, -0.5], [63.5, 63.5]], atol=1e-9)
    with pytest.raises(F.PortraitError, match="crop box"):
        F.alignment_from_box((10, 10, 5, 20), (100, 100))


# ------------------------------------------------------------------ pose


def _look_at(eye, target=np.zeros(3)):
    fwd = target - eye
    fwd /= np.linalg.norm(fwd)
    right = -np.cross(np.array([0.0, 1.0, 0.0]), fwd)
    right /= np.linalg.norm(right)
    down = np.cross(fwd, right)
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([right, down, fwd], axis=1)
    c2w[:3, 3] = eye
    return c2w


def _project_template(tpl, c2w, size):
    """Pixel positions of 3D template points seen by a camera (cam2world) at the EG3D intrinsics."""
    R = c2w[:3, :3].T
    pc = tpl @ R.T + (-R @ c2w[:3, 3])
    K = F._K_pixels(size)
    return (pc[:, :2] / pc[:, 2:]) @ K[:2, :2].T + K[:2, 2]


@pytest.mark.parametrize("yaw,pitch", [(0.0, 0.0), (0.45, 0.0), (-0.3, 0.2), (0.2, -0.25)])
def test_estimate_pose_recovers_known_cameras(yaw, pitch):
    size = 256
    eye = 2.7 * np.array([np.sin(yaw) * np.cos(pitch), np.sin(pitch), np.cos(yaw) * np.cos(pitch)])
    c2w = _look_at(eye, np.array([0.0, 0.0, 0.2]))
    uv = _project_template(F.LM5_EG3D, c2w, size)
    est = F.estimate_pose(uv, size)
    np.testing.assert_allclose(est, c2w, atol=1e-5)


def test_fit_landmark_template_recovers_a_known_face():
    """Triangulation from known cameras recovers a template that is not the BFM one, and
    estimate_pose with it is exact again for that face."""
    rng = np.random.default_rng(4)
    tpl = F.LM5_EG3D + rng.normal(0, 0.02, (5, 3))
    size = 256
    cams = [_look_at(2.7 * np.array([np.sin(y) * np.cos(p), np.sin(p), np.cos(y) * np.cos(p)]), np.array([0, 0, 0.2]))
            for y, p in np.radians([(0, 0), (20, 0), (-20, 5), (0, 10), (10, -10)])]
    lms = np.stack([_project_template(tpl, c, size) for c in cams])
    np.testing.assert_allclose(F.fit_landmark_template(lms, np.stack(cams), size), tpl, atol=1e-6)
    np.testing.assert_allclose(F.estimate_pose(lms[2], size, template=tpl), cams[2], atol=1e-5)
    with pytest.raises(F.PortraitError, match="template"):
        F.estimate_pose(lms[0], size, template=np.zeros((4, 3)))


@needs_detector
def test_pose_of_held_out_twin_heads_with_the_bundles_template():
    """Pose from MTCNN landmarks on held-out twin subjects vs their true cameras: the bundled
    model's landmark template (fitted on training subjects) removes the BFM template's pitch
    bias (the twin's stylised nose sits low)."""
    from model.bundle import DEFAULT_BUNDLE, load_bundle, pose_errors_deg, twin_pose_observations

    if not (DEFAULT_BUNDLE / "bundle.json").is_file():
        pytest.skip("bundled model missing")
    tpl = load_bundle().landmark_template
    assert tpl is not None
    obs = twin_pose_observations([10_000_019, 10_000_022], poses=((0.0, 0.0), (20.0, 0.0), (-15.0, -5.0)))
    assert len(obs) >= 5
    bfm, twin = pose_errors_deg(obs), pose_errors_deg(obs, tpl)
    assert bfm[:, 2].mean() > 8  # the known bias of the BFM template on these heads
    assert abs(twin[:, 2].mean()) < 3 and abs(twin[:, 1].mean()) < 3, twin
    assert twin[:, 0].mean() < 6 and twin[:, 0].mean() < 0.5 * bfm[:, 0].mean(), (twin, bfm)


def test_frontal_camera_matches_eg3d_c_front():
    # EG3D's c_front sees the template at (x, y) -> image centre +- template; PnP returns it.
    size = 512
    uv = _project_template(F.LM5_EG3D, EG3D_FRONT_CAM2WORLD, size)
    est = F.estimate_pose(uv, size)
    np.testing.assert_allclose(est, EG3D_FRONT_CAM2WORLD, atol=1e-6)
    # and the aligned crop's canonical landmarks are within a few pixels of that view
    # (weak perspective vs perspective, and the template's 0.006 / z offsets)
    assert np.abs(F.canonical_landmarks(size) - uv).max() < 20


# ------------------------------------------------------------------ detector


def _install_torchvision_standin(monkeypatch):
    """facenet-pytorch imports two torchvision functions (and tqdm, for downloads we never
    make); give pure-torch stand-ins when the real packages are absent."""
    try:
        import tqdm  # noqa: F401
    except ImportError:
        tq, tqa = types.ModuleType("tqdm"), types.ModuleType("tqdm.auto")
        tq.tqdm = tqa.tqdm = lambda *a, **k: None
        tq.auto = tqa
        monkeypatch.setitem(sys.modules, "tqdm", tq)
        monkeypatch.setitem(sys.modules, "tqdm.auto", tqa)
    try:
        import torchvision  # noqa: F401

        return
    except ImportError:
        pass
    import torch

    def batched_nms(boxes, scores, idxs, iou_threshold):
        keep_all = []
        for c in torch.unique(idxs):
            sel = torch.nonzero(idxs == c).flatten()
            k = F._nms(boxes[sel].double().numpy(), scores[sel].double().numpy(), float(iou_threshold))
            keep_all.append(sel[torch.as_tensor(k, dtype=torch.long)])
        if not keep_all:
            return torch.zeros(0, dtype=torch.long)
        keep = torch.cat(keep_all)
        return keep[torch.argsort(scores[keep], descending=True)]

    def to_tensor(a):
        return torch.as_tensor(np.asarray(a), dtype=torch.float32).permute(2, 0, 1) / 255.0

    tv = types.ModuleType("torchvision")
    ops, boxes_m = types.ModuleType("torchvision.ops"), types.ModuleType("torchvision.ops.boxes")
    tr, fn = types.ModuleType("torchvision.transforms"), types.ModuleType("torchvision.transforms.functional")
    boxes_m.batched_nms = batched_nms
    fn.to_tensor = to_tensor
    tv.ops, ops.boxes, tv.transforms, tr.functional = ops, boxes_m, tr, fn
    for name, mod in {"torchvision": tv, "torchvision.ops": ops, "torchvision.ops.boxes": boxes_m,
                      "torchvision.transforms": tr, "torchvision.transforms.functional": fn}.items():
        monkeypatch.setitem(sys.modules, name, mod)


@needs_detector
def test_our_mtcnn_agrees_with_the_reference_implementation(monkeypatch, detector, astronaut):
    """Same weights, independent cascade code: the facenet-pytorch MTCNN (run through a
    torchvision stand-in) must find the same face and landmarks within a few pixels."""
    _install_torchvision_standin(monkeypatch)
    for m in [m for m in sys.modules if m.startswith("facenet_pytorch")]:
        monkeypatch.delitem(sys.modules, m)
    from facenet_pytorch import MTCNN

    img = F.display_uint8(F.load_portrait(astronaut))
    ref = MTCNN(keep_all=True, device="cpu")
    boxes, probs, pts = ref.detect(img, landmarks=True)
    ours = detector.detect(img)
    assert boxes is not None and len(ours) >= 1
    boxes, probs = np.asarray(boxes, np.float64), np.asarray(probs, np.float64)
    pts = np.asarray(pts, np.float64)
    i = int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
    face_w = boxes[i, 2] - boxes[i, 0]
    np.testing.assert_allclose(ours[0].landmarks, pts[i], atol=0.04 * face_w)
    np.testing.assert_allclose(ours[0].box, boxes[i], atol=0.06 * face_w)
    assert ours[0].score > 0.95 and probs[i] > 0.95


@needs_detector
def test_real_portrait_crop_puts_eyes_at_canonical_positions(detector, astronaut):
    size = 256
    pp = F.prepare_portrait(astronaut, size=size, detector=detector)
    assert pp.source == "detected" and pp.image.shape == (size, size, 3)
    assert np.all(np.isfinite(pp.image)) and pp.image.min() >= 0 and pp.image.max() <= 1.1  # Lanczos overshoot only
    canon = F.canonical_landmarks(size)
    # independent check: detect again on the crop itself
    again = detector.detect(F.display_uint8(pp.image))
    assert again, "no face in the aligned crop"
    err = np.abs(again[0].landmarks - canon)
    assert err[:2].max() < 0.06 * size, err  # eyes within ~15 px at 256
    np.testing.assert_allclose(again[0].landmarks, pp.meta["landmarks_crop"], atol=0.03 * size)
    # pose: on the EG3D sphere, looking at the head, near-frontal for this studio portrait
    c = pp.cam2world[:3, 3]
    assert np.linalg.norm(c) == pytest.approx(2.7, rel=1e-9)
    fwd = pp.cam2world[:3, 2]
    assert fwd @ (-c / np.linalg.norm(c)) > 0.98
    assert c[2] > 2.3  # within ~30 degrees of frontal
    np.testing.assert_allclose(pp.label[:16], pp.cam2world.reshape(16).astype(np.float32))


@needs_detector
def test_16bit_and_large_versions_of_a_photo_give_the_same_landmarks(tmp_path, detector, astronaut):
    lin = F.load_portrait(astronaut)
    base = detector.detect(F.display_uint8(lin))[0].landmarks
    p16 = tmp_path / "a16.png"
    code16 = np.round(F.srgb_encode(lin) * 65535).astype(np.uint16)
    cv2.imwrite(str(p16), code16[..., ::-1])
    lm16 = detector.detect(F.display_uint8(F.load_portrait(p16)))[0].landmarks
    np.testing.assert_allclose(lm16, base, atol=1.0)
    big = cv2.resize(lin, None, fx=4, fy=4, interpolation=cv2.INTER_LINEAR)  # 2048^2 > max_side
    lmb = detector.detect(F.display_uint8(big))[0].landmarks
    # pixel centres: x_big = 4 x + 1.5
    np.testing.assert_allclose((lmb - 1.5) / 4, base, atol=2.0)


@needs_detector
def test_grace_hopper_sample_from_matplotlib(detector):
    cbook = pytest.importorskip("matplotlib.cbook")
    p = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    pp = F.prepare_portrait(p, size=128, detector=detector)
    again = detector.detect(F.display_uint8(pp.image))
    assert again and np.abs(again[0].landmarks[:2] - F.canonical_landmarks(128)[:2]).max() < 8


@needs_detector
@pytest.mark.parametrize("what", ["envmap", "chessboard"])
def test_photo_without_face_raises_no_face_found(detector, real_data, what):
    if what == "envmap":
        p = real_data / "envmaps" / "Grace_Cathedral_latlong.hdr"
    else:
        p = real_data / "calibration" / "opencv_stereo_chessboard" / "left01.jpg"
    if not p.is_file():
        pytest.skip(f"{p.name} missing")
    with pytest.raises(F.NoFaceFound, match=p.name):
        F.prepare_portrait(p, size=64, detector=detector)


def test_without_detector_landmarks_and_box_still_work(monkeypatch):
    monkeypatch.setattr(F, "facenet_weights_dir", lambda: None)
    img = np.random.default_rng(2).uniform(0, 1, size=(200, 220, 3)).astype(np.float32)
    with pytest.raises(F.FaceDetectorUnavailable, match="pip install --no-deps facenet-pytorch==2.6.0"):
        F.prepare_portrait(img, size=64)
    lm = (F.canonical_landmarks(64) - 31.5) * 2.0 + np.array([110.0, 100.0])
    pp = F.prepare_portrait(img, size=64, landmarks=lm)
    assert pp.source == "landmarks"
    np.testing.assert_allclose(pp.meta["landmarks_crop"], F.canonical_landmarks(64), atol=1e-9)
    pb = F.prepare_portrait(img, size=32, box=(10, 10, 190, 190))
    assert pb.source == "box" and pb.image.shape == (32, 32, 3)
    np.testing.assert_array_equal(pb.cam2world, EG3D_FRONT_CAM2WORLD)
    np.testing.assert_array_equal(pb.label, eg3d_label(EG3D_FRONT_CAM2WORLD))


def test_bad_landmarks_and_arrays_are_rejected():
    img = np.zeros((100, 100, 3), np.float32)
    with pytest.raises(F.PortraitError, match="landmarks"):
        F.prepare_portrait(img, landmarks=np.zeros((4, 2)))
    with pytest.raises(F.PortraitError, match="degenerate"):
        F.prepare_portrait(img, landmarks=np.zeros((5, 2)))
    bad = img.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(F.PortraitError, match="NaN"):
        F.prepare_portrait(bad, box=(0, 0, 50, 50))
