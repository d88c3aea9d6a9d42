"""lightstage.twin.static_capture: the small static captures the ingest tests and benchmarks use.

Its radiometric truth is checked end to end by tests/test_ingest_synthetic.py (ingested OLATs
equal the radiance given); here: the files and frames it writes, determinism, noise, dark
frames, and that it refuses to replace output or take bad arguments."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import rawpy

from lightstage.manifest import load_manifest
from lightstage.rig import load_rig
from lightstage.twin.static_capture import scaled_rig, static_texture, write_static_capture

H, W = 24, 32  # LibRaw refuses DNGs of 16 rows (rawpy: "Unsupported file format")


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_n_olat_sequence_files_and_same_bytes_twice(tmp_path):
    a = write_static_capture(tmp_path / "a", height=H, width=W, n_olat=3, n_cameras=2,
                             tracking_irradiance="olat")
    assert [(f.index, f.kind, f.light) for f in a.rig.sequence] == \
        [(0, "tracking", None), (1, "olat", 0), (2, "olat", 1), (3, "olat", 2), (4, "tracking", None)]
    rig = load_rig(a.root / "rig.json")
    assert [c.resolution for c in rig.cameras] == [(H, W)] * 2
    m = load_manifest(a.root / "s000" / "t0" / "capture.json")
    assert [f.index for f in m.frames] == [0, 1, 2, 3, 4] and sorted(m.frames[0].files) == ["cam00", "cam01"]
    n_exp = len(a.rig.sequence[0].exposures)
    assert len(list((a.root / "s000" / "t0" / "raw").rglob("*.dng"))) == 5 * 2 * n_exp
    assert a.calibration.is_file()
    b = write_static_capture(tmp_path / "b", height=H, width=W, n_olat=3, n_cameras=2,
                             tracking_irradiance="olat")
    assert _tree(a.root) == _tree(b.root)


def test_scaled_rig_keeps_the_field_of_view():
    big, small = scaled_rig("tiny", 128, 128), scaled_rig("tiny", H, W, n_cameras=1)
    assert len(small.cameras) == 1
    K0, K1 = big.cameras[0].K_array, small.cameras[0].K_array
    np.testing.assert_allclose(K1[0] / W, K0[0] / 128)  # fx and cx in units of the width
    np.testing.assert_allclose(K1[1] / H, K0[1] / 128)


def test_dark_frames_are_black_and_noise_is_seeded(tmp_path):
    # tiny's frame 0 is dark: every photosite at the black level
    c = write_static_capture(tmp_path / "c", height=H, width=W, frames=[0, 1, 2], n_cameras=1)
    cam = c.rig.cameras[0]
    with rawpy.imread(str(c.root / "s000" / "t0" / "raw" / cam.name / "f0000_e0.dng")) as r:
        dark = r.raw_image_visible.copy()
    assert dark.shape == (H, W) and np.all(dark == cam.sensor.black_level)
    n1 = write_static_capture(tmp_path / "n1", height=H, width=W, frames=[1, 2], n_cameras=1, noise_seed=5)
    n2 = write_static_capture(tmp_path / "n2", height=H, width=W, frames=[1, 2], n_cameras=1, noise_seed=5)
    n3 = write_static_capture(tmp_path / "n3", height=H, width=W, frames=[1, 2], n_cameras=1, noise_seed=6)
    clean = write_static_capture(tmp_path / "cl", height=H, width=W, frames=[1, 2], n_cameras=1)
    dngs = lambda cap: {k: v for k, v in _tree(cap.root).items() if k.endswith(".dng")}  # noqa: E731
    assert dngs(n1) == dngs(n2)
    assert dngs(n1) != dngs(n3) and dngs(n1) != dngs(clean)


def test_refuses_existing_output_and_bad_arguments(tmp_path):
    cap = write_static_capture(tmp_path / "x", height=H, width=W, frames=[1, 2], n_cameras=1)
    before = _tree(cap.root)
    with pytest.raises(FileExistsError, match="rig.json.*overwrite"):
        write_static_capture(tmp_path / "x", height=H, width=W, frames=[1, 3], n_cameras=1)
    assert _tree(cap.root) == before
    write_static_capture(tmp_path / "x", height=H, width=W, frames=[1, 2], n_cameras=1,
                         radiance=lambda ci: 2 * static_texture(H, W, ci), overwrite=True)
    assert _tree(cap.root) != before
    with pytest.raises(ValueError, match="exactly one"):
        write_static_capture(tmp_path / "y", height=H, width=W, frames=[1], n_olat=2)
    with pytest.raises(ValueError, match="no frames \\[999\\]"):
        write_static_capture(tmp_path / "y", height=H, width=W, frames=[1, 999])
    with pytest.raises(ValueError, match="cam00.*shape"):
        write_static_capture(tmp_path / "y", height=H, width=W, frames=[1],
                             radiance=lambda ci: np.ones((H, W)))
    with pytest.raises(ValueError, match="tracking_irradiance"):
        write_static_capture(tmp_path / "y", height=H, width=W, frames=[1], tracking_irradiance="some")
    assert not (tmp_path / "y").exists()  # arguments are checked before anything is written
