"""Recipe validation: strict, before any model is loaded, with the key path and the fix."""
import json

import pytest
import yaml
from conftest import ROOT, run_cli

from llama_recipes.errors import RecipeError
from llama_recipes.schema import Recipe, apply_overrides, load_recipe, validate_recipe

SHIPPED = sorted((ROOT / "recipes").rglob("*.yaml"))

GOOD = {
    "output_dir": "/tmp/x",
    "model": {"name_or_path": "builtin:tiny-llama"},
    "data": {"path": "builtin:demo"},
    "method": {"name": "lora"},
}


def _err(data: dict) -> str:
    with pytest.raises(RecipeError) as e:
        validate_recipe(data, "r.yaml")
    return str(e.value)


def _with(**sections) -> dict:
    data = json.loads(json.dumps(GOOD))
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return data


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.output_dir
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path} must start with a comment: purpose, hardware, launch line"


def test_shipped_recipes_exist():
    names = {p.name for p in SHIPPED}
    assert {"lora_alpaca.yaml", "tiny_lora.yaml"} <= names


def test_unknown_key_with_suggestion():
    msg = _err(_with(method={"name": "lora", "rr": 4}))
    assert "method.rr" in msg and "did you mean `r`" in msg and "r.yaml" in msg


def test_unknown_training_key_is_error_with_suggestion():
    msg = _err(_with(training={"learning_rat": 1e-4}))
    assert "training.learning_rat" in msg and "did you mean `learning_rate`" in msg


def test_unknown_top_level_section():
    msg = _err(_with(trianing={"max_steps": 3}))
    assert "trianing" in msg and "did you mean `training`" in msg


def test_wrong_type_names_key_and_value():
    msg = _err(_with(training={"max_steps": "many"}))
    assert "training.max_steps" in msg and "'many'" in msg


def test_missing_model_section():
    data = _with()
    del data["model"]
    msg = _err(data)
    assert "model: missing required key" in msg


def test_missing_model_path():
    msg = _err(_with(model={"name_or_path": None}) | {"model": {}})
    assert "model.name_or_path: missing required key" in msg


def test_unknown_method_name():
    msg = _err(_with(method={"name": "lorax"}))
    assert "method" in msg and "lora" in msg


def test_bad_value_range():
    msg = _err(_with(method={"name": "lora", "r": 0}))
    assert "method.r" in msg and "greater than 0" in msg


def test_reserved_training_key_points_to_top_level():
    msg = _err(_with(training={"output_dir": "x"}))
    assert "top level" in msg


def test_yaml_string_numbers_are_numbers():
    # PyYAML reads 1e-4 (no dot) as a string; the schema still takes it as a float.
    r = validate_recipe(_with(training={"learning_rate": "1e-4"}))
    assert r.training.learning_rate == pytest.approx(1e-4)


def test_overrides_dotted_keys_and_yaml_values():
    data = apply_overrides(json.loads(json.dumps(GOOD)), ["training.learning_rate=1e-4", "method.r=16",
                                                           "method.target_modules=[q_proj, v_proj]"])
    r = validate_recipe(data)
    assert r.method.r == 16 and r.method.target_modules == ["q_proj", "v_proj"]
    assert r.training.learning_rate == pytest.approx(1e-4)


def test_resolved_recipe_only_keeps_training_keys_that_were_set():
    r = validate_recipe(_with(training={"max_steps": 3}))
    d = r.to_dict()
    assert d["training"] == {"max_steps": 3, "report_to": ["tensorboard"], "activation_checkpointing": True,
                             "bf16": "auto"}
    assert Recipe.model_validate(yaml.safe_load(yaml.safe_dump(d))).fingerprint() == r.fingerprint()


def test_trl_snapshot_matches_installed_trl():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c",
                          "import json,sys; sys.path.insert(0,'scripts'); import snapshot_trl_fields as s; "
                          "print(json.dumps(s.snapshot()))"], cwd=ROOT, capture_output=True, text=True, check=True)
    live = json.loads(out.stdout)
    saved = json.loads((ROOT / "llama_recipes/schema/trl_fields.json").read_text())["configs"]
    assert set(live) == {"SFTConfig", "DPOConfig", "KTOConfig", "RewardConfig", "GRPOConfig", "ORPOConfig", "CPOConfig"}
    assert live == saved, "TRL changed: run `python scripts/snapshot_trl_fields.py`"


