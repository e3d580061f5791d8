"""`method:` section: what is trained. One model per method, chosen by `name`."""
from typing import Annotated, Literal, Union

from pydantic import Field

from llama_recipes.schema.base import Section
from llama_recipes.schema.finetune import FINETUNE_METHODS


class LoraMethod(Section):
    """LoRA: low-rank update matrices next to frozen linear layers (Hu et al., 2021)."""

    name: Literal["lora"]
    r: int = Field(8, gt=0, description="Rank of the update matrices.")
    alpha: float = Field(16, gt=0, description="Scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rslora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt (q_proj, v_proj, ...) or all-linear (every linear but the head)."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r).")
    use_dora: bool = Field(False, description="DoRA: weight-decomposed LoRA (magnitude + direction).")
    modules_to_save: list[str] = Field(
        default_factory=list, description="Extra modules trained in full and saved with the adapter (e.g. lm_head)."
    )


# PEFT adapters (this module) and full/partial fine-tuning (schema/finetune.py) share one
# `method:` section, told apart by `name`.
PEFT_METHOD_MODELS: list[type[Section]] = [LoraMethod]
PEFT_METHODS = {m.model_fields["name"].annotation.__args__[0] for m in PEFT_METHOD_MODELS}

MethodConfig = Annotated[Union[tuple(PEFT_METHOD_MODELS + FINETUNE_METHODS)], Field(discriminator="name")]
