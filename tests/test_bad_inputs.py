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
    return _raw(text.encode("utf-8"))


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
        elif kind == "damaged_recipe":
            out.mkdir()
            (out / "recipe.yaml").write_text("output_dir: [unclosed\n")
        return []
    return setup


NO_COLUMNS = '{"question": "a", "answer": "b"}\n'
ROW = '{"instruction": "a", "output": "b"}\n'


def _raw(data: bytes):
    """The recipe file itself holds these bytes (an encoding problem)."""
    def setup(tmp, recipe):
        (tmp / "r.yaml").write_bytes(data)
        return []
    setup.own_file = True
    return setup


def _recipe_is_dir(tmp, recipe):
    (tmp / "r.yaml").unlink()
    (tmp / "r.yaml").mkdir()
    return []


_recipe_is_dir.own_file = True


def _data_bytes(name, data: bytes, *extra):
    def setup(tmp, recipe):
        (tmp / name).write_bytes(data)
        return [f"data.path={tmp / name}", *extra]
    return setup


def _parquet_truncated(tmp, recipe):
    import pandas as pd

    pd.DataFrame({"instruction": ["a"] * 20, "output": ["b"] * 20}).to_parquet(tmp / "rows.parquet")
    blob = (tmp / "rows.parquet").read_bytes()
    (tmp / "rows.parquet").write_bytes(blob[: len(blob) // 2])
    return [f"data.path={tmp / 'rows.parquet'}"]


def _chat_template(text: bytes):
    def setup(tmp, recipe):
        (tmp / "t.jinja").write_bytes(text)
        return ["data.path=builtin:chat", f"data.chat_template={tmp / 't.jinja'}"]
    return setup


def custom_code_model(d: Path) -> Path:
    """A copy of the tiny Llama whose config names its own Python classes (auto_map): remote code.

    Importing that code appends a line to $REMOTE_CODE_MARK (when set), so a test can tell when it ran.
    """
    shutil.copytree(MODEL, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="custom_llama", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                    "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "configuration_custom.py").write_text(
        "import os\nfrom transformers import LlamaConfig\n"
        "if os.environ.get('REMOTE_CODE_MARK'):\n    open(os.environ['REMOTE_CODE_MARK'], 'a').write('ran\\n')\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom_llama'\n")
    (d / "modeling_custom.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .configuration_custom import CustomConfig\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    return d


def _model(kind):
    def setup(tmp, recipe):
        d = tmp / "model"
        if kind == "file":
            return [f"model.name_or_path={MODEL / 'config.json'}"]
        if kind == "empty":
            d.mkdir()
        elif kind == "custom":
            custom_code_model(d)
        elif kind == "truncated":
            shutil.copytree(MODEL, d)
            w = d / "model.safetensors"
            w.write_bytes(w.read_bytes()[:1000])
        return [f"model.name_or_path={d}"]
    return setup


def _adapter(kind):
    def setup(tmp, recipe):
        d = tmp / "adapter"
        d.mkdir()
        cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
               "base_model_name_or_path": str(MODEL)}
        (d / "adapter_config.json").write_text(json.dumps(cfg)[:30] if kind == "config" else json.dumps(cfg))
        (d / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")  # cut short
        return ["data.eval_split=0.25", "--eval-only", "--checkpoint", str(d)]
    return setup


def _mlp_head(tmp, recipe):
    recipe["method"] = {"name": "mlp_head", "layer": 99}
    recipe["data"] = {"path": "builtin:classify", "max_samples": 16}
    return []

def _head_packing(tmp, recipe):
    recipe["method"] = {"name": "classifier_head"}
    recipe["data"] = {"path": "builtin:classify", "max_samples": 16}
    recipe["training"]["packing"] = True
    return []


def _list_index_override(tmp, recipe):
    recipe["method"]["target_modules"] = ["q_proj", "v_proj"]
    return ["method.target_modules.0=k_proj"]


def _output_in_model(tmp, recipe):
    shutil.copytree(MODEL, tmp / "model")
    recipe["output_dir"] = str(tmp / "model")
    return [f"model.name_or_path={tmp / 'model'}"]


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
    "recipe-is-a-directory": (_recipe_is_dir, "is a directory"),
    "recipe-not-utf8": (_raw(b"output_dir: caf\xe9\n"), "the recipe is not UTF-8 text (byte 15"),
    "recipe-utf16-without-bom": (_raw("output_dir: o\n".encode("utf-16-le")), "it holds NUL bytes: UTF-16"),
    "learning-rate-negative": (["training.learning_rate=-1"], "training.learning_rate: Input should be greater than 0"),
    "learning-rate-nan": (["training.learning_rate=.nan"], "training.learning_rate: Input should be a finite number"),
    "batch-size-zero": (["training.per_device_train_batch_size=0"], "training.per_device_train_batch_size: Input should be greater than 0"),
    "gradient-accumulation-zero": (["training.gradient_accumulation_steps=0"], "training.gradient_accumulation_steps: Input should be greater than 0"),
    "logging-steps-zero": (["training.logging_steps=0"], "training.logging_steps: Input should be greater than 0"),
    "warmup-steps-negative": (["training.warmup_steps=-5"], "training.warmup_steps: Input should be greater than or equal to 0"),
    "optimizer-unknown": (["training.optim=adamw_nope"], "training.optim: 'adamw_nope' is not one of its values — did you mean 'adamw_torch'?"),
    "lr-scheduler-unknown": (["training.lr_scheduler_type=cosine_nope"], "training.lr_scheduler_type: 'cosine_nope' is not one of its values — did you mean 'cosine'?"),
    "seed-negative": (["seed=-1"], "seed: Input should be greater than or equal to 0"),
    "integer-too-large": (["method.r=100000000000000000000"], "method.r: 100000000000000000000 is out of range"),
    "target-modules-empty": (["method.target_modules=[]"], "method.target_modules: an empty list adapts nothing"),
    "prompt-template-malformed": (["data.prompt_template='Q: {instruction'"], "data.prompt_template: not a valid format string"),
    "prompt-template-positional-field": (["data.prompt_template='Q: {0}'"], "field {0} is not a column name"),
    "columns-map-two-onto-one": (["data.columns={instruction: q, output: q}"], "instruction and output both map to column 'q'"),
    "yaml-alias-bomb": (_body("output_dir: o\nx:\n  a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"  {n}: &{n} [" + ", ".join([f"*{p}"] * 10) + "]\n" for p, n in zip("abcdefgh", "bcdefghi"))),
                        "expands to more than 100,000 values once its YAML aliases"),
    "yaml-nested-too-deep": (_body("output_dir: " + "[" * 10000 + "]" * 10000 + "\n"), "nests more than 64 levels deep"),
    "yes-no-as-seed": (["seed=no"], "`seed: false` is a yes/no value"),
    "yes-no-as-rank": (["method.r=true"], "`r: true` is a yes/no value"),
    "yes-no-as-max-steps": (["training.max_steps=on"], "`max_steps: true` is a yes/no value"),
    "bf16-and-fp16": (["training.bf16=true", "training.fp16=true"], "training.bf16 and training.fp16 are both true"),
    "fp16-without-gpu": (["training.fp16=true"], "training.fp16: true without a GPU"),
    "output-dir-empty": (["output_dir="], "output_dir is empty"),
    "load-best-without-eval": (["training.load_best_model_at_end=true"], "load_best_model_at_end needs evaluation"),
    "head-with-packing": (_head_packing, "training.packing with method classifier_head"),
    "cosine-min-lr-without-kwargs": (["training.lr_scheduler_type=cosine_with_min_lr"], "needs training.lr_scheduler_kwargs"),
    "optim-package-missing": (["training.optim=galore_adamw"], "needs the Python package galore_torch"),
    "report-to-not-installed": (["training.report_to=wandb"], "needs the Python package wandb"),
    "push-to-hub-offline": (["training.push_to_hub=true"], "push_to_hub with HF_HUB_OFFLINE set"),
    "two-commands-in-flags": (["--estimate-memory", "--eval-only", "--base"], "are different commands"),
    "override-list-index": (_list_index_override, "method.target_modules is a list, and list items cannot be set one by one"),
    "output-dir-is-the-model-dir": (_output_in_model, "is the directory of model.name_or_path"),
    "eval-split-is-the-train-split": (["data.eval_split=train"], "the held-out numbers would be measured on training rows"),
    "retain-file-missing": (["eval.retain=[/nonexistent/retain.jsonl]"], "eval.retain: /nonexistent/retain.jsonl does not exist"),
    "prompt-template-huge-width": (["data.prompt_template='Q: {instruction:300000000}'"], "pads every prompt to 300,000,000"),
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
    "drop-last-leaves-no-batch": (["data.max_samples=2", "training.per_device_train_batch_size=4",
                                   "training.dataloader_drop_last=true"], "training ran zero optimizer steps"),
    "empty-after-tokenization": (["training.max_length=8"], "no training examples left after tokenization"),
    "over-length-drop-drops-all": (["training.max_length=8", "data.over_length=drop"],
                                   "data.over_length: drop dropped every training example"),
    "bad-rows-skip-drops-all": (_data_bytes("rows.jsonl", b'{"instruction": "a", "output": ""}\n' * 3, "data.bad_rows=skip"),
                                "data.bad_rows: skip dropped every row"),
    "columns-map-onto-existing-column": (_data_bytes("rows.jsonl", b'{"instruction": "a", "output": "b", "answer": "c"}\n',
                                                     "data.columns={output: answer}"),
                                         "already has a column `output`"),
    "data-file-empty": (_data_bytes("rows.jsonl", b""), "is empty"),
    "data-file-not-utf8": (_data_bytes("rows.jsonl", ROW.replace("a", "caf\xe9").encode("latin-1")), "is not UTF-8 text (invalid byte"),
    "data-file-utf16": (_data_bytes("rows.jsonl", ROW.encode("utf-16")), "is not UTF-8 text (it holds NUL bytes"),
    "data-csv-header-only": (_data_bytes("rows.csv", b"instruction,output\n"), "has no rows (a CSV needs a header line"),
    "data-parquet-truncated": (_parquet_truncated, "the file is damaged or not parquet"),
    "chat-template-syntax-error": (_chat_template(b"{% for m in messages %}{{ m.content }}"), "Jinja syntax error at line 1"),
    "chat-template-file-empty": (_chat_template(b"\n"), "is empty"),
    "chat-template-not-utf8": (_chat_template(b"{{ caf\xe9 }}"), "the chat template file is not UTF-8 text"),
    "chat-template-unsafe": (_chat_template(b"{{ messages.__class__.__mro__ }}{% for m in messages %}{{ m.content }}{% endfor %}"),
                             "the chat template tried something Jinja's sandbox forbids"),
    "chat-template-include": (_chat_template(b"{% include 'x.jinja' %}{% for m in messages %}{{ m.content }}{% endfor %}"),
                              "{% include %} and {% import %} are not available in chat templates"),
    "chat-template-output-huge": (_chat_template(b"{{ 'x' * 100000000 }}{% for m in messages %}{{ m.content }}{% endfor %}"),
                                  "one conversation rendered to 100,000,"),
    # model
    "model-path-missing": (["model.name_or_path=/nonexistent/model"], "model path /nonexistent/model does not exist"),
    "model-hub-id-offline": (["model.name_or_path=meta-llama/No-Such-Model"], "neither a local directory nor a reachable hub model"),
    "builtin-model-unknown": (["model.name_or_path=builtin:nope"], "no builtin model named 'nope'"),
    "gguf-file-missing": (["model.name_or_path=/nonexistent", "model.gguf_file=model.gguf"],
                          "model.gguf_file: /nonexistent/model.gguf does not exist"),
    "gguf-file-not-gguf": (["model.name_or_path=/models", "model.gguf_file=model.bin"], "is not a .gguf file name"),
    "model-weights-not-safetensors": (_model_dir("bin"), "needs config.json and *.safetensors"),
    "model-architecture-unsupported": (_model_dir("t5"), "is not a CausalLM architecture"),
    "model-path-is-a-file": (_model("file"), "config.json is a file, not a model directory"),
    "model-dir-empty": (_model("empty"), "is an empty directory"),
    "model-weights-truncated": (_model("truncated"), "a truncated or damaged *.safetensors file?"),
    "model-custom-code-untrusted": (_model("custom"), "ships its own Python code (auto_map in its config), and model.trust_remote_code is false"),
    "mlp-head-layer-out-of-range": (_mlp_head, "method.layer=99: this model has"),
    "eval-checkpoint-adapter-config-damaged": (_adapter("config"), "adapter_config.json is damaged"),
    "eval-checkpoint-adapter-weights-truncated": (_adapter("weights"), "cannot load the adapter in"),
    "target-modules-match-nothing": (["method.target_modules=[nope_proj]"], "use names this model has: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
    "freeze-rule-matches-nothing": (["freeze.train=[nope]"], "freeze.train[0].patterns: 'nope' matches no parameter"),
    # environment / output directory
    "output-dir-is-a-file": (_output("file"), "exists and is a file"),
    "output-dir-not-writable": (_output("under_file"), "cannot write to output_dir"),
    "output-dir-foreign": (_output("foreign"), "was not written by llama-recipes"),
    "output-dir-other-recipe": (_output("other_recipe"), "holds a run of a different recipe"),
    "resume-never-with-checkpoints": (_output("checkpoints"), "resume is 'never'"),
    "output-dir-recipe-damaged": (_output("damaged_recipe"), "recipe.yaml is damaged and cannot be read"),
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
    assert f"Cases from `tests/test_bad_inputs.py` ({len(CASES)})" in doc  # the count it quotes


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


def test_trust_remote_code_warning_comes_before_the_remote_code_runs(tmp_path, monkeypatch):
    """The tokenizer loads first, and with trust_remote_code it imports the model's own config class."""
    import logging

    from llama_recipes import modeling
    from llama_recipes.schema.model import ModelConfig

    mark = tmp_path / "ran"
    monkeypatch.setenv("REMOTE_CODE_MARK", str(mark))
    d = custom_code_model(tmp_path / "custom")
    seen = []

    class Spy(logging.Handler):
        def emit(self, record):
            if "trust_remote_code is on" in record.getMessage():
                seen.append(mark.exists())

    spy = Spy()
    logging.getLogger("llama_recipes").addHandler(spy)
    try:
        modeling.load_tokenizer(ModelConfig(name_or_path=str(d), trust_remote_code=True))
    finally:
        logging.getLogger("llama_recipes").removeHandler(spy)
    assert seen == [False]  # warned once, before any of its code ran
    assert mark.exists()  # and the tokenizer did run it (what the warning is for)


def test_estimate_memory_of_a_remote_code_model_never_reads_stdin(tmp_path, monkeypatch):
    import io

    from llama_recipes import memory
    from llama_recipes.schema import validate_recipe

    d = custom_code_model(tmp_path / "custom")
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # transformers' y/N question would hit EOF
    recipe = {**BASE, "output_dir": str(tmp_path / "o"), "model": {"name_or_path": str(d), "trust_remote_code": True}}
    shape, _, estimate = memory.estimate_recipe(validate_recipe(recipe))
    assert shape.num_layers == 4 and estimate.total > 0
    recipe["model"]["trust_remote_code"] = False
    with pytest.raises(UserError, match="ships its own Python code"):
        memory.estimate_recipe(validate_recipe(recipe))
