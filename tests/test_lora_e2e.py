"""The walking skeleton end to end: the demo recipe trains a LoRA adapter on the tiny Llama.

One short in-process run (module-scoped) is inspected from several angles; one subprocess run
checks the real entry point and the files it leaves.
"""
import json

import pytest
import torch
import yaml
from conftest import DEMO_RECIPE, FAST, TINY, run_cli
from safetensors.torch import load_file

from llama_recipes.schema import load_recipe


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from llama_recipes import pipeline

    out = tmp_path_factory.mktemp("lora") / "out"
    recipe = load_recipe(DEMO_RECIPE, [*FAST, f"output_dir={out}", "eval.generate=false"])
    return recipe, pipeline.train(recipe)


def _initial_model(recipe):
    """The model exactly as training started: same seed, same construction path."""
    from transformers import set_seed

    from llama_recipes import methods, modeling

    set_seed(recipe.seed)
    return methods.apply_method(modeling.load_model(recipe.model), recipe)


def test_loss_goes_down(lora_run):
    _, run = lora_run
    before, after = run.metrics["eval_before"]["loss"], run.metrics["eval_after"]["loss"]
    assert after < before - 0.05, (before, after)


def test_only_lora_parameters_changed(lora_run):
    recipe, run = lora_run
    start = dict(_initial_model(recipe).named_parameters())
    trained = dict(run.model.named_parameters())
    assert start.keys() == trained.keys()
    base_on_disk = load_file(TINY / "model.safetensors")
    lora = [n for n in trained if "lora_" in n]
    assert lora and all(trained[n].requires_grad for n in lora)
    for name, p in trained.items():
        if "lora_" in name:
            assert not torch.equal(p, start[name]), f"LoRA weight did not train: {name}"
        else:
            assert not p.requires_grad, name
            assert torch.equal(p, start[name]), f"base weight changed: {name}"
            disk = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, base_on_disk[disk]), f"base weight differs from the checkpoint: {name}"
    # Exact count: LoRA on every linear layer of every decoder layer (q,k,v,o,gate,up,down).
    cfg = json.loads((TINY / "config.json").read_text())
    h, i, r = cfg["hidden_size"], cfg["intermediate_size"], recipe.method.r
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    expected = cfg["num_hidden_layers"] * sum(r * (a + b) for a, b in shapes)
    assert run.metrics["trainable_params"] == expected


def test_saved_adapter_reloads_with_plain_peft(lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, run = lora_run
    out = run.output_dir
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not list(out.glob("*.bin")), "artifacts are safetensors only"
    base = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, out).eval()
    ids = run.tokenizer(["Reverse the list of words.", "The red cat"], return_tensors="pt", padding=True)
    run.model.eval()
    with torch.no_grad():
        want = run.model(**ids).logits
        got = reloaded(**ids).logits
    assert torch.equal(got, want)


def test_output_dir_contents(lora_run):
    recipe, run = lora_run
    out = run.output_dir
    for name in ("recipe.yaml", "metrics.json", "loss_curve.png", "tokenizer.json", "adapter_model.safetensors"):
        assert (out / name).is_file(), name
    assert yaml.safe_load((out / "recipe.yaml").read_text()) == recipe.to_dict()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["global_step"] == 8
    assert [h["step"] for h in metrics["log_history"] if "loss" in h] == [2, 4, 6, 8]


def test_rerun_into_other_runs_output_dir_is_refused(lora_run):
    from llama_recipes import pipeline
    from llama_recipes.errors import UserError

    recipe, run = lora_run
    other = load_recipe(DEMO_RECIPE, [*FAST, f"output_dir={run.output_dir}", "method.r=4"])
    before = {p.name: p.stat().st_mtime_ns for p in run.output_dir.iterdir()}
    with pytest.raises(UserError, match="different recipe"):
        pipeline.train(other)
    assert {p.name: p.stat().st_mtime_ns for p in run.output_dir.iterdir()} == before


def test_real_entry_point_runs_demo_recipe(tmp_path):
    out = tmp_path / "demo"
    res = run_cli(str(DEMO_RECIPE), *FAST, f"output_dir={out}", "eval.limit=16", "training.report_to=[tensorboard]")
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_after"]["loss"] < metrics["eval_before"]["loss"]
    assert "exact_match" in metrics["eval_after"]
    assert "trainable params:" in res.stderr and "| loss |" in res.stderr
    assert (out / "adapter_model.safetensors").is_file()
    assert list((out / "runs").rglob("events.out.tfevents*")), "TensorBoard is the default logger"


def test_console_script_is_the_same_command(tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("llama-recipes")
    assert exe.exists() or shutil.which("llama-recipes")
    res = subprocess.run([str(exe), "run", str(DEMO_RECIPE), "--validate", "method.r=4"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert yaml.safe_load(res.stdout)["method"]["r"] == 4
