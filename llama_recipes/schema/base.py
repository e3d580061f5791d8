"""Shared base for recipe sections: unknown keys are errors, every field has a description."""
import os

from pydantic import BaseModel, ConfigDict, field_validator

# Integers beyond 32 bits are never a sensible recipe value, and past 64 bits torch, numpy and the
# tokenizers overflow with a traceback far from the recipe. Seeds get numpy's 32-bit unsigned range.
INT_LIMIT = 2**31 - 1
SEED_MAX = 2**32 - 1  # numpy's seed range (transformers.set_seed seeds numpy too)


def check_int_size(value, limit: int = INT_LIMIT):
    """Raise ValueError for an int (or an int in a list) outside [-limit-1, limit]."""
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, int) and not isinstance(v, bool) and not -limit - 1 <= v <= limit:
            raise ValueError(f"{v} is out of range: at most {limit:,} in absolute value")
    return value


class Section(BaseModel):
    """A recipe section. `extra="forbid"` makes a typo an error instead of a silent no-op.

    Floats must be finite (a NaN or inf learning rate, alpha or fraction only fails later, deep in
    a library) and integers fit in 32 bits.
    """

    model_config = ConfigDict(extra="forbid", validate_default=True, protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _int_size(cls, value, info):
        return check_int_size(value, SEED_MAX if info.field_name.endswith("seed") else INT_LIMIT)


def expand_user(value):
    """`~/x` -> /home/me/x in a path-valued field (a list: each item). Hub ids and builtin: never start with ~."""
    if isinstance(value, list):
        return [expand_user(v) for v in value]
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value
