"""The design card's layering: lightstage imports none of calibration/model/cli; calibration and
model never import each other; nothing imports cli (except cli itself)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "lightstage": {"calibration", "model", "cli"},
    "calibration": {"model", "cli"},
    "model": {"calibration", "cli"},
    "benchmarks": {"cli"},
}


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layering(package):
    bad = [f"{p.relative_to(ROOT)}:{line} imports {mod}"
           for p in sorted((ROOT / package).rglob("*.py"))
           for line, mod in _imports(p) if mod in FORBIDDEN[package]]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_violation(tmp_path):
    p = tmp_path / "x.py"
    p.write_text("import os\nfrom model.prior import TriPlaneGenerator\n")
    assert (2, "model") in list(_imports(p))
