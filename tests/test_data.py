"""Data: formats, loss masks token by token, EOS, packing without leaks, truncation, bad rows, sources."""
import itertools
import json
import os
import time
from pathlib import Path

import pytest
from conftest import TINY

from llama_recipes import data, modeling, training
from llama_recipes.errors import RecipeError, UserError
from llama_recipes.schema import validate_recipe
from llama_recipes.schema.data import DataConfig

EOS = "</s>"


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def recipe_for(tmp_path, data_section: dict, training_section: dict | None = None, model: dict | None = None):
    return validate_recipe({
        "output_dir": str(tmp_path / "out"),
        "model": {"name_or_path": str(TINY), "dtype": "float32", **(model or {})},
        "data": data_section,
        "method": {"name": "lora"},
        "training": {"max_length": 128, "bf16": False, "activation_checkpointing": False, "report_to": "none",
                     "per_device_train_batch_size": 4,
                     **(training_section or {})},
    })


_MODELS: dict = {}


def trainer_for(recipe):
    """The pipeline's data stages and trainer, on the tiny model (no method applied: data only)."""
    tok = modeling.load_tokenizer(recipe.model)
    key = recipe.model.attn_implementation
    if key not in _MODELS:
        _MODELS[key] = modeling.load_model(recipe.model)
    built = data.build_datasets(recipe.data)
    train, eval_ds, stats = data.prepare(recipe, tok, built)
    trainer = training.build_trainer(recipe, _MODELS[key], tok, train, eval_ds)
    return trainer, tok, data.finish_report(recipe, trainer, stats)


def spans(ids, labels):
    """Contiguous supervised spans as token lists."""
    out, cur = [], []
    for i, lab in zip(ids, labels):
        if lab == -100:
            if cur:
                out.append(cur)
            cur = []
        else:
            assert lab == i
            cur.append(i)
    return out + ([cur] if cur else [])


# -- label masks and EOS, token by token --------------------------------------------------------------

PC_CASES = {
    "alpaca": ({"instruction": "Give the last word.", "input": "frog fox tea", "output": "tea"},
               data.ALPACA_PROMPT.format(instruction="Give the last word.", input="frog fox tea"), "tea"),
    "prompt_completion": ({"prompt": "Say owl twice:\n", "completion": "owl owl"}, "Say owl twice:\n", "owl owl"),
    "summarization": ({"dialogue": "Anna: Hi.\nBen: Hello.", "summary": "They greet."},
                      data.SUMMARY_PROMPT.format(document="Anna: Hi.\nBen: Hello."), "They greet."),
}


@pytest.mark.parametrize("fmt", list(PC_CASES))
def test_completion_only_mask_and_eos_token_by_token(tmp_path, fmt):
    row, prompt, completion = PC_CASES[fmt]
    path = write_jsonl(tmp_path / "d" / "train.jsonl", [row])
    trainer, tok, _ = trainer_for(recipe_for(tmp_path, {"path": path, "format": fmt}))
    ex = trainer.train_dataset[0]
    prompt_ids = tok(prompt)["input_ids"]
    full = tok(prompt + completion + EOS)["input_ids"]
    assert ex["input_ids"] == full
    assert ex["labels"][:len(prompt_ids)] == [-100] * len(prompt_ids)  # bos + prompt unsupervised
    assert ex["labels"][len(prompt_ids):] == full[len(prompt_ids):]    # every completion token + EOS
    assert tok.decode(full[len(prompt_ids):]) == completion + EOS
    assert ex["input_ids"][-1] == tok.eos_token_id


def test_train_on_prompt_supervises_everything(tmp_path):
    row, prompt, completion = PC_CASES["alpaca"]
    path = write_jsonl(tmp_path / "d" / "train.jsonl", [row])
    trainer, tok, _ = trainer_for(recipe_for(tmp_path, {"path": path, "train_on_prompt": True}))
    ex = trainer.train_dataset[0]
    assert ex["labels"] == ex["input_ids"] == tok(prompt + completion + EOS)["input_ids"]


