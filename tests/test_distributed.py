"""Distributed training on CPU with 2 processes (gloo) through the real entry point.

`accelerate launch --config_file accelerate_configs/cpu_{ddp,fsdp}_2proc.yaml run_recipe.py ...`
against one process with the same global batch: per-step losses equal (fp32); under FSDP2 each
rank holds about half of the parameter and optimizer-state bytes, and the final artifact loads
in one process with the trained model's logits. Every multi-process test asserts that two
ranks really ran and (FSDP) that the parameters really were DTensor shards: accelerate has CPU
launch modes that silently run one process, and FSDP silently falls back to DDP on CPU.

The per-rank numbers come from LLAMA_RECIPES_SHARDING_REPORT (llama_recipes/runtime/distributed.py).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEMO_RECIPE, FP32, ROOT, TINY, free_port, run_cli

from llama_recipes.runtime.distributed import REPORT_ENV

# The tiny pretrained Llama shipped in the package (4 layers).
MODEL = TINY
# fp32 reduction-order tolerance, derived rather than tuned to one CPU. Two runs that differ only
# in summation order (1 rank vs 2, gloo's all-reduce, AVX2 vs AVX512 kernels) differ per matmul by
# about sqrt(K) * u relative (rounding errors as a random walk; u = 2**-24, fp32's unit roundoff;
# K = 352, the tiny model's longest dot product). A forward has 2 matmul stages per layer (L = 4);
# each of the 4 optimizer steps carries one forward's worth of difference into the weights (Adam's
# update is scale-free, so a relative gradient error becomes the same relative update error) and
# the probe forward adds one more: (4 + 1) * 2 * L * sqrt(K) * u = 4.5e-5 relative, applied to
# the magnitude of what is compared (losses ~12, logits up to ~20).
REL_TOL = (4 + 1) * 2 * 4 * 352 ** 0.5 * 2.0 ** -24


def close(a: list[float], b: list[float]) -> bool:
    scale = max(abs(x) for x in [*a, *b])
    return len(a) == len(b) and all(abs(x - y) <= REL_TOL * scale for x, y in zip(a, b))
# Four optimizer steps, a learning rate that moves the weights from step 1, one log per step.
BASE = [
    FP32,
    f"model.name_or_path={MODEL}",
    "training.max_steps=4",
    "training.logging_steps=1",
    "training.warmup_steps=0",
    "training.learning_rate=5e-3",
    "training.report_to=none",
    "data.max_samples=64",
    "eval.before_after=false",
]
FULL = ["method={name: full}", "training.learning_rate=1e-3"]
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class Run:
    def __init__(self, root: Path, proc):
        self.root, self.proc = root, proc
        assert proc.returncode == 0, proc.stderr[-4000:]
        self.out = root / "out"
        self.metrics = json.loads((self.out / "metrics.json").read_text())
        self.reports = [json.loads(p.read_text()) for p in sorted(root.glob("rep.rank*.json"))]

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.metrics["log_history"] if "loss" in h]


def one_process(root: Path, *overrides: str, recipe: Path = DEMO_RECIPE) -> Run:
    proc = run_cli(str(recipe), f"output_dir={root / 'out'}", *BASE, *overrides,
                   env={**THREADS, REPORT_ENV: str(root / "rep")})
    return Run(root, proc)


def two_processes(config: str, root: Path, *overrides: str, flags: tuple = (), recipe: Path = DEMO_RECIPE) -> Run:
    """`accelerate launch` with a CPU config on a free port (two runs never collide); `flags` are
    extra accelerate launch flags (`--zero_stage 2`)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs" / config),
           *flags, "--main_process_port", str(free_port()), str(ROOT / "run_recipe.py"), str(recipe),
           f"output_dir={root / 'out'}", *BASE, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **THREADS, REPORT_ENV: str(root / "rep")},
                          capture_output=True, text=True, timeout=600)
    return Run(root, proc)


def assert_two_ranks(run: Run, kind: str) -> None:
    assert [r["memory"]["rank"] for r in run.reports] == [0, 1], "two ranks must have run"
    for r in run.reports:
        m = r["memory"]
        assert m["world_size"] == 2 and m["processes_seen"] == 2 and m["distributed_type"] == kind
    # logging and artifact writes happen once: one summary line, one log dict per step
    assert run.proc.stderr.count("done in") == 1
    assert run.proc.stderr.count("trainable params") == 1


