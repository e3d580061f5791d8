"""What every method says about itself; the lifecycle (pipeline.train) asks, never branches on names.

A method is one object in the registry (methods/__init__.py), keyed by the schema's
`method.name`. The schema owns the names, fields and defaults; the object owns the behaviour:
how the base loads, how it becomes trainable, which trainer trains it, how its data is
prepared and measured, its parameter formula for `--estimate-memory`, and what its artifact
can do (merge, pack).
"""
from __future__ import annotations

from typing import Any


class Method:
    """Behaviour of one `method.name`. Subclasses override what differs."""

    name: str = ""
    kind: str = "lm"  # "lm": a causal LM trained by TRL's SFTTrainer; "head": a classifier on a base
    peft: bool = False  # the artifact is a PEFT adapter on a referenced base
    mergeable: bool = False  # export folds the update into the base weights (a weight delta)
    virtual_tokens: bool = False  # adds tokens to every sequence: no packing, no padding-free batches
    quantized: bool = False  # the base loads quantized (the artifact needs that same base)
    why_not_mergeable: str = ""

    def __repr__(self) -> str:
        return f"<method {self.name}>"

    # -- model --------------------------------------------------------------------------------
    def load_kwargs(self, cfg) -> dict[str, Any]:
        """Extra `from_pretrained` keyword arguments for the base (QLoRA's quantization)."""
        return {}

    def build_model(self, recipe, tokenizer, built):
        """The model to train: the base loaded as the method needs it, made trainable."""
        raise NotImplementedError

    # -- data, trainer, measurement -----------------------------------------------------------
    def prepare_data(self, recipe, tokenizer, built):
        """(train, eval_raw, stats) ready for the trainer."""
        raise NotImplementedError

    def build_trainer(self, recipe, model, tokenizer, train_ds, eval_raw, callbacks=None):
        raise NotImplementedError

    def evaluate(self, model, tokenizer, trainer, eval_raw, cfg) -> dict | None:
        """The before/after numbers of a run (None when there is no eval split)."""
        raise NotImplementedError

    def describe(self, result: dict) -> str:
        """One log line for an evaluate() result."""
        return ", ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, (int, float)))

    def before_after_table(self, before: dict, after: dict) -> str:
        """The run's before/after numbers as a markdown table (logged at the end of training)."""
        rows = ["| metric | before | after |", "|---|---|---|"]
        for k in after:
            if k in before and isinstance(after[k], float):
                rows.append(f"| {k} | {before[k]:.4f} | {after[k]:.4f} |")
        return "\n".join(rows)

    def metrics_fields(self, model) -> dict:
        """Extra fields of metrics.json for this method (heads: the label names)."""
        return {}

    primary_metric: str = "loss"  # what the dry run compares between the trained and the reloaded model

    # -- memory estimate ----------------------------------------------------------------------
    def estimate_params(self, shape, m: dict) -> tuple[dict[str, int], list[str]]:
        """(new parameters by name, base parameter names that train) for a model shape.

        `m` is the method section with the schema's defaults filled in; `shape` is
        memory.ModelShape (parameter names and shapes from the config, on the meta device).
        """
        raise NotImplementedError