def test_chat_assistant_only_mask_and_eos(tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say owl and hat."},
            {"role": "assistant", "content": "owl hat"}, {"role": "user", "content": "Say car twice."},
            {"role": "assistant", "content": "car car"}]
    path = write_jsonl(tmp_path / "d" / "train.jsonl", [{"messages": msgs}])
    trainer, tok, _ = trainer_for(recipe_for(tmp_path, {"path": path}))
    ex = trainer.train_dataset[0]
    assert ex["input_ids"] == tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    got = [tok.decode(s) for s in spans(ex["input_ids"], ex["labels"])]
    assert got == ["owl hat" + EOS, "car car" + EOS]   # exactly the assistant turns, each ending in EOS
    assert sum(lab != -100 for lab in ex["labels"]) == sum(len(tok(t, add_special_tokens=False)["input_ids"])
                                                          for t in got)


def test_text_supervises_all_tokens_and_appends_eos(tmp_path):
    path = write_jsonl(tmp_path / "d" / "train.jsonl", [{"text": "It was sunny in the town."}])
    trainer, tok, _ = trainer_for(recipe_for(tmp_path, {"path": path}))
    ex = trainer.train_dataset[0]
    assert ex["input_ids"] == tok("It was sunny in the town." + EOS)["input_ids"] == ex["labels"]
    assert ex["input_ids"][-1] == tok.eos_token_id


def test_chat_template_without_generation_markers_trains_assistant_only(tmp_path):
    # Masks come from the template itself (llama_recipes/chat.py, tests/test_chat.py): no markers needed.
    path = write_jsonl(tmp_path / "d" / "train.jsonl",
                       [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] + eos_token }}\n{% endfor %}"
    trainer, tok, _ = trainer_for(recipe_for(tmp_path, {"path": path, "chat_template": plain}))
    ex = trainer.train_dataset[0]
    assert ex["input_ids"] == tok("user: hi" + EOS + "\nassistant: yo" + EOS + "\n", add_special_tokens=False)["input_ids"]
    # no generation prompt in this template: the model writes "assistant: " itself, so it is supervised
    assert [tok.decode(s) for s in spans(ex["input_ids"], ex["labels"])] == ["assistant: yo" + EOS]
    assert trainer.args.assistant_only_loss is False  # TRL gets the mask with the tokens
    # with train_on_prompt everything is supervised, EOS included
    trainer, tok, _ = trainer_for(recipe_for(tmp_path, {"path": path, "chat_template": plain,
                                                        "train_on_prompt": True}))
    ex = trainer.train_dataset[0]
    assert ex["labels"] == ex["input_ids"] and tok.decode(ex["input_ids"]).endswith("yo" + EOS + "\n")


# -- packing never leaks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_losses_equal_each_sample_alone(tmp_path, attn):
    """Packed rows stay a [batch, width] tensor (batching.PackedRowCollator); every sample of every
    row has the logits and loss it has when run alone."""
    import torch

    recipe = recipe_for(tmp_path, {"path": "builtin:demo", "max_samples": 48},
                        {"packing": True, "max_length": 256, "per_device_train_batch_size": 3},
                        {"attn_implementation": attn})
    trainer, _, _ = trainer_for(recipe)
    model = trainer.model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])  # what the train dataloader collates
    rows = trainer.train_dataset[:3]["seq_lengths"]
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    assert ids.shape == (3, max(map(sum, rows))) and "attention_mask" not in batch
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits  # what SFTTrainer.compute_loss runs
        samples = 0
        for r, lengths in enumerate(rows):
            starts = [sum(lengths[:k]) for k in range(len(lengths) + 1)]
            assert pos[r, :starts[-1]].tolist() == [p for n in lengths for p in range(n)]
            for a, b in itertools.pairwise(starts):
                seg_ids, seg_labels = ids[r, a:b], labels[r, a:b]
                assert seg_labels[0] == -100  # the first token is never predicted from the previous sample
                alone = model(input_ids=seg_ids[None]).logits[0]
                # fp32: the packed row's matmuls have other shapes, so they sum in another order (~1e-5)
                torch.testing.assert_close(packed[r, a:b], alone, rtol=0, atol=1e-4)
                lp = torch.nn.functional.cross_entropy(packed[r, a:b - 1], seg_labels[1:], ignore_index=-100)
                la = torch.nn.functional.cross_entropy(alone[:-1], seg_labels[1:], ignore_index=-100)
                assert torch.isfinite(lp) and abs(lp.item() - la.item()) < 1e-5, (r, a, b, lp.item(), la.item())
                samples += 1
    assert samples >= 9, "the packed rows should hold several samples each"
    # The check can fail: with an attention mask (a plain padded collator), samples see their predecessors.
    with torch.no_grad():
        leaky = model(**inputs, attention_mask=torch.ones_like(ids), use_cache=False).logits
    second = slice(rows[0][0], sum(rows[0][:2]))
    assert (leaky[0, second] - packed[0, second]).abs().max() > 1e-2


