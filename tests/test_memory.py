"""--estimate-memory: exact parameter counts, bytes equal to what a real optimizer step allocates,
and the seed's fits / does-not-fit examples (real model configs written locally, no hub)."""
import json
from dataclasses import replace

import pytest
from conftest import ROOT, TINY

from llama_recipes import memory
from llama_recipes.errors import UserError
from llama_recipes.schema import validate_recipe

LLAMA2_7B = {  # meta-llama/Llama-2-7b-hf config.json
    "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 11008,
    "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 32, "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "torch_dtype": "float16",
    "vocab_size": 32000,
}
OPEN_LLAMA_3B = {  # openlm-research/open_llama_3b config.json (3.4B parameters)
    **LLAMA2_7B, "hidden_size": 3200, "intermediate_size": 8640, "num_hidden_layers": 26, "num_attention_heads": 32,
    "num_key_value_heads": 32,
}
SMALL = {  # ~9M-parameter Llama for the byte-exact checks
    **LLAMA2_7B, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 6, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 8000, "torch_dtype": "float32",
}


def llama_dir(tmp_path, name, cfg):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def recipe_for(model_dir, method=None, freeze=None, **training):
    t = {"per_device_train_batch_size": 1, "max_length": 512, "bf16": True, "activation_checkpointing": False,
         "optim": "adamw_torch", **training}
    return validate_recipe({"output_dir": "/tmp/unused", "model": {"name_or_path": str(model_dir), "dtype": "float32"},
                            "data": {"path": "builtin:demo"}, "method": method or {"name": "full"}, "training": t,
                            "freeze": freeze or {}})


