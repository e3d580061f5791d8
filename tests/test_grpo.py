"""GRPO (objective: grpo): validation, prompt_only data, rewards (and every error of a user's reward),
exact resume after SIGKILL, the dry run, --eval-only, the memory estimate.

The tiny twin (recipes/demo/tiny_grpo.yaml) trains a few fp32 steps of LoRA on the tiny Llama;
its per-step losses and rewards are pinned in tests/pinned_losses.json (tests/test_pinned_losses.py).
"""
import argparse
import json
import math
import signal

import pytest
import yaml
from conftest import FP32, ROOT, run_cli

from llama_recipes import dryrun, rewards
from llama_recipes.cli import main as cli_main
from llama_recipes.errors import RecipeError, UserError
from llama_recipes.runtime import resilience
from llama_recipes.schema import load_recipe, validate_recipe

TWIN = ROOT / "recipes" / "demo" / "tiny_grpo.yaml"
SMALL = [FP32, "training.report_to=none", "data.max_samples=32", "data.max_eval_samples=8", "eval.limit=8",
         "training.logging_steps=1"]


def twin_dict() -> dict:
    return yaml.safe_load(TWIN.read_text())


def recipe_with(tmp_path, name="r.yaml", **sections) -> dict:
    d = twin_dict()
    d["output_dir"] = str(tmp_path / "out")
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    return d


# -- validation (no model loads) ----------------------------------------------------------------


def test_twin_validates_with_settings_typed_from_trl(tmp_path):
    r = load_recipe(TWIN)
    assert r.objective.name == "grpo" and r.objective.num_generations == 4 and r.objective.max_completion_length == 8
    assert [x.label() for x in r.objective.rewards] == ["exact_match_answer", "topic_first", "length_penalty"]
    from llama_recipes.schema.objective import trainer_settings

    settings = trainer_settings(r.objective)
    assert "rewards" not in settings and settings["num_generations"] == 4 and settings["beta"] == 0.0


@pytest.mark.parametrize("change,expect", [
    ({"objective": {"rewards": []}}, "needs at least one reward"),
    ({"objective": {"rewards": [{"exact_match": "answer", "regex": "x"}]}}, "exactly one of"),
    ({"objective": {"rewards": [{"regex": "(unclosed"}]}}, "not a valid regular expression"),
    ({"objective": {"rewards": [{"regex": "a"}, {"regex": "b"}]}}, "two rewards are named 'regex'"),
    ({"objective": {"reward_weights": [1.0]}}, "its own `weight:`"),
    ({"objective": {"num_generations": 1}}, "greater than or equal to 2"),
    ({"objective": {"loss_type": "grpoo"}}, "loss_type"),
    ({"objective": {"loss_type": "dapo", "importance_sampling_level": "sequence"}}, "normalises per token"),
    ({"objective": {"use_vllm": True}}, "vLLM is not installed"),
    ({"objective": {"tempreature": 0.7}}, "unknown key `tempreature`"),
    ({"training": {"num_generations": 4}}, "training.num_generations: unknown key"),
    ({"training": {"max_length": 64}}, "not a field of TRL's GRPOConfig"),
    ({"objective": {"rewards": [{"function": "rewards.txt:f"}]}}, "PATH.py:FUNCTION"),
    ({"objective": {"rewards": [{"reward_model": "/nonexistent/rm"}]}}, "reward_model directory /nonexistent/rm not found"),
    ({"objective": {"rewards": [{"regex": "a"}]}, "data": {"format": "alpaca"}}, "cannot train objective grpo"),
    ({"objective": {"name": "sft"}, "data": {"format": "prompt_only"}}, "cannot train objective sft"),
])
def test_bad_grpo_recipes_are_refused_before_anything_loads(tmp_path, change, expect):
    d = recipe_with(tmp_path, **change)
    if change.get("objective", {}).get("name") == "sft":
        d["objective"] = {"name": "sft"}
    with pytest.raises(RecipeError, match=expect):
        validate_recipe(d)


def _write(tmp_path, body: str, name="my_rewards.py"):
    (tmp_path / name).write_text(body)


