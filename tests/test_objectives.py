"""The objective axis: method x objective combinations, preference data, and the preference objectives
(DPO, KTO, ORPO, CPO, SimPO, reward) through the one lifecycle: learning, reference model, dry run,
--eval-only, resume, export.

Runs are the tiny twins (recipes/demo/tiny_<objective>.yaml: LoRA on the tiny Llama, fp32), shrunk.
Their per-step losses are pinned in tests/pinned_losses.json (tests/test_pinned_losses.py).
"""
import json
import signal

import pytest
import torch
import yaml
from conftest import ROOT, run_cli

from llama_recipes.errors import RecipeError, UserError
from llama_recipes.schema import load_recipe, validate_recipe
from llama_recipes.schema.method import METHOD_NAMES, method_defaults
from llama_recipes.schema.objective import OBJECTIVE_NAMES, SPECS, refusal

DEMO = ROOT / "recipes" / "demo"
FAST = ["training.bf16=false", "training.report_to=none", "training.logging_steps=1", "training.warmup_steps=0"]


def recipe(name: str, out, *overrides):
    return load_recipe(DEMO / f"{name}.yaml", [f"output_dir={out}", *FAST, *overrides])


def as_shipped(name: str, out, *overrides):
    """The twin's own schedule (warmup included: DPO on the tiny model does not learn without it), fp32."""
    return load_recipe(DEMO / f"{name}.yaml", [f"output_dir={out}", "training.bf16=false", "training.report_to=none",
                                              *overrides])


def base_dict(method: str, objective: str) -> dict:
    fmt = SPECS[objective].formats[0]
    data = {"preference": "builtin:topic_preference", "unpaired_preference": "builtin:topic_unpaired",
            "classification": "builtin:classify", "prompt_only": "builtin:topic_prompts"}.get(fmt, "builtin:topic")
    training = {"activation_checkpointing": False}
    return {"output_dir": "/tmp/x", "model": {"name_or_path": "builtin:tiny-llama"},
            "data": {"path": data, "format": fmt},
            "method": {"name": method, **({"bits": 4, "compute_dtype": "float32"} if method == "qlora" else {})},
            **({"freeze": {"train": ["layers.3"]}} if method == "partial" else {}),
            "objective": {"name": objective, **({"rewards": [{"length_penalty": 8}]} if objective == "grpo" else {})},
            "training": training}


# -- the two axes in the schema ------------------------------------------------------------------
@pytest.mark.parametrize("objective", OBJECTIVE_NAMES)
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_objective_pair_validates_or_is_refused_in_one_line(method, objective):
    d = base_dict(method, objective)
    if method == "qlora":
        d["model"]["dtype"] = "float32"
    why = refusal(method, objective)
    if not why:
        r = validate_recipe(d)
        assert (r.method.name, r.objective.name) == (method, objective)
        return
    with pytest.raises(RecipeError) as e:
        validate_recipe(d)
    lines = [ln.strip() for ln in e.value.problem.splitlines() if ln.strip() and "invalid recipe" not in ln]
    assert lines == [f"method {method} with objective {objective}: {why}"], e.value.problem


def test_the_refused_pairs_are_the_ones_that_cannot_work():
    refused = {(m, o) for m in METHOD_NAMES for o in OBJECTIVE_NAMES if refusal(m, o)}
    heads = {"classifier_head", "mlp_head"}
    # heads train for classification only, and classification needs a head
    assert {(m, o) for m in heads for o in OBJECTIVE_NAMES if o != "classification"} <= refused
    assert {(m, "classification") for m in METHOD_NAMES if m not in heads} <= refused
    assert ("llama_adapter", "dpo") in refused and ("prompt_tuning", "reward") in refused
    # every LoRA-family, IA3, full and partial pair with an LM objective trains
    for m in ("lora", "dora", "qlora", "ia3", "full", "partial"):
        for o in ("sft", "dpo", "kto", "orpo", "cpo", "simpo", "reward"):
            assert (m, o) not in refused, (m, o)


def test_objective_defaults_by_method_and_old_run_dirs_are_the_same_run(tmp_path):
    from llama_recipes.schema import same_run

    lm = validate_recipe(base_dict("lora", "sft") | {"objective": None})
    head = validate_recipe({**base_dict("classifier_head", "classification"), "objective": None})
    assert (lm.objective.name, head.objective.name) == ("sft", "classification")
    saved = lm.to_dict()
    del saved["objective"]  # a recipe.yaml written before the objective axis
    assert same_run(saved, lm)


