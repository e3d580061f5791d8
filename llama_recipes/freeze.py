"""Apply the recipe's `freeze:` rules to a model's parameters."""
import re

from llama_recipes.errors import UserError


def apply_freeze(model, cfg) -> None:
    """`train`: only matching parameters train. `freeze`: matching parameters are frozen.

    A rule that matches no parameter is an error: a silent no-op is the classic freezing bug.
    """
    names = [n for n, _ in model.named_parameters()]
    for rule in [*cfg.train, *cfg.freeze]:
        if not any(re.search(rule, n) for n in names):
            raise UserError(f"freeze rule {rule!r} matches no parameter",
                            f"check the regex against parameter names such as {names[0]!r}")
    if cfg.train:
        for n, p in model.named_parameters():
            p.requires_grad_(any(re.search(r, n) for r in cfg.train))
    for n, p in model.named_parameters():
        if any(re.search(r, n) for r in cfg.freeze):
            p.requires_grad_(False)
