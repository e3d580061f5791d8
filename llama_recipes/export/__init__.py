"""Merge a trained adapter into its base and write a standalone model (safetensors + tokenizer).

    llama-recipes export OUTPUT_DIR MERGED_DIR [--dtype bfloat16] [--verify]
    python -m llama_recipes.export OUTPUT_DIR MERGED_DIR ...          (the same)

OUTPUT_DIR is a run's directory (adapter_model.safetensors, adapter_config.json, recipe.yaml,
tokenizer). MERGED_DIR then loads with plain `AutoModelForCausalLM.from_pretrained(MERGED_DIR)`.

LoRA, DoRA and IA3 change weights by a delta that folds into the base weight exactly. QLoRA's
adapter was trained against the *quantized* base, so the base is loaded quantized as in training
and dequantized to the compute dtype first; merging into the original full-precision weights
instead would add the quantization error the adapter never saw. Prefix tuning, prompt tuning
and LLaMA-Adapter add tokens or attention paths, not weight deltas: they cannot be merged.
"""
import os
import shutil
from pathlib import Path

from llama_recipes import artifacts, methods, modeling
from llama_recipes.runtime import resilience
from llama_recipes.errors import UserError
from llama_recipes.log import get_logger

log = get_logger(__name__)

def check_mergeable(method_name: str) -> None:
    """Refuse a method whose update is not a weight delta (the registry says which merge)."""
    method = methods.REGISTRY.get(method_name)
    if method is None or not method.peft:
        raise UserError(f"{method_name!r} is not a PEFT adapter run",
                        "pass the output_dir of a PEFT run (full fine-tuning already saves a standalone model)")
    if not method.mergeable:
        raise UserError(f"cannot merge a {method_name} adapter into the base: {method.why_not_mergeable}",
                        "serve it as an adapter on the base (PeftModel.from_pretrained, or llama-recipes adapters); "
                        "only " + ", ".join(n for n, m in methods.REGISTRY.items() if m.mergeable) + " adapters merge")


def run_method(adapter_dir: Path) -> str:
    """The method a run directory was trained with (its recipe.yaml, else the adapter's PEFT type)."""
    cfg, recipe = artifacts.read_adapter_run(adapter_dir)
    if recipe and recipe.get("method", {}).get("name"):
        return recipe["method"]["name"]
    return PEFT_TYPES.get(cfg.get("peft_type", ""), cfg.get("peft_type", "?").lower())


# PEFT's adapter types -> our method names, for adapter directories without a recipe.yaml
PEFT_TYPES = {"LORA": "lora", "IA3": "ia3", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt_tuning",
              "ADAPTION_PROMPT": "llama_adapter"}


def load_base_for_merge(adapter_dir: Path, dtype: str | None = None, dequantize: bool = True,
                        trust_remote_code: bool = False):
    """(base model, method name) for a run directory: as trained, and dequantized if asked (QLoRA).
    The base's own code runs only if the caller grants it (never because the run's recipe.yaml says so)."""
    name = run_method(adapter_dir)
    check_mergeable(name)
    model_cfg, method = artifacts.base_model_config(adapter_dir, trust_remote_code=trust_remote_code)
    objective = artifacts.run_objective(adapter_dir)  # a reward model merges into a sequence classifier
    if methods.get(name).quantized:
        model = artifacts.load_base(model_cfg, method, objective)
        if not dequantize:
            return model, name
        # Dequantize the weights the adapter was trained against, in the compute dtype.
        model = model.dequantize(dtype=modeling.torch_dtype(dtype or method["compute_dtype"]))
    else:
        if dtype:
            model_cfg = model_cfg.model_copy(update={"dtype": dtype})
        model = modeling.load_model(model_cfg, objective.auto_class, **objective.load_kwargs())
    return model, name


def merge_and_export(adapter_dir: str | Path, merged_dir: str | Path, dtype: str | None = None,
                     trust_remote_code: bool = False) -> Path:
    """Fold the adapter of a run into its base and save a standalone model + tokenizer."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    adapter_dir, merged_dir = Path(adapter_dir), Path(merged_dir)
    if merged_dir.exists() and not merged_dir.is_dir():
        raise UserError(f"{merged_dir} is a file", "choose a new directory for the merged model")
    if merged_dir.exists() and any(merged_dir.iterdir()):
        raise UserError(f"{merged_dir} is not empty", "choose a new directory for the merged model")
    base, method = load_base_for_merge(adapter_dir, dtype, trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    config = model.config
    if getattr(config, "quantization_config", None) is not None:  # QLoRA: the merged model is dense
        del config.quantization_config
    if any((adapter_dir / f).is_file() for f in modeling.TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir), trust_remote_code=trust_remote_code)
    else:  # a run directory without its tokenizer files: the base's, which training started from
        base_cfg, _ = artifacts.base_model_config(adapter_dir, trust_remote_code=trust_remote_code)
        log.warning("%s holds no tokenizer files: the merged model gets the base's tokenizer (%s)", adapter_dir,
                    base_cfg.tokenizer or base_cfg.name_or_path)
        tokenizer = modeling.load_tokenizer(base_cfg)
    # Written under a temporary name and renamed: an export killed (or out of disk) mid-write leaves no
    # half MERGED_DIR that a rerun would refuse as "not empty".
    tmp = merged_dir.parent / f".{merged_dir.name}.partial-{os.getpid()}"
    for stale in merged_dir.parent.glob(f".{merged_dir.name}.partial-*"):
        if not _alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)
    need = sum(p.numel() * p.element_size() for p in model.parameters()) + 16 * 2**20
    try:
        with resilience.writing(merged_dir.parent, need, "the merged model"):
            model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
        if merged_dir.exists():
            merged_dir.rmdir()  # empty (checked above)
        os.replace(tmp, merged_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in merged_dir.glob("*.safetensors")) / 2**20
    log.info("merged %s adapter %s into %s (%.1f MiB, %s)", method, adapter_dir, merged_dir, size, model.dtype)
    return merged_dir


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def max_logit_difference(adapter_dir: str | Path, merged_dir: str | Path, text: str = "The quick brown fox",
                         trust_remote_code: bool = False) -> float:
    """Largest |logit| difference between base+adapter (as trained: quantized for QLoRA) and the merged model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, _ = load_base_for_merge(Path(adapter_dir), dequantize=False, trust_remote_code=trust_remote_code)
    with_adapter = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), trust_remote_code=trust_remote_code).eval()
    ids = AutoTokenizer.from_pretrained(str(merged_dir), trust_remote_code=trust_remote_code)(text, return_tensors="pt")
    with torch.inference_mode():
        a = with_adapter(**ids).logits.float()
        b = merged(**ids).logits.float()
    return float((a - b).abs().max())
