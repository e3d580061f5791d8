"""Causal-LM methods (PEFT adapters, full and partial fine-tuning): what they share.

The base loads with the objective's auto class (a causal LM; a one-output sequence classifier for
a reward model), then the method makes it trainable and the `freeze:` rules apply.
"""
from __future__ import annotations

from llama_recipes import freeze, modeling
from llama_recipes.methods.base import Method


class LMMethod(Method):
    kind = "lm"

    def build_model(self, recipe, tokenizer, built, objective):
        model = modeling.load_model(recipe.model, objective.auto_class, **self.load_kwargs(recipe.method),
                                    **objective.load_kwargs(tokenizer))
        model = self.make_trainable(model, recipe)
        freeze.apply_freeze(model, recipe.freeze)
        return model

    def make_trainable(self, model, recipe):
        """The base -> the model whose trainable parameters the optimizer gets."""
        raise NotImplementedError
