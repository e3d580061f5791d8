"""`method:` section: what is trained. One model per method, chosen by `name`.

PEFT methods (this module): lora, dora, qlora, llama_adapter, prefix, prompt_tuning, ia3.
Full/partial fine-tuning lives in schema/finetune.py. docs/methods.md explains each one.
"""
from typing import Annotated, Literal, Union

from pydantic import Field, field_validator, model_validator

from llama_recipes.schema.base import Section
from llama_recipes.schema.finetune import FINETUNE_METHODS

TargetModules = list[str] | Literal["all-linear"]


def _targets_something(v):
    # An empty list adapts nothing (PEFT raises deep inside model building).
    if isinstance(v, list) and not v:
        raise ValueError("an empty list adapts nothing: name modules (q_proj, v_proj, ...) or use all-linear")
    return v


class LoraMethod(Section):
    """LoRA: low-rank update matrices next to frozen linear layers (Hu et al., 2021)."""

    name: Literal["lora"]
    r: int = Field(8, gt=0, description="Rank of the update matrices.")
    alpha: float = Field(16, gt=0, description="Scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rslora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: TargetModules = Field(
        "all-linear", description="Module names to adapt (q_proj, v_proj, ...) or all-linear (every linear but the head)."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r).")
    use_dora: bool = Field(False, description="DoRA: weight-decomposed LoRA (magnitude + direction).")
    modules_to_save: list[str] = Field(
        default_factory=list, description="Extra modules trained in full and saved with the adapter (e.g. lm_head)."
    )

    _targets = field_validator("target_modules")(_targets_something)

    @model_validator(mode="after")
    def _no_lora_on_head(self):
        if isinstance(self.target_modules, list) and "lm_head" in self.target_modules:
            raise ValueError("method.target_modules: TRL refuses LoRA on `lm_head`; "
                             "train the head in full with `modules_to_save: [lm_head]` instead")
        return self


class DoraMethod(LoraMethod):
    """DoRA (Liu et al., 2024): LoRA on the direction plus a trained per-row magnitude vector."""

    name: Literal["dora"]  # type: ignore[assignment]
    use_dora: Literal[True] = Field(True, description="Always on for dora (kept so the saved recipe is explicit).")


class QLoraMethod(LoraMethod):
    """QLoRA (Dettmers et al., 2023): LoRA on a base quantized by bitsandbytes (4-bit NF4 or 8-bit)."""

    name: Literal["qlora"]  # type: ignore[assignment]
    bits: Literal[4, 8] = Field(4, description="Base weight precision: 4 (NF4/FP4) or 8 (LLM.int8).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; NF4 is the QLoRA paper's.")
    double_quant: bool = Field(True, description="Quantize the 4-bit quantization constants too (~0.4 bit/param saved).")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Dtype the 4-bit weights are dequantized to for each matmul (float32 on CPU)."
    )
    quant_storage_dtype: Literal["uint8", "bfloat16", "float16", "float32"] | None = Field(
        None, description="Dtype the packed 4-bit weights are stored in. FSDP needs it equal to the dtype of the "
        "other parameters (e.g. bfloat16) so it can flatten them together; None keeps bitsandbytes' uint8."
    )

    @model_validator(mode="after")
    def _bits(self):
        if self.bits == 8 and self.quant_storage_dtype is not None:
            raise ValueError("method.quant_storage_dtype applies to 4-bit only; remove it or set method.bits: 4")
        return self


class LlamaAdapterMethod(Section):
    """LLaMA-Adapter (Zhang et al., 2023): learned prompts in the top layers' attention, with zero-init gates."""

    name: Literal["llama_adapter"]
    adapter_len: int = Field(10, gt=0, description="Number of learned adaption-prompt tokens per adapted layer.")
    adapter_layers: int | None = Field(
        None, gt=0, description="Adapt this many layers from the top; None adapts every layer."
    )


class PrefixMethod(Section):
    """Prefix tuning (Li & Liang, 2021): learned key/value prefixes in every layer's attention."""

    name: Literal["prefix"]
    num_virtual_tokens: int = Field(20, gt=0, description="Prefix length (key/value positions per layer).")
    prefix_projection: bool = Field(
        False, description="Reparametrise the prefix through a 2-layer MLP (more trainable params, often more stable)."
    )
    encoder_hidden_size: int | None = Field(
        None, gt=0, description="Hidden size of that MLP; None uses the model's hidden size."
    )


