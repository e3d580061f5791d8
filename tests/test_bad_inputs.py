"""The bad-input catalogue (docs/troubleshooting.md lists every case with its message and fix).

Each case runs the real CLI entry point in-process and asserts: exit code != 0, one message naming
the cause and a `fix:`, no traceback (a non-UserError would propagate and fail the test), and
every file that was on disk before is byte-identical after.
"""
import json
import shutil
from pathlib import Path

import pytest
import yaml
from test_resilience import MODEL

from llama_recipes.cli import main as cli_main
from llama_recipes.errors import UserError

BASE = {
    "model": {"name_or_path": str(MODEL), "dtype": "float32"},
    "data": {"path": "builtin:demo", "max_samples": 16},
    "method": {"name": "lora", "r": 4},
    "training": {"max_steps": 1, "bf16": False, "report_to": "none", "save_strategy": "no",
                 "activation_checkpointing": False, "max_length": 256},
    "eval": {"before_after": False},
}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# -- setups: each gets tmp_path and the recipe dict, may create files, returns extra CLI args --------------

def _body(text):
    def setup(tmp, recipe):
        (tmp / "r.yaml").write_text(text)
        return []
    setup.own_file = True
    return setup


def _no_recipe_file(tmp, recipe):
    (tmp / "r.yaml").unlink()
    return []


_no_recipe_file.own_file = True


def _delete(section, key=None):
    def setup(tmp, recipe):
        if key:
            del recipe[section][key]
        else:
            del recipe[section]
        return []
    return setup


def _file(name, text, key="data.path"):
    def setup(tmp, recipe):
        (tmp / name).write_text(text)
        return [f"{key}={tmp / name}"]
    return setup


def _model_dir(kind):
    def setup(tmp, recipe):
        d = tmp / "model"
        d.mkdir()
        for f in MODEL.iterdir():
            if f.suffix == ".json" and f.name != "config.json":
                shutil.copy(f, d / f.name)
        if kind == "bin":  # weights only as a pickle: refused (safetensors only)
            import torch
            from safetensors.torch import load_file

            shutil.copy(MODEL / "config.json", d / "config.json")
            torch.save(load_file(str(MODEL / "model.safetensors")), d / "pytorch_model.bin")
        else:  # an encoder-decoder architecture, not a causal LM
            (d / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 32, "num_layers": 1,
                                                       "num_heads": 2, "d_kv": 16, "d_ff": 64, "vocab_size": 400}))
        return [f"model.name_or_path={d}"]
    return setup


