"""Several captures, subjects and takes in one store.

Two tiny captures written through the twin's sensor model and DNG writer (each with a known
radiance per unit light) go into one store: in one ``ls-ingest CAP1 CAP2`` call, and one after
the other. Checks: both takes are readable by plain zarr and xarray and hold their own
radiance; adding the second take leaves every byte of the first unchanged; verify and resume
still work per take; two captures that name their take alike are refused unless renamed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import zarr

from lightstage.ingest import IngestConfig, IngestError, ingest, verify_store
from lightstage.store import list_takes, open_take
from lightstage.twin.static_capture import write_static_capture

H, W = 32, 40
FRAMES = [1, 2, 3, 10]  # tracking, olat (lights 0, 1), tracking


def albedo(ci: int, level: float) -> np.ndarray:
    """(H, W, 3) radiance per unit light of camera ci for a subject of brightness ``level``."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    t = level * (0.3 + 0.1 * np.sin(2 * np.pi * x / W + ci) * np.cos(2 * np.pi * y / H))
    return t[..., None] * np.array([1.0, 0.8, 0.6])


def write_capture(root: Path, subject: str, take: str, level: float) -> tuple[Path, Path]:
    """Two cameras of the tiny rig at H x W, imaging ``albedo(c, level)``; (folder, calibration)."""
    cap = write_static_capture(root, height=H, width=W, n_cameras=2, frames=FRAMES,
                               radiance=lambda ci: albedo(ci, level), subject=subject, take=take)
    return cap.root, cap.calibration


@pytest.fixture(scope="module")
def captures(tmp_path_factory):
    base = tmp_path_factory.mktemp("multi")
    a = write_capture(base / "capA", "s000", "t0", 1.0)
    b = write_capture(base / "capB", "s001", "t0", 0.6)
    c = write_capture(base / "capC", "s000", "t0", 0.8)  # same names as capA
    return a, b, c


def _tree_bytes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _check_radiance(store: Path, group: str, level: float) -> None:
    s, t = group.split("/")
    take = open_take(store, s, t)
    for c in range(2):
        ob = take.olat(c)
        truth = np.moveaxis(albedo(c, level), -1, 0)
        inner = (slice(None), slice(2, -2), slice(2, -2))  # bilinear demosaic edges
        for li in range(ob.shape[0]):
            rel = np.abs(ob[li][inner] - truth[inner]) / truth[inner]
            assert np.median(rel) < 5e-3, (group, c, li, float(np.median(rel)))


def test_second_capture_appends_a_take_and_leaves_the_first_untouched(captures, tmp_path):
    (capA, cal), (capB, _), _ = captures
    out = tmp_path / "s.zarr"
    assert ingest(capA, cal, out).ok
    before = _tree_bytes(out / "s000")
    rep = ingest(capB, cal, out)
    assert rep.ok and rep.takes == ["s001/t0"] and rep.written == 2 * 2
    assert _tree_bytes(out / "s000") == before  # not one byte of the first take changed
    assert list_takes(out) == [("s000", "t0"), ("s001", "t0")]
    # plain zarr and xarray read both takes
    root = zarr.open_group(str(out), mode="r")
    assert root["s000/t0/olat"].shape == root["s001/t0/olat"].shape == (2, 2, 3, H, W)
    xr = pytest.importorskip("xarray")
    for grp in ("s000/t0", "s001/t0"):
        ds = xr.open_zarr(str(out), group=grp, consolidated=False)
        assert ds.olat.dims == ("camera", "light", "channel", "y", "x")
        assert ds.attrs["subject"] == grp.split("/")[0]
    _check_radiance(out, "s000/t0", 1.0)
    _check_radiance(out, "s001/t0", 0.6)
    assert verify_store(out) == []
    # rerunning both: everything is resumed, nothing rewritten
    rep = ingest([capA, capB], cal, out)
    assert rep.ok and rep.written == 0 and rep.resumed == 2 * 2 * 2
    assert _tree_bytes(out / "s000") == before


def test_one_call_with_two_captures_equals_two_calls(captures, tmp_path):
    (capA, cal), (capB, _), _ = captures
    one, two = tmp_path / "one.zarr", tmp_path / "two.zarr"
    assert ingest([capA, capB], cal, one).ok
    assert ingest(capA, cal, two).ok and ingest(capB, cal, two).ok
    for grp in ("s000/t0", "s001/t0"):
        a, b = zarr.open_group(str(one), mode="r")[grp], zarr.open_group(str(two), mode="r")[grp]
        for name, arr in a.arrays():
            np.testing.assert_array_equal(arr[...], b[name][...], err_msg=f"{grp}/{name}")


def test_same_take_names_refused_unless_renamed_and_resume_per_take(captures, tmp_path):
    (capA, cal), _, (capC, _) = captures
    out = tmp_path / "s.zarr"
    with pytest.raises(IngestError, match="both take 's000/t0'.*--rename"):
        ingest([capA, capC], cal, out)
    assert ingest(capA, cal, out).ok
    # another capture's s000/t0 into the same store: refused, the existing take is kept
    before = _tree_bytes(out / "s000")
    with pytest.raises(IngestError, match="other inputs"):
        ingest(capC, cal, out)
    assert _tree_bytes(out / "s000") == before
    with pytest.raises(IngestError, match="not in the capture"):
        ingest(capC, cal, out, config=IngestConfig(rename={"s009/t0": "s002/t0"}))
    rep = ingest(capC, cal, out, config=IngestConfig(rename={"s000/t0": "s002/t1"}))
    assert rep.ok and rep.takes == ["s002/t1"]
    assert _tree_bytes(out / "s000") == before
    take = open_take(out, "s002", "t1")
    assert take.attrs["ingest"]["captured_as"] == "s000/t0"
    _check_radiance(out, "s002/t1", 0.8)
    # an interrupted second take resumes without touching the first
    g = zarr.open_group(str(out), mode="r+")["s002/t1"]
    g["done"][0, 1] = 0
    problems = verify_store(out)
    assert len(problems) == 1 and "s002/t1" in problems[0] and "missing" in problems[0]
    rep = ingest(capC, cal, out, config=IngestConfig(rename={"s000/t0": "s002/t1"}))
    assert rep.ok and rep.written == 1
    assert verify_store(out) == [] and _tree_bytes(out / "s000") == before


def test_cli_takes_several_captures_and_renames(captures, tmp_path):
    from click.testing import CliRunner

    from cli.ingest import main

    (capA, cal), _, (capC, _) = captures
    out = tmp_path / "s.zarr"
    r = CliRunner().invoke(main, [str(capA), str(capC), "--calibration", str(cal), "--out",
                                  str(out), "--workers", "0"])
    assert r.exit_code == 2 and "--rename" in r.output  # both are s000/t0
    r = CliRunner().invoke(main, [str(capA), "--calibration", str(cal), "--out", str(out),
                                  "--workers", "0"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, [str(capC), "--calibration", str(cal), "--out", str(out),
                                  "--workers", "0", "--rename", "s000/t0=s003/t0"])
    assert r.exit_code == 0, r.output
    assert list_takes(out) == [("s000", "t0"), ("s003", "t0")]
    r = CliRunner().invoke(main, [str(capA), "--calibration", str(cal), "--out", str(out),
                                  "--rename", "bad"])
    assert r.exit_code == 2 and "SUBJECT/TAKE=SUBJECT/TAKE" in r.output
