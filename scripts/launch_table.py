"""Print docs/distributed.md's recipe x launch-config table (between the launch-matrix markers).

    HF_HUB_OFFLINE=1 python scripts/launch_table.py

The same code tests/test_launch_pairs.py runs: every shipped recipe under every shipped GPU
config through `llama_recipes.launchcheck.check` (what `--validate --config` does).
"""
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import test_launch_pairs as t  # noqa: E402

logging.getLogger("llama_recipes").setLevel(logging.WARNING)
print(t.MATRIX_START)
print(t.matrix_markdown())
print(t.MATRIX_END)