def assert_sharded_in_half(run: Run) -> None:
    mems = [r["memory"] for r in run.reports]
    for m in mems:
        assert m["sharded"] and m["dtensor_params"] == m["params"] > 0, "FSDP fell back to DDP"
        held = m["param_bytes_local"] + m["optim_bytes_local"]
        full = m["param_bytes_full"] + m["optim_bytes_full"]
        assert m["optim_bytes_full"] > 0 and held <= 0.55 * full, (held, full)
    # the two shards partition the model: nothing held twice, nothing lost
    assert sum(m["param_bytes_local"] for m in mems) == mems[0]["param_bytes_full"]


def assert_same_losses(a: Run, b: Run) -> None:
    assert len(a.losses) == len(b.losses) == 4
    assert len(a.losses) == 4 and close(a.losses, b.losses), (a.losses, b.losses)


def artifact_logits(out: Path, peft: bool):
    import torch
    from transformers import AutoModelForCausalLM

    if peft:
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(MODEL), out)
    else:
        model = AutoModelForCausalLM.from_pretrained(out)
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.arange(1, 17).unsqueeze(0)).logits[0, :, :32]


def assert_artifact_is_the_trained_model(run: Run, peft: bool) -> None:
    import torch

    assert (run.out / ("adapter_model.safetensors" if peft else "model.safetensors")).is_file()
    assert not list(run.out.glob("*.bin")) and not list(run.out.glob("pytorch_model*"))
    trained = torch.tensor(run.reports[0]["probe_logits"])
    torch.testing.assert_close(artifact_logits(run.out, peft), trained, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# 2 processes vs 1 (default run: LoRA, the case most recipes use)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_reference(tmp_path_factory) -> Run:
    """One process, batch 4 x accumulation 1: the global batch every LoRA run below matches."""
    return one_process(tmp_path_factory.mktemp("ref"), "training.per_device_train_batch_size=4")


def test_ddp_two_ranks_match_one_rank(lora_reference, tmp_path):
    run = two_processes("cpu_ddp_2proc.yaml", tmp_path, "training.per_device_train_batch_size=2")
    assert_two_ranks(run, "MULTI_CPU")
    assert all(not r["memory"]["sharded"] for r in run.reports)
    assert_same_losses(run, lora_reference)
    assert run.proc.stdout.count("'loss'") + run.proc.stderr.count("'loss'") == 4  # logged once per step
    said = run.proc.stdout + run.proc.stderr  # third-party noise silenced at its source (llama_recipes/log.py)
    for noise in ("find_unused_parameters=True was specified", "is_gradient_checkpointing", "publisher trust check"):
        assert noise not in said, noise


@pytest.mark.slow
@pytest.mark.parametrize("twin", ["tiny_dpo", "tiny_reward"])
def test_preference_objective_ddp_two_ranks_match_one_rank(twin, tmp_path):
    """DPO (policy + the adapter-off reference) and a reward model under 2-rank DDP: the per-step losses of
    one process with the same global batch (the pairwise losses are means over pairs)."""
    recipe = ROOT / "recipes" / "demo" / f"{twin}.yaml"
    ref = one_process(tmp_path / "one", "training.per_device_train_batch_size=4", recipe=recipe)
    run = two_processes("cpu_ddp_2proc.yaml", tmp_path / "two", "training.per_device_train_batch_size=2",
                        recipe=recipe)
    assert_two_ranks(run, "MULTI_CPU")
    assert run.metrics["objective"] == ref.metrics["objective"] == twin.removeprefix("tiny_")
    assert_same_losses(run, ref)


def test_fsdp2_lora_shards_and_matches_one_rank(lora_reference, tmp_path):
    # micro-batch 1 x accumulation 2 x 2 ranks = the reference's 4 x 1 x 1
    run = two_processes("cpu_fsdp_2proc.yaml", tmp_path, "training.per_device_train_batch_size=1",
                        "training.gradient_accumulation_steps=2")
    assert_two_ranks(run, "FSDP")
    assert_sharded_in_half(run)
    assert_same_losses(run, lora_reference)
    assert_artifact_is_the_trained_model(run, peft=True)
    # and the artifact is the same model one process trained
    import torch

    got, ref = torch.tensor(run.reports[0]["probe_logits"]), torch.tensor(lora_reference.reports[0]["probe_logits"])
    torch.testing.assert_close(got, ref, rtol=0, atol=REL_TOL * ref.abs().max().item())


# --------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-2/3 through accelerate's DeepSpeed path (the CPU stand-in's shim, gloo)
# --------------------------------------------------------------------------------------------
DS = "cpu_deepspeed_2proc.yaml"
ZERO2 = ("--zero_stage", "2")


def assert_zero_partitioned(run: Run, stage: int) -> None:
    """ZeRO-3: every parameter is a partition and the two halves make the model; ZeRO-2: whole
    parameters on each rank; both: each rank keeps half of the optimizer state."""
    mems = [r["memory"] for r in run.reports]
    for m in mems:
        assert m["zero_stage"] == stage
        assert m["optim_bytes_full"] > 0 and m["optim_bytes_local"] <= 0.55 * m["optim_bytes_full"], m
        assert m["master_bytes_local"] > 0  # ZeRO's fp32 copy of this rank's partition
        if stage == 3:
            assert m["zero3_params"] == m["params"] > 0, "ZeRO-3 did not partition the parameters"
            assert m["param_bytes_local"] <= 0.55 * m["param_bytes_full"], m
        else:
            assert m["zero3_params"] == 0 and m["param_bytes_local"] == m["param_bytes_full"]
    if stage == 3:  # partitions cover the model (DeepSpeed pads each to a multiple of the world size)
        full = mems[0]["param_bytes_full"]
        assert full <= sum(m["param_bytes_local"] for m in mems) <= full + 4 * 2 * mems[0]["params"]
    assert f"sharding (DEEPSPEED ZeRO-{stage}): rank 0 " in run.proc.stderr


def assert_estimate_matches(run: Run, stage: int, *overrides: str) -> None:
    """--estimate-memory for this recipe under the same launch plan vs the bytes rank 0 held."""
    from llama_recipes import memory
    from llama_recipes.runtime import launchplan

    recipe = _recipe(*BASE, *overrides)
    shape = memory.recipe_shape(recipe.model)
    s = memory.setup_from_recipe(recipe)
    memory.apply_plan(s, launchplan.from_config(str(ROOT / "accelerate_configs" / DS),
                                                *(ZERO2 if stage == 2 else ())))
    e = memory.estimate(shape, s)
    m = run.reports[0]["memory"]
    assert e.weights == pytest.approx(m["param_bytes_local"], rel=0.05), (e.weights, m)
    assert e.optimizer == pytest.approx(m["optim_bytes_local"] + m["master_bytes_local"], rel=0.05), (e.optimizer, m)


def test_deepspeed_zero3_partitions_and_matches_one_rank(lora_reference, tmp_path):
    """The DeepSpeed config really runs DeepSpeed (not DDP): ZeRO-3 partitions, same losses as one
    process, the artifact is a normal adapter that loads in one process with the trained logits,
    and --estimate-memory's per-rank bytes are what the ranks held."""
    run = two_processes(DS, tmp_path, "training.per_device_train_batch_size=2")
    assert_two_ranks(run, "DEEPSPEED")
    assert_zero_partitioned(run, 3)
    assert "the model loads partitioned over 2 processes (deepspeed.zero.Init)" in run.proc.stderr
    assert_same_losses(run, lora_reference)
    assert_artifact_is_the_trained_model(run, peft=True)
    assert_estimate_matches(run, 3, "training.per_device_train_batch_size=2")


@pytest.mark.slow
def test_deepspeed_zero2_partitions_and_matches_one_rank(lora_reference, tmp_path):
    run = two_processes(DS, tmp_path, "training.per_device_train_batch_size=2", flags=ZERO2)
    assert_two_ranks(run, "DEEPSPEED")
    assert_zero_partitioned(run, 2)
    assert_same_losses(run, lora_reference)
    assert_artifact_is_the_trained_model(run, peft=True)
    assert_estimate_matches(run, 2, "training.per_device_train_batch_size=2")


@pytest.mark.slow
def test_full_finetune_ddp_zero2_zero3_same_losses(tmp_path):
    """DDP vs ZeRO-2 vs ZeRO-3, full fine-tuning, 2 ranks x batch 2: the same per-step losses as one
    process with batch 4, and each artifact is a normal model directory with the trained logits."""
    ref = one_process(tmp_path / "ref", *FULL, "training.per_device_train_batch_size=4")
    ddp = two_processes("cpu_ddp_2proc.yaml", tmp_path / "ddp", *FULL, "training.per_device_train_batch_size=2")
    assert_same_losses(ddp, ref)
    for stage in (2, 3):
        run = two_processes(DS, tmp_path / f"z{stage}", *FULL, "training.per_device_train_batch_size=2",
                            flags=ZERO2 if stage == 2 else ())
        assert_two_ranks(run, "DEEPSPEED")
        assert_zero_partitioned(run, stage)
        assert_same_losses(run, ref)
        assert_artifact_is_the_trained_model(run, peft=False)
        assert_estimate_matches(run, stage, *FULL, "training.per_device_train_batch_size=2")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_exact_resume_eval_only_and_export(tmp_path, stage):
    """A ZeRO run killed after checkpoint-2 resumes to the uninterrupted run's losses; its artifact
    is read by --eval-only and export in one process, as any run's."""
    import shutil

    flags = ZERO2 if stage == 2 else ()
    ckpt = ("training.per_device_train_batch_size=2", "training.save_strategy=steps", "training.save_steps=2")
    first = two_processes(DS, tmp_path, *ckpt, flags=flags)
    losses = first.losses
    assert (first.out / "checkpoint-2").is_dir() and list((first.out / "checkpoint-2").glob("global_step2"))
    # as if both nodes had died right after checkpoint-2
    (first.out / "metrics.json").unlink()
    shutil.rmtree(first.out / "checkpoint-4")
    resumed = two_processes(DS, tmp_path, *ckpt, flags=flags)
    assert "resum" in resumed.proc.stderr.lower()
    assert resumed.metrics["train"]["global_step"] == 4
    assert close(resumed.losses, losses), (resumed.losses, losses)
    assert_artifact_is_the_trained_model(resumed, peft=True)
    # the artifact is a normal adapter directory: --eval-only and export in one process
    ev = run_cli(str(DEMO_RECIPE), "--eval-only", f"output_dir={resumed.out}", *BASE, env=THREADS)
    assert ev.returncode == 0, ev.stderr[-3000:]
    merged = tmp_path / "merged"
    ex = subprocess.run([sys.executable, "-m", "llama_recipes.export", str(resumed.out), str(merged)], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, env={**os.environ, **THREADS})
    assert ex.returncode == 0, ex.stderr[-3000:]
    assert (merged / "model.safetensors").is_file()


def test_gradient_accumulation_2x2_equals_4x1(lora_reference, tmp_path):
    run = one_process(tmp_path, "training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=2")
    assert_same_losses(run, lora_reference)
    assert run.metrics["train"]["global_step"] == 4


# --------------------------------------------------------------------------------------------
# FSDP2 full fine-tuning and a partial freeze (slow: two more runs each)
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_fsdp2_full_finetune_shards_and_matches_one_rank(tmp_path):
    ref = one_process(tmp_path / "ref", *FULL, "training.per_device_train_batch_size=4")
    run = two_processes("cpu_fsdp_2proc.yaml", tmp_path / "fsdp", *FULL, "training.per_device_train_batch_size=2")
    assert_two_ranks(run, "FSDP")
    assert_sharded_in_half(run)
    assert_same_losses(run, ref)
    assert_artifact_is_the_trained_model(run, peft=False)


@pytest.mark.slow
def test_fsdp2_partial_freeze(tmp_path):
    import torch
    from safetensors.torch import load_file

    # method partial: freeze rules with method full are refused (every parameter would train)
    partial = ["method={name: partial}", "training.learning_rate=1e-3", "freeze.train=['layers\\.1\\.']"]
    ref = one_process(tmp_path / "ref", *partial, "training.per_device_train_batch_size=4")
    run = two_processes("cpu_fsdp_2proc.yaml", tmp_path / "fsdp", *partial, "training.per_device_train_batch_size=2")
    assert_two_ranks(run, "FSDP")
    assert_sharded_in_half(run)
    assert_same_losses(run, ref)
    assert_artifact_is_the_trained_model(run, peft=False)
    base = load_file(MODEL / "model.safetensors")
    saved = load_file(run.out / "model.safetensors")
    for name, before in base.items():
        changed = not torch.equal(before, saved[name])
        assert changed == ("layers.1." in name), name


# --------------------------------------------------------------------------------------------
# The rules, in process (no launch): one source for precision and activation checkpointing,
# FSDP1 + frozen parameters, the wrap class from the model
# --------------------------------------------------------------------------------------------

FSDP2_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "ACCELERATE_MIXED_PRECISION": "no"}


