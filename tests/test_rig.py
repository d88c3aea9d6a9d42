import json

import numpy as np
import pytest

from lightstage.rig import BUILTIN_RIGS, RigError, builtin_rig, load_rig, rig_from_dict, rig_to_dict, save_rig


@pytest.mark.parametrize("name", sorted(BUILTIN_RIGS))
def test_builtin_rigs_round_trip(name, tmp_path):
    rig = builtin_rig(name)
    save_rig(rig, tmp_path / "rig.json")
    again = load_rig(tmp_path / "rig.json")
    assert rig_to_dict(again) == rig_to_dict(rig)
    # cameras look at the rig centre: the optical axis passes within 1 mm of the origin
    for cam in rig.cameras:
        c2w = cam.cam2world_array
        o, z = c2w[:3, 3], c2w[:3, 2]
        closest = o - np.dot(o, z) * z
        assert np.linalg.norm(closest) < 1e-3


def test_builtin_sizes():
    assert (builtin_rig("tiny").n_cameras, builtin_rig("tiny").n_lights) == (4, 32)
    lsx = builtin_rig("lsx-331")
    assert (lsx.n_cameras, lsx.n_lights) == (40, 331)
    assert (lsx.cameras[0].sensor.width, lsx.cameras[0].sensor.height) == (4096, 2160)
    # a tracking frame every ~20 lights, every light exactly once
    assert sorted(f.light for f in lsx.olat_frames()) == list(range(331))
    assert len(lsx.tracking_frames()) >= 331 // 20


def test_invalid_rig_reports_every_bad_field(tmp_path):
    d = rig_to_dict(builtin_rig("tiny"))
    d["cameras"][0]["K"][0][0] = -1
    d["cameras"][1]["sensor"]["cfa_pattern"] = "RGBW"
    d["lights"][3]["position"] = "north"
    d["sequence"][2]["light"] = 99
    del d["cameras"][2]["cam2world"]
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(d))
    with pytest.raises(RigError) as ei:
        load_rig(p)
    msgs = ei.value.errors
    assert len(msgs) == 5, msgs
    joined = "\n".join(msgs)
    for field in ("cameras[0].K", "cameras[1].sensor.cfa_pattern", "lights[3].position",
                  "sequence[2].light", "cameras[2].cam2world"):
        assert field in joined
    assert str(p) in str(ei.value)


def test_not_json_and_unknown_name(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{not json")
    with pytest.raises(RigError, match="not valid JSON"):
        load_rig(p)
    with pytest.raises(RigError, match="no built-in rig"):
        load_rig("no-such-rig")


def test_wrong_version_rejected():
    d = rig_to_dict(builtin_rig("tiny"))
    d["version"] = 99
    with pytest.raises(RigError, match="version"):
        rig_from_dict(d)
