"""Freeze rules, data-driven selection and partial fine-tuning on the tiny Llama (CPU, offline).

Expected trainable counts are computed from the model config (layer shapes), not from the
parameter names the rules match, so a wrong rule cannot agree with itself.
"""
import json

import pytest
import torch
from conftest import ROOT, TINY

from llama_recipes.errors import RecipeError, UserError
from llama_recipes.freeze import apply_freeze, report, weight_snr
from llama_recipes.schema import load_recipe, validate_recipe
from llama_recipes.schema.freeze import FreezeConfig

MODEL = TINY


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)


def sizes(cfg) -> dict:
    """Parameter counts of a Llama from its config alone."""
    h, hd = cfg.hidden_size, cfg.head_dim
    attn = h * cfg.num_attention_heads * hd * 2 + h * cfg.num_key_value_heads * hd * 2
    mlp = 3 * h * cfg.intermediate_size
    mlp_gate_up = 2 * h * cfg.intermediate_size
    layer_norms = 2 * h
    layer = attn + mlp + layer_norms
    emb = cfg.vocab_size * h
    head = 0 if cfg.tie_word_embeddings else emb
    n = cfg.num_hidden_layers
    return dict(attn=attn, mlp=mlp, mlp_gate_up=mlp_gate_up, layer_norms=layer_norms, layer=layer, emb=emb,
                head=head, norm=h, n=n, total=emb + n * layer + h + head)


def trainable_after(model, freeze: dict) -> int:
    for p in model.parameters():
        p.requires_grad_(True)
    apply_freeze(model, FreezeConfig.model_validate(freeze))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def expected(s, case):
    return {
        "last_layers": 2 * s["layer"],
        "first_attention": s["attn"],
        "layers_list_and_range": 3 * s["layer"],   # [0, '2-3'] on 4 layers
        "negative_index": s["layer"],
        "norms": s["n"] * s["layer_norms"] + s["norm"],
        "embeddings_and_head": s["emb"] + s["head"],
        "regex_include_exclude": s["n"] * s["mlp_gate_up"],
        "two_rules_add_up": s["layer"] + s["norm"],
        "train_then_freeze": 2 * (s["layer"] - s["layer_norms"]),
        "freeze_only": s["total"] - s["emb"],
    }[case]


CASES = {
    "last_layers": {"train": [{"last_layers": 2}]},
    "first_attention": {"train": [{"first_layers": 1, "modules": ["attention"]}]},
    "layers_list_and_range": {"train": [{"layers": [0, "2-3"]}]},
    "negative_index": {"train": [{"layers": [-1]}]},
    "norms": {"train": [{"modules": ["norms"]}]},
    "embeddings_and_head": {"train": [{"modules": ["embeddings", "lm_head"]}]},
    "regex_include_exclude": {"train": [{"patterns": [r"\.mlp\."], "exclude": ["down_proj"]}]},
    "two_rules_add_up": {"train": [{"last_layers": 1}, r"^model\.norm\."]},
    "train_then_freeze": {"train": [{"last_layers": 2}], "freeze": [{"modules": ["norms"]}]},
    "freeze_only": {"freeze": [{"modules": ["embeddings"]}]},
}


@pytest.mark.parametrize("case", CASES)
def test_exact_trainable_counts(model, case):
    s = sizes(model.config)
    assert s["total"] == sum(p.numel() for p in model.parameters())
    assert trainable_after(model, CASES[case]) == expected(s, case)


def test_layer_rule_keeps_every_other_parameter_frozen(model):
    trainable_after(model, {"train": [{"layers": [1]}]})
    for n, p in model.named_parameters():
        assert p.requires_grad == n.startswith("model.layers.1."), n


@pytest.mark.parametrize("freeze,where", [
    ({"train": [r"no_such_param"]}, "freeze.train[0].patterns"),
    ({"train": [{"last_layers": 1}], "freeze": [{"modules": ["lm_head"], "layers": [0]}]}, "freeze.freeze[0]"),
    ({"train": [{"layers": ["3-9"]}]}, "freeze.train[0]"),
    ({"train": [{"patterns": ["mlp"], "exclude": ["nothing_here"]}]}, "freeze.train[0].exclude"),
])
def test_rule_matching_nothing_is_an_error_naming_the_key(model, freeze, where):
    with pytest.raises(UserError) as e:
        trainable_after(model, freeze)
    assert where in str(e.value) and "fix:" in str(e.value)