def _recipe(*overrides: str):
    from llama_recipes.schema import load_recipe

    return load_recipe(DEMO_RECIPE, [FP32, f"model.name_or_path={MODEL}", *overrides])


def _setup(monkeypatch, env: dict, *overrides: str):
    from llama_recipes.runtime import distributed

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # one process: no shim is installed
    # The recipe-by-config decisions every rank makes (setup's first step, and --validate's);
    # on this GPU-less machine setup would then apply the CPU stand-in (tested below).
    return distributed.resolve(_recipe(*overrides))


def test_cpu_stand_in_runs_a_gpu_launch_in_fp32(monkeypatch):
    from llama_recipes.runtime import distributed

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")  # a GPU config, as accelerate launch hands it over
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    r = distributed.setup(_recipe("model.dtype=bfloat16", "training.bf16=true"))
    assert r.training.bf16 is False and r.training.fp16 is False and r.model.dtype == "float32"
    assert os.environ["ACCELERATE_MIXED_PRECISION"] == "no"
    # a CPU config (use_cpu: true) is not a stand-in: the recipe's precision stands
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    assert distributed.setup(_recipe("training.bf16=true")).training.bf16 is True


def test_activation_checkpointing_from_one_place(monkeypatch):
    from llama_recipes.errors import UserError

    env = {**FSDP2_ENV, "FSDP_ACTIVATION_CHECKPOINTING": "true"}
    # the same intent twice is not a conflict: FSDP does it, once (the shipped recipes x FSDP configs)
    both = _setup(monkeypatch, env, "training.activation_checkpointing=true")
    assert both.training.trainer_kwargs()["activation_checkpointing"] is False
    # a real contradiction is an error naming both places
    with pytest.raises(UserError) as e:
        _setup(monkeypatch, env, "training.activation_checkpointing=false")
    assert "training.activation_checkpointing: false" in str(e.value) and "fsdp_activation_checkpointing" in str(e.value)
    # a recipe that does not mention it yields to the config (the default is on)
    silent = _setup(monkeypatch, env, "training={bf16: false}")
    assert silent.training.trainer_kwargs()["activation_checkpointing"] is False
    from llama_recipes.training import sft_config

    assert sft_config(silent).activation_checkpointing is False  # the default (on) is overridden
    # without FSDP checkpointing the recipe is untouched
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "false")
    assert _setup(monkeypatch, {}, "training={bf16: false}").training.trainer_kwargs()["activation_checkpointing"] is True


