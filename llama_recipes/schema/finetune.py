"""Full and partial fine-tuning, and task heads on a frozen (or LoRA-adapted) base.

    method: {name: full}                      # every parameter trains
    method: {name: partial}                   # what trains is decided by the `freeze:` section
    method: {name: classifier_head}           # AutoModelForSequenceClassification: the `score` layer trains
    method: {name: mlp_head, hidden_sizes: [256], pooling: mean}   # a few FC layers on the hidden states
"""
from typing import Literal

from pydantic import Field, model_validator

from llama_recipes.schema.base import Section


class FullMethod(Section):
    """Full fine-tuning: every parameter trains (no `freeze:` rules; use `partial` for those)."""

    name: Literal["full"]


class PartialMethod(Section):
    """Partial fine-tuning: the `freeze:` section says which parameters train."""

    name: Literal["partial"]


class BaseLora(Section):
    """LoRA on the base under a task head (the head trains in full and is saved with the adapter)."""

    r: int = Field(8, gt=0, description="Rank of the update matrices.")
    alpha: float = Field(16, gt=0, description="Scaling numerator: the update is scaled by alpha/r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description="Modules to adapt.")


class _Head(Section):
    lora: BaseLora | None = Field(None, description="LoRA on the base instead of a frozen base: {r, alpha, dropout, target_modules}.")
    cache_features: bool = Field(
        True, description="Frozen base only (no lora): run the base once over the training examples, keep each "
        "one's pooled features in memory and train the head on them (the same numbers; epochs after the first "
        "skip the base). false runs the base on every step.")

    @model_validator(mode="after")
    def _cache_needs_frozen_base(self):
        if self.lora is not None and self.cache_features and "cache_features" in self.model_fields_set:
            raise ValueError("method.cache_features needs a frozen base: with method.lora the base changes every "
                             "step; remove cache_features or method.lora")
        return self


class ClassifierHeadMethod(_Head):
    """Sequence classification: the model's `score` layer (hidden -> num_labels) on the last non-pad token."""

    name: Literal["classifier_head"]


class MLPHeadMethod(_Head):
    """A small MLP classifier on the frozen model's pooled hidden states."""

    name: Literal["mlp_head"]
    hidden_sizes: list[int] = Field([256], description="Widths of the hidden FC layers ([] is a linear probe).")
    activation: Literal["gelu", "relu", "silu", "tanh"] = Field("gelu", description="Activation between FC layers.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout before every FC layer.")
    pooling: Literal["last", "mean"] = Field(
        "last", description="last: the hidden state of the last non-pad token; mean: mean over non-pad tokens."
    )
    layer: int = Field(-1, description="Which hidden state to pool: -1 is the final (normed) output, 0 the embeddings.")


FINETUNE_METHODS: list[type[Section]] = [FullMethod, PartialMethod, ClassifierHeadMethod, MLPHeadMethod]
HEAD_METHODS = {"classifier_head", "mlp_head"}


def check_method_freeze(recipe) -> None:
    """Cross-field checks between `method:` and `freeze:` (called by the Recipe validator)."""
    name, freeze = recipe.method.name, recipe.freeze
    if name == "full" and freeze.active:
        raise ValueError("freeze: rules are set but method.name is full (every parameter trains); "
                         "use method.name: partial to train only what freeze: selects")
    if name == "partial" and not freeze.active:
        raise ValueError("method.name partial needs freeze: rules (freeze.train, freeze.freeze or freeze.select); "
                         "use method.name: full to train everything")
    if name in HEAD_METHODS and freeze.active:
        raise ValueError(f"method.name {name} keeps the base frozen (or LoRA-adapted via method.lora); "
                         "remove the freeze: section")
