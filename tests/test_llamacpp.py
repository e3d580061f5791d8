"""The exported GGUF in llama.cpp itself (llama-cpp-python==0.3.36): same greedy answers as the trained
model in transformers, stopping at the end of the turn. Slow, and runs only where llama_cpp imports
(here or in the venv `python scripts/llamacpp_check.py --build` makes: a 15-35 min compile)."""
import importlib.util

import pytest
from conftest import ROOT

from llama_recipes.schema import load_recipe


def _script():
    spec = importlib.util.spec_from_file_location("llamacpp_check", ROOT / "scripts" / "llamacpp_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_llamacpp_answers_as_the_trained_model(tmp_path):
    check = _script()
    py = check.llamacpp_python()
    if py is None:
        pytest.skip(f"llama_cpp is not built: python scripts/llamacpp_check.py --build (into {check.venv_dir()})")
    from llama_recipes import pipeline

    run = pipeline.train(load_recipe(ROOT / "recipes/demo/smollm2_chat_lora.yaml", [
        "training.max_steps=4", "training.logging_steps=2", "training.report_to=none", "eval.limit=4",
        "eval.generate=false", f"output_dir={tmp_path / 'run'}"]))
    rows = check.check(run.output_dir, ["f16", "q8_0"], 6, 32, tmp_path / "gguf", py)
    f16, q8 = rows
    assert f16["llamacpp_prompt_tokens_equal"] == "6/6", f16  # the tokenizer travelled
    assert f16["llamacpp_greedy_agree"] == "6/6", f16
    assert f16["stop_ids_are_eog"] and q8["stop_ids_are_eog"], rows  # <|im_end|> ends generation in llama.cpp
    assert int(q8["llamacpp_greedy_agree"].split("/")[0]) >= 4, q8
