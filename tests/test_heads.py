"""Task heads on a frozen (or LoRA-adapted) tiny Llama: learning, frozen base, artifacts, reload.

Numbers (tiny-llama, builtin:classify, 200 eval rows, majority class 29%): see docs/partial_finetuning.md.
"""
import json

import pytest
import torch
from conftest import ROOT, TINY

from llama_recipes import heads
from llama_recipes.errors import UserError
from llama_recipes.schema import load_recipe

MODEL = TINY


def recipe(name: str, tmp_path, *overrides):
    return load_recipe(ROOT / f"recipes/demo/{name}.yaml", [
        f"output_dir={tmp_path}", "training.report_to=none", *overrides])


def base_weights():
    from transformers import AutoModel

    return {n: p.detach().clone() for n, p in AutoModel.from_pretrained(MODEL).named_parameters()}


def check_base_frozen(model, before):
    """Every base weight is bit-identical to the checkpoint's (names are matched by suffix)."""
    checked = 0
    for n, p in model.named_parameters():
        if "lora_" in n or "score" in n or n.startswith("head."):
            continue
        plain = n.replace(".base_layer", "")  # PEFT wraps adapted linears
        key = next(k for k in before if plain == k or plain.endswith("." + k))
        assert torch.equal(p.detach(), before[key]), n
        checked += 1
    assert checked == len(before)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    from llama_recipes import pipeline

    out = tmp_path_factory.mktemp("cls")
    return pipeline.train(recipe("tiny_classifier_head", out, "training.max_steps=60"))


def test_classifier_head_beats_majority_and_keeps_base_frozen(classifier):
    m = classifier.metrics
    after, before = m["eval_after"], m["eval_before"]
    # measured: before 0.280, after 0.630 at 60 steps (majority class 0.290)
    assert after["accuracy"] > after["majority_baseline"] + 0.25, after
    assert after["accuracy"] > before["accuracy"] + 0.2
    assert len(after["confusion_matrix"]) == 4 and sum(map(sum, after["confusion_matrix"])) == after["examples"] == 200
    assert after["labels"] == m["labels"] and not after["labels"][0].isdigit()  # names, in id order
    cfg = classifier.model.config
    assert m["trainable_params"] == cfg.hidden_size * 4  # score: hidden -> 4 labels, no bias
    check_base_frozen(classifier.model, base_weights())


def test_classifier_artifact_is_head_only_and_reloads_identically(classifier):
    out = classifier.output_dir
    files = {p.name for p in out.iterdir()}
    assert {"head_config.json", "head.safetensors", "trainable_parameters.json", "tokenizer.json"} <= files
    assert not any(f.startswith(("model", "pytorch_model", "adapter")) for f in files)  # no copy of the base
    cfg = json.loads((out / "head_config.json").read_text())
    assert cfg["labels"] == ["animals", "colours", "food", "weather"] and cfg["method"] == "classifier_head"
    texts = ["The cat and the dog played.", "It rained all day.", "I ate bread and cheese.", "Her coat is red."]
    loaded = heads.load(out)
    expected = heads.batch_logits(classifier.model, classifier.tokenizer, texts)
    assert torch.equal(loaded.logits(texts), expected)
    assert heads.predict(loaded, texts) == [cfg["labels"][i] for i in expected.argmax(-1).tolist()]


def test_evaluate_artifact_matches_training_metrics(classifier, tmp_path):
    r = recipe("tiny_classifier_head", tmp_path)
    result = heads.evaluate_artifact(r, classifier.output_dir)
    after = classifier.metrics["eval_after"]
    assert result["accuracy"] == after["accuracy"] and result["confusion_matrix"] == after["confusion_matrix"]
    assert heads.evaluate_artifact(r, classifier.output_dir, limit=10)["examples"] == 10


def test_mlp_head_trains_and_reloads_identically(tmp_path):
    from llama_recipes import pipeline

    run = pipeline.train(recipe("tiny_mlp_head", tmp_path, "training.max_steps=30"))
    h = run.model.base.config.hidden_size
    assert run.metrics["trainable_params"] == (h * 128 + 128) + (128 * 4 + 4)  # [128] hidden, 4 labels
    after = run.metrics["eval_after"]
    assert after["accuracy"] > after["majority_baseline"] + 0.25, after
    check_base_frozen(run.model.base, base_weights())
    texts = ["The cow ate the grass.", "A cold wind and snow.", "Green and blue are colours."]
    assert torch.equal(heads.load(tmp_path).logits(texts), heads.batch_logits(run.model, run.tokenizer, texts))


