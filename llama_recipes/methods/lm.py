"""Causal-LM methods (PEFT adapters, full and partial fine-tuning): what they share.

The base loads as `AutoModelForCausalLM`, the data is rendered to TRL's formats, TRL's
SFTTrainer tokenizes and trains, and the run is measured by token-weighted loss (and
generation metrics for prompt/completion data).
"""
from __future__ import annotations

from llama_recipes import data, freeze, measure, modeling, training
from llama_recipes.methods.base import Method


class LMMethod(Method):
    kind = "lm"

    def build_model(self, recipe, tokenizer, built):
        model = modeling.load_model(recipe.model, **self.load_kwargs(recipe.method))
        model = self.make_trainable(model, recipe)
        freeze.apply_freeze(model, recipe.freeze)
        return model

    def make_trainable(self, model, recipe):
        """The base -> the model whose trainable parameters the optimizer gets."""
        raise NotImplementedError

    def prepare_data(self, recipe, tokenizer, built):
        return data.prepare(recipe, tokenizer, built)  # lengths, truncation, chat template

    def build_trainer(self, recipe, model, tokenizer, train_ds, eval_raw, callbacks=None):
        return training.build_trainer(recipe, model, tokenizer, train_ds, eval_raw, callbacks=callbacks)

    def evaluate(self, model, tokenizer, trainer, eval_raw, cfg):
        if trainer.eval_dataset is None:
            return None
        return measure.evaluate_lm(model, tokenizer, trainer.eval_dataset, eval_raw, trainer.data_collator, cfg)
