"""The training run, stage by stage: recipe -> model -> data -> trainer -> train -> save -> eval.

Each stage is one call into the package; the order is the data flow and matters where noted.
"""
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_recipes import artifacts, data, freeze, harness, methods, modeling, objectives
from llama_recipes.log import get_logger
from llama_recipes.runtime import distributed, resilience

log = get_logger(__name__)


@dataclass
class Run:
    """What a finished run leaves in memory (tests and notebooks inspect it)."""

    metrics: dict
    trainer: Any
    tokenizer: Any
    output_dir: Path
    eval_raw: Any = None  # the held-out rows before tokenization (what methods measure on)
    recipe: Any = None  # the recipe as trained: launch-config conflicts resolved, bf16 auto decided

    @property
    def model(self):
        return self.trainer.model


def train(recipe, overwrite: bool = False, callbacks: list | None = None) -> Run:
    """Run a validated recipe end to end, whatever its method; metrics also go to OUTPUT_DIR/metrics.json.

    Setup, train, save, cleanup (torchtune's lifecycle). What differs by method (what trains) or by
    objective (what for) is asked of their registry objects, never branched on here. `callbacks` are extra TrainerCallbacks
    (the dry run times steps with one).
    """
    from transformers import set_seed

    # -- setup ----------------------------------------------------------------------------------
    # Recipe vs accelerate launch config (precision, activation checkpointing, FSDP1 rules),
    # checked before anything is loaded.
    recipe = distributed.setup(recipe)
    method = methods.get(recipe.method.name)
    objective = objectives.get(recipe.objective.name)
    started = time.time()
    set_seed(recipe.seed)

    # Output directory first, so a clash fails before minutes of loading. Under --overwrite the
    # previous run is moved aside, and put back if this one fails before its first checkpoint.
    with artifacts.claim(recipe, overwrite) as out:
        return _train_and_save(recipe, method, objective, out, overwrite, callbacks, started)


def _train_and_save(recipe, method, objective, out: Path, overwrite: bool, callbacks, started: float) -> Run:
    """The rest of the lifecycle, inside the claimed output directory."""
    resume = resilience.resume_checkpoint(recipe, out, overwrite)  # newest complete checkpoint, or None

    # Raw data before the model: a head sizes itself by the labels, and a data error should not
    # wait for a model load. Loading rows draws nothing from torch's RNG, so the model's
    # initialisation (LoRA, heads) is the same as if it came first.
    tokenizer = modeling.load_tokenizer(recipe.model)
    built = data.build_datasets(recipe.data, recipe.formats)
    model = method.build_model(recipe, tokenizer, built, objective)
    trainable, total = modeling.count_parameters(model)
    log.info("trainable params: %s || all params: %s || trainable%%: %.4f",
             f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    if recipe.guards.check_disk:
        resilience.check_disk_space(model, recipe, out)
    param_report = freeze.report(model)
    train_ds, eval_raw, data_stats = objective.prepare_data(recipe, tokenizer, built)

    # the trainer tokenizes (TRL), so it comes after the model and the data; the objective builds
    # it, the method adjusts it (QLoRA's adapter dtype)
    trainer = objective.build_trainer(recipe, model, tokenizer, train_ds, eval_raw, callbacks=callbacks)
    trainer = method.wrap_trainer(trainer, recipe, callbacks=callbacks)
    data.check_not_empty(trainer, recipe)  # TRL may have dropped every row (all truncated away)
    distributed.prepare_trainer(trainer)  # before train(): the FSDP wrap happens inside it
    resilience.install(trainer, recipe)  # atomic checkpoints, SIGTERM/SIGINT stop, NaN guard
    data_stats = data.finish_report(recipe, trainer, data_stats)  # packing / padding efficiency

    def measure(tag, reference=None):
        if not recipe.eval.before_after:
            return None
        with distributed.evaluable(trainer) as model:  # ZeRO-3: partitioned before the first step
            result = objective.evaluate(model, tokenizer, trainer, eval_raw, recipe, reference=reference)
        if result is not None:
            log.info("eval %s training: %s", tag, objective.describe(result))
        return harness.measure(result, trainer.model, tokenizer, recipe, trainer.args)  # + eval.harness (lm-eval)

    # -- train ----------------------------------------------------------------------------------
    # Before training the policy is the reference model: its numbers are the reference's too.
    before = measure("before")
    result = trainer.train(resume_from_checkpoint=resume)
    if resume:  # the Trainer averages train_loss over this call's steps only: make it the whole run's
        at = resilience.checkpoint_step(Path(resume)) or 0
        result.metrics["train_loss"] = artifacts.whole_run_loss(
            trainer.state.log_history, at, result.global_step - at, result.metrics["train_loss"])

    # -- save -----------------------------------------------------------------------------------
    # The result first: from here a signal (preemption, Ctrl-C) cuts only the after-training eval
    # short, and the run ends 143/130 once the artifact and metrics.json are written (resilience).
    with resilience.after_training(out, trainer) as finishing:
        artifacts.save(trainer, tokenizer, out, method)
        after = finishing.skippable("after-eval", measure, "after", before)
        freeze.save_report(out, param_report)
        metrics = artifacts.run_metrics(recipe, trainer, result, started, objective=recipe.objective.name,
                                        data_format=built[2], data=data_stats,
                                        **objective.metrics_fields(trainer.model), trainable_params=trainable,
                                        total_params=total, eval_before=before, eval_after=after)
        line, sizes = artifacts.size_report(out, trainer.model, method)
        log.info(line)
        metrics.update(sizes)
        artifacts.write_metrics(out, metrics)
        artifacts.plot_loss(out, trainer.state.log_history)
        if before and after:
            log.info("\n%s", objective.before_after_table(before, after))
        log.info("done in %.0f s; artifacts in %s", metrics["wall_seconds"], out)
    return Run(metrics, trainer, tokenizer, out, eval_raw, recipe)
