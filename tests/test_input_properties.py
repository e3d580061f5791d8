"""Property-style checks of bad inputs: every number field of the schema and every file input.

For every number field of every recipe section (walked from the pydantic models, every method's
section included), a negative, zero, NaN and huge value is either valid or refused at validation
with a RecipeError naming the key, never a traceback. A value the schema accepts for a `training:`
key must also be accepted by TRL's SFTConfig (what the run builds after loading the model).

For every documented file input (recipe, data files, chat template, model directory, adapter
directory), an empty, truncated, UTF-16 and invalid-UTF-8 file is either read or refused with a
UserError naming the file. In-process and validation-only where possible, so the whole module runs
in seconds; tests/test_bad_inputs.py runs a few of the same inputs through the CLI.
"""
import copy
import itertools
import json
import math
import shutil
import types
import typing
from pathlib import Path

import pytest
import yaml
from test_resilience import MODEL

from llama_recipes.errors import RecipeError, UserError
from llama_recipes.schema import Recipe, validate_recipe
from llama_recipes.schema.base import Section
from llama_recipes.schema.method import METHOD_MODELS
from llama_recipes.schema.objective import OBJECTIVE_MODELS

BASE = {"output_dir": "out", "model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"},
        "data": {"path": "builtin:demo"}, "method": {"name": "lora"}, "training": {"bf16": False}}
# What a method needs besides its own section to be a valid recipe at all.
METHOD_BASE = {"qlora": {"model": {"name_or_path": "builtin:tiny-llama", "dtype": "bfloat16"}},
               "prefix": {"training": {"bf16": False, "activation_checkpointing": False}},
               "partial": {"freeze": {"train": [{"last_layers": 1}]}},
               "classifier_head": {"data": {"path": "builtin:classify"}},
               "mlp_head": {"data": {"path": "builtin:classify"}}}


def _members(ann) -> list:
    """The types an annotation accepts (Optional/Union/Annotated unwrapped)."""
    if typing.get_origin(ann) is typing.Annotated:
        return _members(typing.get_args(ann)[0])
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(ann) for m in _members(a)]
    return [ann]


def number_fields(model: type[Section], prefix: tuple = ()):
    """(path, kind, in_list) for every int/float field under `model`; list items get index 0."""
    for name, f in model.model_fields.items():
        for m in _members(f.annotation):
            in_list = typing.get_origin(m) is list
            inner = _members(typing.get_args(m)[0]) if in_list else [m]
            for t in inner:
                if isinstance(t, type) and issubclass(t, Section):
                    yield from number_fields(t, (*prefix, name, 0) if in_list else (*prefix, name))
                elif t in (int, float):
                    yield (*prefix, name), t.__name__, in_list


def _objective_base(name: str) -> dict | None:
    """The objective and data sections of the objective's tiny twin (recipes/demo/tiny_NAME.yaml)."""
    twin = Path(__file__).resolve().parents[1] / "recipes" / "demo" / f"tiny_{name}.yaml"
    if not twin.is_file():
        return None
    r = yaml.safe_load(twin.read_text())
    return {"objective": r["objective"], "data": r["data"]}


OBJECTIVE_BASE = {n: b for n in OBJECTIVE_MODELS if n not in ("sft", "classification") and (b := _objective_base(n))}


def _cases():
    out = []
    for name, f in Recipe.model_fields.items():
        if name == "method":
            for method, model in METHOD_MODELS.items():
                out += [(method, (name, *path), kind, in_list) for path, kind, in_list in number_fields(model)]
            continue
        if name == "objective":  # each objective's own settings, on its tiny twin's data and objective section
            for objective, model in OBJECTIVE_MODELS.items():
                out += [(f"objective={objective}", (name, *path), kind, in_list)
                        for path, kind, in_list in number_fields(model) if objective in OBJECTIVE_BASE]
            continue
        for t in _members(f.annotation):
            if isinstance(t, type) and issubclass(t, Section):
                out += [(None, (name, *path), kind, in_list) for path, kind, in_list in number_fields(t)]
            elif t in (int, float):
                out.append((None, (name,), t.__name__, False))
    return out


CASES = _cases()
VALUES = {"negative": -3, "zero": 0, "nan": math.nan, "huge": None}


