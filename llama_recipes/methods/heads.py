"""Task heads: a classifier on a frozen (or LoRA-adapted) base.

The models, the artifact format and the metrics live in llama_recipes/heads.py; this file builds
the model. They train for the classification objective (objectives/classification.py: the plain
Trainer, accuracy) through the same pipeline.train as every method: resume, guards, FSDP, dry run
and eval included.
"""
from __future__ import annotations

from llama_recipes import heads
from llama_recipes.log import get_logger
from llama_recipes.methods.base import Method
from llama_recipes.paths import model_path

log = get_logger(__name__)


class Head(Method):
    kind = "head"

    def build_model(self, recipe, tokenizer, built, objective):
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