@pytest.mark.parametrize("body,expect", [
    ("model: {name_or_path: x}\nmethod: {name: lora, rr: 1}\n", "did you mean `r`"),
    ("model: [unclosed\n", "YAML syntax error at line"),
    ("output_dir: o\nmodel: {}\ndata: {path: d}\nmethod: {name: lora}\n", "model.name_or_path: missing required key"),
])
def test_cli_bad_recipe_exits_nonzero_without_traceback(tmp_path, body, expect):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    res = run_cli(str(path))
    assert res.returncode == 2
    assert expect in res.stderr and "Traceback" not in res.stderr
    assert str(path) in res.stderr


def test_cli_missing_recipe_file(tmp_path):
    res = run_cli(str(tmp_path / "nope.yaml"))
    assert res.returncode == 2 and "recipe file not found" in res.stderr


def test_recipe_reference_doc_is_current():
    from llama_recipes.schema.docs import render_markdown

    assert (ROOT / "docs/recipes.md").read_text() == render_markdown(), \
        "regenerate: python -m llama_recipes.schema.docs > docs/recipes.md"


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path):
    """A second `training:` block would silently replace the first (bf16, max_length, lr vanish)."""
    path = tmp_path / "r.yaml"
    path.write_text("output_dir: x\nmodel: {name_or_path: builtin:tiny-llama}\ndata: {path: builtin:demo}\n"
                    "method: {name: lora}\ntraining:\n  bf16: false\n  max_length: 64\ntraining:\n  max_steps: 3\n")
    with pytest.raises(RecipeError, match=r"key 'training' appears twice, at lines 5 and 8") as e:
        load_recipe(path)
    assert str(path) in str(e.value)


DEMO = ROOT / "recipes" / "demo" / "tiny_lora.yaml"


def test_an_override_that_is_not_valid_yaml_says_so():
    with pytest.raises(RecipeError, match=r"override freeze: the value is not valid YAML"):
        load_recipe(DEMO, ['freeze={train: [{patterns: ["a\\.(b|c)"]}]}'])
    # single quotes keep the backslash, and a plain string that is not YAML is taken as written
    r = load_recipe(DEMO, ["method={name: partial}", "freeze={train: [{patterns: ['a\\.(b|c)']}]}"])
    assert r.freeze.train[0].patterns == ["a\\.(b|c)"]


def test_chat_template_that_is_a_missing_file_is_refused(tmp_path):
    chat = ROOT / "recipes" / "demo" / "chat_tiny_lora.yaml"
    with pytest.raises(RecipeError, match="data.chat_template 'missing.jinja' is neither a Jinja template"):
        load_recipe(chat, ["data.chat_template=missing.jinja"])
    good = tmp_path / "t.jinja"
    good.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert load_recipe(chat, [f"data.chat_template={good}"]).data.chat_template == str(good)


@pytest.mark.parametrize("over, msg", [
    (["training.max_steps=0"], "training.max_steps=0 trains nothing"),
    (["training.max_steps=-3"], "training.max_steps=-3 trains nothing"),
    (["training.max_steps=-1", "training.num_train_epochs=0"], r"num_train_epochs=0(\.0)? with max_steps -1 trains nothing"),
])
def test_settings_that_train_nothing_are_refused(over, msg):
    """TRL would run one step for max_steps 0 and save an untrained model for 0 epochs."""
    with pytest.raises(RecipeError, match=msg):
        load_recipe(DEMO, over)


def test_tilde_is_expanded_in_every_path_field(tmp_path, monkeypatch):
    import shutil

    from conftest import TINY

    from llama_recipes import data, modeling

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(TINY, tmp_path / "m")
    (tmp_path / "rows.jsonl").write_text('{"instruction": "a", "output": "b"}\n' * 4)
    (tmp_path / "t.jinja").write_text((TINY / "chat_template.jinja").read_text())
    r = validate_recipe({"output_dir": "~/out/", "resume": "~/out/checkpoint-2",
                         "model": {"name_or_path": "~/m", "tokenizer": "~/m"},
                         "data": {"path": "~/rows.jsonl", "chat_template": "~/t.jinja"},
                         "method": {"name": "lora"}, "eval": {"retain": ["~/rows.jsonl", "builtin:retain"]}})
    home = str(tmp_path)
    assert r.output_dir == f"{home}/out" and r.resume == f"{home}/out/checkpoint-2"
    assert r.model.name_or_path == r.model.tokenizer == f"{home}/m"
    assert r.data.path == f"{home}/rows.jsonl" and r.data.chat_template == f"{home}/t.jinja"
    assert r.eval.retain == [f"{home}/rows.jsonl", "builtin:retain"]
    mixed = validate_recipe({**GOOD, "data": {"mix": [{"path": "~/rows.jsonl"}]}})
    assert mixed.data.mix[0].path == f"{home}/rows.jsonl"
    # and they load
    assert len(data.build_datasets(r.data)[0]) == 4
    assert modeling.load_tokenizer(r.model).eos_token
