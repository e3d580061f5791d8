"""Precision and kernels that follow the CPU: `training.bf16: auto`, bitsandbytes' packed 4-bit path.

This suite must pass on AVX2-only CPUs and on AVX512/AMX ones. Each test runs the path of the
machine it is on and forces the other one where it can: ATEN_CPU_CAPABILITY=avx2 makes torch use
its AVX2 kernels (and `auto` then picks fp32); LLAMA_RECIPES_BNB_CPU_PACKED=0 keeps every 4-bit
layer on bitsandbytes' generic CPU kernel, the one an AVX2 CPU runs.
"""
import os

import pytest
import torch
from conftest import FAST, ROOT, run_cli

from llama_recipes.runtime import hardware
from llama_recipes.schema import load_recipe

QLORA = ROOT / "recipes" / "demo" / "tiny_qlora.yaml"
DEMO = ROOT / "recipes" / "demo" / "tiny_lora.yaml"
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", hardware.BNB_PACKED_ENV: "0"}


def test_packed_kernel_shape_rule():
    # bitsandbytes 0.50 tiles out_features by 32 and reshapes absmax to (out, in / blocksize)
    assert hardware.packed_kernel_fits(128, 128, 64)
    assert hardware.packed_kernel_fits(352, 128, 64)  # the tiny model's up/gate_proj
    assert not hardware.packed_kernel_fits(128, 352, 64)  # its down_proj: 352 % 64 != 0
    assert not hardware.packed_kernel_fits(1015, 128, 64)  # 1015 % 32 != 0


def test_auto_bf16_follows_the_cpu_flags():
    use, why = hardware.auto_bf16()
    native = bool(set(hardware.NATIVE_BF16_FLAGS) & hardware.cpu_flags())
    assert use == (native and hardware.cpu_isa().startswith("AVX512")), why
    assert hardware.cpu_isa() in why
    # a model too small for bf16 matmuls to pay stays fp32 on every CPU; a large one follows the CPU
    assert hardware.auto_bf16(hidden_size=128)[0] is False
    assert hardware.auto_bf16(hidden_size=hardware.CPU_BF16_MIN_HIDDEN)[0] == use


def _qlora_bf16(packed: str):
    """The tiny model in 4-bit with bf16 compute, in eval mode: what the packed kernel would take."""
    from llama_recipes import methods, modeling

    os.environ[hardware.BNB_PACKED_ENV] = packed
    try:
        recipe = load_recipe(QLORA, ["method.compute_dtype=bfloat16", "model.dtype=bfloat16"])
        return modeling.load_model(recipe.model, **methods.load_kwargs(recipe.method)).eval()
    finally:
        del os.environ[hardware.BNB_PACKED_ENV]


def test_qlora_odd_shapes_evaluate_on_either_kernel():
    """A 4-bit model whose down_proj (128x352) the packed kernel cannot hold evaluates on both paths."""
    from bitsandbytes.nn import Linear4bit

    ids = torch.arange(1, 33).unsqueeze(0)
    logits = {}
    for packed in ("1", "0"):
        model = _qlora_bf16(packed)
        with torch.inference_mode():
            logits[packed] = model(input_ids=ids).logits.float()
        layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
        assert len(layers) == 4 * 7
        for name, m in layers.items():
            is_packed = bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
            fits = hardware.packed_kernel_fits(m.out_features, m.in_features, 64)
            # packed only where the CPU has the kernel, the shape fits and nobody forced it off
            assert is_packed == (packed == "1" and fits and hardware.bnb_has_packed_kernel()), name
    assert torch.isfinite(logits["1"]).all()
    # The packed kernel keeps bf16 scales: same model, bf16-level differences only (2**-8 relative
    # per weight, a few of them adding up over 4 layers).
    scale = logits["0"].abs().max().item()
    assert (logits["1"] - logits["0"]).abs().max().item() <= 0.05 * scale


def test_demo_precision_auto_is_logged_and_used(tmp_path):
    """The demo says bf16: auto; one log line says what was chosen and why, and the run used it."""
    import json

    fast = [o for o in FAST if not o.startswith("training.bf16")]
    r = run_cli(str(DEMO), *fast, "training.max_steps=2", f"output_dir={tmp_path / 'o'}", "eval.before_after=false")
    assert r.returncode == 0, r.stderr[-3000:]
    use, why = hardware.recipe_bf16(load_recipe(DEMO))
    assert use is False, why  # the 1M-parameter demo (hidden 128): fp32 on every CPU
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("precision:")]
    assert line == [f"precision: {'bf16 autocast' if use else 'fp32'} (training.bf16: auto; {why})"]
    saved = (tmp_path / "o" / "recipe.yaml").read_text()
    assert f"bf16: {str(use).lower()}" in saved
    assert "pin_memory" not in r.stderr  # the DataLoader warning every CPU run used to print
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["train"]["global_step"] == 2


def test_forced_avx2_path_picks_fp32_and_qlora_passes_dry_run(tmp_path):
    """The other machine's path on this one: torch's AVX2 kernels, bitsandbytes' generic 4-bit kernel."""
    r = run_cli(str(QLORA), f"output_dir={tmp_path / 'o'}", "training.bf16=auto", "--dry-run", env=AVX2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("precision:")]
    assert len(line) == 1 and line[0].startswith("precision: fp32 (training.bf16: auto; ") and "AVX2" in line[0]
    assert "dry run: PASS" in r.stdout


def test_bf16_on_cpu_round_trips(tmp_path):
    """Explicit bf16 autocast on CPU (what auto picks for bigger models on AVX512-BF16 CPUs) on this
    machine's kernels: trains, saves, reloads to the same logits under the same autocast."""
    if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() == "avx2" and "amx_bf16" in hardware.cpu_flags():
        pytest.skip("torch 2.13 on an AMX CPU with its kernels forced to AVX2 (.ci/run's second pass) refuses bf16 "
                    "matmuls ('pack_vnni2 is only supported when avx512 is supported'): a real AVX2 CPU has no "
                    "AMX; the first pass ran this test on this CPU's own kernels")
    r = run_cli(str(DEMO), f"output_dir={tmp_path / 'o'}", "training.bf16=true", "--dry-run")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "PASS  reload" in r.stdout and "dry run: PASS" in r.stdout