def shape_of(cfg):
    from transformers import AutoConfig

    return memory.model_shape(AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"}))


@pytest.fixture(scope="module")
def llama7b():
    return shape_of(LLAMA2_7B)


def test_llama2_7b_parameter_count_is_exact(llama7b):
    assert llama7b.total == 6_738_415_616  # the published count of Llama-2-7B
    assert llama7b.unit_sizes()[0] == 202_383_360 and len(llama7b.unit_sizes()) == 33


def test_lora_parameter_count_matches_peft_formula(llama7b):
    s = memory.Setup(method={"name": "lora", "r": 16, "target_modules": ["q_proj", "v_proj"]})
    extra, base = memory.trainable_params(llama7b, s)
    assert sum(extra.values()) == 32 * 2 * 16 * (4096 + 4096) and base == []
    s = memory.Setup(method={"name": "lora", "r": 8, "target_modules": "all-linear", "use_dora": True})
    extra, _ = memory.trainable_params(llama7b, s)
    per_layer = 8 * (4 * 2 * 4096 + 3 * (4096 + 11008)) + (4 * 4096 + 2 * 11008 + 4096)
    assert sum(extra.values()) == 32 * per_layer


def _setup(**kw):
    base = dict(method={"name": "full"}, weight_dtype="float32", mixed="bf16", optim="adamw_torch",
                micro_batch=1, seq_len=512, checkpointing=True, gpu_memory=16 * memory.GiB)
    return memory.Setup(**{**base, **kw})


def test_seed_ddp_16gb_tops_out_near_0_7b():
    """Full fine-tuning, AdamW, bf16 mixed precision, DDP on 16 GB cards: ~20 bytes/parameter."""
    fits = {}
    for h in (1280, 1536, 1792, 2048):  # Llama-shaped, 24 layers, 32k vocab: 0.56B .. 1.37B
        cfg = {**LLAMA2_7B, "hidden_size": h, "intermediate_size": int(h * 8 / 3) // 64 * 64,
               "num_hidden_layers": 24, "num_attention_heads": h // 128, "num_key_value_heads": h // 128}
        shape = shape_of(cfg)
        e = memory.estimate(shape, _setup(gpus=4))
        fits[shape.total] = memory.fits(e, _setup(gpus=4))
    largest = max(n for n, ok in fits.items() if ok)
    smallest_miss = min(n for n, ok in fits.items() if not ok)
    assert 0.5e9 < largest < 0.85e9 < smallest_miss < 1.2e9, fits


def test_seed_fsdp_4x16gb_fits_3b():
    shape = shape_of(OPEN_LLAMA_3B)
    assert 3.3e9 < shape.total < 3.5e9
    s = _setup(gpus=4, sharding="full_shard")
    assert memory.fits(memory.estimate(shape, s), s)
    ddp = _setup(gpus=4)
    assert not memory.fits(memory.estimate(shape, ddp), ddp)


def test_seed_llama2_7b_80gb_full_no_lora_yes_qlora_24gb(llama7b):
    gb80, gb24 = 80 * memory.GiB, 24 * memory.GiB
    full = _setup(gpu_memory=gb80)
    e = memory.estimate(llama7b, full)
    assert not memory.fits(e, full)
    assert 16 * 6.7e9 < e.weights + e.gradients + e.optimizer < 17 * 6.8e9  # 16 bytes/param
    opts = [text for text, _ in memory.options(llama7b, full)]
    assert any("FSDP" in t for t in opts) and any("LoRA" in t for t in opts)
    lora = _setup(method={"name": "lora", "r": 16}, weight_dtype="bfloat16", micro_batch=4, gpu_memory=gb80)
    assert memory.fits(memory.estimate(llama7b, lora), lora)
    qlora = _setup(method={"name": "qlora", "r": 16}, weight_dtype="bfloat16", micro_batch=4, gpu_memory=gb24)
    e = memory.estimate(llama7b, qlora)
    assert memory.fits(e, qlora) and e.weights < 4.5 * memory.GiB
    bf16_lora_24 = replace(lora, gpu_memory=gb24, checkpointing=False)  # why QLoRA is the 24 GB answer
    assert not memory.fits(memory.estimate(llama7b, bf16_lora_24), bf16_lora_24)


def test_every_method_has_a_formula_and_unknown_is_clear(llama7b):
    for label, m in memory.COMPARE:
        e = memory.estimate(llama7b, _setup(method=m, weight_dtype="bfloat16"), label)
        assert 0 < e.trainable < llama7b.total + 1
    with pytest.raises(UserError, match="does not know method 'vera'"):
        memory.estimate(llama7b, _setup(method={"name": "vera"}))


def test_sharding_divides_state():
    shape = shape_of(SMALL)
    one = memory.estimate(shape, _setup())
    four = memory.estimate(shape, _setup(gpus=4, sharding="full_shard"))
    assert four.gradients == pytest.approx(one.gradients / 4) and four.optimizer == pytest.approx(one.optimizer / 4)
    off = memory.estimate(shape, _setup(gpus=4, sharding="full_shard", offload=True))
    assert off.weights == off.gradients == off.optimizer == 0 and off.cpu == pytest.approx(
        four.weights + four.gradients + four.optimizer)


def _measured_state_bytes(model, steps=1):
    """Tensor bytes of parameters, .grad and optimizer state after a real AdamW step."""
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 100, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    seen, weights, grads = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        weights += p.numel() * p.element_size()
        grads += p.grad.numel() * p.grad.element_size() if p.grad is not None else 0
    states = sum(t.numel() * t.element_size() for st in opt.state.values() for k, t in st.items() if k != "step")
    return weights, grads, states


@pytest.mark.parametrize("model,method,freeze", [
    ("tiny", {"name": "full"}, {}),
    ("tiny", {"name": "lora", "r": 8, "target_modules": "all-linear", "dropout": 0.0}, {}),
    ("small", {"name": "full"}, {}),
    ("small", {"name": "partial"}, {"train": [r"layers\.[45]\.", r"lm_head"]}),
    ("small", {"name": "lora", "r": 8, "target_modules": "all-linear", "dropout": 0.0}, {}),
    ("small", {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"], "use_dora": True}, {}),
])
def test_estimate_equals_bytes_after_optimizer_step(tmp_path, model, method, freeze):
    """The tiny asset and a ~9M-parameter Llama: estimate == tensor bytes after one AdamW step."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llama_recipes.methods import apply_method

    d = TINY if model == "tiny" else llama_dir(tmp_path, "small", SMALL)
    recipe = recipe_for(d, method, freeze)
    shape, s, e = memory.estimate_recipe(recipe)
    torch.manual_seed(0)
    net = apply_method(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d)), recipe)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert e.trainable == trainable
    w, g, o = _measured_state_bytes(net)
    assert e.weights == pytest.approx(w, rel=0.05)
    assert e.gradients == pytest.approx(g, rel=0.05)
    assert e.optimizer == pytest.approx(o, rel=0.05)


# Config variants per family: the class defaults alone (every optional key omitted, as
# save_pretrained may write it), a small one with every key explicit, and the switches that change
# parameter shapes (tied embeddings, biases, explicit head_dim, num_key_value_heads: null).
SMALL_KEYS = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 2}
VARIANTS = {
    "defaults": {},
    "small": SMALL_KEYS,
    "tied": {**SMALL_KEYS, "tie_word_embeddings": True, "torch_dtype": "bfloat16"},
    "biases": {**SMALL_KEYS, "attention_bias": True, "mlp_bias": True},
    "head_dim": {**SMALL_KEYS, "head_dim": 24, "dtype": "float16"},
    "kv_null": {**SMALL_KEYS, "num_key_value_heads": None, "head_dim": None},
}
# transformers 5.24 refuses null num_key_value_heads/head_dim except in LlamaConfig: no such config loads
CASES = [(f, v) for f in sorted(memory.FAMILIES) for v in VARIANTS if v != "kv_null" or f == "llama"]


@pytest.mark.parametrize("family,variant", CASES)
def test_config_shape_equals_the_meta_model(family, variant):
    """The torch-free shape (config.json alone) is the meta-device model's, name for name and shape
    for shape, for every family it claims: so --estimate-memory can skip torch and transformers."""
    from transformers import AutoConfig

    raw = {"model_type": family, **VARIANTS[variant]}
    fast = memory.config_shape(raw)
    meta = memory.meta_shape(AutoConfig.for_model(**raw))
    assert fast.params == meta.params
    assert fast.linears == meta.linears
    for field in ("layer_prefix", "num_layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab",
                  "dtype"):
        assert getattr(fast, field) == getattr(meta, field), field
    assert fast.total == meta.total > 0


def test_other_architectures_and_remote_code_use_the_meta_model():
    assert memory.config_shape({"model_type": "gpt2"}) is None
    assert memory.config_shape({"model_type": "llama", "auto_map": {"AutoModelForCausalLM": "m.M"}}) is None
    gpt2 = memory.model_shape(__import__("transformers").AutoConfig.for_model("gpt2", n_layer=2, n_embd=64, n_head=4))
    assert gpt2.num_layers == 2 and gpt2.module_classes  # built on the meta device


def test_estimate_memory_fits_in_process(tmp_path, capsys):
    import argparse

    d = llama_dir(tmp_path, "llama2_7b", LLAMA2_7B)
    from llama_recipes.schema import load_recipe

    recipe = load_recipe(ROOT / "recipes/lora_alpaca.yaml", [f"model.name_or_path={d}"])
    args = argparse.Namespace(gpus=None, config=None, gpu_memory="80GB", compare=False)
    assert memory.main(recipe, args) == 0
    out = capsys.readouterr().out
    assert "6,738,415,616 parameters" in out and "verdict: FITS" in out and "activations, checkpointing on (in use)" in out


def test_cli_does_not_fit_with_options_and_no_heavy_imports(tmp_path):
    """The real entry point, full fine-tuning of Llama-2-7B on one 80 GB GPU: exit 1, ranked options,
    the --compare table, and nothing heavy imported: not even torch or transformers (a Llama is
    counted from config.json, memory.config_shape)."""
    import subprocess
    import sys

    d = llama_dir(tmp_path, "llama2_7b", LLAMA2_7B)
    recipe = tmp_path / "full.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'out'}\nmodel: {{name_or_path: {d}, dtype: float32}}\n"
                      "data: {path: builtin:demo}\nmethod: {name: full}\n"
                      "training: {bf16: true, per_device_train_batch_size: 1, max_length: 512}\n")
    code = ("import sys; from llama_recipes.cli import main; rc = main(sys.argv[1:]); "
            "heavy = {'trl', 'peft', 'bitsandbytes', 'torch', 'transformers'} & set(sys.modules); "
            "print('HEAVY', sorted(heavy)); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, str(recipe), "--estimate-memory", "--gpu-memory", "80GB",
                        "--compare"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1, r.stderr
    assert "DOES NOT FIT" in r.stdout and "FSDP full shard over 2 GPUs" in r.stdout, r.stdout
    assert "qlora r16 all-linear" in r.stdout and "prompt tuning" in r.stdout
    assert "HEAVY []" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("train", ["", r"layers\.[45]\.|lm_head"], ids=["full", "partial"])
def test_fsdp_two_ranks_per_rank_bytes(tmp_path, train):
    """torchrun, 2 CPU ranks, torch FSDP2 fully_shard per layer + root: each rank holds half."""
    import os
    import subprocess
    import sys

    from conftest import free_port

    d = llama_dir(tmp_path, "small", SMALL)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), str(ROOT / "tests" / "fsdp_memory_worker.py"), str(d), train],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = json.loads(r.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert len(ranks) == 2
    for rank in ranks:
        for measured, est in zip(rank["measured"], rank["estimate"]):
            assert est == pytest.approx(measured, rel=0.05), rank


def test_launch_config_estimates_match_hand_arithmetic():
    """Full 7B under fsdp_4gpu: FSDP mixed precision keeps trained parameters in fp32 (accelerate
    upcasts them), so 16 B/param ÷ 4 whatever model.dtype says; LoRA 7B on one GPU: bf16 base +
    fp32 adapters. Both computed here by hand, and the numbers docs/memory.md quotes."""
    from llama_recipes.schema import load_recipe

    GIB = 2**30
    n7b, n_lora = 6_738_415_616, 39_976_960
    full = load_recipe(ROOT / "recipes/full_alpaca.yaml", ["model.name_or_path=meta-llama/Llama-2-7b-hf"])
    shape, s, e = memory.estimate_recipe(full, config=str(ROOT / "accelerate_configs/fsdp_4gpu.yaml"),
                                         gpu_memory="24GB")
    assert shape.total == n7b and s.backend == "fsdp"
    assert e.weights == n7b * 4 / 4 and e.gradients == n7b * 4 / 4 and e.optimizer == n7b * 8 / 4
    assert not memory.fits(e, s)
    assert not any("pure bf16" in text for text, _ in memory.options(shape, s)), "FSDP upcasts: unreachable"
    lora = load_recipe(ROOT / "recipes/lora_alpaca.yaml")
    _, s2, e2 = memory.estimate_recipe(lora, config=str(ROOT / "accelerate_configs/single_gpu.yaml"),
                                       gpu_memory="24GB")
    assert e2.trainable == n_lora
    assert e2.weights == n7b * 2 + n_lora * 4 and e2.gradients == n_lora * 4 and e2.optimizer == n_lora * 8
    assert memory.fits(e2, s2)
    doc = (ROOT / "docs" / "memory.md").read_text()
    for value in (e.weights, e.optimizer, e.total, e2.weights, e2.gradients, e2.optimizer, e2.total):
        assert f"{value / GIB:.2f}" in doc, f"docs/memory.md must quote {value / GIB:.2f}"


def test_deepspeed_is_labelled_as_deepspeed():
    from llama_recipes.schema import load_recipe

    full = load_recipe(ROOT / "recipes/full_alpaca.yaml")
    shape, s, e = memory.estimate_recipe(full, config=str(ROOT / "accelerate_configs/deepspeed_zero3.yaml"))
    assert memory.sharding_text(s) == "DeepSpeed ZeRO-3"
    assert "DeepSpeed" in memory.precision_text(s)
    # 16-bit weights and gradients, fp32 master + AdamW m, v in the optimizer: 16 B per param, ÷4
    assert e.weights + e.gradients + e.optimizer == shape.total * 16 / 4
