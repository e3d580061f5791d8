"""--eval-only and the eval numbers: exact perplexity, generation equal to one-at-a-time, artifacts of
every kind, the forgetting check, and agreement with the numbers training reports."""
import json
import math
import sys
from argparse import Namespace

import pytest
from conftest import DEMO_RECIPE, FAST, ROOT, TINY, free_port, run_cli

from llama_recipes import evaluation
from llama_recipes.errors import RecipeError, UserError
from llama_recipes.schema import load_recipe

EVAL = ["eval.limit=16", "eval.max_new_tokens=6", "eval.retain=[builtin:retain]"]


def _recipe(out, *extra):
    return load_recipe(DEMO_RECIPE, [*FAST, f"output_dir={out}", *EVAL, *extra])


def _results(d):
    return json.loads((d / "eval_results.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The demo recipe trained for a few steps, with intermediate checkpoints, evaluated with --eval-only."""
    from llama_recipes import pipeline

    out = tmp_path_factory.mktemp("demo")
    recipe = _recipe(out, "training.save_strategy=steps", "training.save_steps=4")
    run = pipeline.train(recipe)
    assert evaluation.eval_only(recipe, Namespace(checkpoint=None, base=False)) == 0
    return recipe, run


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY), AutoModelForCausalLM.from_pretrained(TINY).eval()


def _rows(n=7):
    from datasets import Dataset

    from llama_recipes.data import render_alpaca

    words = "red blue green cat dog sun moon tree".split()
    rows = [render_alpaca({"instruction": "Repeat the words.", "input": " ".join(words[: 1 + i % 6]),
                           "output": " ".join(words[: 1 + i % 6])}) for i in range(n)]
    return Dataset.from_list(rows)


def test_perplexity_is_exp_of_token_weighted_loss(tiny):
    import torch

    tok, model = tiny
    recipe = _recipe("/tmp/unused")
    ds = evaluation.tokenize_like_trl(_rows(), tok, recipe)
    collate = lambda rows: evaluation.pad_collate(rows, tok.pad_token_id)  # noqa: E731
    got = evaluation.eval_loss(model, ds, collate, batch_size=3)
    # independent: one plain forward per example; HF's loss is that example's mean over its supervised tokens
    total, count = 0.0, 0
    with torch.no_grad():
        for row in ds:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            n = int((labels[0, 1:] != -100).sum())
            total += model(input_ids=ids, labels=labels).loss.item() * n
            count += n
    assert got["tokens"] == count
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    # only completion tokens (+ EOS) are supervised, as in training
    row = ds[0]
    assert row["labels"][:5] == [-100] * 5 and row["labels"][-1] == tok.eos_token_id
    assert evaluation.eval_loss(model, ds, collate, batch_size=1)["loss"] == pytest.approx(got["loss"], rel=1e-5)


def test_batched_left_padded_generation_equals_one_at_a_time(tiny):
    import torch

    tok, model = tiny
    prompts = _rows(6)["prompt"][:3] + ["red", "blue green cat dog sun moon tree red", "### Response:\n"]
    side = tok.padding_side
    batched = evaluation.generate(model, tok, prompts, max_new_tokens=8, batch_size=4)
    assert tok.padding_side == side  # restored for training's collator
    single = []
    with torch.inference_mode():
        for p in prompts:
            enc = tok(p, return_tensors="pt")
            out = model.generate(**enc, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
            single.append(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    assert batched == single and any(batched)


def test_eval_only_adapter_beats_base_and_agrees_with_training(trained):
    recipe, run = trained
    out = run.output_dir
    res = _results(out / "eval")
    assert res["kind"] == "adapter" and res["recipe_fingerprint"] == recipe.fingerprint()
    assert res["examples"] == 16 and len(res["dataset"]["fingerprint"]) == 16
    preds = (out / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 16 and set(json.loads(preds[0])) == {"prompt", "reference", "prediction"}
    # the same tokens and loss mask as training: eval-only equals the run's own after-training number
    assert res["metrics"]["loss"] == pytest.approx(run.metrics["eval_after"]["loss"], rel=1e-5)

    # --base through the real entry point, with the same settings
    args = [str(DEMO_RECIPE), *FAST, f"output_dir={out}", *EVAL, "--eval-only", "--base"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| loss |" in proc.stderr and "| builtin:retain |" in proc.stderr
    base = _results(out / "eval" / "base")
    assert base["kind"] == "base" and base["dataset"]["fingerprint"] == res["dataset"]["fingerprint"]
    assert base["metrics"]["loss"] == pytest.approx(run.metrics["eval_before"]["loss"], rel=1e-5)
    assert res["metrics"]["loss"] < base["metrics"]["loss"]
    assert res["metrics"]["perplexity"] < base["metrics"]["perplexity"]

    # forgetting check: the adapter switched off is the base model
    r = res["retain"]["builtin:retain"]
    assert r["base"]["loss"] == pytest.approx(base["retain"]["builtin:retain"]["base"]["loss"], rel=1e-5)
    assert r["delta_loss"] == pytest.approx(r["artifact"]["loss"] - r["base"]["loss"])
    assert r["base"]["tokens"] == r["artifact"]["tokens"] > 0
    # training artifacts are untouched; results live in eval/
    assert (out / "adapter_model.safetensors").is_file() and (out / "metrics.json").is_file()


def test_eval_only_merged_model_and_checkpoint(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe, run = trained
    adapter = _results(run.output_dir / "eval")
    merged = tmp_path / "merged"
    base = AutoModelForCausalLM.from_pretrained(TINY)
    PeftModel.from_pretrained(base, str(run.output_dir)).merge_and_unload().save_pretrained(merged)
    run.tokenizer.save_pretrained(merged)
    assert evaluation.eval_only(recipe, Namespace(checkpoint=str(merged), base=False)) == 0
    res = _results(merged / "eval")
    assert res["kind"] == "model"
    assert res["metrics"]["loss"] == pytest.approx(adapter["metrics"]["loss"], rel=1e-4)
    r, a = res["retain"]["builtin:retain"], adapter["retain"]["builtin:retain"]
    assert r["artifact"]["loss"] == pytest.approx(a["artifact"]["loss"], rel=1e-4)
    assert r["base"]["loss"] == pytest.approx(a["base"]["loss"], rel=1e-5)  # base reloaded from the recipe

    ckpt = run.output_dir / "checkpoint-4"
    assert evaluation.eval_only(recipe, Namespace(checkpoint=str(ckpt), base=False)) == 0
    mid = _results(ckpt / "eval")
    assert mid["kind"] == "adapter" and mid["examples"] == 16
    assert mid["metrics"]["loss"] != adapter["metrics"]["loss"]  # a different point of the run


def test_targets_and_errors(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path / "out")
    with pytest.raises(UserError, match="not a directory"):
        evaluation.resolve_target(recipe, None, False)
    with pytest.raises(UserError, match="pass one of them"):
        evaluation.resolve_target(recipe, "x", True)
    (tmp_path / "out" / "checkpoint-3").mkdir(parents=True)
    (tmp_path / "out" / "checkpoint-12").mkdir()
    with pytest.raises(UserError, match="checkpoint-12"):
        evaluation.resolve_target(recipe, None, False)
    head = tmp_path / "head"
    head.mkdir()
    (head / "head_config.json").write_text("{}")
    assert evaluation.resolve_target(recipe, str(head), False).kind == "head"
    with pytest.raises(UserError, match="head_config.json lacks .*base_model"):  # a damaged artifact
        evaluation.eval_only(recipe, Namespace(checkpoint=str(head), base=False))
    from llama_recipes.cli import main

    assert main([str(DEMO_RECIPE), f"output_dir={tmp_path}", "--base"]) == 2  # not silently a training run
    with pytest.raises(RecipeError, match="eval.metrics"):
        _recipe(tmp_path, "eval.metrics=[bleu]")


@pytest.mark.slow
def test_eval_only_two_ranks_equals_one(trained):
    """torchrun with 2 CPU processes: the eval set is split, numbers and predictions equal one process."""
    import subprocess

    recipe, run = trained
    single = _results(run.output_dir / "eval")
    preds = (run.output_dir / "eval" / "predictions.jsonl").read_text()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "run_recipe.py"), str(DEMO_RECIPE), *FAST, f"output_dir={run.output_dir}", *EVAL,
           "training.save_strategy=steps", "training.save_steps=4", "--eval-only"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = _results(run.output_dir / "eval")
    assert two["world_size"] == 2
    assert two["metrics"]["tokens"] == single["metrics"]["tokens"]
    assert two["metrics"]["loss"] == pytest.approx(single["metrics"]["loss"], rel=1e-5)
    assert two["retain"]["builtin:retain"]["delta_loss"] == pytest.approx(
        single["retain"]["builtin:retain"]["delta_loss"], rel=1e-4, abs=1e-6)
    assert (run.output_dir / "eval" / "predictions.jsonl").read_text() == preds
    assert proc.stderr.count("eval results in") == 1  # written and reported once


def test_eval_only_drops_over_length_rows_as_training_does(tmp_path):
    """data.over_length: drop removes over-length eval rows before training's eval takes its first
    eval.limit rows; --eval-only selects the same rows, so it reproduces the run's numbers."""
    from llama_recipes import pipeline

    recipe = _recipe(tmp_path / "run", "data.path=builtin:demo", "data.over_length=drop", "training.max_length=56",
                     "eval.retain=[]")
    run = pipeline.train(recipe)
    assert run.metrics["data"]["eval_dropped_over_length"] > 0  # some of the first 16 eval rows are too long
    assert evaluation.eval_only(recipe, Namespace(checkpoint=None, base=False)) == 0
    res = _results(run.output_dir / "eval")
    after = run.metrics["eval_after"]
    assert res["metrics"]["tokens"] == after["tokens"]
    assert res["metrics"]["loss"] == pytest.approx(after["loss"], rel=1e-5)
    assert res["examples"] == after.get("examples", res["examples"])