def _with_function(tmp_path, ref: str) -> RecipeError | None:
    d = twin_dict()
    d["output_dir"] = str(tmp_path / "out")
    d["objective"]["rewards"] = [{"function": ref}]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    try:
        load_recipe(tmp_path / "r.yaml")
    except RecipeError as e:
        return e
    return None


def test_function_path_is_relative_to_the_recipe_and_checked_without_running_it(tmp_path):
    _write(tmp_path, "raise SystemExit('must not run at validation')\n"
                     "def good(completions, **kwargs):\n    return [0.0] * len(completions)\n"
                     "def no_kwargs(completions):\n    return []\n"
                     "def no_completions(prompts):\n    return []\n"
                     "def positional(completions, /, **kw):\n    return []\n")
    assert _with_function(tmp_path, "my_rewards.py:good") is None  # found next to the recipe, not in the cwd
    r = load_recipe(tmp_path / "r.yaml")
    assert r.objective.rewards[0].function == f"{tmp_path / 'my_rewards.py'}:good"
    assert "file " in str(_with_function(tmp_path, "missing.py:good")) and "not found" in str(
        _with_function(tmp_path, "missing.py:good"))
    assert "defines no function 'absent'" in str(_with_function(tmp_path, "my_rewards.py:absent"))
    assert "has no **kwargs" in str(_with_function(tmp_path, "my_rewards.py:no_kwargs"))
    assert "takes no `completions`" in str(_with_function(tmp_path, "my_rewards.py:no_completions"))
    assert "positional-only" in str(_with_function(tmp_path, "my_rewards.py:positional"))


def test_reward_code_never_runs_from_a_data_directory(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "train.jsonl").write_text(json.dumps({"prompt": "hi", "answer": "a"}) + "\n")
    (data_dir / "evil.py").write_text("def f(completions, **kw):\n    return [1.0] * len(completions)\n")
    d = twin_dict()
    d.update(output_dir=str(tmp_path / "out"), data={"path": str(data_dir), "format": "prompt_only"})
    d["objective"]["rewards"] = [{"function": str(data_dir / "evil.py") + ":f"}]
    with pytest.raises(RecipeError, match="never runs from a dataset or a model"):
        validate_recipe(d)


# -- reward functions ---------------------------------------------------------------------------


def _reward(tmp_path, body: str, func="f"):
    from llama_recipes.schema.grpo import RewardConfig

    _write(tmp_path, body)
    return rewards.load_function(RewardConfig(function=f"{tmp_path / 'my_rewards.py'}:{func}"))


@pytest.mark.parametrize("body,expect", [
    ("def f(completions, **kw):\n    return [1.0]\n", "returned 1 values for 2 completions"),
    ("def f(completions, **kw):\n    return [1.0, float('nan')]\n", "returned nan for completion 1"),
    ("def f(completions, **kw):\n    return [1.0, None]\n", "returned None .* for completion 1, not a number"),
    ("def f(completions, **kw):\n    return 1.0\n", "returned float, not a list"),
    ("def f(completions, **kw):\n    return [len(c) / 0 for c in completions]\n",
     r"raised ZeroDivisionError: division by zero at .*my_rewards.py:2"),
])
def test_a_bad_reward_value_is_one_error_naming_the_reward(tmp_path, body, expect):
    fn = _reward(tmp_path, body)
    with pytest.raises(UserError, match=f"reward f.*{expect}"):
        fn(prompts=["p", "q"], completions=["a", "bb"], completion_ids=[[1], [2, 3]])


def test_user_reward_gets_columns_and_its_values_checked(tmp_path):
    fn = _reward(tmp_path, "import numpy as np\n"
                           "def f(completions, answer, **kw):\n"
                           "    return np.array([float(c == a) for c, a in zip(completions, answer)])\n")
    assert fn(prompts=["p", "q"], completions=["x", "y"], completion_ids=[[1], [2]], answer=["x", "z"]) == [1.0, 0.0]
    with pytest.raises(UserError, match="wrong signature"):
        _reward(tmp_path, "g = lambda completions: [0.0]\n", func="g")
    with pytest.raises(UserError, match="importing .* raised ModuleNotFoundError"):
        _reward(tmp_path, "import not_a_module_here\ndef f(completions, **kw):\n    return []\n")