def test_mixed_precision_from_one_source(monkeypatch):
    from llama_recipes.errors import UserError

    with pytest.raises(UserError) as e:
        _setup(monkeypatch, {"ACCELERATE_MIXED_PRECISION": "bf16"}, "training.bf16=false")
    msg = str(e.value)
    assert "training.bf16" in msg and "mixed_precision: bf16" in msg
    with pytest.raises(UserError):
        _setup(monkeypatch, {"ACCELERATE_MIXED_PRECISION": "fp16"}, "training.bf16=true")
    # config silent ("no"): the recipe decides; recipe silent: the config decides
    assert _setup(monkeypatch, {"ACCELERATE_MIXED_PRECISION": "no"}, "training.bf16=true").training.bf16 is True
    fp16 = _setup(monkeypatch, {"ACCELERATE_MIXED_PRECISION": "fp16"}, "training={max_steps: 1}").training.trainer_kwargs()
    assert fp16["fp16"] is True and fp16["bf16"] is False


def test_fsdp1_needs_use_orig_params_with_frozen_parameters():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import AutoModelForCausalLM

    from llama_recipes.errors import UserError
    from llama_recipes.runtime import distributed

    model = AutoModelForCausalLM.from_pretrained(MODEL)
    flat = FullyShardedDataParallelPlugin(fsdp_version=1, use_orig_params=False, sync_module_states=False)
    distributed.finish_fsdp_plugin(flat, model)  # everything trains: fine
    model.lm_head.weight.requires_grad_(False)  # a freeze rule, an adapter's frozen base, a head-only method
    with pytest.raises(UserError) as e:
        distributed.finish_fsdp_plugin(flat, model)
    assert "use_orig_params" in str(e.value) and "lm_head.weight" in str(e.value)
    orig = FullyShardedDataParallelPlugin(fsdp_version=1, use_orig_params=True, sync_module_states=False)
    distributed.finish_fsdp_plugin(orig, model)
    distributed.finish_fsdp_plugin(FullyShardedDataParallelPlugin(fsdp_version=2), model)  # FSDP2 handles it


