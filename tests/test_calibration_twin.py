"""End to end: the twin writes a calibration capture (raw DNGs) of the demo rig, ls-calibrate
recovers the rig, compared against the twin's exact calibration.

Default run: a subset (3 of the demo rig's 8 cameras at 512 x 512, 10 board poses, 2
lights, chrome ball at two positions). The full demo rig (every camera, 30 poses, 15 lights)
is the slow test, which checks the issue's accuracy targets."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from calibration.colour import delta_e2000
from calibration.pipeline import CalibrateConfig, CaptureError, calibrate_capture
from cli.calibrate import main as cli
from lightstage.calibfile import load_calibration
from lightstage.rig import builtin_rig
from lightstage.twin.capture import simulate
from lightstage.twin.targets import colorchecker_reference

SUBSET = ["cam01", "cam02", "cam05"]


def _rot_deg(A, B):
    R = A[:3, :3].T @ B[:3, :3]
    return math.degrees(math.acos(np.clip((np.trace(R) - 1) / 2, -1, 1)))


def _compare(cal, truth):
    """Errors of a calibration against the truth: per camera and per light."""
    ref = colorchecker_reference()
    cams = {}
    for name, c in cal.cameras.items():
        t = truth.cameras[name]
        # the true camera response to the chart, corrected by both matrices (white ~0.45)
        cam_true = (0.5 * ref) @ np.linalg.inv(t.colour_matrix).T
        de = delta_e2000(cam_true @ c.colour_matrix.T, 0.5 * ref)
        cams[name] = {
            "f": max(abs(c.K[0, 0] / t.K[0, 0] - 1), abs(c.K[1, 1] / t.K[1, 1] - 1)),
            "pp_px": float(np.abs(c.K[:2, 2] - t.K[:2, 2]).max()),
            "centre_mm": 1000 * float(np.linalg.norm(c.cam2world[:3, 3] - t.cam2world[:3, 3])),
            "rot_deg": _rot_deg(c.cam2world, t.cam2world),
            "de_mean": float(de.mean()), "de_max": float(de.max()),
            "vig": float(np.abs(c.vignetting - t.vignetting).max()),
        }
    tl = {l.index: l for l in truth.lights}
    lights = {}
    for l in cal.lights:
        t = tl[l.index]
        lights[l.index] = {
            "dir_deg": math.degrees(math.acos(np.clip(l.direction @ t.direction, -1, 1))),
            "rgb": float(np.abs(l.rgb / t.rgb - 1).max()),
            # position error relative to the light's distance (near-field rigs)
            "pos_rel": float(np.linalg.norm(l.position - t.position) / np.linalg.norm(t.position)),
        }
    return cams, lights


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    out = tmp_path_factory.mktemp("twin") / "capture"
    simulate(out, builtin_rig("demo"), n_subjects=0, seed=3, workers=1,
             calibration={"cameras": SUBSET, "lights": [60, 140], "n_board_poses": 10,
                          "chrome_cameras": 3, "diffuse_cameras": 2})
    return out


@pytest.fixture(scope="module")
def run(capture):
    return calibrate_capture(capture, CalibrateConfig())


def test_twin_subset_recovers_rig(run, capture):
    truth = load_calibration(capture / "calibration" / "truth_calibration.json")
    cal = run.calibration
    assert sorted(cal.cameras) == SUBSET, run.problems
    cams, lights = _compare(cal, truth)
    for name, e in cams.items():
        assert e["de_mean"] < 0.5 and e["de_max"] < 1.5, (name, e)
        assert e["f"] < 0.005, (name, e)            # intrinsics within 0.5 %
        assert e["vig"] < 0.01, (name, e)
        # 3 cameras and 12 poses: looser than the full rig's targets (slow test)
        assert e["centre_mm"] < 3.0 and e["rot_deg"] < 0.2, (name, e)
        assert cal.cameras[name].residuals["reprojection_rms_px"] < 0.3
    assert sorted(lights) == [60, 140], run.tables["light_problems"]
    for i, e in lights.items():
        assert e["dir_deg"] < 0.5 and e["rgb"] < 0.01, (i, e)
    # cameras agree on the chart
    assert run.tables["colour_spread"]["delta_e2000_mean"] < 0.5


def test_cli_writes_calibration_and_report_and_refuses_overwrite(capture, tmp_path):
    out = tmp_path / "cal.json"
    rep = tmp_path / "report"
    r = CliRunner().invoke(cli, [str(capture), "--out", str(out), "--report", str(rep),
                                 "--lights", "60", "--colour-method", "root-polynomial"])
    assert r.exit_code == 0, r.output
    cal = load_calibration(out)
    assert cal.source == "ls-calibrate" and sorted(cal.cameras) == SUBSET
    assert all(c.colour_method == "root-polynomial-2" and c.colour_terms.shape == (3, 3)
               for c in cal.cameras.values())
    assert [l.index for l in cal.lights] == [60]
    html = (rep / "index.html").read_text()
    assert "reproj" in html and (rep / "rig.png").stat().st_size > 1000
    assert (rep / "lights.png").exists()
    before = out.read_bytes()
    r = CliRunner().invoke(cli, [str(capture), "--out", str(out)])
    assert r.exit_code == 2 and "--overwrite" in r.output
    assert out.read_bytes() == before


def test_missing_chart_names_camera_and_partial_exit(capture, tmp_path):
    bad = tmp_path / "capture"
    shutil.copytree(capture / "calibration", bad / "calibration")
    # cam02's chart frame replaced by its flat-field frame: no chart there
    shots = json.loads((bad / "calibration" / "shots.json").read_text())
    S = {s["name"]: s for s in shots["shots"]}
    shutil.copy(bad / "calibration" / S["flat_field"]["files"]["cam02"][0]["path"],
                bad / "calibration" / S["chart"]["files"]["cam02"][0]["path"])
    out = tmp_path / "cal.json"
    args = [str(bad), "--out", str(out), "--lights", "60"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1, r.output
    assert "cam02" in r.output and "chart" in r.output
    cal = load_calibration(out)  # the others are still calibrated
    assert sorted(cal.cameras) == ["cam01", "cam05"]
    r = CliRunner().invoke(cli, args + ["--allow-partial", "--overwrite"])
    assert r.exit_code == 0, r.output


def test_bad_capture_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CaptureError, match="shots.json"):
        calibrate_capture(tmp_path)
    (tmp_path / "calibration").mkdir()
    (tmp_path / "calibration" / "shots.json").write_text('{"format": "nope"}')
    r = CliRunner().invoke(cli, [str(tmp_path), "--out", str(tmp_path / "c.json")])
    assert r.exit_code == 2 and "format" in r.output


@pytest.mark.slow
def test_twin_full_demo_rig(tmp_path):
    """Every demo camera, 30 board poses, 15 lights, chrome ball at two mount positions: the
    issue's targets (camera centres 1 mm, rotations 0.05 deg, focal 0.5 %, chart dE00 0.5,
    light directions 0.5 deg, intensities 1 %).

    Measured (seed 0): centres 0.13-0.44 mm, rotations 0.010-0.037 deg (corners refitted as
    blurred saddles on linear data, boards rendered at 8x8 rays per pixel); light directions
    <= 0.25 deg, intensities <= 0.92 %, positions 1.4-1.7 % of their range (two ball
    positions 0.1 m apart)."""
    out = tmp_path / "capture"
    simulate(out, builtin_rig("demo"), n_subjects=0, seed=0, workers=2,
             calibration={"lights": list(range(0, 150, 10))})
    run = calibrate_capture(out, CalibrateConfig())
    truth = load_calibration(out / "calibration" / "truth_calibration.json")
    assert len(run.calibration.cameras) == 8, run.problems
    cams, lights = _compare(run.calibration, truth)
    print({n: (round(e["centre_mm"], 3), round(e["rot_deg"], 4)) for n, e in cams.items()})
    for name, e in cams.items():
        assert e["de_mean"] < 0.5, (name, e)
        assert e["f"] < 0.005, (name, e)
        assert e["centre_mm"] < 1.0, (name, e)
        assert e["rot_deg"] < 0.05, (name, e)
    assert len(lights) == 15
    print({i: (round(e["dir_deg"], 3), round(e["rgb"], 4), round(e["pos_rel"], 4))
           for i, e in lights.items()})
    for i, e in lights.items():
        assert e["dir_deg"] < 0.5 and e["rgb"] < 0.01, (i, e)
        # two ball positions fix the range: a few % (one ball left it to the rig's shape)
        assert e["pos_rel"] < 0.05, (i, e)
    assert any("ball positions" in r["how"] for r in run.tables["lights"])
