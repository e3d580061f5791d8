"""Every PEFT method trains on the tiny Llama (CPU): loss goes down, only the method's parameters
change, exact trainable counts, and the saved adapter reloads with plain PeftModel.

Each method's tiny twin recipe (recipes/demo/tiny_<method>.yaml) runs once in-process, shortened
by SHORT; the runs are cached for the module and inspected by several tests.
"""
import json
import math

import pytest
import torch
from conftest import FP32, ROOT, TINY

from llama_recipes.errors import RecipeError, UserError
from llama_recipes.schema import load_recipe, validate_recipe

SHORT = [
    FP32,  # tiny_lora.yaml says bf16: auto; these tests compare logits in fp32 on every CPU
    "training.max_steps=10", "training.logging_steps=5", "training.per_device_train_batch_size=8",
    "training.warmup_steps=0", "training.save_strategy=no", "training.report_to=none",
    "data.max_samples=80", "data.max_eval_samples=16", "eval.generate=false",
]
# id -> (tiny twin recipe, extra overrides)
METHODS = {
    "lora": ("lora", []),
    "dora": ("dora", []),
    "qlora4": ("qlora", []),
    "qlora8": ("qlora", ["method.bits=8"]),
    "llama_adapter": ("llama_adapter", []),
    "prefix": ("prefix", []),
    "prefix_projection": ("prefix", ["method.prefix_projection=true", "method.encoder_hidden_size=16"]),
    "prompt_text": ("prompt_tuning", []),
    "prompt_random": ("prompt_tuning", ["method.init=random", "method.init_text=null"]),
    "ia3": ("ia3", []),
}
# Variants of a method already covered in the default run: slow (make test-all) for the time budget.
SLOW_VARIANTS = {"prefix_projection", "prompt_random"}
KEYS = [pytest.param(k, marks=pytest.mark.slow) if k in SLOW_VARIANTS else k for k in METHODS]
PROMPTS = ["### Instruction:\nReverse the list of words.\n\n### Input:\nred cat sun\n\n### Response:\n",
           "Give the last word."]
_RUNS: dict = {}


def recipe_for(key, out, extra=()):
    twin, more = METHODS[key]
    return load_recipe(ROOT / f"recipes/demo/tiny_{twin}.yaml", [*SHORT, *more, *extra, f"output_dir={out}"])


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """trained(key) -> (recipe, Run), training each method once per session (test_export reuses them)."""
    from llama_recipes import pipeline

    def get(key):
        if key not in _RUNS:
            recipe = recipe_for(key, tmp_path_factory.mktemp(key) / "out")
            _RUNS[key] = (recipe, pipeline.train(recipe))
        return _RUNS[key]

    return get


def fresh_base(recipe):
    """The base model loaded exactly as training loaded it (quantized for QLoRA)."""
    from llama_recipes import methods, modeling

    return modeling.load_model(recipe.model, **methods.load_kwargs(recipe.method))


def initial_model(recipe):
    """The model exactly as training started: same seed, same construction path."""
    from transformers import set_seed

    from llama_recipes import methods

    set_seed(recipe.seed)
    return methods.apply_method(fresh_base(recipe), recipe)


