"""What every method says about itself; the lifecycle (pipeline.train) asks, never branches on names.

A method is one object in the registry (methods/__init__.py), keyed by the schema's
`method.name`. The schema owns the names, fields and defaults; the object owns the behaviour:
how the base loads, how it becomes trainable, its parameter formula for `--estimate-memory`,
and what its artifact can do (merge, pack). What it is trained FOR (the trainer, the data
preparation, the measurement) is the objective's (llama_recipes/objectives/).
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

    def build_model(self, recipe, tokenizer, built, objective):
        """The model to train: the base loaded as the method and the objective need it, made trainable."""
        raise NotImplementedError

    def wrap_trainer(self, trainer, recipe, callbacks=None):
        """The objective's trainer, adjusted for this method (QLoRA's adapter dtype; LLaMA-Adapter's plain
        Trainer, which gets the same `callbacks`); the same one by default."""
        return trainer

    # -- memory estimate ----------------------------------------------------------------------
    def estimate_params(self, shape, m: dict) -> tuple[dict[str, int], list[str]]:
        """(new parameters by name, base parameter names that train) for a model shape.

        `m` is the method section with the schema's defaults filled in; `shape` is
        memory.ModelShape (parameter names and shapes from the config, on the meta device).
        """
        raise NotImplementedError
