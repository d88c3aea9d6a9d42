"""FaceOLAT importer on a small tree the test writes: per-unit-light radiance through the 3x4
colour matrix, light geometry (mm -> m), motion compensation of a known shift, the store's
layout and checksums, and clear errors for broken trees."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lightstage.imageio import write_exr
from lightstage.importers.faceolat import import_faceolat, scan_faceolat
from lightstage.ingest import IngestError, read_flow, verify_store
from lightstage.store import open_take

H, W = 40, 56
POS_MM = np.array([[0, 1500, 0], [1500, 0, 0], [0, 0, 1500], [-1060, 1060, 0]], float)
DUR = [1.0, 2.0, 0.5, 4.0]
M = np.array([[1.2, -0.1, 0.0], [-0.05, 0.9, 0.1], [0.0, -0.2, 1.4]])
BLACK = np.array([0.01, 0.02, 0.015])


def texture(shift=0.0):
    """(H, W, 3) smooth, textured radiance per unit light; ``shift`` moves it right (px)."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    x = x - shift
    t = 0.5 + 0.2 * np.sin(x / 3.1) * np.cos(y / 2.7) + 0.1 * np.sin((x + 2 * y) / 5.3)
    return t[..., None] * np.array([1.0, 0.8, 0.6]) * np.exp(-((x - W / 2) ** 2 + (y - H / 2) ** 2) / 900)[..., None]


def albedo(light, shift=0.0):
    return texture(shift) * (0.5 + 0.25 * light)


def write_tree(root, shifts=None, frames=None):
    """Frames: 0 tracking (all lights), 1-4 OLAT of lights 0-3, 5 tracking."""
    Minv = np.linalg.inv(M)
    patterns = [{"light_index_durations": {str(i): DUR[i] for i in range(4)}}]
    patterns += [{"light_index_durations": [[i, DUR[i]]]} for i in range(4)]
    per = [[0, 0], [1, 1], [2, 2], [3, 3], [4, 4], [5, 0]]
    shifts = shifts or {f: 0.0 for f in range(6)}
    (root / "lights").mkdir(parents=True)
    (root / "lights" / "light_pattern_metadata.json").write_text(json.dumps(
        {"light_positions": POS_MM.tolist(), "light_patterns": patterns}))
    (root / "lights" / "light_pattern_per_frame.json").write_text(json.dumps(per))
    (root / "colour_matrix.json").write_text(json.dumps(
        {"colour_matrix": np.column_stack([BLACK, M]).tolist()}))
    for cam in ("Cam00", "Cam01"):
        d = root / cam / "P07"
        d.mkdir(parents=True)
        for f, k in per:
            if frames is not None and f not in frames:
                continue
            if k == 0:
                rad = sum(albedo(i, shifts[f]) * DUR[i] for i in range(4))
            else:
                rad = albedo(k - 1, shifts[f]) * DUR[k - 1]
            cam_rgb = rad @ Minv.T + BLACK  # the inverse of rgb = M (cam - black)
            write_exr(d / f"P07.{f:06d}.exr", cam_rgb.astype(np.float32))


def test_import_matches_per_unit_light_radiance(tmp_path):
    write_tree(tmp_path / "tree")
    grp = import_faceolat(tmp_path / "tree", tmp_path / "s.zarr")
    assert grp == "P07/t0"
    take = open_take(tmp_path / "s.zarr")
    assert take.cameras == ["Cam00", "Cam01"] and take.attrs["lights"] == [0, 1, 2, 3]
    assert take.attrs["olat_frames"] == [1, 2, 3, 4] and take.attrs["tracking_frames"] == [0, 5]
    np.testing.assert_allclose(take.light_directions,
                               POS_MM / np.linalg.norm(POS_MM, axis=1, keepdims=True), atol=1e-12)
    np.testing.assert_allclose(np.asarray(take.attrs["light_rgb"])[:, 0], DUR)
    for c in range(2):
        ob = take.olat(c)
        for i in range(4):
            truth = np.moveaxis(albedo(i), -1, 0)
            lit = truth > 0.05 * truth.max()
            rel = np.abs(ob[i] - truth)[lit] / truth[lit]
            assert np.median(rel) < 2e-3 and rel.max() < 5e-3  # float16 storage
    assert verify_store(tmp_path / "s.zarr") == []
    assert take.attrs["ingest"]["cameras"] == "uncalibrated"


