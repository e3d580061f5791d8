"""`--estimate-memory` answers for every shipped recipe and demo twin, offline.

Each recipe under recipes/ and recipes/demo/ goes through the real entry point in a subprocess
(`python run_recipe.py RECIPE --estimate-memory`, HF_HUB_OFFLINE=1), as a user would run it
before renting a GPU: exit 0, the table with a positive trainable-parameter count and total,
and the verdict line (memory.render / memory.verdict). Cases known to fail are strict xfails
with the error they give today, so the suite stays green and turns red once they are fixed
(then delete the mark).
"""
import re

import pytest

from conftest import ROOT, run_cli

RECIPES = sorted([*(ROOT / "recipes").glob("*.yaml"), *(ROOT / "recipes" / "demo").glob("*.yaml")])
# recipe (relative to recipes/) -> why it fails today
KNOWN_FAILURES: dict[str, str] = {}


def case(path):
    rel = str(path.relative_to(ROOT / "recipes"))
    marks = [pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[rel])] if rel in KNOWN_FAILURES else []
    return pytest.param(path, id=rel, marks=marks)


def number(pattern: str, text: str) -> float:
    m = re.search(pattern, text, re.MULTILINE)
    assert m, f"no line matching {pattern!r} in:\n{text}"
    return float(m.group(1).replace(",", ""))


@pytest.mark.parametrize("path", [case(p) for p in RECIPES])
def test_estimate_memory(path):
    proc = run_cli(str(path), "--estimate-memory", env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, timeout=120)
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert number(r"^model: ([\d,]+) parameters", out) > 0
    assert number(r"^method: \S+ — trainable ([\d,]+) \(", out) > 0
    assert number(r"^total\s+([\d.]+)$", out) > 0
    assert re.search(r"^verdict: ", out, re.MULTILINE), out


def test_every_recipe_is_covered():
    assert len(RECIPES) >= 26 and any(p.parent.name == "demo" for p in RECIPES)
    assert set(KNOWN_FAILURES) <= {str(p.relative_to(ROOT / "recipes")) for p in RECIPES}
