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
import json
import sys
from pathlib import Path

from llama_recipes.errors import UserError
from llama_recipes.log import get_logger

log = get_logger(__name__)

MERGEABLE = {"LORA", "IA3"}
WHY_NOT = {
    "PREFIX_TUNING": "prefix tuning adds learned key/value vectors to every attention layer, not a weight delta",
    "PROMPT_TUNING": "prompt tuning prepends learned input embeddings (virtual tokens), not a weight delta",
    "P_TUNING": "p-tuning prepends learned input embeddings (virtual tokens), not a weight delta",
    "ADAPTION_PROMPT": "LLaMA-Adapter adds a gated attention path over learned prompts, not a weight delta",
}


def _read_run(adapter_dir: Path) -> tuple[dict, dict | None]:
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise UserError(f"{adapter_dir} has no adapter_config.json",
                        "pass the output_dir of a PEFT run (full fine-tuning already saves a standalone model)")
    recipe = None
    if (adapter_dir / "recipe.yaml").is_file():
        import yaml

        recipe = yaml.safe_load((adapter_dir / "recipe.yaml").read_text())
    return json.loads(cfg_path.read_text()), recipe


def check_mergeable(peft_type: str) -> None:
    if peft_type not in MERGEABLE:
        why = WHY_NOT.get(peft_type, f"PEFT type {peft_type} has no merge")
        raise UserError(f"cannot merge a {peft_type} adapter into the base: {why}",
                        "serve it as an adapter on the base (PeftModel.from_pretrained, or llama_recipes.adapters); "
                        "only LoRA, DoRA, QLoRA and IA3 adapters merge")


def load_base_for_merge(adapter_dir: Path, dtype: str | None = None, dequantize: bool = True):
    """(base model, method name) for a run directory: as trained, and dequantized if asked (QLoRA)."""
    from llama_recipes import methods, modeling
    from llama_recipes.schema.method import QLoraMethod
    from llama_recipes.schema.model import ModelConfig

    cfg, recipe = _read_run(adapter_dir)
    check_mergeable(cfg.get("peft_type", "?"))
    model_cfg = ModelConfig(**recipe["model"]) if recipe else ModelConfig(name_or_path=cfg["base_model_name_or_path"])
    method = (recipe or {}).get("method", {})
    if method.get("name") == "qlora":
        q = QLoraMethod(**method)
        model = modeling.load_model(model_cfg, **methods.load_kwargs(q))
        if not dequantize:
            return model, "qlora"
        # Dequantize the weights the adapter was trained against, in the compute dtype.
        model = model.dequantize(dtype=modeling.torch_dtype(dtype or q.compute_dtype))
    else:
        if dtype:
            model_cfg = model_cfg.model_copy(update={"dtype": dtype})
        model = modeling.load_model(model_cfg)
    return model, method.get("name", cfg.get("peft_type", "").lower())


def merge_and_export(adapter_dir: str | Path, merged_dir: str | Path, dtype: str | None = None) -> Path:
    """Fold the adapter of a run into its base and save a standalone model + tokenizer."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    adapter_dir, merged_dir = Path(adapter_dir), Path(merged_dir)
    if merged_dir.exists() and any(merged_dir.iterdir()):
        raise UserError(f"{merged_dir} is not empty", "choose a new directory for the merged model")
    base, method = load_base_for_merge(adapter_dir, dtype)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    config = model.config
    if getattr(config, "quantization_config", None) is not None:  # QLoRA: the merged model is dense
        del config.quantization_config
    model.save_pretrained(str(merged_dir), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(str(merged_dir))
    size = sum(f.stat().st_size for f in merged_dir.glob("*.safetensors")) / 2**20
    log.info("merged %s adapter %s into %s (%.1f MB, %s)", method, adapter_dir, merged_dir, size, model.dtype)
    return merged_dir


def max_logit_difference(adapter_dir: str | Path, merged_dir: str | Path, text: str = "The quick brown fox") -> float:
    """Largest |logit| difference between base+adapter (as trained: quantized for QLoRA) and the merged model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, _ = load_base_for_merge(Path(adapter_dir), dequantize=False)
    with_adapter = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    ids = AutoTokenizer.from_pretrained(str(merged_dir))(text, return_tensors="pt")
    with torch.inference_mode():
        a = with_adapter(**ids).logits.float()
        b = merged(**ids).logits.float()
    return float((a - b).abs().max())


def main(argv: list[str] | None = None) -> int:
    """`python -m llama_recipes.export ...`: the `llama-recipes export` command (parser in llama_recipes/cli.py)."""
    from llama_recipes import cli  # here, not at the top: the CLI imports this module to run the command

    return cli.run_command("export", argv, prog="python -m llama_recipes.export")


if __name__ == "__main__":
    sys.exit(main())
