"""What the machine can do fast, decided once: the bf16 choice behind `training.bf16: auto`,
and which bitsandbytes 4-bit layers may use the AVX512-BF16 packed CPU kernel.

CPUs differ between machines of the same kind. On AVX2-only CPUs bf16 runs 20-30x slower than
fp32 (it is emulated); on CPUs with avx512_bf16 / amx_bf16 a bf16 matmul runs several times
faster (docs/benchmarks.md has both, with the ISA). So the right precision is a property of
the machine, not of the recipe, unless the recipe pins it.
"""
import os
from functools import lru_cache

from llama_recipes.log import get_logger
from llama_recipes.paths import model_path

log = get_logger(__name__)

# Set to 0 to keep every bitsandbytes 4-bit layer on its generic CPU kernel (the one AVX2 CPUs
# run), e.g. to reproduce an AVX2 machine's numbers on an AVX512 one. Tests use it.
BNB_PACKED_ENV = "LLAMA_RECIPES_BNB_CPU_PACKED"
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:  # not Linux: no flags known, so no native bf16 is assumed
        pass
    return frozenset()


def cpu_isa() -> str:
    """torch's kernel level (DEFAULT, AVX2, AVX512, ...); ATEN_CPU_CAPABILITY=avx2 lowers it."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def cpu_native_bf16() -> tuple[bool, str]:
    """(bf16 is fast on this CPU, why). Needs the bf16 instructions and torch's AVX512 kernels."""
    flags = sorted(f for f in NATIVE_BF16_FLAGS if f in cpu_flags())
    isa = cpu_isa()
    if not flags:
        return False, f"CPU {isa} without avx512_bf16/amx_bf16: bf16 would be emulated (20-30x slower)"
    if not isa.startswith("AVX512"):
        return False, f"CPU has {'+'.join(flags)} but torch runs its {isa} kernels (ATEN_CPU_CAPABILITY?)"
    return True, f"CPU {isa} with {'+'.join(flags)}: native bf16 matmuls"


# On CPUs with native bf16, bf16 autocast pays only when the matmuls are big enough to dominate a
# step (casts and small kernels cost the rest). Measured side by side on an AVX512-BF16 CPU
# (docs/benchmarks.md): hidden 128 (the tiny demo) 0.89x, hidden 576 (135M Llama LoRA step) 1.58x.
CPU_BF16_MIN_HIDDEN = 512


def auto_bf16(hidden_size: int | None = None) -> tuple[bool, str]:
    """What `training.bf16: auto` means here: (use bf16 autocast, the reason in words).

    GPUs: bf16 where supported (Ampere+). CPUs: bf16 with native bf16 instructions and torch's
    AVX512 kernels, for models whose hidden size is at least CPU_BF16_MIN_HIDDEN (when known).
    """
    import torch

    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return True, f"GPU {torch.cuda.get_device_name()} supports bf16"
        return False, f"GPU {torch.cuda.get_device_name()} has no bf16 (pre-Ampere): fp32"
    fast, why = cpu_native_bf16()
    if fast and hidden_size is not None and hidden_size < CPU_BF16_MIN_HIDDEN:
        return False, (f"{why}, but hidden size {hidden_size} < {CPU_BF16_MIN_HIDDEN}: matmuls this small run "
                       "no faster in bf16 (docs/benchmarks.md)")
    return fast, why


def recipe_bf16(recipe) -> tuple[bool, str]:
    """What `training.bf16: auto` resolves to for this recipe on this machine, and why."""
    if recipe.training.fp16:
        return False, "training.fp16 is on"
    return auto_bf16(hidden_size_of(recipe.model))


def hidden_size_of(model_cfg) -> int | None:
    """The model's hidden size from its config.json alone (None when it cannot be read offline)."""
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_path(model_cfg), revision=model_cfg.revision,
                                         trust_remote_code=model_cfg.trust_remote_code)
        return getattr(cfg.get_text_config(), "hidden_size", None)
    except Exception:  # a hub id offline, a typo: the model load reports it properly later
        return None


def has_accelerator() -> bool:
    import torch

    if torch.cuda.is_available():
        return True
    acc = getattr(torch, "accelerator", None)
    return bool(acc and acc.is_available())


# -- bitsandbytes 4-bit on CPU -------------------------------------------------------------------

def bnb_has_packed_kernel() -> bool:
    """Whether bitsandbytes would use its AVX512-BF16 packed 4-bit kernel on this CPU."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


def packed_kernel_fits(out_features: int, in_features: int, blocksize: int) -> bool:
    """Whether bitsandbytes 0.50's packed CPU layout can hold this weight.

    `_convert_weight_packed_for_cpu` tiles the output dimension in blocks of 32 and reshapes the
    absmax to (out, in / blocksize): any other shape fails with a raw reshape error.
    """
    return out_features % 32 == 0 and in_features % 2 == 0 and in_features % blocksize == 0


def limit_bnb_cpu_packing(model, compute_dtype) -> None:
    """Keep 4-bit layers that the packed AVX512-BF16 kernel cannot take on the generic kernel.

    bitsandbytes switches a Linear4bit to that kernel on its first no-grad forward in eval mode,
    on CPUs with avx512_bf16. The kernel assumes shapes (packed_kernel_fits) and computes with
    bf16 scales, so it is allowed only where the shape fits and the recipe's compute dtype is
    bfloat16: a float32 QLoRA evaluates with the same arithmetic it trained with.
    """
    import torch

    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    candidates = [(n, m) for n, m in layers if getattr(m, "support_avx512bf16_for_cpu", False)]
    if not candidates:
        return
    forced_off = os.environ.get(BNB_PACKED_ENV, "1").strip() in ("0", "false", "no")
    odd: list[str] = []
    for name, m in candidates:
        qs = m.weight.quant_state
        blocksize = getattr(qs, "blocksize", 64) if qs is not None else 64
        fits = packed_kernel_fits(m.out_features, m.in_features, blocksize)
        if forced_off or compute_dtype != torch.bfloat16 or not fits:
            m.support_avx512bf16_for_cpu = False
            if not fits:
                odd.append(f"{name.rsplit('.', 1)[-1]} ({m.out_features}x{m.in_features})")
    kept = len(candidates) - sum(not m.support_avx512bf16_for_cpu for _, m in candidates)
    if forced_off:
        why = f"{BNB_PACKED_ENV}=0"
    elif compute_dtype != torch.bfloat16:
        why = f"method.compute_dtype is {str(compute_dtype).removeprefix('torch.')}; the packed kernel computes in bf16"
    else:
        why = "shapes the packed kernel cannot hold: " + ", ".join(sorted(set(odd))) if odd else ""
    if kept < len(candidates):
        log.info("bitsandbytes CPU: %d of %d 4-bit layers use the generic kernel (%s); %d use the AVX512-BF16 "
                 "packed kernel", len(candidates) - kept, len(candidates), why, kept)
