"""Build TRL's SFTTrainer from the recipe: SFTConfig from `training:`, the model, the datasets."""
from llama_recipes.log import get_logger

log = get_logger(__name__)


def sft_config(recipe, data_overrides: dict | None = None):
    from trl import SFTConfig

    kwargs = {**recipe.training.sft_kwargs(), **(data_overrides or {})}  # data keys: see data.sft_overrides
    return SFTConfig(output_dir=recipe.output_dir, seed=recipe.seed, **kwargs)


def build_trainer(recipe, model, tokenizer, train_ds, eval_ds, callbacks=None):
    """SFTTrainer over an already-built model (PEFT wrapping and freezing are done by then)."""
    from trl import SFTTrainer

    from llama_recipes import data, methods

    trainer = SFTTrainer(
        model=model,
        args=sft_config(recipe, data.sft_overrides(recipe, train_ds)),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    if methods.uses_plain_trainer(recipe):
        trainer = methods.plain_trainer(trainer, callbacks)
    methods.after_trainer(trainer, recipe)
    return trainer
