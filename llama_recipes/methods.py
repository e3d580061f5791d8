"""Build the trainable model for the recipe's `method:` (PEFT adapters or full fine-tuning).

One function per concern, in the order the pipeline calls them:
  load_kwargs(method)          -> extra from_pretrained kwargs (QLoRA's BitsAndBytesConfig)
  apply_method(model, recipe)  -> the PEFT-wrapped (or fully trainable) model
  after_trainer(trainer, ...)  -> undo what the trainer changed that the recipe says otherwise
docs/methods.md describes every method.
"""
from pathlib import Path

from llama_recipes.errors import UserError
from llama_recipes.log import get_logger

log = get_logger(__name__)


def quantization_config(method):
    """The BitsAndBytesConfig for a qlora method section (None for every other method)."""
    if method.name != "qlora":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if method.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method.quant_type,
        bnb_4bit_use_double_quant=method.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, method.compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, method.quant_storage_dtype or "uint8"),
    )


def load_kwargs(method) -> dict:
    """Keyword arguments for modeling.load_model that the method needs (empty for most)."""
    qc = quantization_config(method)
    return {} if qc is None else {"quantization_config": qc}


def _num_layers(model) -> int:
    return model.config.num_hidden_layers


def peft_config(method, model=None, tokenizer_path: str | None = None):
    """The PEFT config object for a PEFT method section.

    `model` is needed where a default depends on the architecture (llama_adapter's layer count),
    `tokenizer_path` for prompt tuning initialised from text.
    """
    name = method.name
    if name in ("lora", "dora", "qlora"):
        from peft import LoraConfig

        return LoraConfig(
            task_type="CAUSAL_LM",
            r=method.r,
            lora_alpha=method.alpha,
            lora_dropout=method.dropout,
            target_modules=method.target_modules,
            use_rslora=method.use_rslora,
            use_dora=method.use_dora,
            modules_to_save=method.modules_to_save or None,
        )
    if name == "llama_adapter":
        from peft import AdaptionPromptConfig

        n = _num_layers(model) if model is not None else None
        layers = method.adapter_layers or n
        if n is not None and layers > n:
            raise UserError(f"method.adapter_layers={layers} but the model has {n} layers",
                            f"set method.adapter_layers to at most {n} (or leave it unset for all layers)")
        return AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=method.adapter_len, adapter_layers=layers)
    if name == "prefix":
        from peft import PrefixTuningConfig

        kwargs = {}
        if method.prefix_projection:
            kwargs["encoder_hidden_size"] = method.encoder_hidden_size or model.config.hidden_size
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=method.num_virtual_tokens,
                                  prefix_projection=method.prefix_projection, **kwargs)
    if name == "prompt_tuning":
        from peft import PromptTuningConfig

        if method.init == "text":
            return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=method.num_virtual_tokens,
                                      prompt_tuning_init="TEXT", prompt_tuning_init_text=method.init_text,
                                      tokenizer_name_or_path=tokenizer_path)
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=method.num_virtual_tokens,
                                  prompt_tuning_init="RANDOM")
    if name == "ia3":
        from peft import IA3Config

        return IA3Config(task_type="CAUSAL_LM", target_modules=method.target_modules,
                         feedforward_modules=method.feedforward_modules)
    raise ValueError(f"not a PEFT method: {name}")


def apply_method(model, recipe):
    """Return the model to train: wrapped in a PEFT adapter, or the base itself for full tuning."""
    from llama_recipes.freeze import apply_freeze
    from llama_recipes.paths import resolve

    if recipe.is_peft:
        from peft import get_peft_model

        from llama_recipes.resilience import peft_errors

        method = recipe.method
        if method.name == "qlora":
            from peft import prepare_model_for_kbit_training

            # Casts the non-quantized layers (norms, embeddings, head) to fp32 for stable training,
            # freezes the base and, if asked, turns on activation checkpointing with input grads.
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=bool(getattr(recipe.training, "activation_checkpointing", False)))
        tok_path = resolve(recipe.model.tokenizer or recipe.model.name_or_path, "model")
        with peft_errors(model):
            model = get_peft_model(model, peft_config(method, model, tok_path))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    apply_freeze(model, recipe.freeze)
    return model


