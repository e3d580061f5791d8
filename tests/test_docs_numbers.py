"""Numbers and facts the docs quote about shipped things, checked against the things themselves.

A doc that quotes the tiny model's size, its vocabulary, which data the demo twins train on or
which builtin datasets exist drifts when the asset changes; these tests fail instead.
"""
import json
import re

import pytest
import yaml
from conftest import ROOT, TINY

DOCS = ROOT / "docs"
CONFIG = json.loads((TINY / "config.json").read_text())


@pytest.fixture(scope="module")
def tiny_parameters() -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY))
    return sum(p.numel() for p in model.parameters())


def test_tiny_model_size_as_quoted(tiny_parameters):
    millions = f"{tiny_parameters / 1e6:.1f}M"
    assert f"the packaged {millions}-parameter tiny Llama" in (DOCS / "distributed.md").read_text()
    methods = (DOCS / "methods.md").read_text()
    h, i, L = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["num_hidden_layers"]
    kv = CONFIG["num_key_value_heads"] * CONFIG["head_dim"]
    assert f"tiny Llama: h={h}, i={i}, kv={kv}, L={L}, {millions} parameters" in methods


def test_dry_run_transcript_has_the_tiny_vocabulary():
    shapes = re.findall(r"over \((\d+), (\d+), (\d+)\)", (DOCS / "memory.md").read_text())
    assert shapes and all(int(v) == CONFIG["vocab_size"] for _, _, v in shapes), shapes


def test_methods_doc_says_which_data_the_twins_train_on():
    from llama_recipes.schema.method import PEFT_METHODS

    said = (DOCS / "methods.md").read_text()
    m = re.search(r"`builtin:tiny-llama` on `(builtin:\w+)`(?:, except ((?:`tiny_\w+` on `builtin:\w+`(?:, )?)+))?\)", said)
    assert m, "docs/methods.md no longer says which data the twins train on"
    exceptions = dict(re.findall(r"`(tiny_\w+)` on `(builtin:\w+)`", m.group(2) or ""))
    for name in PEFT_METHODS:
        recipe = yaml.safe_load((ROOT / "recipes" / "demo" / f"tiny_{name}.yaml").read_text())
        assert recipe["data"]["path"] == exceptions.get(f"tiny_{name}", m.group(1)), name


def test_troubleshooting_lists_every_builtin():
    doc = (DOCS / "troubleshooting.md").read_text()
    line = next(x for x in doc.splitlines() if x.startswith("| `builtin-data-unknown`"))
    data = sorted(p.name for p in (ROOT / "llama_recipes" / "assets" / "data").iterdir() if p.is_dir())
    assert line.endswith("use one of: " + ", ".join(f"builtin:{d}" for d in data) + " |")
    line = next(x for x in doc.splitlines() if x.startswith("| `builtin-model-unknown`"))
    assert "builtin:tiny-llama" in line


def test_sizes_are_mebibytes_and_say_so():
    """Sizes are computed as bytes / 2**20: the docs and the log lines say MiB, not MB."""
    import inspect

    from llama_recipes import adapters, artifacts, export

    for module in (adapters, artifacts, export):
        assert not re.search(r"\d\}? MB\b|f\} MB|MB on disk|MB\)", inspect.getsource(module)), module.__name__
    assert " MB on disk" not in (DOCS / "methods.md").read_text()


def _numbers_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("real_model_numbers", ROOT / "scripts" / "real_model_numbers.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_demo_numbers_blocks_are_generated():
    """README's demo numbers, docs/real_models.md's and docs/preference.md's are the rendering of
    docs/real_model_numbers.json."""
    script = _numbers_script()
    data = json.loads(script.NUMBERS.read_text())
    for block in script.BLOCKS:
        text = block[0].read_text()
        assert script.replace_block(text, script.render(data, block), block) == text, \
            f"{block[0].name} ({block[1]}) is stale: python scripts/real_model_numbers.py"
    assert set(script.DEMOS) <= set(data["demos"]), "a demo has no recorded numbers: run it, then the script"


def test_forgetting_table_is_generated():
    """docs/evaluation.md's forgetting table is the rendering of docs/forgetting_numbers.json
    (written by scripts/forgetting_table.py from the runs of the commands the page shows)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("forgetting_table", ROOT / "scripts" / "forgetting_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    text = script.DOC.read_text()
    assert script.replace_block(text, script.render(json.loads(script.NUMBERS.read_text()))) == text, \
        "docs/evaluation.md is stale: python scripts/forgetting_table.py --render"
    block = text.split(script.END, 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    shown = next(line for line in block.splitlines() if line.startswith("R="))
    assert script.RECIPE in shown and all(o in shown for o in script.COMMON), "the page shows other commands than the script runs"