def test_packing_efficiency_on_demo_data(tmp_path):
    # Demo rows are 38-78 tokens; at max_length 256 bins of three long rows leave gaps (0.896, see docs/data.md).
    recipe = recipe_for(tmp_path, {"path": "builtin:demo"}, {"packing": True, "max_length": 512,
                                                             "per_device_train_batch_size": 16})
    trainer, _, stats = trainer_for(recipe)
    assert stats["packing_efficiency"] >= 0.95
    assert 0 < stats["padded_efficiency"] < stats["packing_efficiency"]
    assert sum(sum(r) for r in trainer.train_dataset["seq_lengths"]) == stats["train_tokens"]
    assert trainer.args.eval_packing is False


@pytest.mark.parametrize("overrides,expect", [
    ({"model": {"attn_implementation": "flex_attention"}}, "attend to each other"),
    ({"training": {"packing_strategy": "wrapped"}}, "wrapped"),
])
def test_packing_that_would_leak_is_refused(overrides, expect):
    rec = {"output_dir": "/tmp/x", "model": {"name_or_path": "builtin:tiny-llama"}, "data": {"path": "builtin:demo"},
           "method": {"name": "lora"}, "training": {"packing": True}}
    for k, v in overrides.items():
        rec[k] = {**rec[k], **v}
    with pytest.raises(RecipeError, match=expect):
        validate_recipe(rec)


@pytest.mark.parametrize("key", ["completion_only_loss", "assistant_only_loss", "dataset_text_field"])
def test_data_owned_training_keys_are_refused(key):
    rec = {"output_dir": "/tmp/x", "model": {"name_or_path": "builtin:tiny-llama"}, "data": {"path": "builtin:demo"},
           "method": {"name": "lora"}, "training": {key: "text" if key == "dataset_text_field" else False}}
    with pytest.raises(RecipeError, match=f"training.{key}.*data"):
        validate_recipe(rec)


# -- truncation ---------------------------------------------------------------------------------------------


