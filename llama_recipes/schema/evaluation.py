"""`eval:` section: what is measured on the held-out split, before and after training."""
from pydantic import Field

from llama_recipes.schema.base import Section


class EvalConfig(Section):
    before_after: bool = Field(True, description="Evaluate the model before and after training and report both.")
    generate: bool = Field(True, description="Greedy-generate answers for eval prompts and score exact match.")
    max_new_tokens: int = Field(32, gt=0, description="Generation length limit.")
    batch_size: int = Field(16, gt=0, description="Batch size for eval loss and generation.")
    limit: int | None = Field(None, gt=0, description="Evaluate only the first N eval examples.")
