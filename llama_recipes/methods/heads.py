"""Task heads: a classifier on a frozen (or LoRA-adapted) base, trained by the plain Trainer.

The models, the artifact format and the metrics live in llama_recipes/heads.py; this file is
what the lifecycle needs to know. Heads go through the same pipeline.train as every method:
resume, guards, FSDP, dry run and eval included.
"""
from __future__ import annotations

from llama_recipes import batching, heads, training
from llama_recipes.log import get_logger
from llama_recipes.methods.base import Method
from llama_recipes.paths import model_path

log = get_logger(__name__)


class Head(Method):
    kind = "head"
    primary_metric = "accuracy"

    def build_model(self, recipe, tokenizer, built):
        from transformers import AutoConfig

        tokenizer.padding_side = "right"  # the classifier reads the last non-pad token
        train_ds, eval_ds, fmt = built
        labels = heads.check_labels(train_ds, eval_ds, fmt)
        log.info("labels (%d): %s", len(labels), ", ".join(labels))
        base_config = AutoConfig.from_pretrained(model_path(recipe.model),
                                                 revision=recipe.model.revision,
                                                 trust_remote_code=recipe.model.trust_remote_code)
        cfg = heads.head_config(recipe, labels, tokenizer.pad_token_id, base_config.get_text_config().hidden_size)
        model = heads.build(cfg, recipe.method.lora)
        model.head_config = cfg  # what artifacts.save writes as head_config.json
        return model

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

    def evaluate(self, model, tokenizer, trainer, eval_raw, cfg):
        if eval_raw is None:
            return None
        return heads.evaluate_model(model, tokenizer, eval_raw, cfg.batch_size, model.head_config["max_length"]
                                    if hasattr(model, "head_config") else None, cfg.limit)

    def metrics_fields(self, model):
        return {"labels": model.head_config["labels"]}

    def describe(self, r):
        return (f"accuracy={r['accuracy']:.4f} macro_f1={r['macro_f1']:.4f} (majority class "
                f"{r['majority_baseline']:.4f}, {r['examples']} examples)")


class ClassifierHead(Head):
    """AutoModelForSequenceClassification: the `score` layer on the last non-pad token."""

    name = "classifier_head"

    def estimate_params(self, shape, m):
        labels = int(m.get("num_labels") or 4)  # the label count comes from the data: assume a handful
        return {"score": shape.hidden * labels}, []


class MLPHead(Head):
    """A few FC layers on the pooled hidden states of the base AutoModel."""

    name = "mlp_head"

    def estimate_params(self, shape, m):
        labels = int(m.get("num_labels") or 4)
        widths = [shape.hidden, *m["hidden_sizes"]]
        return {f"head.{i}": a * b + b for i, (a, b) in enumerate(zip(widths, widths[1:] + [labels]))}, []