def _recipe(method: str | None, path: tuple, value) -> dict:
    r = copy.deepcopy(BASE)
    if method and method.startswith("objective="):
        r.update(copy.deepcopy(OBJECTIVE_BASE[method.removeprefix("objective=")]))
        method = None
    if method:
        r["method"] = {"name": method}
        r.update(copy.deepcopy(METHOD_BASE.get(method, {})))
    if path[0] == "freeze":
        r["method"] = {"name": "partial"}
    if path[:2] == ("eval", "harness"):  # an optional section: its required key first
        r.setdefault("eval", {})["harness"] = {"tasks": ["builtin:topic_mc"]}
    if path[:2] == ("data", "mix"):
        r["data"] = {"mix": [{"path": "builtin:demo"}]}
    node = r
    for part, nxt in itertools.pairwise(path):
        if isinstance(part, int):
            node = node[part]
            continue
        node = node.setdefault(part, [{}] if isinstance(nxt, int) else {})
        if isinstance(nxt, int) and not node:
            node.append({})
    node[path[-1]] = value
    return r


def test_the_walk_finds_every_section():
    paths = {".".join(map(str, p)) for _, p, _, _ in CASES}
    for expected in ("seed", "training.learning_rate", "training.per_device_train_batch_size", "method.r",
                     "method.alpha", "method.num_virtual_tokens", "method.hidden_sizes", "method.lora.r",
                     "data.max_samples", "data.eval_split", "data.mix.0.weight", "eval.max_new_tokens",
                     "guards.max_bad_steps", "freeze.train.0.last_layers", "freeze.select.fraction"):
        assert expected in paths, expected
    assert len(CASES) > 60
    for method in METHOD_MODELS:  # every base the test builds is itself valid
        validate_recipe(_recipe(method, ("seed",), 1))


@pytest.fixture(scope="module")
def sft_config():
    from llama_recipes import training

    return training.sft_config


@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("case", CASES, ids=[f"{m or ''}:{'.'.join(map(str, p))}" for m, p, _, _ in CASES])
def test_number_field_is_valid_or_one_clear_error(case, value, sft_config):
    method, path, kind, in_list = case
    v = VALUES[value]
    if v is None:
        v = 10**30 if kind == "int" else 1e30
    r = _recipe(method, path, [v] if in_list else v)
    try:
        recipe = validate_recipe(r)
    except RecipeError as e:
        lines = e.problem.splitlines()
        assert lines[0] == "invalid recipe:" and len(lines) == 2, e.problem  # exactly one error line
        shown = [str(p) for p in path if p != 0 or path[-1] == p]
        assert lines[1].strip().startswith(shown[0]) and str(path[-1]) in lines[1], (path, lines[1])
        assert e.fix
        return
    if path[0] == "training":  # accepted here: TRL must accept it too (it is built after the model loads)
        sft_config(recipe)
    if isinstance(v, float) and not math.isfinite(v):
        pytest.fail(f"{'.'.join(map(str, path))}={v} accepted")


# -- files ----------------------------------------------------------------------------------------

CORRUPTIONS = ("empty", "truncated", "utf16", "invalid_utf8")


def corrupt(path: Path, how: str) -> None:
    blob = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(blob[: max(1, len(blob) // 2 - 7)])
    elif how == "utf16":
        try:
            path.write_bytes(blob.decode("utf-8").encode("utf-16"))
        except UnicodeDecodeError:  # a binary file: the same bytes behind a UTF-16 byte-order mark
            path.write_bytes(b"\xff\xfe" + blob)
    else:
        path.write_bytes(blob[:10] + b"\xff\xfe\xc3(" + blob[10:])


def _expect_read_or_user_error(fn, name: str):
    try:
        return fn()
    except UserError as e:
        assert name in str(e), str(e)
        assert e.fix, str(e)
        return None


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_recipe_file(tmp_path, how):
    from llama_recipes.schema import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**BASE, "output_dir": str(tmp_path / "o")}))
    corrupt(path, how)
    got = _expect_read_or_user_error(lambda: load_recipe(path), "r.yaml")
    if how == "utf16":  # UTF-16 with a byte-order mark is read like UTF-8
        assert got is not None and got.model.name_or_path == "builtin:tiny-llama"


def _rows(n=12):
    return [{"instruction": f"say {i}", "output": f"{i} said"} for i in range(n)]


@pytest.mark.parametrize("how", CORRUPTIONS)
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_data_file(tmp_path, suffix, how):
    import pandas as pd

    from llama_recipes import data
    from llama_recipes.schema.data import DataConfig

    path = tmp_path / f"train{suffix}"
    df = pd.DataFrame(_rows())
    {".jsonl": lambda: df.to_json(path, orient="records", lines=True),
     ".json": lambda: df.to_json(path, orient="records"),
     ".csv": lambda: df.to_csv(path, index=False),
     ".parquet": lambda: df.to_parquet(path)}[suffix]()
    corrupt(path, how)
    got = _expect_read_or_user_error(lambda: data.build_datasets(DataConfig(path=str(path))), path.name)
    if got is not None:  # what was read is in the file: rows in order, nothing invented; a CSV cut inside
        rows = list(got[0])  # its last line reads as a shorter last row (a CSV has no end marker)
        assert 0 < len(rows) <= 12
        assert all(r["completion"] == f"{i} said" for i, r in enumerate(rows[:-1]))
        assert "said".startswith(rows[-1]["completion"].split(" ")[-1]) or suffix == ".csv"


