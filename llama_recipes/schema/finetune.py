"""Full and partial fine-tuning methods (everything that is not a PEFT adapter)."""
from typing import Literal

from llama_recipes.schema.base import Section


class FullMethod(Section):
    """Full fine-tuning: every parameter not frozen by the `freeze:` section is trained."""

    name: Literal["full"]


FINETUNE_METHODS: list[type[Section]] = [FullMethod]