def test_lengths_match_trl_and_truncation_is_counted(tmp_path):
    recipe = recipe_for(tmp_path, {"path": "builtin:demo", "max_samples": 64}, {"max_length": 1024})
    tok = modeling.load_tokenizer(recipe.model)
    trainer, _, stats = trainer_for(recipe)
    full = [len(x) for x in trainer.train_dataset["input_ids"]]
    assert data._lengths(data.build_datasets(recipe.data)[0], tok) == full
    cut = sorted(full)[len(full) // 2]
    short = recipe_for(tmp_path, {"path": "builtin:demo", "max_samples": 64}, {"max_length": cut})
    trainer, _, stats = trainer_for(short)
    over = [n for n in full if n > cut]
    assert stats["train_over_length"] == len(over) > 0
    assert stats["train_truncated_tokens"] == sum(n - cut for n in over)
    assert max(len(x) for x in trainer.train_dataset["input_ids"]) == cut
    drop = recipe_for(tmp_path, {"path": "builtin:demo", "max_samples": 64, "over_length": "drop"},
                      {"max_length": cut})
    trainer, _, stats = trainer_for(drop)
    assert len(trainer.train_dataset) == 64 - len(over) and stats["train_dropped_over_length"] == len(over)


# -- bad rows -------------------------------------------------------------------------------------------------

GOOD_ALPACA = {"instruction": "Say hi.", "input": "", "output": "hi"}
BAD = {
    "empty completion": ([GOOD_ALPACA, {"instruction": "Say hi.", "input": "", "output": "  "}], "alpaca",
                         "row 1: column `output`: empty"),
    "missing value": ([GOOD_ALPACA, {"instruction": "Say hi.", "input": ""}], "alpaca",
                      "row 1: column `output`: missing value"),
    "wrong type": ([{"prompt": "p", "completion": 5}], "prompt_completion", "row 0: column `completion`: expected a string"),
    "empty messages": ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                        {"messages": []}], "chat", "row 1: column `messages`: empty"),
    "unknown role": ([{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "yo"}]}], "chat",
                     "row 0: column `messages`: message 1 has unknown role 'robot'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_row_error_names_file_row_column(tmp_path, case):
    rows, fmt, expect = BAD[case]
    path = write_jsonl(tmp_path / f"{case.replace(' ', '_')}.jsonl", rows)
    with pytest.raises(UserError) as e:
        data.build_datasets(DataConfig(path=path, format=fmt))
    assert f"{path} {expect}" in str(e.value) and "bad_rows: skip" in str(e.value)


def test_missing_column_names_file_and_fix(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "x", "answer": "y"}])
    with pytest.raises(UserError) as e:
        data.build_datasets(DataConfig(path=path, format="alpaca"))
    assert f"{path}: column 'output' missing for format alpaca" in str(e.value) and "data.columns" in str(e.value)
    train, _, fmt = data.build_datasets(DataConfig(path=path, columns={"output": "answer"}))
    assert fmt == "alpaca" and train[0]["completion"] == "y"


def test_bad_rows_skipped_and_counted(tmp_path):
    rows = [GOOD_ALPACA, {**GOOD_ALPACA, "output": ""}, GOOD_ALPACA, {**GOOD_ALPACA, "instruction": None}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    built = data.build_datasets(DataConfig(path=path, bad_rows="skip"))
    assert len(built[0]) == 2 and built.stats["skipped_rows"] == 2


# -- classification ------------------------------------------------------------------------------------------


def test_classification_labels_are_classlabel(tmp_path):
    train, eval_ds, fmt = data.build_datasets(DataConfig(path="builtin:classify", eval_split="eval"))
    assert fmt == "classification"
    names = train.features["label"].names
    assert names == sorted(names) == ["animals", "colours", "food", "weather"]
    assert eval_ds.features["label"].names == names
    raw = [json.loads(x) for x in (Path(data.resolve("builtin:classify", "data")) / "train.jsonl").open()][:5]
    assert [names[i] for i in train["label"][:5]] == [r["label"] for r in raw]
    d = tmp_path / "ints"
    write_jsonl(d / "train.jsonl", [{"text": "a", "label": 2}, {"text": "b", "label": 0}])
    train, _, _ = data.build_datasets(DataConfig(path=str(d)))
    assert train.features["label"].names == ["0", "1", "2"] and train["label"] == [2, 0]


def test_classification_eval_label_unseen_in_train_is_a_bad_row(tmp_path):
    d = tmp_path / "cls"
    write_jsonl(d / "train.jsonl", [{"text": "a cow", "label": "animals"}, {"text": "red", "label": "colours"}])
    write_jsonl(d / "eval.jsonl", [{"text": "a pig", "label": "animals"}, {"text": "rain", "label": "weather"}])
    with pytest.raises(UserError, match=r"eval.jsonl row 1: column `label`: 'weather' is not in the label set"):
        data.build_datasets(DataConfig(path=str(d), eval_split="eval"))
    built = data.build_datasets(DataConfig(path=str(d), eval_split="eval", bad_rows="skip"))
    assert len(built[1]) == 1 and built.stats["skipped_rows"] == 1


# -- sources: hub offline, mixing, splits, cache ------------------------------------------------------------------


def test_offline_hub_id_fails_fast_with_local_hint():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    start = time.time()
    with pytest.raises(UserError) as e:
        data.build_datasets(DataConfig(path="nobody-here/no-such-dataset"))
    assert time.time() - start < 10
    assert "offline" in str(e.value) and "local" in str(e.value)


def test_mix_by_weight_and_family_check(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{**GOOD_ALPACA, "output": f"a{i}"} for i in range(50)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"dialogue": f"X: {i}", "summary": f"b{i}"} for i in range(8)])
    cfg = DataConfig(mix=[{"path": a, "weight": 3}, {"path": b, "weight": 1}], max_samples=40)
    train, _, fmt = data.build_datasets(cfg)
    done = train["completion"]
    assert fmt == "alpaca+summarization" and len(done) == 40
    assert sum(c.startswith("a") for c in done) == 30 and sum(c.startswith("b") for c in done) == 10
    assert data.build_datasets(cfg)[0]["completion"] == done  # seeded
    c = write_jsonl(tmp_path / "c.jsonl", [{"text": "plain"}])
    with pytest.raises(UserError, match="render differently"):
        data.build_datasets(DataConfig(mix=[{"path": a}, {"path": c}]))