# Rows of odd content in an otherwise good file: row 3 is odd, the others are plain text.
ODD_VALUES = {"int": 7, "float": 2.5, "bool": True, "null": None, "list": ["a", "b"], "dict": {"a": 1},
              "nul_byte": "say\x00 3", "quoted_json": '"Hello"', "json_null_text": "null"}


@pytest.mark.parametrize("bad_rows", ["error", "skip"])
@pytest.mark.parametrize("odd", sorted(ODD_VALUES))
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_data_file_with_one_odd_value(tmp_path, suffix, odd, bad_rows):
    """Mixed types in a column, NUL bytes, nested values, text that looks like JSON: the file is read with every
    other row's text exactly as written (nothing decoded, dropped or invented), or one UserError names it."""
    import pandas as pd

    from llama_recipes import data
    from llama_recipes.schema.data import DataConfig

    rows = _rows()
    rows[3] = {**rows[3], "output": ODD_VALUES[odd]}
    path = tmp_path / f"train{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        pd.DataFrame(rows).to_csv(path, index=False)
    got = _expect_read_or_user_error(lambda: data.build_datasets(DataConfig(path=str(path), bad_rows=bad_rows)),
                                     path.name)
    if got is None:
        return
    out = {r["prompt"]: r["completion"] for r in got[0]}
    for i, r in enumerate(rows):
        if i != 3:  # every plain row reads back as written
            assert any(c == r["output"] for c in out.values()), (r, out)
    assert len(out) in (11, 12)  # the odd row is skipped, or kept
    assert all(isinstance(c, str) for c in out.values())


@pytest.mark.parametrize("odd", ["list", "dict", "int"])
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_an_odd_row_never_changes_how_the_other_rows_read(tmp_path, suffix, odd):
    """One nested or numeric value in a column once made datasets type it as JSON and decode the other rows:
    '"Hello"' trained as Hello and the text 'null' was dropped (issue 29). With bad_rows: skip the odd row
    goes and the text rows read as written."""
    from llama_recipes import data
    from llama_recipes.schema.data import DataConfig

    rows = _rows()
    rows[3]["output"], rows[5]["output"], rows[6]["output"] = ODD_VALUES[odd], '"Hello"', "null"
    path = tmp_path / f"train{suffix}"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) if suffix == ".jsonl" else json.dumps(rows))
    got = list(data.build_datasets(DataConfig(path=str(path), bad_rows="skip"))[0])
    assert [r["completion"] for r in got] == [r["output"] for i, r in enumerate(rows) if i != 3]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_data_file_with_a_byte_order_mark(tmp_path, suffix):
    import pandas as pd

    from llama_recipes import data
    from llama_recipes.schema.data import DataConfig

    path = tmp_path / f"train{suffix}"
    text = {".jsonl": lambda: "".join(json.dumps(r) + "\n" for r in _rows()), ".json": lambda: json.dumps(_rows()),
            ".csv": lambda: pd.DataFrame(_rows()).to_csv(index=False)}[suffix]()
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    got = _expect_read_or_user_error(lambda: data.build_datasets(DataConfig(path=str(path))), path.name)
    if got is not None:
        assert [r["completion"] for r in got[0]] == [r["output"] for r in _rows()]


@pytest.fixture(scope="module")
def tokenizer():
    from llama_recipes import modeling
    from llama_recipes.schema.model import ModelConfig

    return modeling.load_tokenizer(ModelConfig(name_or_path=str(MODEL)))


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_chat_template_file(tmp_path, how, tokenizer):
    from llama_recipes import data

    path = tmp_path / "t.jinja"
    path.write_text((MODEL / "chat_template.jinja").read_text())
    corrupt(path, how)
    recipe = validate_recipe({**BASE, "data": {"path": "builtin:chat", "chat_template": str(path)}})
    tok = copy.copy(tokenizer)
    got = _expect_read_or_user_error(lambda: data.apply_chat_template_choice(recipe, tok) or True, "t.jinja")
    if how == "utf16":
        assert got and tok.chat_template == (MODEL / "chat_template.jinja").read_text()


