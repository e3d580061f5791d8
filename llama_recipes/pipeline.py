"""The training run, stage by stage: recipe -> model -> data -> trainer -> train -> save -> eval.

Each stage is one call into the package; the order is the data flow and matters where noted.
"""
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_recipes.log import get_logger

log = get_logger(__name__)


@dataclass
class Run:
    """What a finished run leaves in memory (tests and notebooks inspect it)."""

    metrics: dict
    trainer: Any
    tokenizer: Any
    output_dir: Path

    @property
    def model(self):
        return self.trainer.model


def train(recipe, overwrite: bool = False, callbacks: list | None = None) -> Run:
    """Run a validated recipe end to end; metrics are also written to OUTPUT_DIR/metrics.json.

    `callbacks` are extra TrainerCallbacks (the dry run times steps with one).
    """
    from transformers import set_seed

    from llama_recipes import artifacts, data, distributed, evaluation, freeze, methods, modeling, resilience, training
    from llama_recipes.schema.finetune import HEAD_METHODS

    # Recipe vs accelerate launch config (precision, activation checkpointing, FSDP1 rules),
    # checked before anything is loaded.
    recipe = distributed.setup(recipe)
    if recipe.method.name in HEAD_METHODS:  # task heads train with the plain Trainer (heads.py)
        from llama_recipes import heads

        return heads.train(recipe, overwrite)

    started = time.time()
    set_seed(recipe.seed)

    # -- output directory: claimed first, so a clash fails before minutes of loading ----------
    out = artifacts.prepare_output_dir(recipe, overwrite)
    resume = resilience.resume_checkpoint(recipe, out, overwrite)  # newest complete checkpoint, or None

    # -- tokenizer and model (+ freeze / PEFT) ------------------------------------------------
    tokenizer = modeling.load_tokenizer(recipe.model)
    model = modeling.load_model(recipe.model, **methods.load_kwargs(recipe.method))
    model = methods.apply_method(model, recipe)
    trainable, total = modeling.count_parameters(model)
    log.info("trainable params: %s || all params: %s || trainable%%: %.4f",
             f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    if recipe.guards.check_disk:
        resilience.check_disk_space(model, recipe, out)
    param_report = freeze.report(model)

    # -- datasets -----------------------------------------------------------------------------
    train_ds, eval_raw, fmt = built = data.build_datasets(recipe.data)
    train_ds, eval_raw, data_stats = data.prepare(recipe, tokenizer, built)  # lengths, truncation, chat template

    # -- trainer (tokenizes the data, so it comes after the model and datasets) ---------------
    trainer = training.build_trainer(recipe, model, tokenizer, train_ds, eval_raw, callbacks=callbacks)
    distributed.prepare_trainer(trainer)  # before train(): the FSDP wrap happens inside it
    resilience.install(trainer, recipe)  # atomic checkpoints, SIGTERM/SIGINT stop, NaN guard
    data_stats = data.finish_report(recipe, trainer, data_stats)  # packing / padding efficiency

    def measure(tag):
        if trainer.eval_dataset is None or not recipe.eval.before_after:
            return None
        result = evaluation.evaluate_lm(trainer.model, tokenizer, trainer.eval_dataset, eval_raw,
                                        trainer.data_collator, recipe.eval)
        log.info("eval %s training: %s", tag, ", ".join(f"{k}={v:.4g}" for k, v in result.items()))
        return result

    # -- train --------------------------------------------------------------------------------
    before = measure("before")
    result = trainer.train(resume_from_checkpoint=resume)
    after = measure("after")

    # -- save ---------------------------------------------------------------------------------
    artifacts.save_artifact(trainer, tokenizer, out)
    freeze.save_report(out, param_report)
    metrics = artifacts.run_metrics(recipe, trainer, result, started, data_format=fmt, data=data_stats,
                                    trainable_params=trainable, total_params=total,
                                    eval_before=before, eval_after=after)
    if recipe.is_peft:  # adapter MB on disk and % of the base model's size
        line, sizes = methods.adapter_size_line(out, trainer.model)
        log.info(line)
        metrics.update(sizes)
    artifacts.write_metrics(out, metrics)
    artifacts.plot_loss(out, trainer.state.log_history)
    if before and after:
        log.info("\n%s", report_table(before, after))
    log.info("done in %.0f s; artifacts in %s", metrics["wall_seconds"], out)
    return Run(metrics, trainer, tokenizer, out)


def report_table(before: dict, after: dict) -> str:
    rows = ["| metric | before | after |", "|---|---|---|"]
    for k in after:
        if k in before and isinstance(after[k], float):
            rows.append(f"| {k} | {before[k]:.4f} | {after[k]:.4f} |")
    return "\n".join(rows)