def after_trainer(trainer, recipe) -> None:
    """Fix-ups after the trainer is built and before it trains (the optimizer does not exist yet).

    TRL casts the LoRA weights of a quantized model to bf16 (the QLoRA paper's choice). The
    recipe's method.compute_dtype is the one source of truth instead: with float32 compute (CPU,
    or for precision) the adapter stays float32, otherwise bf16 matmuls are mixed in (and on
    CPUs without bf16 hardware they are ~6x slower).
    """
    if recipe.method.name != "qlora":
        return
    import torch

    dtype = getattr(torch, recipe.method.compute_dtype)
    for _, p in trainer.model.named_parameters():
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)


def uses_plain_trainer(recipe) -> bool:
    """LLaMA-Adapter needs transformers.Trainer: TRL's fused LM head never reaches its forward."""
    return recipe.method.name == "llama_adapter"


# -- sizes --------------------------------------------------------------------------------------

def base_size_bytes(model) -> int:
    """Bytes of the base model's weights as they are stored in a checkpoint (unquantized).

    Quantized weights count at the compute dtype's width (what the dense checkpoint holds);
    adapter parameters are excluded.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    seen, total = set(), 0
    adapter_markers = ("lora_", "adaption_", "prompt_encoder", "ia3_", "modules_to_save", "prefix_encoder")
    for name, p in base.named_parameters():
        if id(p) in seen or any(m in name for m in adapter_markers):
            continue
        seen.add(id(p))
        n, _ = count_parameters_of(p)
        width = p.element_size() if p.is_floating_point() else _dense_width(model)
        total += n * width
    return total


def _dense_width(model) -> int:
    import torch

    dtype = getattr(model.config, "dtype", None) or torch.bfloat16
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return torch.tensor([], dtype=dtype).element_size()


def count_parameters_of(p) -> tuple[int, bool]:
    """(logical element count, is_quantized) of one parameter; bnb 4-bit params are packed."""
    qs = getattr(p, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        import math

        return math.prod(qs.shape), True
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel(), False


def adapter_size_line(out: Path, model) -> tuple[str, dict]:
    """One log line (and metrics) for the saved adapter: MB on disk and % of the base model's size."""
    from llama_recipes.artifacts import dir_size_mb

    adapter_mb = dir_size_mb(out, "adapter_model.safetensors")
    base_mb = base_size_bytes(model) / 2**20
    pct = 100 * adapter_mb / base_mb if base_mb else float("nan")
    line = f"adapter: {adapter_mb:.3f} MB on disk = {pct:.3f}% of the base model ({base_mb:,.1f} MB)"
    return line, {"adapter_mb": round(adapter_mb, 4), "base_mb": round(base_mb, 2), "adapter_pct_of_base": round(pct, 4)}


def plain_trainer(sft_trainer, callbacks=None):
    """A transformers.Trainer over the SFTTrainer's tokenized data, collator and arguments.

    LLaMA-Adapter wraps each attention layer and calls the original forward it captured, so
    TRL's fused LM-head patch (its loss reads `outputs.log_probs`) never takes effect and
    SFTTrainer fails with AttributeError. TRL still does the data preparation (tokenizing,
    EOS, completion masks); the plain Trainer takes the model's own cross-entropy `loss`, the
    same token-mean over the supervised positions.
    """
    import dataclasses

    from transformers import Trainer

    args = dataclasses.replace(sft_trainer.args, remove_unused_columns=False)
    return Trainer(
        model=sft_trainer.model,
        args=args,
        train_dataset=sft_trainer.train_dataset,
        eval_dataset=sft_trainer.eval_dataset,
        data_collator=sft_trainer.data_collator,
        processing_class=sft_trainer.processing_class,
        callbacks=callbacks,
    )
