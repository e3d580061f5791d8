"""Full and partial fine-tuning: the base's own parameters train (all, or what `freeze:` selects)."""
from __future__ import annotations

from llama_recipes.methods.lm import LMMethod


class Full(LMMethod):
    """Every parameter trains."""

    name = "full"

    def make_trainable(self, model, recipe):
        model.requires_grad_(True)
        return model

    def estimate_params(self, shape, m):
        return {}, list(shape.params)


class Partial(Full):
    """The `freeze:` rules decide what trains (applied after make_trainable, like every method)."""

    name = "partial"

    def estimate_params(self, shape, m):
        # --compare has no freeze rules: the top quarter of the decoder layers (+ final norm).
        # A recipe's own freeze: rules are applied to these names by memory.trainable_params.
        keep = max(1, shape.num_layers // 4)

        def top(n):
            i = shape.layer_of(n)
            return (i is not None and i >= shape.num_layers - keep) or (i is None and n.endswith("norm.weight"))

        return {}, [n for n in shape.params if top(n)]
