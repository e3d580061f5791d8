"""`freeze:` section: which parameters of the base model are trainable."""
from pydantic import Field

from llama_recipes.schema.base import Section


class FreezeConfig(Section):
    train: list[str] = Field(
        default_factory=list,
        description="Regexes on parameter names to train; everything else is frozen. Empty: the method decides.",
    )
    freeze: list[str] = Field(default_factory=list, description="Regexes on parameter names to freeze.")