@pytest.mark.parametrize("how", CORRUPTIONS)
@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_model_dir(tmp_path, name, how):
    from llama_recipes import modeling
    from llama_recipes.schema.model import ModelConfig

    d = tmp_path / "model"
    shutil.copytree(MODEL, d)
    corrupt(d / name, how)
    cfg = ModelConfig(name_or_path=str(d))
    _expect_read_or_user_error(lambda: (modeling.load_tokenizer(cfg), modeling.load_model(cfg)), str(d))


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory):
    """A real adapter artifact (LoRA r=2 on the tiny Llama, saved untrained: loading is what is tested)."""
    from peft import LoraConfig, get_peft_model

    from llama_recipes import modeling
    from llama_recipes.schema.model import ModelConfig

    d = tmp_path_factory.mktemp("adapter")
    model = modeling.load_model(ModelConfig(name_or_path=str(MODEL), dtype="float32"))
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(d))
    return d


@pytest.mark.parametrize("how", CORRUPTIONS)
@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors"])
def test_adapter_dir_for_eval_checkpoint(tmp_path, adapter_run, name, how):
    from llama_recipes import artifacts

    d = tmp_path / "adapter"
    shutil.copytree(adapter_run, d)
    corrupt(d / name, how)
    recipe = validate_recipe({**BASE, "model": {"name_or_path": str(MODEL), "dtype": "float32"}})
    _expect_read_or_user_error(lambda: artifacts.load(recipe, d), "adapter")


def test_adapter_dir_intact_loads(adapter_run):
    from llama_recipes import artifacts

    recipe = validate_recipe({**BASE, "model": {"name_or_path": str(MODEL), "dtype": "float32"}})
    _, model = artifacts.load(recipe, adapter_run)
    assert model.peft_config["default"].r == 2


def test_read_json_names_the_file(tmp_path):
    from llama_recipes.errors import read_json

    p = tmp_path / "x.json"
    p.write_text(json.dumps({"a": 1})[:4])
    with pytest.raises(UserError, match="x.json is damaged"):
        read_json(p)


# -- command-line flags ------------------------------------------------------------------------------
# Every subcommand's flags that take a value, given values that make no sense: each is accepted (the
# command then stops on what follows: a run directory that is not there, --validate) or refused with
# exit code 2 and an error line, never a traceback. The commands run in-process, so this stays fast.
BAD_FLAG_VALUES = ["-1", "0", "two", "", "nan", "1e999", "/nonexistent/x", "x" * 5000]


def _value_flags():
    import argparse

    from llama_recipes import cli

    _, modes = cli.build_command_parser()
    parsers = {**modes, "run_recipe.py": cli.build_parser()}
    return [(mode, a.option_strings[-1]) for mode, parser in parsers.items() for a in parser._actions
            if a.option_strings and a.nargs is None and not isinstance(a, argparse._HelpAction)]


def test_the_flag_walk_covers_every_subcommand():
    from llama_recipes import cli

    _, modes = cli.build_command_parser()
    walked = {m for m, _ in _value_flags()}
    assert walked == {m for m, p in {**modes, "run_recipe.py": None}.items()
                      if p is None or any(a.option_strings and a.nargs is None and a.dest != "help" for a in p._actions)}
    assert {"--gpus", "--gpu-memory", "--config", "--checkpoint", "--max-new-tokens", "--quant"} <= \
        {f for _, f in _value_flags()}


@pytest.mark.parametrize("value", BAD_FLAG_VALUES, ids=lambda v: v[:12] or "empty")
@pytest.mark.parametrize("mode,flag", _value_flags(), ids=lambda x: x)
def test_cli_flag_value_is_valid_or_one_clear_error(tmp_path, capsys, mode, flag, value):
    from llama_recipes.cli import console_main, main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**BASE, "output_dir": str(tmp_path / "out")}))
    base = {"export": [str(tmp_path / "no_run"), str(tmp_path / "merged")],
            "adapters": [f"a={tmp_path / 'no_run'}"]}.get(mode, [str(recipe)])
    # an accepted value must not start training: run validates; run_recipe.py estimates (or evaluates a
    # --checkpoint that is not there)
    safe = {"run": ["--validate"], "run_recipe.py": [] if flag == "--checkpoint" else ["--estimate-memory"]}.get(mode, [])
    try:
        code = main([*base, *safe, flag, value]) if mode == "run_recipe.py" else \
            console_main([mode, *base, *safe, flag, value])
    except SystemExit as e:  # argparse's usage error
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-2000:]
    assert code in (0, 2), (code, err[-2000:])
    if code == 2:
        assert "error" in err.lower(), err[-2000:]
