"""Build the trainable model for the recipe's `method:` (PEFT adapters or full fine-tuning)."""
from llama_recipes.log import get_logger

log = get_logger(__name__)


def peft_config(method):
    """The PEFT config object for a PEFT method section."""
    if method.name == "lora":
        from peft import LoraConfig

        return LoraConfig(
            task_type="CAUSAL_LM",
            r=method.r,
            lora_alpha=method.alpha,
            lora_dropout=method.dropout,
            target_modules=method.target_modules,
            use_rslora=method.use_rslora,
            use_dora=method.use_dora,
            modules_to_save=method.modules_to_save or None,
        )
    raise ValueError(f"not a PEFT method: {method.name}")


def apply_method(model, recipe):
    """Return the model to train: wrapped in a PEFT adapter, or the base itself for full tuning."""
    from llama_recipes.freeze import apply_freeze

    if recipe.is_peft:
        from peft import get_peft_model

        from llama_recipes.resilience import peft_errors

        with peft_errors(model):
            model = get_peft_model(model, peft_config(recipe.method))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    apply_freeze(model, recipe.freeze)
    return model