@pytest.mark.parametrize("override,message", [
    ("training.beta=0.2", "training.beta: unknown key"),  # no TRL config of sft has it
    ("training.packing=true", "training.packing is not a field of TRL's DPOConfig (objective dpo): remove it"),
    ("training.loss_type=dft", "training.loss_type is a setting of objective dpo: set `objective.loss_type`"),
    ("objective.loss_type=sigmiod", "objective.loss_type"),
    ("objective.beta=-1", "objective.beta"),
    ("objective.gamma=1", "objective.gamma: unknown key"),
    ("data.format=chat", "data.format chat cannot train objective dpo"),
])
def test_training_and_objective_keys_follow_the_objectives_trl_config(override, message, tmp_path):
    with pytest.raises(RecipeError) as e:
        recipe("tiny_dpo", tmp_path, override)
    assert message in e.value.problem, e.value.problem


def test_objective_settings_reach_trls_config(tmp_path):
    from trl.experimental.cpo import CPOConfig

    from llama_recipes import training

    r = recipe("tiny_simpo", tmp_path, "objective.simpo_gamma=0.7")
    args = training.trl_config(r, CPOConfig)
    assert (args.loss_type, args.cpo_alpha, args.simpo_gamma, args.beta) == ("simpo", 0.0, 0.7, 2.0)
    # what the recipe did not set is TRL's (DPOConfig's learning rate default is not SFTConfig's)
    from trl import DPOConfig

    r = recipe("tiny_dpo", tmp_path, "objective.loss_type=[sigmoid, sft]", "objective.loss_weights=[1.0, 0.5]")
    args = training.trl_config(r, DPOConfig)
    assert args.loss_type == ["sigmoid", "sft"] and args.loss_weights == [1.0, 0.5]


