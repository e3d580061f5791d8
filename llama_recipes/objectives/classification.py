"""Classification by a task head (classifier_head, mlp_head): the plain Trainer, measured by accuracy.

The models, the artifact format and the metrics live in llama_recipes/heads.py; the head methods
(methods/heads.py) build the model. This objective is the only one they train for.
"""
from __future__ import annotations

from llama_recipes import batching, heads, training
from llama_recipes.log import get_logger
from llama_recipes.objectives.base import Objective

log = get_logger(__name__)


class Classification(Objective):
    name = "classification"
    primary_metric = "accuracy"

    def prepare_data(self, recipe, tokenizer, built):
        train_ds, eval_ds, _ = built
        return heads.tokenize(train_ds, tokenizer, recipe.training.max_length), eval_ds, dict(built.stats)

    def build_trainer(self, recipe, model, tokenizer, train_ds, eval_raw, callbacks=None):
        from transformers import Trainer

        args = training.sft_config(recipe)  # an SFTConfig is a TrainingArguments: one `training:` section
        args.remove_unused_columns = False
        if recipe.method.lora is None and args.activation_checkpointing:
            # Nothing is back-propagated through a frozen base; checkpointing would only make the
            # embeddings' output require grad and build a graph through every layer.
            log.info("training.activation_checkpointing: off (the base is frozen, only the head trains)")
            args.activation_checkpointing = False
        eval_tok = heads.tokenize(eval_raw, tokenizer, recipe.training.max_length) if eval_raw is not None else None
        cls = batching.trainer_class(Trainer)
        if recipe.method.cache_features:
            why_not = heads.why_not_cached(model, recipe.method.lora, args)
            if why_not:
                if recipe.method.lora is None:
                    log.info("method.cache_features: off (%s); the base runs on every step", why_not)
            else:
                cls = type(cls.__name__, (heads.CachedFeaturesMixin, cls), {"__module__": heads.__name__})
        return cls(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_tok,
                   data_collator=heads.HeadCollator(tokenizer), processing_class=tokenizer, callbacks=callbacks)

    def evaluate(self, model, tokenizer, trainer, eval_raw, recipe, reference=None):
        if eval_raw is None:
            return None
        cfg = recipe.eval
        return heads.evaluate_model(model, tokenizer, eval_raw, cfg.batch_size, model.head_config["max_length"]
                                    if hasattr(model, "head_config") else None, cfg.limit)

    def metrics_fields(self, model):
        return {"labels": model.head_config["labels"]}

    def describe(self, r):
        return (f"accuracy={r['accuracy']:.4f} macro_f1={r['macro_f1']:.4f} (majority class "
                f"{r['majority_baseline']:.4f}, {r['examples']} examples)")
