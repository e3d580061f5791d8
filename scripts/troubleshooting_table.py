"""Print the bad-input catalogue as the Markdown rows of docs/troubleshooting.md.

    HF_HUB_OFFLINE=1 python scripts/troubleshooting_table.py

Runs every case of tests/test_bad_inputs.py through the CLI in-process and prints case, input,
message and fix (temporary paths shown as <tmp>).
"""
import contextlib
import io
import json
import re
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import test_bad_inputs as t  # noqa: E402
from llama_recipes.cli import main  # noqa: E402

for case, (how, _) in t.CASES.items():
    tmp = Path(tempfile.mkdtemp())
    recipe = {"output_dir": str(tmp / "out"), **json.loads(json.dumps(t.BASE))}
    path = tmp / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    args = how(tmp, recipe) if callable(how) else how
    if not getattr(how, "own_file", False):
        path.write_text(yaml.safe_dump(recipe))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        main([str(path), *args])
    lines = [x.strip() for x in err.getvalue().splitlines() if x.startswith(("error:", "  ")) and "it/s" not in x]
    text = " ".join(lines).replace(str(tmp) + "/r.yaml: ", "").replace(str(tmp), "<tmp>")
    msg, _, fix = re.sub(r"^(warnings\.warn\( )?error: ", "", text).partition(" fix: ")
    shown = "(see test)" if callable(how) else "`" + " ".join(args) + "`"
    print(f"| `{case}` | {shown} | {msg.replace('|', '/')} | {fix.replace('|', '/')} |")
