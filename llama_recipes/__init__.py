"""llama-recipes: fine-tune Llama-family models from one YAML recipe.

Importing the package is cheap on purpose: heavy libraries (torch, transformers, TRL, PEFT)
are imported inside the functions that need them, so `--help` and recipe validation are fast.
"""
__version__ = "0.1.0"

from llama_recipes.errors import UserError  # noqa: E402

__all__ = ["UserError", "__version__"]
