"""Supervised fine-tuning: TRL's SFTTrainer, measured by token-weighted loss and generation metrics."""
from __future__ import annotations

from llama_recipes import data, measure, training
from llama_recipes.objectives.base import Objective


class SFT(Objective):
    name = "sft"

    def prepare_data(self, recipe, tokenizer, built):
        return data.prepare(recipe, tokenizer, built)  # lengths, truncation, chat template

    def build_trainer(self, recipe, model, tokenizer, train_ds, eval_raw, callbacks=None):
        return training.build_trainer(recipe, model, tokenizer, train_ds, eval_raw, callbacks=callbacks)

    def evaluate(self, model, tokenizer, trainer, eval_raw, recipe, reference=None):
        if trainer.eval_dataset is None:
            return None
        return measure.evaluate_lm(model, tokenizer, trainer.eval_dataset, eval_raw, trainer.data_collator,
                                   recipe.eval)

    def fallback_eval(self, model, trainer, batch_size):
        ds = trainer.train_dataset  # no eval split: a finite loss on a few train rows
        return measure.eval_loss(model, ds.select(range(min(len(ds), 8))), trainer.data_collator, batch_size)
