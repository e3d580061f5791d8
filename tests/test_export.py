"""Merge/export of mergeable adapters, clear refusal for the others, and several adapters on one base.

Reuses the method runs of test_methods.py (the `trained` fixture trains each method once).
"""
import json

import pytest
import torch
from conftest import ROOT
from test_methods import PROMPTS, SHORT, trained  # noqa: F401  (fixture)

from llama_recipes.errors import UserError
from llama_recipes.schema import load_recipe

# fp32 summation order only: merging computes (W + BA)x where the adapter computed Wx + B(Ax). Each
# logit passes 2 matmul stages per layer (L = 4) of dot products up to K = 352 long, so the
# difference is about 2 * L * sqrt(K) * 2**-24 = 9e-6 relative, x logits up to ~20 = 1.8e-4; measured
# 1e-5 or less (docs/methods.md). 8-bit is compared with its own reference (below).
MERGE_TOL = 2 * 4 * 352 ** 0.5 * 2.0 ** -24 * 20
TOLERANCE = {"lora": MERGE_TOL, "dora": MERGE_TOL, "ia3": MERGE_TOL, "qlora4": MERGE_TOL, "qlora8": MERGE_TOL}


def reference_model(key, run):
    """What the merged model must equal: the in-memory trained model, except for 8-bit.

    LLM.int8 also quantizes the *activations* of every matmul (vector-wise int8), which a dense
    model cannot reproduce; its reference is the dequantized base with the adapter on top.
    """
    if key != "qlora8":
        return run.model.eval()
    from peft import PeftModel

    from llama_recipes.export import load_base_for_merge

    base, _ = load_base_for_merge(run.output_dir)
    return PeftModel.from_pretrained(base, run.output_dir).eval()


@pytest.mark.parametrize("key", TOLERANCE)
def test_merged_model_loads_with_plain_transformers(trained, tmp_path, key):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llama_recipes.evaluation import generate
    from llama_recipes.export import merge_and_export

    _, run = trained(key)
    merged_dir = merge_and_export(run.output_dir, tmp_path / "merged")
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    assert not list(merged_dir.glob("*.bin")) and not list(merged_dir.glob("adapter_*"))
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert all(p.dtype == torch.float32 for p in merged.parameters())  # QLoRA: dequantized to compute dtype
    tok = AutoTokenizer.from_pretrained(merged_dir)
    ids = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = reference_model(key, run)
        want = ref(**ids).logits
        got = merged(**ids).logits
    assert (got - want).abs().max() <= TOLERANCE[key], (got - want).abs().max()
    assert generate(merged, tok, PROMPTS, 6) == generate(ref, run.tokenizer, PROMPTS, 6)


@pytest.mark.parametrize("key,why", [
    ("prefix", "key/value vectors"), ("prompt_text", "virtual tokens"), ("llama_adapter", "gated attention"),
])
def test_unmergeable_methods_are_a_clear_error(trained, tmp_path, key, why):
    from llama_recipes.cli import run_command
    from llama_recipes.export import merge_and_export

    _, run = trained(key)
    with pytest.raises(UserError, match="cannot merge") as e:
        merge_and_export(run.output_dir, tmp_path / "merged")
    assert why in str(e.value) and "not a weight delta" in str(e.value)
    assert not (tmp_path / "merged").exists()
    assert run_command("export", [str(run.output_dir), str(tmp_path / "m2")]) == 2  # the CLI: message, exit 2


def test_export_cli(trained, tmp_path, capsys):
    from llama_recipes.cli import run_command

    _, run = trained("lora")
    assert run_command("export", [str(run.output_dir), str(tmp_path / "merged"), "--verify"]) == 0
    diff = float(capsys.readouterr().out.rsplit(":", 1)[1])
    assert diff < MERGE_TOL


# -- several adapters on one base -----------------------------------------------------------------

def _task_data(tmp_path, instruction: str):
    rows = [json.loads(line) for line in (ROOT / "llama_recipes/assets/data/demo/train.jsonl").open()]
    ev = [json.loads(line) for line in (ROOT / "llama_recipes/assets/data/demo/eval.jsonl").open()]
    d = tmp_path / ("data_" + instruction.split()[0].lower())
    d.mkdir()
    for name, src in (("train", rows), ("eval", ev)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in src if r["instruction"] == instruction))
    return d


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    """Two LoRA adapters on the same base, trained on different sub-tasks of the demo data."""
    from llama_recipes import pipeline

    tmp = tmp_path_factory.mktemp("multi")
    runs = {}
    for name, instruction in (("reverse", "Reverse the list of words."), ("last", "Give the last word.")):
        recipe = load_recipe(ROOT / "recipes/demo/tiny_lora.yaml", [
            *SHORT, "training.max_steps=20", "training.learning_rate=5e-3", "method.r=8",
            f"data.path={_task_data(tmp, instruction)}", f"output_dir={tmp / name}"])
        runs[name] = pipeline.train(recipe)
    return runs


