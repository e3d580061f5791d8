"""Files from elsewhere (issue 29, "code runs unasked"): a run directory received from someone else, chat
templates, recipes and GGUF files are bounded and checked before anything runs or is built from them.

Each test fails on the main branch before issue 29 (remote code ran from a run directory's recipe.yaml,
an alias bomb hung --validate, a template looped for ever, a GGUF with 0 heads divided by zero).
"""
import json
import time
from pathlib import Path

import pytest
import yaml
from test_bad_inputs import custom_code_model
from test_resilience import MODEL

from llama_recipes.cli import console_main
from llama_recipes.cli import main as cli_main


# -- 1. a run directory never grants trust_remote_code ---------------------------------------------------

def _received_run(tmp: Path) -> Path:
    """A run directory as someone else could send it: a LoRA adapter on a base with its own Python code,
    and a recipe.yaml that says trust_remote_code: true."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = custom_code_model(tmp / "base")
    run = tmp / "run"
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(MODEL)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(str(run))
    AutoTokenizer.from_pretrained(str(MODEL)).save_pretrained(str(run))
    cfg = json.loads((run / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(base)}))
    recipe = {"output_dir": str(run), "model": {"name_or_path": str(base), "trust_remote_code": True},
              "data": {"path": "builtin:demo"}, "method": {"name": "lora", "r": 4, "target_modules": ["q_proj"]}}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return run


def test_a_run_directory_never_grants_trust_remote_code(tmp_path, monkeypatch, capsys):
    mark = tmp_path / "remote-code-ran"
    monkeypatch.setenv("REMOTE_CODE_MARK", str(mark))
    run = _received_run(tmp_path)

    assert console_main(["export", str(run), str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "trust_remote_code: true" in err and "pass --trust-remote-code" in err and "Traceback" not in err
    assert not mark.exists() and not (tmp_path / "merged").exists()

    assert console_main(["adapters", f"a={run}"]) == 2
    assert "pass --trust-remote-code" in capsys.readouterr().err
    assert not mark.exists()

    # Only the user grants it, on the command line: then the base's code runs, and the export works.
    assert console_main(["export", str(run), str(tmp_path / "merged"), "--trust-remote-code"]) == 0
    assert mark.exists() and (tmp_path / "merged" / "model.safetensors").is_file()


def test_two_adapters_with_one_name_are_refused(tmp_path, capsys):
    assert console_main(["adapters", f"a={tmp_path}/x", f"a={tmp_path}/y"]) == 2
    assert "two adapters are named 'a'" in capsys.readouterr().err


def test_one_adapter_is_not_called_less_memory():
    from llama_recipes.adapters import MemoryReport

    one = MemoryReport(100 * 2**20, {"a": 2**20}).render()
    assert "x more" in one and "x less" not in one
    assert "1.96x less" in MemoryReport(100 * 2**20, {"a": 2**20, "b": 2**20}).render()


# -- 3. recipes: alias bombs and deep nesting -------------------------------------------------------------

def _bomb(levels: int = 9) -> str:
    names = [f"l{i}" for i in range(levels)]
    lines = [f"  {names[0]}: &{names[0]} [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"  {n}: &{n} [" + ", ".join([f"*{p}"] * 10) + "]" for p, n in zip(names, names[1:])]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("body, message", [
    ("model:\n  name_or_path: builtin:tiny-llama\n  extra:\n" + "  " + _bomb().replace("\n  ", "\n    "),
     "expands to more than 100,000 values"),
    ("output_dir: " + "[" * 10000 + "]" * 10000 + "\n", "nests more than 64 levels deep"),
    ("output_dir: " + "[" * 100 + "]" * 100 + "\n", "nests more than 64 levels deep"),
])
def test_recipe_alias_bomb_and_deep_nesting_are_refused_at_once(tmp_path, capsys, body, message):
    path = tmp_path / "r.yaml"
    path.write_text(body)
    started = time.monotonic()
    assert cli_main([str(path), "--validate"]) == 2
    err = capsys.readouterr().err
    assert message in err and "fix:" in err and "Traceback" not in err
    assert time.monotonic() - started < 10  # main: the bomb hung for minutes (shared machine: generous bound)


def test_recipe_yaml_read_back_from_a_run_directory_is_bounded(tmp_path):
    from llama_recipes.artifacts import read_run
    from llama_recipes.errors import UserError

    (tmp_path / "recipe.yaml").write_text("bomb:\n" + _bomb())
    with pytest.raises(UserError, match="expands to more than"):
        read_run(tmp_path)


def test_a_real_recipe_is_far_inside_the_bounds():
    from llama_recipes import bounds
    from llama_recipes.schema import _StrictLoader

    for path in Path(__file__).resolve().parents[1].glob("recipes/**/*.yaml"):
        node = yaml.compose(path.read_text(), Loader=_StrictLoader)
        bounds.check_yaml_node(node)  # raises if a shipped recipe were near the bounds


# -- 2. chat templates: bounded in time ------------------------------------------------------------------

def test_a_template_that_loops_for_ever_is_stopped_and_named(tmp_path, monkeypatch, capsys):
    from test_bad_inputs import BASE

    from llama_recipes import bounds

    monkeypatch.setattr(bounds, "TEMPLATE_SECONDS", 1.0)
    (tmp_path / "t.jinja").write_text("{% for a in range(100000) %}{% for b in range(100000) %}"
                                      "{% for c in range(100000) %}x{% endfor %}{% endfor %}{% endfor %}")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**BASE, "output_dir": str(tmp_path / "out")}))
    started = time.monotonic()
    code = cli_main([str(path), "data.path=builtin:chat", f"data.chat_template={tmp_path / 't.jinja'}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{tmp_path / 't.jinja'}: the chat template: rendering one conversation took more than 1 s" in err, err
    assert time.monotonic() - started < 60  # main: never returned


def test_the_template_deadline_gives_back_an_outer_timer():
    import signal

    from llama_recipes import bounds

    fired = []
    old = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        assert bounds.render_template(lambda: "ok") == "ok"
        time.sleep(0.8)
        assert fired == [1]  # the outer alarm still fired after the bounded render
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# -- 3. GGUF files are checked against their own metadata first -----------------------------------------

@pytest.mark.parametrize("kw, message", [
    ({"meta": {"block_count": 10**9}}, "its metadata says llama.block_count = 1,000,000,000, outside 1..1,024"),
    ({"meta": {"head_count": 0}}, "its metadata says llama.attention.head_count = 0, outside 1..1,024"),
    ({"meta": {"head_count": 3}}, "128 with 3 attention heads, which do not divide it"),
    ({"cut": "blk.2.ffn_up.weight"}, "tensor blk.2.ffn_up.weight has shape [128, 176]; the file's metadata implies [128, 352]"),
])
def test_a_gguf_is_checked_against_its_metadata_before_anything_is_built(tmp_path, monkeypatch, capsys, kw, message):
    from gguf_tiny import write_tiny_gguf
    from test_bad_inputs import BASE

    monkeypatch.setenv("LLAMA_RECIPES_CACHE", str(tmp_path / "cache"))
    gguf = write_tiny_gguf(tmp_path / "m.gguf", **kw)
    path = tmp_path / "r.yaml"
    recipe = {**BASE, "output_dir": str(tmp_path / "out"), "model": {"name_or_path": str(tmp_path), "gguf_file": gguf.name}}
    path.write_text(yaml.safe_dump(recipe))
    for args in (["--estimate-memory"], []):  # the metadata alone (estimate), then the conversion (training)
        started = time.monotonic()
        assert cli_main([str(path), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "fix:" in err and "Traceback" not in err, err
        assert time.monotonic() - started < 60  # main: 1e9 layers ran for minutes
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # nothing converted


def test_export_without_tokenizer_files_and_into_a_file_path(tmp_path, capsys):
    """Issue 29 item 13: export of a run without tokenizer files, or into a path that is a file, tracebacked."""
    from test_resilience import write_recipe

    out = tmp_path / "run"
    assert cli_main([str(write_recipe(tmp_path, out, max_steps=1, save_strategy="no"))]) == 0
    (tmp_path / "afile").write_text("x")
    assert console_main(["export", str(out), str(tmp_path / "afile")]) == 2
    assert "is a file" in capsys.readouterr().err
    for f in out.glob("tokenizer*"):
        f.unlink()
    (out / "chat_template.jinja").unlink(missing_ok=True)
    assert console_main(["export", str(out), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "tokenizer.json").is_file() and (tmp_path / "merged" / "model.safetensors").is_file()


def test_a_local_directory_named_like_a_token_is_recorded_as_it_is(tmp_path):
    """Issue 29 item 9: a base directory named like an HF token was written as <redacted> into recipe.yaml, and
    the run could no longer be exported or dry-run. Only values that are not existing local paths are redacted."""
    import shutil

    from llama_recipes.schema import validate_recipe
    from test_bad_inputs import BASE

    base = tmp_path / ("hf_" + "a" * 30)
    shutil.copytree(MODEL, base)
    recipe = validate_recipe({**BASE, "output_dir": str(tmp_path / "o"), "model": {"name_or_path": str(base)},
                              "training": {**BASE["training"], "run_name": "hf_" + "b" * 30}})
    saved = recipe.to_dict()
    assert saved["model"]["name_or_path"] == str(base)
    assert saved["training"]["run_name"] == "<redacted>"  # a token-shaped value that is not a path still is


def test_exporting_a_head_run_says_what_a_head_artifact_is(tmp_path, capsys):
    """Issue 29 item 14: main told a head run's user that "full fine-tuning already saves a standalone model"."""
    (tmp_path / "head_config.json").write_text(json.dumps({"method": "mlp_head"}))
    assert console_main(["export", str(tmp_path), str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "is a task-head run" in err and "--eval-only --checkpoint" in err and "full fine-tuning" not in err
