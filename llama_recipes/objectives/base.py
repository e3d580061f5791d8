"""What every objective says about itself; the lifecycle (pipeline.train) asks, never branches on names.

An objective is one object in the registry (objectives/__init__.py), keyed by the schema's
`objective.name` (schema/objective.py owns the names, settings and defaults). The method
(methods/) says what trains; the objective says what for: which model head the base loads with,
how the data is prepared, which TRL trainer trains it, how a model is measured, and what the
memory estimate adds (a reference model, a doubled batch).
"""
from __future__ import annotations

from typing import Any

from llama_recipes import harness


class Objective:
    """Behaviour of one `objective.name`. Subclasses override what differs."""

    name: str = ""
    auto_class: str = "AutoModelForCausalLM"  # how the base loads (a reward model: a sequence classifier)
    peft_task: str = "CAUSAL_LM"  # PEFT's task_type (SEQ_CLS trains and saves the score head with the adapter)
    primary_metric: str = "loss"  # what the dry run compares between the trained and the reloaded model
    reference: bool = False  # trains against a frozen reference model (the adapter off under PEFT)
    sequences_per_row: int = 1  # a preference row is two sequences (chosen + rejected) in every batch
    pairwise: bool = False  # measured on held-out preferences (--eval-only: evaluation.evaluate_pairs)
    reference_metrics: bool = False  # its numbers after training compare the model with where it started

    def __repr__(self) -> str:
        return f"<objective {self.name}>"

    def load_kwargs(self, tokenizer=None) -> dict[str, Any]:
        """Extra `from_pretrained` keyword arguments of the base for this objective (a reward head's size)."""
        return {}

    def prepare_data(self, recipe, tokenizer, built):
        """(train, eval_raw, stats) ready for the trainer."""
        raise NotImplementedError

    def build_trainer(self, recipe, model, tokenizer, train_ds, eval_raw, callbacks=None):
        raise NotImplementedError

    def evaluate(self, model, tokenizer, trainer, eval_raw, recipe, reference: dict | None = None) -> dict | None:
        """The before/after numbers of a run (None when there is no eval split). `reference` is the
        before-training result: the reference model's numbers for objectives that train against one."""
        raise NotImplementedError

    def evaluate_against(self, result: dict, reference: dict, recipe) -> dict:
        """`result` (measured without a reference) completed with the numbers against `reference`."""
        return result

    def fallback_eval(self, model, trainer, batch_size: int) -> dict | None:
        """The dry run's measurement when there is no eval split (None: nothing to measure)."""
        return None

    def describe(self, result: dict) -> str:
        """One log line for an evaluate() result."""
        return ", ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, (int, float)))

    def before_after_table(self, before: dict, after: dict) -> str:
        """The run's before/after numbers as a markdown table (logged at the end of training)."""
        rows = ["| metric | before | after |", "|---|---|---|"]
        for k in after:
            if k in before and isinstance(after[k], float):
                rows.append(f"| {k} | {before[k]:.4f} | {after[k]:.4f} |")
        return "\n".join(rows + harness.table_rows(before, after))  # eval.harness rows (none without it)

    def metrics_fields(self, model) -> dict:
        """Extra fields of metrics.json for this objective (classification: the label names)."""
        return {}
