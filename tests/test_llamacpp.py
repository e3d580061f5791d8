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
    rows = check.check(run.output_dir, ["f16", "q8_0", "lora"], 6, 32, tmp_path / "gguf", py)
    f16, q8, lora = rows
    assert f16["llamacpp_prompt_tokens_equal"] == "6/6", f16  # the tokenizer travelled
    assert f16["llamacpp_greedy_agree"] == "6/6", f16
    assert f16["stop_ids_are_eog"] and q8["stop_ids_are_eog"], rows  # <|im_end|> ends generation in llama.cpp
    assert check.agreed(q8), q8  # Q8_0: equal, or parted where 8-bit rounding can flip the choice (a near tie)
    assert lora["llamacpp_prompt_tokens_equal"] == "6/6" and check.agreed(lora), lora  # the adapter as llama.cpp applies it


def test_a_parting_counts_as_a_near_tie_only_within_twice_the_files_rounding():
    """The check's rule (the one export --verify applies): where llama.cpp's answer parts from transformers',
    transformers' top-2 margin at that token must be within 2 x the file's measured max logit difference."""
    check = _script()
    hf = [{"output": [5, 6, 7], "margins": [3.0, 0.03, 2.0]}, {"output": [5, 6, 7], "margins": [3.0, 0.5, 2.0]},
          {"output": [5, 6], "margins": [1.0, 1.0]}]
    lc = [{"output": [5, 9, 7]}, {"output": [5, 9]}, {"output": [5, 6]}]
    assert check.near_ties(hf, lc, rounding=0.02) == [0.03]  # 0.03 <= 0.04; 0.5 is a real difference
    row = {"llamacpp_greedy_agree": "1/3", "llamacpp_near_ties": [0.03], "stop_ids_are_eog": True}
    assert not check.agreed(row)
    assert check.agreed({**row, "llamacpp_near_ties": [0.03, 0.4]})
    assert not check.agreed({**row, "llamacpp_near_ties": [0.03, 0.4], "stop_ids_are_eog": False})