def test_recipe_cannot_configure_fsdp_itself():
    from llama_recipes.errors import RecipeError

    with pytest.raises(RecipeError) as e:
        _recipe("training.fsdp=full_shard")
    assert "accelerate config" in str(e.value)


@pytest.mark.parametrize("arch", ["Qwen2", "Mistral", "Llama"])
def test_wrap_class_comes_from_the_model(arch, monkeypatch):
    import transformers
    from accelerate.utils import FullyShardedDataParallelPlugin

    from llama_recipes.errors import UserError
    from llama_recipes.runtime import distributed

    cfg = getattr(transformers, f"{arch}Config")(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    model = getattr(transformers, f"{arch}ForCausalLM")(cfg)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="TRANSFORMER_BASED_WRAP")
    distributed._set_wrap_classes(plugin, model)
    assert plugin.transformer_cls_names_to_wrap == [f"{arch}DecoderLayer"]
    plugin.set_auto_wrap_policy(model)  # accelerate accepts it
    if arch != "Llama":
        named = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="TRANSFORMER_BASED_WRAP",
                                               transformer_cls_names_to_wrap=["LlamaDecoderLayer"])
        with pytest.raises(UserError) as e:
            distributed._set_wrap_classes(named, model)
        assert "LlamaDecoderLayer" in str(e.value) and f"{arch}DecoderLayer" in str(e.value)