def expected_trainable(key, recipe) -> int:
    """Trainable-parameter count from the method's formula for a Llama layer (docs/methods.md)."""
    cfg = json.loads((TINY / "config.json").read_text())
    h, i, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * cfg.get("head_dim", h // cfg["num_attention_heads"])
    m = recipe.method
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down (in, out)
    if m.name in ("lora", "dora", "qlora"):
        n = L * sum(m.r * (a + b) for a, b in linears)
        return n + (L * sum(b for _, b in linears) if m.use_dora else 0)
    if m.name == "llama_adapter":
        return (m.adapter_layers or L) * (m.adapter_len * h + 1)
    if m.name == "prefix":
        table = m.num_virtual_tokens * L * 2 * kv
        if not m.prefix_projection:
            return table
        e = m.encoder_hidden_size
        return m.num_virtual_tokens * kv + (kv * e + e) + (e * L * 2 * kv + L * 2 * kv)
    if m.name == "prompt_tuning":
        return m.num_virtual_tokens * h
    if m.name == "ia3":
        return L * (kv + kv + i)
    raise AssertionError(m.name)


@pytest.mark.parametrize("key", KEYS)
def test_loss_goes_down(trained, key):
    _, run = trained(key)
    before, after = run.metrics["eval_before"]["loss"], run.metrics["eval_after"]["loss"]
    assert after < before, (key, before, after)
    losses = [h["loss"] for h in run.metrics["log_history"] if "loss" in h]
    assert all(math.isfinite(x) for x in losses) and len(losses) == 2


@pytest.mark.parametrize("key", KEYS)
def test_only_method_parameters_changed(trained, key):
    recipe, run = trained(key)
    start = dict(initial_model(recipe).named_parameters())
    trained_params = dict(run.model.named_parameters())
    assert start.keys() == trained_params.keys()
    trainable = {n for n, p in trained_params.items() if p.requires_grad}
    assert trainable
    for name, p in trained_params.items():
        if name in trainable:
            assert not torch.equal(p.data.float(), start[name].data.float()), f"{key}: did not train: {name}"
        else:  # bit-identical base (packed 4-bit / int8 storage compared as stored)
            assert torch.equal(p.data, start[name].data), f"{key}: base weight changed: {name}"
    assert run.metrics["trainable_params"] == expected_trainable(key, recipe)
    assert run.metrics["trainable_params"] == sum(trained_params[n].numel() for n in trainable)
    if key.startswith("qlora"):
        # 4-bit weights are packed two per byte: the total still counts logical parameters.
        assert run.metrics["total_params"] == trained("lora")[1].metrics["total_params"]


@pytest.mark.parametrize("key", KEYS)
def test_saved_adapter_reloads_with_plain_peft(trained, key):
    from peft import PeftModel

    from llama_recipes.evaluation import generate

    recipe, run = trained(key)
    out = run.output_dir
    assert (out / "adapter_model.safetensors").is_file() and not list(out.glob("*.bin"))
    reloaded = PeftModel.from_pretrained(fresh_base(recipe), out).eval()
    model = run.model.eval()
    ids = run.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        want, got = model(**ids).logits, reloaded(**ids).logits
    # prompt tuning: both include the virtual tokens' logits (length prompt + N)
    assert want.shape == got.shape
    # Same weights, same kernels: equal up to fp32 summation order (a trained parameter's memory
    # layout can make oneDNN pick another blocking: prefix_projection differed by 1e-5 on logits
    # of ~12, i.e. ~2**-20 relative, a few units of fp32 rounding). Bound: 2 * L * sqrt(K) * u.
    rel = 2 * 4 * 352 ** 0.5 * 2.0 ** -24
    assert (got - want).abs().max() <= rel * want.abs().max(), (key, (got - want).abs().max())
    assert generate(reloaded, run.tokenizer, PROMPTS, 6) == generate(model, run.tokenizer, PROMPTS, 6)


@pytest.mark.parametrize("key", ["lora", "qlora4", "prompt_text"])
def test_adapter_size_reported(trained, key):
    from llama_recipes.artifacts import base_size_bytes

    recipe, run = trained(key)
    m = json.loads((run.output_dir / "metrics.json").read_text())
    on_disk = (run.output_dir / "adapter_model.safetensors").stat().st_size / 2**20
    assert m["adapter_mb"] == pytest.approx(on_disk, abs=1e-4)
    # the base counts at its dense size even when it is held in 4-bit
    from safetensors.torch import load_file

    dense = sum(v.numel() * v.element_size() for v in load_file(TINY / "model.safetensors").values()) / 2**20
    assert base_size_bytes(run.model) / 2**20 == pytest.approx(dense)
    assert m["adapter_pct_of_base"] == pytest.approx(100 * m["adapter_mb"] / m["base_mb"], rel=1e-3)


def test_llama_adapter_trains_with_plain_trainer(trained):
    import transformers
    import trl

    _, run = trained("llama_adapter")
    assert isinstance(run.trainer, transformers.Trainer) and not isinstance(run.trainer, trl.SFTTrainer)
    _, lora = trained("lora")
    assert isinstance(lora.trainer, trl.SFTTrainer)


def test_qlora_is_4bit_nf4_with_float32_adapters(trained):
    import bitsandbytes as bnb

    recipe, run = trained("qlora4")
    base = run.model.get_base_model()
    q = base.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_state.quant_type == "nf4"
    assert q.weight.quant_state.nested  # double quantization
    assert all(p.dtype == torch.float32 for p in run.model.parameters() if p.requires_grad)


# -- impossible combinations are refused by the schema -------------------------------------------

def _recipe(method, **training):
    return {"output_dir": "/tmp/x", "model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"},
            "data": {"path": "builtin:demo"}, "method": method, "training": training}