def test_builtin_rewards_score_as_documented():
    from llama_recipes.schema.grpo import RewardConfig

    exact = rewards.ExactMatch(RewardConfig(exact_match="answer", extract=r"answer: (\w+)"))
    comps = ["so answer: Food.", "food", [{"role": "assistant", "content": "answer: weather"}]]
    assert exact(completions=comps, answer=["food", "food", "food"]) == [1.0, 0.0, 0.0]
    assert rewards.ExactMatch(RewardConfig(exact_match="a"))(completions=[" Food. ", "food!"], a=["food"] * 2) == [1.0, 0.0]
    assert rewards.Regex(RewardConfig(regex=r"^\w+$"))(completions=["ok", "not ok"]) == [1.0, 0.0]
    pen = rewards.LengthPenalty(RewardConfig(length_penalty=4), max_completion_length=8)
    assert pen(completion_ids=[[1] * 3, [1] * 6, [1] * 8, [1] * 20]) == [0.0, -0.5, -1.0, -1.0]
    total = rewards.score([exact, pen], None, ["answer: food", "x"], [[1] * 6, [1]], {"answer": ["food", "food"]})
    assert total["reward"] == [1.0 * 1 + 1.0 * -0.5, 0.0]


# -- data ---------------------------------------------------------------------------------------


def test_prompt_only_keeps_the_columns_rewards_read(tmp_path):
    from llama_recipes import data

    r = load_recipe(TWIN)
    built = data.build_datasets(r.data, r.formats)
    assert built[2] == "prompt_only" and built[0].column_names == ["prompt", "answer"]
    assert built[0][0]["answer"] in ("animals", "colours", "food", "weather")
    rows = [{"prompt": [{"role": "user", "content": "q"}], "answer": "a", "tests": "t"},
            {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}], "answer": "b",
             "tests": "t"}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    cfg = r.data.model_copy(update={"path": str(path), "eval_split": None, "bad_rows": "skip"})
    built = data.build_datasets(cfg, r.formats)
    assert len(built[0]) == 1 and built[0].column_names == ["prompt", "answer", "tests"]
    with pytest.raises(UserError, match="ends with an assistant turn"):
        data.build_datasets(cfg.model_copy(update={"bad_rows": "error"}), r.formats)


# -- memory -------------------------------------------------------------------------------------


def test_memory_estimate_counts_generation_and_the_reference():
    from llama_recipes import memory

    def est(*ov):
        return memory.estimate_recipe(load_recipe(TWIN, list(ov)))[2]

    base = est()
    longer = est("objective.max_completion_length=72")  # 256 + 72 = 2 x (256 + 8) tokens per sequence... + 0
    assert longer.buffers > 1.2 * base.buffers and longer.act_plain > base.act_plain
    assert any("KV cache" in n for n in base.notes)
    assert est("objective.beta=0.1").weights == base.weights  # LoRA: the adapter switched off, no copy
    full = est("method={name: full}")
    full_ref = est("method={name: full}", "objective.beta=0.1")
    assert full_ref.weights - full.weights == pytest.approx(full.total_params * 2, rel=0.01)  # bf16 copy


# -- training lifecycle (tiny model) ------------------------------------------------------------


def step_log(out) -> dict[int, tuple[float, float]]:
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    return {h["step"]: (h["loss"], h["reward"]) for h in history if "loss" in h}


