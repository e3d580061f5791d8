"""docs/outputs.md against real runs: its output-dir table lists every file a run writes, and its
plain-load workaround for QLoRA on avx512_bf16 CPUs is the code that works there."""
import re

import pytest
from conftest import FP32, ROOT, TINY

DOC = ROOT / "docs" / "outputs.md"


def table_names() -> set[str]:
    """The file names in the first column of the output-dir table (a `dir/` names a directory)."""
    text = DOC.read_text().split("## What lands in `output_dir`", 1)[1].split("\n## ", 1)[0]
    names = set()
    for line in text.splitlines():
        if line.startswith("| `"):
            names |= set(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return names


def written(out) -> set[str]:
    return {p.name + ("/" if p.is_dir() else "") for p in out.iterdir()}


def train(recipe: str, out, *extra):
    from llama_recipes import pipeline
    from llama_recipes.schema import load_recipe

    pipeline.train(load_recipe(ROOT / "recipes" / "demo" / f"{recipe}.yaml",
                               [FP32, "training.max_steps=2", "training.logging_steps=1", "data.max_samples=32",
                                "data.max_eval_samples=8", "eval.limit=4", "eval.max_new_tokens=2",
                                "training.report_to=[tensorboard]", f"output_dir={out}", *extra]))


@pytest.mark.parametrize("recipe", ["tiny_lora", pytest.param("tiny_full", marks=pytest.mark.slow),
                                    pytest.param("tiny_classifier_head", marks=pytest.mark.slow)])
def test_output_dir_table_lists_every_file(recipe, tmp_path):
    out = tmp_path / "out"
    train(recipe, out)
    missing = written(out) - table_names()
    assert not missing, f"docs/outputs.md's table does not list {sorted(missing)} (written by {recipe})"
    assert {"recipe.yaml", "metrics.json", ".llama-recipes.lock"} <= written(out)


def snippet() -> str:
    text = DOC.read_text().split("<!-- qlora-plain-load -->", 1)[1]
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def _plain_4bit():
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(TINY, quantization_config=q).eval()


def test_qlora_plain_load_workaround_is_what_works():
    """The doc's snippet makes a plain transformers + bitsandbytes 4-bit load of the tiny model evaluate;
    where bitsandbytes takes its packed AVX512-BF16 kernel, the same load without it fails as the doc says."""
    import torch

    from llama_recipes.runtime import hardware

    ids = torch.tensor([[1, 5, 9, 13, 17]])
    model = _plain_4bit()
    exec(snippet(), {"model": model})
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == model.config.vocab_size
    if hardware.bnb_has_packed_kernel():  # the failure the doc describes happens on this CPU kind only
        with pytest.raises(RuntimeError, match="is invalid for input of size"), torch.no_grad():
            _plain_4bit()(input_ids=ids)
