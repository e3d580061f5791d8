"""The method registry: one object per `method.name`, the one place behaviour differs by method.

    method = methods.get(recipe.method.name)
    model = method.build_model(recipe, tokenizer, built)       # base as the method loads it, trainable
    trainer = method.build_trainer(recipe, model, tokenizer, train, eval_raw)

The schema (llama_recipes/schema/method.py, schema/finetune.py) owns the names, fields and
defaults; the registry must cover exactly those names (checked at import). Adding a method:
its schema model, a class here (methods/peft.py, finetune.py or heads.py: a subclass of
base.Method), and one entry in REGISTRY.
"""
from __future__ import annotations

from llama_recipes import freeze
from llama_recipes.methods.base import Method
from llama_recipes.methods.finetune import Full, Partial
from llama_recipes.methods.heads import ClassifierHead, MLPHead
from llama_recipes.methods.peft import (
    IA3,
    Dora,
    LlamaAdapter,
    Lora,
    Prefix,
    PromptTuning,
    QLora,
)
from llama_recipes.schema.method import METHOD_NAMES

REGISTRY: dict[str, Method] = {m.name: m for m in (
    Lora(), Dora(), QLora(), LlamaAdapter(), Prefix(), PromptTuning(), IA3(),
    Full(), Partial(), ClassifierHead(), MLPHead(),
)}
if set(REGISTRY) != set(METHOD_NAMES):  # a schema entry without behaviour, or the reverse
    raise ImportError(f"method registry {sorted(REGISTRY)} != schema methods {sorted(METHOD_NAMES)}")


def get(name: str) -> Method:
    return REGISTRY[name]


def load_kwargs(cfg) -> dict:
    """Extra from_pretrained kwargs the method section needs (QLoRA's quantization; {} for most)."""
    return get(cfg.name).load_kwargs(cfg)


def apply_method(model, recipe):
    """The loaded base -> the model to train (PEFT-wrapped or made trainable), freeze rules applied."""
    model = get(recipe.method.name).make_trainable(model, recipe)
    freeze.apply_freeze(model, recipe.freeze)
    return model