def test_lora_base_with_classifier_head_saves_head_in_adapter(tmp_path):
    """peft#1070: the trained head must be in the adapter; a plain PeftModel load reproduces the logits."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from llama_recipes import pipeline

    run = pipeline.train(recipe("tiny_classifier_head", tmp_path, "training.max_steps=5", "method.lora.r=4",
                                "eval.before_after=false"))
    keys = load_file(str(tmp_path / "adapter_model.safetensors")).keys()
    assert any("score" in k for k in keys) and any("lora_A" in k for k in keys)
    base = AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=4, pad_token_id=run.tokenizer.pad_token_id)
    plain = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    texts = ["The cat sat.", "Snow and rain."]
    assert torch.allclose(heads.batch_logits(plain, run.tokenizer, texts),
                          heads.batch_logits(run.model, run.tokenizer, texts), atol=1e-6)
    assert torch.equal(heads.load(tmp_path).logits(texts), heads.batch_logits(run.model, run.tokenizer, texts))


def test_pooling_last_non_pad_and_mean_with_left_or_right_padding():
    h = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert heads.pool(h, right, "last").flatten().tolist() == [1.0, 7.0]
    assert heads.pool(h, left, "last").flatten().tolist() == [3.0, 7.0]
    assert heads.pool(h, right, "mean").flatten().tolist() == [0.5, 5.5]


def test_classification_metrics():
    m = heads.classification_metrics([0, 0, 1, 2], [0, 1, 1, 2], 3)
    assert m["accuracy"] == 0.75 and m["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_confusion_matrix_is_labelled_with_label_names():
    from llama_recipes.evaluation import results_table

    m = heads.classification_metrics([0, 0, 1, 2], [0, 1, 1, 2], 3, ["sport", "tech", "world"])
    table = results_table({"artifact": "out", "metrics": m})
    assert "| true \\ predicted | sport | tech | world |" in table
    assert "| sport | 1 | 0 | 0 |" in table and "| tech | 1 | 1 | 0 |" in table


def test_head_on_non_classification_data_is_a_user_error(tmp_path):
    from llama_recipes import pipeline

    # a format the classification objective does not train on: refused by validation, before any load
    with pytest.raises(UserError, match="data.format alpaca cannot train objective classification"):
        recipe("tiny_classifier_head", tmp_path, "data.path=builtin:demo", "data.format=alpaca")
    # detected from the columns (format auto): the data check says so
    r = recipe("tiny_classifier_head", tmp_path, "data.path=builtin:demo", "data.format=auto")
    with pytest.raises(UserError, match="holds alpaca data .* trains on classification data"):
        pipeline.train(r)
    # said to be classification, without the columns: the missing column is named
    r = recipe("tiny_classifier_head", tmp_path, "data.path=builtin:demo", "data.format=classification")
    with pytest.raises(UserError, match="column 'text' missing for format classification"):
        pipeline.train(r)


def test_lora_base_with_mlp_head_saves_adapter_and_head(tmp_path):
    from llama_recipes import pipeline

    run = pipeline.train(recipe("tiny_mlp_head", tmp_path, "training.max_steps=3", "method.lora.r=2",
                                "eval.before_after=false"))
    assert {"adapter_model.safetensors", "adapter_config.json", "head.safetensors", "head_config.json"} <= {
        p.name for p in tmp_path.iterdir()}
    check_base_frozen(run.model.base, base_weights())
    texts = ["A brown horse.", "Sunny and warm."]
    assert torch.equal(heads.load(tmp_path).logits(texts), heads.batch_logits(run.model, run.tokenizer, texts))


def test_eval_only_cli_on_a_head_artifact_reports_what_training_measured(classifier):
    """`run_recipe.py RECIPE --eval-only` dispatches a head artifact to heads.evaluate_artifact."""
    from llama_recipes.cli import main

    out = classifier.output_dir
    args = [str(ROOT / "recipes/demo/tiny_classifier_head.yaml"), f"output_dir={out}", "training.report_to=none",
            "training.max_steps=60"]
    assert main([*args, "--eval-only"]) == 0
    got = json.loads((out / "eval" / "eval_results.json").read_text())
    want = classifier.metrics["eval_after"]
    assert got["metrics"]["accuracy"] == pytest.approx(want["accuracy"])
    assert got["metrics"]["macro_f1"] == pytest.approx(want["macro_f1"])


@pytest.mark.parametrize("name", ["tiny_classifier_head", "tiny_mlp_head"])
def test_cached_base_features_train_the_same_head(tmp_path, monkeypatch, name):
    """A frozen base runs once (method.cache_features, the default): the per-step losses and the
    trained head equal those of running the base on every step, fp32; the artifact loads the same way."""
    from llama_recipes import objectives, pipeline

    calls, runs = {}, {}
    for cache in (True, False):
        r = recipe(name, tmp_path / str(cache), "training.max_steps=12", "training.logging_steps=1",
                   "data.max_samples=96", "eval.before_after=false", "training.bf16=false",
                   "training.per_device_eval_batch_size=32", f"method.cache_features={str(cache).lower()}")
        objective = objectives.get(r.objective.name)
        original = objective.build_trainer

        def build(*a, _original=original, _cache=cache, **kw):
            trainer = _original(*a, **kw)
            model = trainer.model
            base = model.base if heads.is_mlp_head(model) else model.model
            calls[_cache] = 0
            base.register_forward_pre_hook(lambda *_: calls.__setitem__(_cache, calls[_cache] + 1))
            return trainer

        monkeypatch.setattr(objective, "build_trainer", build)
        runs[cache] = pipeline.train(r)
        monkeypatch.undo()
    losses = {c: [h["loss"] for h in runs[c].trainer.state.log_history if "loss" in h] for c in runs}
    assert len(losses[True]) == 12
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=0, atol=1e-5)
    assert losses[True][-1] < losses[True][0]
    # 12 steps of 32 rows = 4 epochs of 96 rows; cached: one pass over the 96 in batches of 32
    assert calls == {True: 3, False: 12}, calls
    state = {c: heads.head_state(runs[c].trainer.model) for c in runs}
    for k in state[False]:
        torch.testing.assert_close(state[True][k], state[False][k], rtol=0, atol=1e-5)
    # the saved head is today's artifact: it reloads and predicts as the trained model does
    texts = runs[True].eval_raw["text"][:16] if runs[True].eval_raw is not None else ["a", "b"]
    loaded = heads.load(runs[True].output_dir)
    torch.testing.assert_close(loaded.logits(texts), heads.batch_logits(runs[True].trainer.model,
                                                                         runs[True].tokenizer, texts, 8, 64))
    check_base_frozen(runs[True].trainer.model, base_weights())