# -- preference data ---------------------------------------------------------------------------
def write_rows(tmp_path, rows, name="train.jsonl"):
    path = tmp_path / "data"
    path.mkdir(exist_ok=True)
    (path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5"}
CONV = {"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]}


@pytest.mark.parametrize("bad,problem", [
    ({**GOOD, "rejected": " 4"}, "chosen and rejected are the same"),
    ({**GOOD, "chosen": "  "}, "column `chosen`: empty"),
    ({**GOOD, "rejected": None}, "column `rejected`: missing value"),
    ({"chosen": CONV["chosen"], "rejected": [{"role": "user", "content": "3+3?"}, CONV["rejected"][1]]},
     "differ before their last message"),
    ({"chosen": CONV["chosen"][1:], "rejected": CONV["rejected"][1:]}, "hold only the answer"),
    ({"prompt": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5"}, "mix plain text and message"),
])
def test_bad_preference_rows_are_named_or_skipped_and_counted(tmp_path, bad, problem):
    from llama_recipes import data
    from llama_recipes.schema.data import DataConfig

    good = CONV if isinstance(bad.get("chosen"), list) else GOOD
    path = write_rows(tmp_path, [good, bad, good])
    with pytest.raises(UserError, match=f"row 1: .*{problem}"):
        data.build_datasets(DataConfig(path=str(path), format="preference"))
    built = data.build_datasets(DataConfig(path=str(path), format="preference", bad_rows="skip"))
    assert len(built[0]) == 2 and built.stats["skipped_rows"] == 1


def test_preference_rows_render_to_trls_explicit_prompt_form(tmp_path):
    from llama_recipes import data
    from llama_recipes.schema.data import DataConfig

    rows = [CONV, {**GOOD}, {"prompt": "p", "completion": "c", "label": True}]
    conv = data.build_datasets(DataConfig(path=str(write_rows(tmp_path, rows[:1])))).__getitem__(0)
    assert conv[0] == {"prompt": [CONV["chosen"][0]], "chosen": [CONV["chosen"][1]], "rejected": [CONV["rejected"][1]]}
    text = data.build_datasets(DataConfig(path=str(write_rows(tmp_path, rows[1:2], "t.jsonl")), split="t"))
    assert text[2] == "preference" and text[0][0] == GOOD  # detected from the columns
    kto = data.build_datasets(DataConfig(path=str(write_rows(tmp_path, rows[2:], "k.jsonl")), split="k"))
    assert kto[2] == "unpaired_preference" and kto[0][0] == {"prompt": "p", "completion": "c", "label": True}
    bad = write_rows(tmp_path, [{"prompt": "p", "completion": "c", "label": "yes"}], "b.jsonl")
    with pytest.raises(UserError, match="column `label`: expected true .* got 'yes'"):
        data.build_datasets(DataConfig(path=str(bad), split="b"))


def test_sft_data_under_a_preference_objective_is_refused_before_loading(tmp_path):
    from llama_recipes import pipeline

    r = recipe("tiny_dpo", tmp_path, "data.path=builtin:topic", "data.format=auto")
    with pytest.raises(UserError, match="holds alpaca data .* trains on preference data"):
        pipeline.train(r)


# -- training: it learns, measured on held-out pairs -----------------------------------------------
def test_dpo_raises_held_out_preference_accuracy_and_trains_only_the_adapter(tmp_path):
    from llama_recipes import pipeline

    # the twin as shipped (40 steps; it learns from step ~15 on), on 100 of its held-out pairs
    run = pipeline.train(as_shipped("tiny_dpo", tmp_path, "data.max_eval_samples=100"))
    before, after = run.metrics["eval_before"], run.metrics["eval_after"]
    assert before["examples"] == after["examples"] == 100
    assert before["preference_accuracy"] < 0.6 and after["preference_accuracy"] >= 0.8, (before, after)
    assert after["logp_margin"] > before["logp_margin"] + 1.0
    assert after["reward_accuracy"] >= 0.9 and after["reward_margin"] > 0
    # the reference is the base with the adapter off: no second model in memory
    assert run.trainer.ref_model is None
    assert run.metrics["objective"] == "dpo"
    trained = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"adapter_model.safetensors", "metrics.json"} <= files and "ref" not in files


def test_full_fine_tuning_dpo_keeps_a_frozen_reference_unless_precomputed(tmp_path):
    from llama_recipes import pipeline

    small = ["training.max_steps=1", "data.max_samples=8", "data.max_eval_samples=4", "method={name: full}",
             "eval.before_after=false"]
    run = pipeline.train(recipe("tiny_dpo", tmp_path / "copy", *small))
    ref = run.trainer.ref_model
    assert ref is not None and not any(p.requires_grad for p in ref.parameters())
    assert sum(p.numel() for p in ref.parameters()) == sum(p.numel() for p in run.model.parameters())
    run = pipeline.train(recipe("tiny_dpo", tmp_path / "pre", *small, "objective.precompute_ref_log_probs=true"))
    assert run.trainer.ref_model is None


def test_memory_estimate_counts_the_reference_copy_and_the_doubled_batch():
    from llama_recipes import memory

    def est(*ov):
        shape, _, e = memory.estimate_recipe(load_recipe(DEMO / "tiny_dpo.yaml", list(ov)))
        return e, shape

    lora, shape = est()
    full, _ = est("method={name: full}")
    pre, _ = est("method={name: full}", "objective.precompute_ref_log_probs=true")
    sft, _ = est("objective={name: sft}", "data.path=builtin:topic", "data.format=alpaca")
    assert lora.reference == 0 and pre.reference == 0
    assert full.reference == shape.total * 4  # fp32 frozen copy
    assert lora.act_plain == pytest.approx(2 * sft.act_plain)  # chosen + rejected per row


@pytest.mark.parametrize("name,metric", [("tiny_reward", "pairwise_accuracy"),
                                         pytest.param("tiny_kto", "logp_margin", marks=pytest.mark.slow),
                                         ("tiny_orpo", "preference_accuracy")])
def test_other_objectives_learn_on_held_out_data(tmp_path, name, metric):
    from llama_recipes import pipeline

    run = pipeline.train(as_shipped(name, tmp_path, "data.max_eval_samples=100"))  # the twin as shipped (40 steps)
    before, after = run.metrics["eval_before"], run.metrics["eval_after"]
    assert after[metric] > before[metric] + (0.3 if metric == "logp_margin" else 0.2), (before, after)
    if name == "tiny_reward":
        assert after["pairwise_accuracy"] >= 0.7
        assert type(run.model.get_base_model()).__name__ == "LlamaForSequenceClassification"


# -- the same lifecycle: dry run, eval-only, export, resume -------------------------------------------
@pytest.mark.parametrize("name", ["tiny_dpo", pytest.param("tiny_reward", marks=pytest.mark.slow)])
def test_dry_run_passes(name, tmp_path):
    res = run_cli(str(DEMO / f"{name}.yaml"), f"output_dir={tmp_path}", "training.bf16=false", "--dry-run")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "dry run: PASS" in res.stdout
    metric = "pairwise_accuracy" if name == "tiny_reward" else "preference_accuracy"
    assert f"PASS  eval       reloaded model: {metric}" in res.stdout


@pytest.mark.parametrize("name,keys", [
    ("tiny_dpo", ["preference_accuracy", "logp_margin", "reward_accuracy", "reward_margin"]),
    ("tiny_kto", ["desirable_logp", "undesirable_logp", "reward_accuracy"]),
    ("tiny_reward", ["pairwise_accuracy", "reward_margin"]),
])
def test_eval_only_reproduces_the_runs_numbers(name, keys, tmp_path):
    from llama_recipes import pipeline
    from llama_recipes.cli import main as cli_main

    ov = ["training.max_steps=6", "data.max_samples=64", "data.max_eval_samples=16"]
    run = pipeline.train(recipe(name, tmp_path, *ov))
    assert cli_main([str(DEMO / f"{name}.yaml"), f"output_dir={tmp_path}", *FAST, *ov, "--eval-only"]) == 0
    got = json.loads((tmp_path / "eval" / "eval_results.json").read_text())["metrics"]
    for k in keys:
        assert got[k] == pytest.approx(run.metrics["eval_after"][k], abs=1e-4), k


def test_export_merges_a_dpo_adapter_and_a_reward_model_is_a_sequence_classifier(tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from llama_recipes import pipeline
    from llama_recipes.export import merge_and_export

    ov = ["training.max_steps=2", "data.max_samples=16", "eval.before_after=false"]
    for name, cls in (("tiny_dpo", AutoModelForCausalLM), ("tiny_reward", AutoModelForSequenceClassification)):
        run = pipeline.train(recipe(name, tmp_path / name, *ov))
        merged = merge_and_export(run.output_dir, tmp_path / f"{name}_merged")
        model = cls.from_pretrained(merged).eval()
        batch = run.tokenizer(["Which topic is this sentence about?"], return_tensors="pt")
        with torch.inference_mode():
            want = run.model.eval()(**batch).logits
            got = model(**batch).logits
        assert got.shape == want.shape and (got - want).abs().max().item() < 1e-4, name


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_dpo_losses(tmp_path):
    import subprocess
    import sys
    import time

    from llama_recipes.runtime import resilience

    def write(out, name):
        d = yaml.safe_load((DEMO / "tiny_dpo.yaml").read_text())
        d["output_dir"] = str(out)
        d["method"]["dropout"] = 0.1  # resume must restore the RNG
        d["data"].update(max_samples=48, max_eval_samples=8)
        d["training"].update(max_steps=6, per_device_train_batch_size=4, save_strategy="steps", save_steps=3,
                             logging_steps=1, bf16=False, report_to="none", warmup_steps=0)
        d["eval"] = {"before_after": False}
        path = tmp_path / name
        path.write_text(yaml.safe_dump(d))
        return path

    killed, fresh = tmp_path / "killed", tmp_path / "fresh"
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_recipe.py"), str(write(killed, "k.yaml"))], cwd=ROOT,
                            env={**__import__("os").environ, resilience.SAVE_HOOK_ENV: "6:pause"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (killed / resilience.STAGING / "checkpoint-6" / "trainer_state.json").exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert resilience.newest_checkpoint(killed) == killed / "checkpoint-3"
    assert run_cli(str(write(killed, "k.yaml"))).returncode == 0
    assert run_cli(str(write(fresh, "f.yaml"))).returncode == 0

    def losses(out):
        return {h["step"]: h["loss"] for h in json.loads((out / "metrics.json").read_text())["log_history"]
                if "loss" in h}

    a, b = losses(killed), losses(fresh)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in b:
        assert a[step] == pytest.approx(b[step], abs=1e-5), step


def test_sft_then_dpo_on_the_merged_run(tmp_path):
    """The SFT -> DPO pipeline of docs/preference.md: the DPO policy and reference start as the SFT model."""
    from llama_recipes import pipeline
    from llama_recipes.export import merge_and_export

    sft = pipeline.train(load_recipe(DEMO / "tiny_lora.yaml", [
        f"output_dir={tmp_path / 'sft'}", *FAST, "training.max_steps=30", "data.max_samples=256",
        "eval.before_after=false"]))
    merged = merge_and_export(sft.output_dir, tmp_path / "sft_merged")
    ov = [f"model.name_or_path={merged}", "training.max_steps=2", "data.max_samples=16", "data.max_eval_samples=32"]
    dpo = pipeline.train(recipe("tiny_dpo", tmp_path / "dpo", *ov))
    base = pipeline.train(recipe("tiny_dpo", tmp_path / "dpo_base", *ov[1:]))
    # SFT on the topic task taught the answer's form (one topic word): the DPO run starts from there, not from
    # the base (measured: completion log-prob -5.7 after SFT vs -25.8 for the base, per pair)
    sft_start, base_start = dpo.metrics["eval_before"], base.metrics["eval_before"]
    assert sft_start["chosen_logp"] > base_start["chosen_logp"] + 10, (sft_start, base_start)
    assert dpo.trainer.ref_model is None  # the reference: the merged SFT model, adapter off
    # the other form: the SFT run itself as the model, its adapter continuing (tests/test_start_from_run.py)
    # starts from the same model, so the same numbers before training
    cont = pipeline.train(recipe("tiny_dpo", tmp_path / "dpo_cont", f"model.name_or_path={sft.output_dir}", *ov[1:]))
    for k in ("chosen_logp", "rejected_logp", "logp_margin", "preference_accuracy"):
        assert cont.metrics["eval_before"][k] == pytest.approx(sft_start[k], rel=1e-4, abs=1e-4), k