def test_eval_split_by_fraction_is_seeded_and_disjoint():
    t1, e1, _ = data.build_datasets(DataConfig(path="builtin:summarize", eval_split=0.1, seed=3))
    t2, e2, _ = data.build_datasets(DataConfig(path="builtin:summarize", eval_split=0.1, seed=3))
    assert e1["prompt"] == e2["prompt"] and len(e1) == 30 and len(t1) == 270
    assert not set(e1["prompt"]) & set(t1["prompt"])
    _, e3, _ = data.build_datasets(DataConfig(path="builtin:summarize", eval_split=0.1, seed=4))
    assert e3["prompt"] != e1["prompt"]


def test_second_run_hits_the_cache(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{**GOOD_ALPACA, "output": f"w{i}"} for i in range(20)])
    first = data.build_datasets(DataConfig(path=path))[0]
    files = [f["filename"] for f in first.cache_files]
    stamps = [os.stat(f).st_mtime_ns for f in files]
    time.sleep(0.05)
    second = data.build_datasets(DataConfig(path=path))[0]
    assert [f["filename"] for f in second.cache_files] == files  # same processed file, loaded not rewritten
    assert [os.stat(f).st_mtime_ns for f in files] == stamps


def test_local_csv_parquet_and_custom_template(tmp_path):
    import datasets

    d = tmp_path / "csvdir"
    d.mkdir()
    (d / "train.csv").write_text("question,answer\nSay hi.,hi\nSay yo.,yo\n")
    cfg = DataConfig(path=str(d), columns={"instruction": "question", "output": "answer"},
                     prompt_template="Q: {instruction}\nA: ")
    train, _, fmt = data.build_datasets(cfg)
    assert fmt == "alpaca" and train[1] == {"prompt": "Q: Say yo.\nA: ", "completion": "yo"}
    pq = tmp_path / "t.parquet"
    datasets.Dataset.from_dict({"text": ["one", "two"]}).to_parquet(str(pq))
    train, _, fmt = data.build_datasets(DataConfig(path=str(pq)))
    assert fmt == "text" and train["text"] == ["one", "two"]
    with pytest.raises(UserError, match=r"prompt_template uses \['question'\]"):
        data.build_datasets(cfg.model_copy(update={"prompt_template": "Q: {question}"}))
