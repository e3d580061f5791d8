"""Snapshot TRL's SFTConfig fields into llama_recipes/schema/sft_fields.json.

The recipe's `training:` section accepts exactly the fields of TRL's `SFTConfig`. Importing
TRL takes ~10 s, too slow for validating a recipe or printing `--help`, so the field names,
value kinds, defaults and help texts are snapshotted here and a test
(tests/test_recipe.py::test_sft_snapshot_matches_installed_trl) fails when TRL changes.

    python scripts/snapshot_sft_fields.py
"""
import dataclasses
import enum
import json
import types
import typing
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "llama_recipes" / "schema" / "sft_fields.json"


def kinds(tp) -> list[str]:
    """Map a dataclass annotation to the YAML value kinds it accepts."""
    if tp is type(None) or tp is None:
        return ["null"]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        out: list[str] = []
        for arg in typing.get_args(tp):
            out += [k for k in kinds(arg) if k not in out]
        return out
    if origin is typing.Literal:
        return sorted({type(a).__name__ if a is not None else "null" for a in typing.get_args(tp)})
    if origin in (list, tuple):
        return ["list"]
    if origin is dict:
        return ["dict"]
    for py, name in ((bool, "bool"), (int, "int"), (float, "float"), (str, "str"), (list, "list"), (dict, "dict")):
        if tp is py:
            return [name]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return ["str"]
    return ["any"]


def choices(tp) -> list[str]:
    """The values of the Enum in an annotation (OptimizerNames | str -> its values), else []."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    for arg in args:
        if isinstance(arg, type) and issubclass(arg, enum.Enum):
            return [e.value for e in arg]
    return []


def snapshot() -> dict:
    from trl import SFTConfig

    fields = {}
    for f in dataclasses.fields(SFTConfig):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, enum.Enum):
            default = default.value
        try:
            json.dumps(default)
        except TypeError:
            default = repr(default)
        fields[f.name] = {"kinds": kinds(f.type), "default": default, "help": f.metadata.get("help", "")}
        names = choices(f.type)
        if names:  # an enum (optim, lr_scheduler_type, *_strategy): the recipe is checked against its values
            fields[f.name]["choices"] = names
    return fields


if __name__ == "__main__":
    import trl

    OUT.write_text(json.dumps({"trl_version": trl.__version__, "fields": snapshot()}, indent=1) + "\n")
    print(f"wrote {OUT}")