def test_report_groups_and_table(model):
    trainable_after(model, {"train": [{"last_layers": 1}, {"modules": ["lm_head"]}]})
    s = sizes(model.config)
    rep = report(model)
    groups = {r["group"]: r for r in rep["groups"]}
    assert list(groups) == ["embeddings", *[f"layers.{i}" for i in range(s["n"])], "norm", "head"]
    assert groups[f"layers.{s['n'] - 1}"]["trainable"] == s["layer"] and groups["layers.0"]["trainable"] == 0
    assert groups["head"] == {"group": "head", "trainable": s["head"], "total": s["head"]}
    assert rep["trainable"] == s["layer"] + s["head"] and rep["total"] == s["total"]


def test_snr_ranks_structure_above_noise():
    torch.manual_seed(0)
    noise = torch.randn(64, 96)
    structured = noise * 0.1 + torch.randn(64, 4) @ torch.randn(4, 96)
    assert weight_snr(structured) > weight_snr(noise)


@pytest.mark.parametrize("unit", ["layers", "modules"])
def test_snr_selection_trains_the_top_fraction(model, unit):
    s = sizes(model.config)
    n = trainable_after(model, {"select": {"by": "snr", "unit": unit, "fraction": 0.5}})
    sel = report(model)["selection"]
    if unit == "layers":
        assert n == 2 * s["layer"] and len(sel["selected"]) == 2
        best = sorted(sel["scores"], key=sel["scores"].get)[-2:]
        assert sorted(best) == sorted(sel["selected"])
    else:  # half of each kind of linear (7 kinds x 4 layers), biases none
        assert len(sel["selected"]) == 7 * 2
        assert n == 2 * (s["attn"] + s["mlp"])


GOOD = {"output_dir": "/tmp/x", "model": {"name_or_path": "builtin:tiny-llama"}, "data": {"path": "builtin:demo"}}


@pytest.mark.parametrize("method,freeze,msg", [
    ({"name": "full"}, {"train": ["lm_head"]}, "use method.name: partial"),
    ({"name": "partial"}, {}, "partial needs freeze: rules"),
    ({"name": "mlp_head"}, {"train": ["lm_head"]}, "remove the freeze: section"),
    ({"name": "partial"}, {"train": [{"last_layer": 2}]}, "freeze.train.0.last_layer: unknown key `last_layer` — did you mean `last_layers`?"),
    ({"name": "partial"}, {"train": [{"layers": ["5-2"]}]}, "freeze.train.0.layers"),
    ({"name": "partial"}, {"train": [{"exclude": ["x"]}]}, "a rule needs at least one of"),
    ({"name": "partial"}, {"train": [{"patterns": ["(unclosed"]}]}, "invalid regex"),
    ({"name": "partial"}, {"select": {"fraction": 1.5}}, "freeze.select.fraction"),
    ({"name": "mlp_head", "pooling": "max"}, {}, "method.pooling"),
])
def test_validation_errors_name_the_key(method, freeze, msg):
    with pytest.raises(RecipeError) as e:
        validate_recipe({**GOOD, "method": method, "freeze": freeze})
    assert msg in str(e.value)


def test_partial_training_with_checkpointing_and_frozen_embeddings(tmp_path):
    """Last 2 layers train under activation checkpointing while embeddings are frozen: the trained
    layers change, everything else is bit-identical, and the artifact reloads with plain from_pretrained."""
    from transformers import AutoModelForCausalLM

    from llama_recipes import pipeline

    recipe = load_recipe(ROOT / "recipes/demo/tiny_freeze_last2.yaml", [
        "training.max_steps=4", "data.max_samples=64", "training.report_to=none", f"output_dir={tmp_path}",
        "training.activation_checkpointing=true", "eval.before_after=false"])
    before = {n: p.detach().clone() for n, p in AutoModelForCausalLM.from_pretrained(MODEL).named_parameters()}
    run = pipeline.train(recipe)
    s = sizes(run.model.config)
    trained = {n: p.detach() for n, p in run.model.named_parameters()}
    for n, p in trained.items():
        should_train = n.startswith((f"model.layers.{s['n'] - 2}.", f"model.layers.{s['n'] - 1}.", "model.norm."))
        assert not torch.equal(p, before[n]) == should_train, n
    assert run.metrics["trainable_params"] == 2 * s["layer"] + s["norm"]
    saved = json.loads((tmp_path / "trainable_parameters.json").read_text())
    assert saved["trainable"] == 2 * s["layer"] + s["norm"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for n, p in reloaded.named_parameters():
        assert torch.equal(p, trained[n]), n


@pytest.mark.parametrize("method,freeze", [("full", {}), ("partial", {"train": [{"last_layers": 1}]})])
def test_methods_full_and_partial(model, method, freeze):
    from llama_recipes.methods import apply_method

    for p in model.parameters():
        p.requires_grad_(False)
    recipe = validate_recipe({**GOOD, "method": {"name": method}, "freeze": freeze})
    apply_method(model, recipe)
    s = sizes(model.config)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == (s["total"] if method == "full" else s["layer"])