def test_switch_adapters_on_one_base(two_adapters, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llama_recipes import data
    from llama_recipes.adapters import MultiAdapter
    from llama_recipes.cli import run_command
    from llama_recipes.evaluation import generate

    multi = MultiAdapter({k: r.output_dir for k, r in two_adapters.items()})
    base_ids = {id(p) for n, p in multi.model.named_parameters() if "lora_" not in n}
    ids = multi.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    logits, answers = {}, {}
    for name, run in two_adapters.items():
        model = multi.use(name)
        with torch.no_grad():
            logits[name] = model(**ids).logits
        answers[name] = multi.generate(name, PROMPTS, 6, raw=True)
        base_path = json.loads((run.output_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
        alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), run.output_dir).eval()
        with torch.no_grad():
            assert torch.equal(logits[name], alone(**ids).logits), name
        assert answers[name] == generate(alone, multi.tokenizer, PROMPTS, 6)
        # without raw: the text goes into the Alpaca template, as training rendered this run's rows
        trained_prompt = data.render_alpaca({"instruction": PROMPTS[1], "input": "", "output": ""})["prompt"]
        assert multi.generate(name, [PROMPTS[1]], 6) == generate(alone, multi.tokenizer, [trained_prompt], 6)
    # the same base tensors serve both adapters, and the adapters give different outputs
    assert base_ids == {id(p) for n, p in multi.model.named_parameters() if "lora_" not in n}
    assert (logits["reverse"] - logits["last"]).abs().max() > 1e-2

    report = multi.memory()
    assert report.shared == report.base_bytes + sum(report.adapter_bytes.values())
    assert report.separate == 2 * report.base_bytes
    text = report.render()
    assert "one base + 2 adapters" in text and "2 full models" in text
    assert run_command("adapters", [f"{k}={r.output_dir}" for k, r in two_adapters.items()] + ["--prompt", PROMPTS[1]]) == 0
    out = capsys.readouterr().out
    assert "one base + 2 adapters" in out and out.count('"adapter"') == 2


def test_each_adapter_is_best_on_its_own_task(two_adapters):
    """Eval loss of each adapter on its own task's held-out rows beats the other adapter's."""
    from llama_recipes.adapters import MultiAdapter
    from llama_recipes.evaluation import eval_loss

    multi = MultiAdapter({k: r.output_dir for k, r in two_adapters.items()})
    for task, run in two_adapters.items():
        ds, collator = run.trainer.eval_dataset, run.trainer.data_collator
        own = eval_loss(multi.use(task), ds, collator)["loss"]
        other = eval_loss(multi.use(next(k for k in two_adapters if k != task)), ds, collator)["loss"]
        assert own < other, (task, own, other)


def test_adapters_of_different_types_are_refused(trained, two_adapters):
    from llama_recipes.adapters import MultiAdapter

    _, prefix = trained("prefix")
    with pytest.raises(UserError, match="different PEFT types"):
        MultiAdapter({"a": two_adapters["reverse"].output_dir, "b": prefix.output_dir})


@pytest.mark.parametrize("fmt", ["alpaca", "summarization", "chat", "text", "prompt_completion"])
def test_adapters_render_a_prompt_as_the_run_trained(tmp_path, fmt):
    """`llama-recipes adapters --prompt TEXT` feeds each adapter the text as its training rendered
    prompts: the run's recipe.yaml (prompt_template) and metrics.json (the data format it detected)."""
    import shutil

    import yaml
    from conftest import TINY

    from llama_recipes import data, modeling
    from llama_recipes.adapters import prompt_renderer
    from llama_recipes.schema.model import ModelConfig

    run = tmp_path / "run"
    run.mkdir()
    template = {"prompt_completion": "Q: {question}\nA: "}.get(fmt)
    (run / "recipe.yaml").write_text(yaml.safe_dump({"data": {"path": "x", "prompt_template": template}}))
    (run / "metrics.json").write_text(json.dumps({"data_format": fmt}))
    for f in TINY.iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(f, run / f.name)
    tok = modeling.load_tokenizer(ModelConfig(name_or_path=str(TINY)))
    render, special, said = prompt_renderer(run, tok)
    assert said == fmt
    text = "Give the last word."
    expected = {
        "alpaca": data.render_alpaca({"instruction": text, "output": ""})["prompt"],
        "summarization": data.SUMMARY_PROMPT.format(document=text),
        "chat": tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True),
        "text": text,
        "prompt_completion": "Q: Give the last word.\nA: ",
    }[fmt]
    assert render(text) == expected and special == (fmt != "chat")
    assert fmt in ("text",) or render(text) != text
    if fmt == "alpaca":  # --input: the row's `input`, rendered as training rendered rows that have one
        with_input = data.render_alpaca({"instruction": text, "input": "frog fox tea", "output": ""})["prompt"]
        assert render(text, "frog fox tea") == with_input and "### Input:" in with_input