@pytest.mark.parametrize("method,training,expect", [
    ({"name": "prefix"}, {"packing": True}, "training.packing: false"),
    ({"name": "prompt_tuning"}, {"packing": True}, "once per packed row"),
    ({"name": "prompt_tuning"}, {"padding_free": True}, "padding_free: false"),
    ({"name": "prefix"}, {"activation_checkpointing": True}, "activation_checkpointing: false"),
    ({"name": "qlora", "compute_dtype": "bfloat16"}, {}, "set model.dtype: bfloat16"),
    ({"name": "qlora", "bits": 8, "quant_storage_dtype": "bfloat16"}, {}, "4-bit only"),
    ({"name": "prompt_tuning", "init": "text"}, {}, "needs `method.init_text`"),
    ({"name": "lora", "target_modules": ["q_proj", "lm_head"]}, {}, "modules_to_save: [lm_head]"),
    ({"name": "ia3", "target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}, {}, "must also be in"),
    ({"name": "dora", "use_dora": False}, {}, "method.use_dora"),
])
def test_impossible_combinations_are_validation_errors(method, training, expect):
    with pytest.raises(RecipeError) as e:
        validate_recipe(_recipe(method, **training), "r.yaml")
    assert expect in str(e.value), str(e.value)


def test_possible_combinations_validate():
    validate_recipe(_recipe({"name": "prompt_tuning"}, activation_checkpointing=True))
    validate_recipe(_recipe({"name": "llama_adapter"}, activation_checkpointing=True))
    validate_recipe(_recipe({"name": "qlora", "compute_dtype": "float32"}, activation_checkpointing=True))


def test_too_many_adapter_layers_is_a_user_error():
    from llama_recipes import methods, modeling

    recipe = validate_recipe(_recipe({"name": "llama_adapter", "adapter_layers": 99}))
    with pytest.raises(UserError, match="at most"):
        methods.apply_method(modeling.load_model(recipe.model), recipe)


@pytest.mark.slow
@pytest.mark.parametrize("twin", ["dora", "qlora", "llama_adapter", "prefix", "prompt_tuning", "ia3"])
def test_tiny_twin_through_real_entry_point(tmp_path, twin):
    from conftest import run_cli

    out = tmp_path / "out"
    res = run_cli(str(ROOT / f"recipes/demo/tiny_{twin}.yaml"), *SHORT, f"output_dir={out}", "eval.generate=true",
                  "eval.limit=8")
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["eval_after"]["loss"] < m["eval_before"]["loss"]
    assert "trainable params:" in res.stderr and "MB on disk" in res.stderr


def test_modules_to_save_naming_no_module_is_refused():
    """PEFT would write [nope] into adapter_config.json and train nothing for it."""
    from llama_recipes import methods, modeling

    recipe = load_recipe(ROOT / "recipes/demo/tiny_lora.yaml", ["method.modules_to_save=[nope]"])
    with pytest.raises(UserError, match=r"modules_to_save \['nope'\] names no module of the model"):
        methods.apply_method(modeling.load_model(recipe.model), recipe)
    ok = load_recipe(ROOT / "recipes/demo/tiny_lora.yaml", ["method.modules_to_save=[lm_head]"])
    model = methods.apply_method(modeling.load_model(ok.model), ok)
    assert any("modules_to_save" in n for n, p in model.named_parameters() if p.requires_grad)