def test_import_compensates_known_motion(tmp_path):
    # the subject drifts right by 1.5 px between the tracking frames 0 and 5
    shifts = {f: 1.5 * f / 5 for f in range(6)}
    write_tree(tmp_path / "tree", shifts)
    import_faceolat(tmp_path / "tree", tmp_path / "s.zarr")
    take = open_take(tmp_path / "s.zarr")
    flow = read_flow(take.group, 0, 1)  # stored compactly: the per-pixel flow as warped
    ref = take.attrs["reference_frames"][0]
    assert ref == 0
    inner = (slice(8, -8), slice(8, -8))
    assert abs(np.median(flow[..., 0][inner]) - 1.5) < 0.15  # frame 5 seen from frame 0
    ob = take.olat(0)
    v = take.group["valid"][0] > 0
    errs_aligned, errs_raw = [], []
    for i in range(4):
        truth = np.moveaxis(albedo(i, shifts[0]), -1, 0)
        moved = np.moveaxis(albedo(i, shifts[i + 1]), -1, 0)
        lit = (truth.min(0) > 0.1 * truth.max()) & v[i]
        errs_aligned.append(np.median(np.abs(ob[i] - truth)[:, lit] / truth[:, lit]))
        errs_raw.append(np.median(np.abs(moved - truth)[:, lit] / truth[:, lit]))
    assert np.mean(errs_aligned) < 0.5 * np.mean(errs_raw)


def test_broken_trees_name_file_and_field(tmp_path):
    write_tree(tmp_path / "a", frames={0, 1, 2, 4, 5})
    with pytest.raises(IngestError, match=r"P07\.000003\.exr: missing"):
        import_faceolat(tmp_path / "a", tmp_path / "a.zarr")
    write_tree(tmp_path / "b")
    meta = tmp_path / "b" / "lights" / "light_pattern_metadata.json"
    d = json.loads(meta.read_text())
    d["light_patterns"][2] = {"durations": 1}
    meta.write_text(json.dumps(d))
    with pytest.raises(IngestError, match=r"light_patterns\[2\]\.light_index_durations: missing"):
        scan_faceolat(tmp_path / "b")
    d["light_patterns"][2] = {"light_index_durations": [[9, 1.0]]}
    meta.write_text(json.dumps(d))
    with pytest.raises(IngestError, match="light index 9 out of range"):
        scan_faceolat(tmp_path / "b")
    with pytest.raises(IngestError, match="light_pattern_metadata.json: missing"):
        scan_faceolat(tmp_path / "a" / "Cam00")
    # an existing take is not replaced without overwrite
    write_tree(tmp_path / "c")
    import_faceolat(tmp_path / "c", tmp_path / "c.zarr", dtype="float32")
    with pytest.raises(Exception, match="overwrite"):
        import_faceolat(tmp_path / "c", tmp_path / "c.zarr")


def test_cli_faceolat(tmp_path):
    from click.testing import CliRunner

    from cli.ingest import main

    write_tree(tmp_path / "tree")
    r = CliRunner().invoke(main, [str(tmp_path / "tree"), "--faceolat", "--out", str(tmp_path / "s.zarr"),
                                  "--no-motion"])
    assert r.exit_code == 0, r.output
    assert open_take(tmp_path / "s.zarr").attrs["lights"] == [0, 1, 2, 3]
    assert CliRunner().invoke(main, ["--verify", str(tmp_path / "s.zarr")]).exit_code == 0