def test_bf16_fsdp2_reduces_in_fp32():
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin

    from llama_recipes.runtime import distributed

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    plugin.set_mixed_precision("bf16")
    assert plugin.mixed_precision_policy.reduce_dtype == torch.bfloat16  # accelerate's default
    distributed._reduce_in_fp32(plugin)
    policy = plugin.mixed_precision_policy
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32


@pytest.mark.slow
def test_ddp_two_ranks_with_packed_rows_match_one_rank(tmp_path):
    """Packed rows (batching.PackedRowCollator) under DDP: 2 ranks x 2 rows = 1 rank x 4 rows."""
    packed = ("training.packing=true", "training.max_length=256")
    ref = one_process(tmp_path / "one", *packed, "training.per_device_train_batch_size=4")
    run = two_processes("cpu_ddp_2proc.yaml", tmp_path / "two", *packed, "training.per_device_train_batch_size=2")
    assert_two_ranks(run, "MULTI_CPU")
    assert_same_losses(run, ref)
    # the logged token count is the real tokens of both ranks' rows; TRL's count (one row's width per
    # rank and step) could not exceed 2 ranks x 4 steps x 256
    tokens = [h["num_tokens"] for h in run.metrics["log_history"] if "num_tokens" in h]
    assert tokens == [h["num_tokens"] for h in ref.metrics["log_history"] if "num_tokens" in h]
    assert tokens[-1] > 2 * 4 * 256, tokens
