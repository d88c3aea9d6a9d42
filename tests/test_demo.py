"""``ls-demo --quick`` end to end (CliRunner): the report links every image it names, every number
is finite, and the folder rules (refuse non-empty OUT, --overwrite only replaces our output)."""

from __future__ import annotations

import json
import math
import re

import pytest
from click.testing import CliRunner

from cli.demo import _finite, main


@pytest.fixture(scope="module")
def demo(tmp_path_factory, one_torch_thread):
    out = tmp_path_factory.mktemp("demo") / "out"
    r = CliRunner().invoke(main, [str(out), "--quick"])
    assert r.exit_code == 0, r.output
    return out


def test_report_links_every_image_and_numbers_are_finite(demo):
    page = (demo / "index.html").read_text()
    links = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert len(links) >= 6
    for link in links:
        assert not link.startswith(("/", "http")), link  # relative links only
        assert (demo / link).is_file(), link
    res = json.loads((demo / "demo.json").read_text())
    nums = list(_finite(res))
    assert nums and all(math.isfinite(v) for v in nums)
    for stage in ("simulate", "calibrate", "ingest", "relight", "portrait"):
        assert res["seconds"][stage] > 0
    # every stage reports its numbers against the truth
    assert 0 <= res["ingest"]["median_rel_err"] < 0.2
    assert res["relight"]["psnr_db_mean"] > 20  # store relit vs truth store, same weights
    assert res["portrait"]["studio_input_model_psnr"] > 0
    assert "relight/turntable.gif" in links and "portrait/relit_input.png" in links
    # the calibration actually used is stated
    assert res["calibration_used"] in page


def test_refuses_non_empty_out_without_overwrite(demo, tmp_path):
    r = CliRunner().invoke(main, [str(demo), "--quick"])
    assert r.exit_code == 2 and "--overwrite" in r.output
    other = tmp_path / "theirs"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    r = CliRunner().invoke(main, [str(other), "--quick", "--overwrite"])
    assert r.exit_code == 2 and "not an ls-demo output" in r.output
    assert (other / "thesis.tex").read_text() == "precious"