def test_sigkill_then_resume_draws_the_same_completions_as_an_uninterrupted_run(tmp_path):
    """Killed while writing checkpoint-4, resumed from checkpoint-2: every step's loss and mean reward equal an
    uninterrupted run's (sampling is seeded per step), and --eval-only reproduces training's eval_after."""
    from test_resilience import spawn, wait_for

    def write(out, name, before_after):
        d = recipe_with(tmp_path, output_dir=str(out))
        d["training"].update(max_steps=6, save_strategy="steps", save_steps=2, logging_steps=1, bf16=False,
                             report_to="none")
        d["data"].update(max_samples=32, max_eval_samples=8)
        d["eval"] = {"before_after": before_after, "limit": 8, "batch_size": 8}
        (tmp_path / name).write_text(yaml.safe_dump(d))
        return tmp_path / name

    out = tmp_path / "killed"
    recipe = write(out, "killed.yaml", False)
    proc = spawn(recipe, {resilience.SAVE_HOOK_ENV: "4:pause", "OMP_NUM_THREADS": "1"})
    try:
        wait_for(out / resilience.STAGING / "checkpoint-4" / "trainer_state.json", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert resilience.newest_checkpoint(out) == out / "checkpoint-2"
    assert cli_main([str(recipe)]) == 0  # resumes from checkpoint-2
    ref_out = tmp_path / "ref"
    ref_recipe = write(ref_out, "ref.yaml", True)
    assert cli_main([str(ref_recipe)]) == 0
    killed, ref = step_log(out), step_log(ref_out)
    assert sorted(killed) == list(range(1, 7)) == sorted(ref)
    for step in ref:
        assert killed[step][0] == pytest.approx(ref[step][0], abs=1e-6), step
        assert killed[step][1] == pytest.approx(ref[step][1], abs=1e-6), step
    assert len({r for _, r in ref.values()}) > 1  # the rewards moved: the comparison compares something

    metrics = json.loads((ref_out / "metrics.json").read_text())
    after = metrics["eval_after"]
    assert {"reward_mean", "reward_mean_exact_match_answer", "reward_pass_rate_exact_match_answer",
            "completion_length_mean", "reward_examples"} <= set(after)
    assert all(math.isfinite(after[k]) for k in after if k.startswith("reward_mean"))
    assert cli_main([str(ref_recipe), "--eval-only"]) == 0
    again = json.loads((ref_out / "eval" / "eval_results.json").read_text())["metrics"]
    for k, v in again.items():
        assert v == pytest.approx(after[k], abs=1e-9), k


def test_dry_run_passes_and_the_reloaded_adapter_scores_the_same_reward(tmp_path, capsys):
    recipe = load_recipe(TWIN, [*SMALL, f"output_dir={tmp_path / 'real'}"])
    assert dryrun.main(recipe, argparse.Namespace()) == 0
    out = capsys.readouterr().out
    for stage in ("train", "save", "reload", "eval", "timing"):
        assert f"PASS  {stage}" in out, out
    assert "reloaded model: reward_mean" in out and "dry run: PASS" in out
    assert not (tmp_path / "real").exists()


def test_a_reward_returning_nan_stops_the_run_with_one_error(tmp_path):
    _write(tmp_path, "def broken(completions, **kw):\n    return [float('nan')] * len(completions)\n")
    d = recipe_with(tmp_path)
    d["objective"]["rewards"] = [{"function": "my_rewards.py:broken"}]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    r = run_cli(str(tmp_path / "r.yaml"), *SMALL, "training.max_steps=2", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stderr[-3000:]
    assert "reward broken returned nan for completion 0" in r.stderr and "Traceback" not in r.stderr


# -- reward models ------------------------------------------------------------------------------


def test_a_reward_model_directory_scores_prompt_plus_completion(tmp_path):
    """A saved one-output sequence classifier scores each prompt + completion as its own forward does."""
    import torch
    from conftest import TINY
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(TINY, num_labels=1)
    tok = AutoTokenizer.from_pretrained(TINY)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    d = recipe_with(tmp_path)
    d["objective"]["rewards"] = [{"reward_model": str(tmp_path / "rm"), "weight": 2.0}]
    recipe = validate_recipe(d)
    (fn,) = rewards.build(recipe, ["prompt", "answer"])
    assert fn.__name__ == "rm_rm" and fn.weight == 2.0
    prompts, comps = ["The cat", "A very long prompt about the weather today"], [" is red.", " rain"]
    got = fn(prompts=prompts, completions=comps, completion_ids=[[1], [1]])
    rm.eval()
    with torch.inference_mode():
        want = [rm(**tok(p + c, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
                for p, c in zip(prompts, comps)]
    assert got == pytest.approx(want, abs=1e-5) and got[0] != got[1]
    d["objective"]["rewards"] = [{"reward_model": str(TINY)}]  # a causal LM is not a reward model
    with pytest.raises(UserError, match="outputs; a reward model has one|not a reward model|num_labels"):
        rewards.build(validate_recipe(d), ["prompt", "answer"])


@pytest.mark.slow  # ~60 s: two runs, one of them 2 processes
def test_two_rank_ddp_equals_one_rank(tmp_path):
    """Each group of completions is sampled from its own (seed, step, group) seed, so 2 ranks x 4 rows draw what
    1 rank x 8 rows draws: equal per-step losses and rewards."""
    import os
    import subprocess
    import sys

    from conftest import free_port

    common = [FP32, "training.report_to=none", "training.max_steps=3", "training.logging_steps=1",
              "eval.before_after=false", "data.max_samples=32"]
    one = tmp_path / "one"
    assert cli_main([str(TWIN), *common, "training.per_device_train_batch_size=8", f"output_dir={one}"]) == 0
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / "cpu_ddp_2proc.yaml"), "--main_process_port", str(free_port()),
           str(ROOT / "run_recipe.py"), str(TWIN), *common, "training.per_device_train_batch_size=4",
           f"output_dir={two}"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = step_log(one), step_log(two)
    assert sorted(a) == [1, 2, 3] == sorted(b)
    for step in a:
        assert b[step][0] == pytest.approx(a[step][0], abs=1e-5), step
        assert b[step][1] == pytest.approx(a[step][1], abs=1e-6), step


# -- the sampler (objectives/grpo.sample_groups) ---------------------------------------------------


def test_group_sampler_draws_from_the_softmax_of_the_warped_scores():
    """Gumbel-max per group: over 20,000 draws the frequencies match softmax(scores) within 0.015, the -inf
    scores (filtered by a warper) are never drawn, and each group's draws depend on its own seed only."""
    import torch

    from llama_recipes.objectives.grpo import GroupSampler

    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]]).repeat(20_000, 1)
    counts = torch.zeros(5)
    picks = GroupSampler([7], 20_000)(None, scores).argmax(-1)
    counts.index_add_(0, picks, torch.ones(len(picks)))
    want = torch.softmax(scores[0], -1)
    assert (counts / len(picks) - want).abs().max() < 0.015
    assert counts[4] == 0
    two = GroupSampler([7, 8], 3)(None, scores[:6]).argmax(-1)  # group 0 alone, then beside another group
    assert torch.equal(two[:3], GroupSampler([7], 3)(None, scores[:3]).argmax(-1))
    assert torch.equal(two[3:], GroupSampler([8], 3)(None, scores[:3]).argmax(-1))


