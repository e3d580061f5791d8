"""Build TRL's SFTTrainer from the recipe: SFTConfig from `training:`, the model, the datasets."""
from llama_recipes import batching, data
from llama_recipes.log import get_logger
from llama_recipes.runtime.hardware import has_accelerator, recipe_bf16

log = get_logger(__name__)


def sft_config(recipe, data_overrides: dict | None = None):
    from trl import SFTConfig

    kwargs = {**recipe.training.sft_kwargs(), **(data_overrides or {})}  # data keys: see data.sft_overrides
    kwargs.update(device_kwargs(recipe, kwargs))
    return SFTConfig(output_dir=recipe.output_dir, seed=recipe.seed, **kwargs)


def device_kwargs(recipe, kwargs: dict) -> dict:
    """Trainer arguments that follow the device rather than the recipe (unless the recipe set them).

    bf16 "auto" is normally resolved by distributed.setup (with a log line); this covers callers
    that build a config directly. Pinned memory only helps copies to a GPU: on CPU torch warns.
    transformers refuses bf16 without a GPU unless use_cpu is set.
    """
    out = {}
    gpu = has_accelerator()
    if kwargs.get("bf16") == "auto":
        out["bf16"] = recipe_bf16(recipe)[0]
    if not gpu and "dataloader_pin_memory" not in kwargs:
        out["dataloader_pin_memory"] = False
    if not gpu and out.get("bf16", kwargs.get("bf16")) and "use_cpu" not in kwargs:
        out["use_cpu"] = True
    return out


def build_trainer(recipe, model, tokenizer, train_ds, eval_ds, callbacks=None):
    """SFTTrainer over an already-built model (PEFT wrapping and freezing are done by then).

    With packing, the batches are isolated packed rows (batching.PackedRowCollator) rather than
    TRL's one flattened row; `group_by_length` sampling is seeded per epoch (batching).
    """
    from trl import SFTTrainer

    args = sft_config(recipe, data.sft_overrides(recipe, train_ds))
    packed = bool(args.packing) and args.packing_strategy in ("bfd", "bfd_split")
    trainer = batching.trainer_class(SFTTrainer, packed=packed)(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    if packed:
        batching.install_packed_collator(trainer)
    return trainer
