"""A take without tracking frames (a static object, a calibration target, a rig that never
fires the fully-lit frame): ingested without motion compensation; with it, refused clearly."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

from lightstage.ingest import DONE_WRITTEN, IngestConfig, IngestError, ingest, verify_store
from lightstage.store import open_take
from lightstage.twin.static_capture import static_texture, write_static_capture

H, W = 24, 40
FRAMES = [2, 3, 4]  # the tiny rig's OLATs of lights 0, 1, 2 only


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    return write_static_capture(tmp_path_factory.mktemp("nt") / "cap", height=H, width=W,
                                frames=FRAMES)


def test_no_tracking_frames_ingested_without_motion(capture, tmp_path):
    out = tmp_path / "s.zarr"
    rep = ingest(capture.root, capture.calibration, out, config=IngestConfig(motion=False))
    assert rep.ok, rep.errors
    C = len(capture.rig.cameras)
    assert rep.written == C * 3
    take = open_take(out)
    g = take.group
    assert g["tracking"].shape[1] == 0 and (g["done"][...] == DONE_WRITTEN).all()
    assert (g["mask"][...] == 255).all()
    assert "no tracking frames" in take.attrs["ingest"]["mask_rule"]
    for ci in range(C):  # per unit light, the written radiance (static_texture)
        truth = np.moveaxis(static_texture(H, W, ci), -1, 0)
        for li in range(3):
            rel = np.abs(take.olat(ci)[li] - truth)[:, 2:-2, 2:-2] / truth[:, 2:-2, 2:-2]
            assert np.median(rel) < 0.006
    assert verify_store(out) == []
    ds = xr.open_zarr(str(out), group="s000/t0", consolidated=False)
    assert ds["olat"].dims == ("camera", "light", "channel", "y", "x")
    assert ds["tracking"].sizes["tracking_frame"] == 0


def test_no_tracking_frames_with_motion_is_refused_by_name(capture, tmp_path):
    with pytest.raises(IngestError, match="motion compensation needs tracking frames"):
        ingest(capture.root, capture.calibration, tmp_path / "m.zarr")
    assert not (tmp_path / "m.zarr").exists()  # refused before anything is written
    from cli.ingest import main

    r = CliRunner().invoke(main, [str(capture.root), "--calibration", str(capture.calibration),
                                  "--out", str(tmp_path / "c.zarr"), "--no-motion"])
    assert r.exit_code == 0, r.output
    assert (open_take(tmp_path / "c.zarr").group["done"][...] == DONE_WRITTEN).all()
