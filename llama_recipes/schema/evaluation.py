"""`eval:` section: what is measured on the held-out split (before/after training and with --eval-only)."""
from typing import Literal

from pydantic import Field, field_validator

from llama_recipes.schema.base import SEED_MAX, Section, expand_user

GenerationMetric = Literal["rouge", "exact_match", "f1"]


class EvalConfig(Section):
    before_after: bool = Field(True, description="Evaluate the model before and after training and report both.")
    generate: bool = Field(
        True, description="Greedy-generate answers for eval prompts (prompt/completion data) and score `metrics`."
    )
    metrics: list[GenerationMetric] = Field(
        default_factory=lambda: ["rouge", "exact_match", "f1"],
        description="Generation metrics: rouge (ROUGE-1/2/L F), exact_match (normalised), f1 (token-level). "
        "Loss and perplexity on supervised tokens are always reported.",
    )
    max_new_tokens: int = Field(32, gt=0, description="Generation length limit; generation also stops at EOS.")
    batch_size: int = Field(16, gt=0, description="Batch size for eval loss and generation.")
    limit: int | None = Field(None, gt=0, description="Evaluate only the first N eval examples (and N rows of each retain set).")
    seed: int = Field(42, ge=0, le=SEED_MAX, description="Seed set before evaluating, so repeated evals give identical numbers.")
    retain: list[str] = Field(
        default_factory=list,
        description="Forgetting check: datasets (builtin:retain, a .jsonl/.json/.csv/.parquet file or directory) whose "
        "loss/perplexity --eval-only reports for the base model, the artifact and the difference.",
    )

    _paths = field_validator("retain")(expand_user)
