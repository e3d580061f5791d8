"""The demos' recorded numbers (docs/real_model_numbers.json, shown in README.md and
docs/real_models.md) reproduce: each demo runs again, as shipped, and its held-out numbers before
and after training are compared with the recorded ones.

Tolerance (stated in docs/real_models.md, "How exactly these reproduce"):
- on the kernel path the numbers were recorded on (torch's CPU capability, e.g. AVX512), the run is
  deterministic: every number equal to SAME_PATH_REL (fp32 printing noise, not training noise);
- on another kernel path (AVX2 vs AVX512 sum in another order) the before numbers still agree to
  SAME_PATH_REL x 100, while the after-training numbers may move by OTHER_PATH: training amplifies
  rounding differences over its steps.

`.ci/run` runs the tiny demo's check (about a minute); `make test-all` runs them all (the smollm2
demos take about 5 minutes each on 2 cores).
"""
import importlib.util
import json
import math

import pytest
from conftest import ROOT

NUMBERS = json.loads((ROOT / "docs" / "real_model_numbers.json").read_text())["demos"]
_spec = importlib.util.spec_from_file_location("real_model_numbers", ROOT / "scripts" / "real_model_numbers.py")
SCRIPT = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(SCRIPT)
SAME_PATH_REL = 1e-5
OTHER_PATH = {"loss": 0.05, "perplexity": 0.15, "exact_match": 0.05, "rougeL": 0.05, "accuracy": 0.05,
              "macro_f1": 0.05, "preference_accuracy": 0.05, "reward_accuracy": 0.05,
              "harness_exact_match": 0.05, "harness_acc": 0.05,
              # GRPO samples its training data: one token drawn otherwise changes every later step
              "reward_mean": 0.15, "reward_mean_": 0.15, "reward_pass_rate_": 0.15, "completion_length_mean": 0.5,
              }  # relative for loss/perplexity/length, absolute for the scores in [0, 1] and the rewards
COMPARED = ("loss", "perplexity", "exact_match", "rougeL", "accuracy", "macro_f1", "preference_accuracy",
            "reward_accuracy", "harness_exact_match", "harness_acc", "reward_mean", "completion_length_mean",
            "examples", "tokens")
PER_REWARD = SCRIPT.REWARD_KEYS  # GRPO's per-reward keys (named after each reward)
# demos that start from another demo's run, as their recipe's header says: (that demo, merged first or continued)
STARTS_FROM = {"smollm2_dpo": ("smollm2_lora", "merged"), "smollm2_grpo": ("smollm2_lora", "continued")}


def capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def close(key: str, got: float, want: float, same_path: bool, after: bool) -> bool:
    if key in ("examples", "tokens"):
        return got == want
    if same_path or not after:
        rel = SAME_PATH_REL * (1 if same_path else 100)
        return math.isclose(got, want, rel_tol=rel, abs_tol=rel)
    key = next((k for k in PER_REWARD if key.startswith(k)), key)
    if key in ("loss", "perplexity", "completion_length_mean"):
        return math.isclose(got, want, rel_tol=OTHER_PATH[key])
    return abs(got - want) <= OTHER_PATH[key]


def demo(name: str):
    marks = [pytest.mark.slow] + ([pytest.mark.smollm2] if name.startswith("smollm2_") else [])
    if name in STARTS_FROM:  # two SmolLM2 runs (SFT, then GRPO: ~4 + ~7 min idle) pass the suite's 600 s limit
        marks.append(pytest.mark.timeout(2400))
    return pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", [demo(n) for n in sorted(NUMBERS)])
def test_recorded_demo_numbers_reproduce(name, tmp_path):
    from llama_recipes import pipeline
    from llama_recipes.schema import load_recipe

    rec = NUMBERS[name]
    overrides = [f"output_dir={tmp_path / 'out'}"]
    if name in STARTS_FROM:  # SFT -> DPO / GRPO: the SFT demo, then this one on top (of its merged model, or its run)
        from llama_recipes.export import merge_and_export

        demo_first, how = STARTS_FROM[name]
        first = load_recipe(ROOT / NUMBERS[demo_first]["recipe"], [f"output_dir={tmp_path / 'first'}"])
        pipeline.train(first)
        if how == "merged":
            merge_and_export(tmp_path / "first", tmp_path / "merged")
        overrides.append(f"model.name_or_path={tmp_path / ('merged' if how == 'merged' else 'first')}")
    run = pipeline.train(load_recipe(ROOT / rec["recipe"], overrides))
    m = run.metrics
    assert (m["trainable_params"], m["total_params"], m["train"]["global_step"]) == \
        (rec["trainable_params"], rec["total_params"], rec["steps"])
    same_path = f"capability {capability()}" in rec["cpu"]
    wrong = []
    for tag, got in (("before", m["eval_before"]), ("after", m["eval_after"])):
        got = SCRIPT.numbers_of(got)
        for key, want in rec[tag].items():
            if (key in COMPARED or key.startswith(PER_REWARD)) and not close(key, got[key], want, same_path,
                                                                              tag == "after"):
                wrong.append(f"{tag} {key}: {got[key]:.6g}, recorded {want:.6g}")
    where = "the kernel path it was recorded on" if same_path else f"another kernel path ({capability()})"
    assert not wrong, (f"{name} on {where} ({rec['cpu']} recorded): " + "; ".join(wrong) +
                       ". If a change of numbers is intended: rerun the demo, then python scripts/real_model_numbers.py")
