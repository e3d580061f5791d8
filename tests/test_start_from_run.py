"""SFT -> DPO in two recipes: model.name_or_path names the SFT run, whose adapter continues training.

The reference of DPO is then the SFT model (TRL copies the starting adapter into a frozen "ref"
adapter), which the first step's loss shows: log 2 exactly when policy and reference agree, and
not if the reference were the base with the adapter off.
"""
import json
import math

import pytest
import torch
import yaml
from conftest import ROOT

from llama_recipes.errors import RecipeError
from llama_recipes.schema import load_recipe

DEMO = ROOT / "recipes" / "demo"
FAST = ["training.bf16=false", "training.report_to=none", "training.logging_steps=1", "training.warmup_steps=0"]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    from llama_recipes import pipeline

    out = tmp_path_factory.mktemp("sft")
    pipeline.train(load_recipe(DEMO / "tiny_lora.yaml", [f"output_dir={out}", *FAST, "training.max_steps=20",
                                                         "data.max_samples=160", "eval.before_after=false"]))
    return out


def dpo(out, start, *overrides):
    return load_recipe(DEMO / "tiny_dpo.yaml", [f"output_dir={out}", f"model.name_or_path={start}", *FAST, *overrides])


def test_a_run_directory_as_the_model_is_its_base_plus_its_adapter(sft_run, tmp_path):
    from llama_recipes.paths import tokenizer_path

    r = dpo(tmp_path / "dpo", sft_run)
    assert r.model.name_or_path == "builtin:tiny-llama" and r.model.adapter == str(sft_run)
    assert tokenizer_path(r.model) == str(sft_run)  # the tokenizer the SFT run trained with
    saved = r.to_dict()["model"]
    assert saved["name_or_path"] == "builtin:tiny-llama" and saved["adapter"] == str(sft_run)
    # the recipe.yaml written from it reads back as the same recipe (a rerun is the same run)
    again = load_recipe(DEMO / "tiny_dpo.yaml", [f"output_dir={tmp_path / 'dpo'}", *FAST,
                                                 f"model.adapter={sft_run}"])
    assert again.fingerprint() == r.fingerprint()


@pytest.mark.parametrize("override,needle", [
    ("method={name: full}", "trains the base's own weights and cannot continue an adapter; merge it"),
    ("method.r=8", "method.r: 16"),
    ("method={name: prompt_tuning}", "is a lora adapter and method is prompt_tuning: set method.name: lora"),
    ("objective={name: reward}", "a reward model is a sequence classifier"),
])
def test_a_method_that_cannot_continue_the_adapter_is_one_error_naming_the_fix(sft_run, tmp_path, override, needle):
    with pytest.raises(RecipeError) as e:
        load_recipe(DEMO / "tiny_dpo.yaml", [f"output_dir={tmp_path}", f"model.name_or_path={sft_run}", override,
                                             *(["data.path=builtin:topic_preference"] if "reward" in override else [])])
    assert needle in str(e.value), str(e.value)
    if "merge" in needle:
        assert f"llama-recipes export {sft_run}" in str(e.value)


def test_model_adapter_must_be_a_complete_adapter(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_config.json").write_text("{}")
    for path, needle in ((tmp_path, "holds no adapter_config.json"), (tmp_path / "half", "no adapter_model")):
        with pytest.raises(RecipeError) as e:
            load_recipe(DEMO / "tiny_dpo.yaml", [f"output_dir={tmp_path / 'o'}", f"model.adapter={path}"])
        assert needle in str(e.value)


def test_dpo_continues_the_sft_adapter_against_the_sft_model(sft_run, tmp_path):
    from safetensors.torch import load_file

    from llama_recipes import pipeline
    from llama_recipes.export import merge_and_export

    ov = ["training.max_steps=3", "data.max_samples=48", "data.max_eval_samples=16"]
    run = pipeline.train(dpo(tmp_path / "dpo", sft_run, *ov))
    losses = [h["loss"] for h in run.trainer.state.log_history if "loss" in h]
    # step 1: the policy is the SFT model and so is the reference -> every pair's margin is 0
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5), losses
    # (its "before" numbers equal the merged SFT model's: test_objectives.py::test_sft_then_dpo_on_the_merged_run)

    # the artifact: one adapter of the SFT adapter's shape, moved from it, on the SFT run's base
    sft = load_file(sft_run / "adapter_model.safetensors")
    got = load_file(tmp_path / "dpo" / "adapter_model.safetensors")
    assert set(got) == set(sft)
    moved = [k for k in got if not torch.equal(got[k], sft[k])]
    assert moved and all(torch.allclose(got[k], sft[k], atol=0.05) for k in got)
    assert not (tmp_path / "dpo" / "ref").exists()
    assert json.loads((tmp_path / "dpo" / "adapter_config.json").read_text())["r"] == 16
    saved = yaml.safe_load((tmp_path / "dpo" / "recipe.yaml").read_text())["model"]
    assert saved["name_or_path"] == "builtin:tiny-llama" and saved["adapter"] == str(sft_run)

    # --eval-only repeats the run's numbers, the implicit reward against the SFT model (the reference it
    # trained against, not the base with the adapter off); --base is the model training started from
    from llama_recipes.cli import main as cli_main

    args = [str(DEMO / "tiny_dpo.yaml"), f"output_dir={tmp_path / 'dpo'}", f"model.name_or_path={sft_run}", *FAST, *ov]
    for flags, tag, sub in (([], "eval_after", "eval"), (["--base"], "eval_before", "eval/base")):
        assert cli_main([*args, "--eval-only", *flags]) == 0
        got = json.loads((tmp_path / "dpo" / sub / "eval_results.json").read_text())["metrics"]
        keys = ["preference_accuracy", "logp_margin"] + (["reward_accuracy", "reward_margin"] if not flags else [])
        for k in keys:
            assert got[k] == pytest.approx(run.metrics[tag][k], abs=1e-4), (tag, k)

    # export merges it into that base alone: the same logits as the trained model
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merge_and_export(run.output_dir, tmp_path / "merged")).eval()
    batch = run.tokenizer(["Which topic is this sentence about?"], return_tensors="pt")
    with torch.inference_mode():
        want = run.model.eval()(**batch).logits
        assert (merged(**batch).logits - want).abs().max().item() < 1e-4


def test_a_run_directory_written_before_model_adapter_existed_is_the_same_run(tmp_path):
    from llama_recipes.schema import same_run

    r = load_recipe(DEMO / "tiny_lora.yaml", [f"output_dir={tmp_path}"])
    saved = r.to_dict()
    assert saved["model"]["adapter"] is None
    del saved["model"]["adapter"]
    assert same_run(saved, r)
    saved["model"]["adapter"] = "outputs/other"
    assert not same_run(saved, r)


def test_a_missing_run_named_by_a_shipped_recipe_says_which_recipe_writes_it():
    """SFT -> GRPO before the SFT demo ran: the error names the recipe whose output_dir the model path is."""
    from llama_recipes import modeling

    hint = modeling._hub_hint("outputs/demo_smollm2_lora")
    assert hint.endswith("it is the output_dir of recipes/demo/smollm2_lora.yaml: run that recipe first"), hint
    assert "run that recipe first" not in modeling._hub_hint("meta-llama/Llama-2-7b-hf")