def _output(kind):
    def setup(tmp, recipe):
        out = tmp / "out"
        if kind == "file":
            out.write_text("not a directory")
        elif kind == "under_file":
            (tmp / "blocker").write_text("a file")
            return [f"output_dir={tmp / 'blocker' / 'out'}"]
        elif kind == "foreign":
            out.mkdir()
            (out / "notes.txt").write_text("someone else's files")
        elif kind == "other_recipe":
            out.mkdir()
            other = {**recipe, "output_dir": str(out), "seed": 7}
            (out / "recipe.yaml").write_text(yaml.safe_dump(other))
            (out / "adapter_model.safetensors").write_bytes(b"previous run's weights")
        elif kind == "checkpoints":
            from llama_recipes.schema import validate_recipe

            out.mkdir()
            (out / "recipe.yaml").write_text(yaml.safe_dump(validate_recipe({**recipe, "output_dir": str(out)}).to_dict()))
            (out / "checkpoint-2").mkdir()
            (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
            return ["resume=never"]
        return []
    return setup


NO_COLUMNS = '{"question": "a", "answer": "b"}\n'

# id -> (setup or overrides, text the message must contain)
CASES = {
    # recipe
    "yaml-syntax-error": (_body("output_dir: o\nmodel: x: y\n"), "YAML syntax error at line 2"),
    "yaml-python-tag-refused": (_body("output_dir: !!python/object/apply:os.system [echo hi]\n"),
                                "could not determine a constructor"),
    "recipe-not-a-mapping": (_body("- model\n- data\n"), "must be a YAML mapping"),
    "recipe-file-missing": (_no_recipe_file, "recipe file not found"),
    "unknown-key": (["method.rr=4"], "unknown key `rr` — did you mean `r`?"),
    "unknown-section": (["trianing.max_steps=3"], "did you mean `training`?"),
    "unknown-training-key": (["training.learning_rat=1e-4"], "did you mean `learning_rate`?"),
    "wrong-type": (["training.max_steps=many"], "training.max_steps: Input should be a valid integer"),
    "section-not-a-mapping": (["model=llama"], "model: Input should be a valid dictionary"),
    "value-out-of-range": (["method.r=0"], "method.r: Input should be greater than 0"),
    "dropout-out-of-range": (["method.dropout=1.5"], "method.dropout: Input should be less than 1"),
    "missing-required-key": (_delete("model", "name_or_path"), "model.name_or_path: missing required key"),
    "missing-section": (_delete("data"), "data: missing required key"),
    "unknown-method": (["method.name=lorax"], "does not match any of the expected tags"),
    "reserved-training-key": (["training.output_dir=x"], "set `output_dir:` at the top level"),
    "deprecated-alias": (["training.gradient_checkpointing=true"], "use `training.activation_checkpointing`"),
    "resume-in-training-section": (["training.resume_from_checkpoint=out/checkpoint-3"], "set `resume:` at the top level"),
    "bad-override-syntax": (["training.max_steps"], "bad override 'training.max_steps'"),
    "eval-strategy-without-eval-split": (["training.eval_strategy=steps"], "needs data.eval_split"),
    "fsdp-in-training-section": (["training.fsdp_config={activation_checkpointing: true}"],
                                 "FSDP options live in the accelerate config"),
    "negative-bad-step-budget": (["guards.max_bad_steps=-1"], "guards.max_bad_steps: Input should be greater than or equal to 0"),
    "resume-path-missing": (["resume=/nonexistent/checkpoint-5"], "resume: /nonexistent/checkpoint-5 does not exist"),
    # data
    "data-file-missing": (["data.path=/nonexistent/train.jsonl"], "data file or directory not found: /nonexistent/train.jsonl"),
    "data-file-type": (_file("train.txt", "hello\n"), "unsupported data file type '.txt'"),
    "builtin-data-unknown": (["data.path=builtin:nope"], "no builtin data named 'nope'"),
    "split-missing": (["data.split=nope"], "no split 'nope'"),
    "eval-split-missing": (["data.eval_split=nope"], "no eval split 'nope'"),
    "format-undetectable": (_file("qa.jsonl", NO_COLUMNS), "cannot detect the data format"),
    "data-malformed-json-line": (_file("bad.jsonl", '{"instruction": "a", "output": "b"}\n{not json\n'),
                                 "JSON parse error"),
    "data-row-missing-column": (_file("rows.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n'),
                                "row 1: column `output`: missing value"),
    "data-hub-id-offline": (["data.path=someone/no-such-dataset"], "cannot load dataset 'someone/no-such-dataset'"),
    "empty-after-tokenization": (["training.max_length=8"], "no training examples left after tokenization"),
    # model
    "model-path-missing": (["model.name_or_path=/nonexistent/model"], "model path /nonexistent/model does not exist"),
    "model-hub-id-offline": (["model.name_or_path=meta-llama/No-Such-Model"], "neither a local directory nor a reachable hub model"),
    "builtin-model-unknown": (["model.name_or_path=builtin:nope"], "no builtin model named 'nope'"),
    "gguf-file-missing": (["model.name_or_path=/nonexistent", "model.gguf_file=model.gguf"],
                          "model.gguf_file: /nonexistent/model.gguf does not exist"),
    "gguf-file-not-gguf": (["model.name_or_path=/models", "model.gguf_file=model.bin"], "is not a .gguf file name"),
    "model-weights-not-safetensors": (_model_dir("bin"), "needs config.json and *.safetensors"),
    "model-architecture-unsupported": (_model_dir("t5"), "is not a CausalLM architecture"),
    "target-modules-match-nothing": (["method.target_modules=[nope_proj]"], "use names this model has: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
    "freeze-rule-matches-nothing": (["freeze.train=[nope]"], "freeze.train[0].patterns: 'nope' matches no parameter"),
    # environment / output directory
    "output-dir-is-a-file": (_output("file"), "exists and is a file"),
    "output-dir-not-writable": (_output("under_file"), "cannot write to output_dir"),
    "output-dir-foreign": (_output("foreign"), "was not written by llama-recipes"),
    "output-dir-other-recipe": (_output("other_recipe"), "holds a run of a different recipe"),
    "resume-never-with-checkpoints": (_output("checkpoints"), "resume is 'never'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tmp_path, capsys):
    how, expect = CASES[case]
    recipe = {"output_dir": str(tmp_path / "out"), **json.loads(json.dumps(BASE))}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    args = how(tmp_path, recipe) if callable(how) else how
    if not getattr(how, "own_file", False):
        path.write_text(yaml.safe_dump(recipe))  # the setup may have edited the recipe dict
    before = _snapshot(tmp_path)
    code = cli_main([str(path), *args])
    err = capsys.readouterr().err
    assert code != 0
    assert expect in err, err
    assert "fix:" in err and "Traceback" not in err
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before, "a file on disk was changed"


def test_catalogue_size_and_docs():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md").read_text()
    assert len(CASES) >= 30
    missing = [c for c in CASES if f"`{c}`" not in doc]
    assert not missing, f"docs/troubleshooting.md lacks: {missing}"


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "o"), **BASE}))
    with pytest.raises(UserError, match="did you mean"):
        cli_main([str(path), "method.rr=4", "--debug"])


def test_missing_pad_token_is_handled(tmp_path):
    from llama_recipes import modeling
    from llama_recipes.schema.model import ModelConfig

    d = tmp_path / "tok"
    shutil.copytree(MODEL, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tokenizer = modeling.load_tokenizer(ModelConfig(name_or_path=str(d)))
    assert tokenizer.pad_token == tokenizer.eos_token
