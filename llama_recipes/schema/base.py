"""Shared base for recipe sections: unknown keys are errors, every field has a description."""
import os

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

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

    @model_validator(mode="before")
    @classmethod
    def _no_yes_no_numbers(cls, data):
        # YAML 1.1 reads unquoted yes/no/on/off as booleans, and pydantic would take them as 1/0:
        # `seed: no` became seed 0, `max_steps: on` one step.
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key) if isinstance(key, str) else None
                if isinstance(value, bool) and field is not None:
                    kinds = _kinds(field.annotation)
                    if bool not in kinds and kinds & {int, float}:
                        raise ValueError(f"`{key}: {str(value).lower()}` is a yes/no value (YAML reads an unquoted yes, "
                                         "no, on, off, true, false as one), and this key takes a number")
        return data

    @field_validator("*", mode="after")
    @classmethod
    def _int_size(cls, value, info):
        return check_int_size(value, SEED_MAX if info.field_name.endswith("seed") else INT_LIMIT)


def _kinds(annotation) -> set:
    """The plain types an annotation admits (int | None -> {int, NoneType}; Literal values: their types)."""
    import typing

    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return {type(a) for a in args}
    if not args:
        return {annotation}
    out = set()
    for a in args:
        out |= _kinds(a)
    return out


def expand_user(value):
    """`~/x` -> /home/me/x in a path-valued field (a list: each item). Hub ids and builtin: never start with ~."""
    if isinstance(value, list):
        return [expand_user(v) for v in value]
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value