class PromptTuningMethod(Section):
    """Prompt tuning (Lester et al., 2021): learned input embeddings prepended to every sequence."""

    name: Literal["prompt_tuning"]
    num_virtual_tokens: int = Field(20, gt=0, description="Number of soft-prompt embeddings.")
    init: Literal["random", "text"] = Field("random", description="Initialise from random vectors or from the "
                                            "embeddings of `init_text` (repeated/truncated to the length).")
    init_text: str | None = Field(None, description="Text whose token embeddings initialise the soft prompt (init: text).")

    @model_validator(mode="after")
    def _text(self):
        if self.init == "text" and not (self.init_text or "").strip():
            raise ValueError("method.init: text needs `method.init_text` (e.g. 'Answer the instruction:')")
        if self.init == "random" and self.init_text:
            raise ValueError("method.init_text is only used with `method.init: text`; set it, or remove init_text")
        return self


class IA3Method(Section):
    """IA3 (Liu et al., 2022): learned per-channel scaling vectors on keys, values and the MLP."""

    name: Literal["ia3"]
    target_modules: list[str] = Field(
        ["k_proj", "v_proj", "down_proj"], description="Modules whose activations are rescaled."
    )
    _targets = field_validator("target_modules")(_targets_something)
    feedforward_modules: list[str] = Field(
        ["down_proj"], description="Subset of target_modules treated as feed-forward (the scale is on their input)."
    )

    @model_validator(mode="after")
    def _subset(self):
        extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
        if extra:
            raise ValueError(f"method.feedforward_modules {extra} must also be in method.target_modules")
        return self


# PEFT adapters (this module) and full/partial fine-tuning (schema/finetune.py) share one
# `method:` section, told apart by `name`.
PEFT_METHOD_MODELS: list[type[Section]] = [
    LoraMethod, DoraMethod, QLoraMethod, LlamaAdapterMethod, PrefixMethod, PromptTuningMethod, IA3Method,
]
METHOD_MODELS: dict[str, type[Section]] = {
    m.model_fields["name"].annotation.__args__[0]: m for m in PEFT_METHOD_MODELS + FINETUNE_METHODS}
# The schema is the only source of method names; llama_recipes/methods/ has one object per name.
METHOD_NAMES = tuple(METHOD_MODELS)
PEFT_METHODS = {m.model_fields["name"].annotation.__args__[0] for m in PEFT_METHOD_MODELS}
# Methods that add virtual tokens to the sequence (prompt/prefix) rather than changing weights.
VIRTUAL_TOKEN_METHODS = {"prefix", "prompt_tuning"}
# Packing puts several samples in one row: these methods would add their prompt once per row.
PACKING_UNSAFE_METHODS = VIRTUAL_TOKEN_METHODS | {"llama_adapter"}


def method_defaults(name: str, given: dict | None = None) -> dict:
    """The method section `given` with the schema's defaults filled in (what a recipe would get)."""
    return METHOD_MODELS[name].model_validate({**(given or {}), "name": name}).model_dump()

MethodConfig = Annotated[Union[tuple(PEFT_METHOD_MODELS + FINETUNE_METHODS)], Field(discriminator="name")]


def check_combinations(recipe) -> None:
    """Cross-section checks for PEFT methods (called by Recipe's model_validator).

    Each refused combination either crashes mid-run or silently trains something else.
    """
    m, t = recipe.method, recipe.training
    name = m.name
    packing = bool(getattr(t, "packing", False))
    checkpointing = bool(getattr(t, "activation_checkpointing", False))
    if name in VIRTUAL_TOKEN_METHODS and packing:
        raise ValueError(
            f"method {name} with training.packing: the virtual tokens would be added once per packed row, "
            "not once per example, so packed examples train without their prompt; set training.packing: false")
    if name in VIRTUAL_TOKEN_METHODS | {"llama_adapter"} and getattr(t, "padding_free", False):
        raise ValueError(f"method {name} with training.padding_free: the virtual tokens need a padded batch; "
                         "set training.padding_free: false")
    if name == "prefix" and checkpointing:
        raise ValueError(
            "method prefix with training.activation_checkpointing (on by default): the prefix is passed as a "
            "key/value cache, and checkpointed layers then see mismatched attention lengths (crash on the first "
            "step); set training.activation_checkpointing: false")
    if name == "qlora" and recipe.model.dtype != m.compute_dtype:
        raise ValueError(
            f"model.dtype {recipe.model.dtype} differs from method.compute_dtype {m.compute_dtype}: the "
            "non-quantized layers and the LoRA weights would run in another dtype than the dequantized base; "
            f"set model.dtype: {m.compute_dtype}")