def test_a_groups_completions_do_not_depend_on_the_batch_it_is_in(tiny_path):
    """What makes resume and 2-rank DDP exact: a prompt's group sampled alone, or after a longer prompt (left
    padding, a shared prefill), draws the same tokens. And the prompt's KV cache, filled once and repeated,
    gives what full generation gives: with top_k=1 the samples are the greedy continuation of plain generate."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from llama_recipes.objectives.grpo import sample_groups

    model = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    short, long = [1, 40, 41, 42], [1, 50, 51, 52, 53, 54, 55, 56, 57]
    cfg = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=1.0, pad_token_id=0)
    eos = [2]
    with torch.no_grad():
        alone = sample_groups(model, [short], 4, [11], cfg, eos, 0)
        batched = sample_groups(model, [long, short], 4, [5, 11], cfg, eos, 0)
        assert batched[4:] == alone
        assert len({tuple(c) for c in alone}) > 1  # sampled: the group's completions differ
        cfg.top_k = 1
        greedy = sample_groups(model, [long, short], 2, [5, 11], cfg, eos, 0)
        plain = model.generate(torch.tensor([short]), max_new_tokens=12, do_sample=False, pad_token_id=0,
                               eos_token_id=eos)[0, len(short):].tolist()
    end = plain.index(2) + 1 if 2 in plain else len(plain)
    assert greedy[2] == greedy[3] == plain[:end]
