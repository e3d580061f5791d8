"""Snapshot the fields of TRL's trainer configs into llama_recipes/schema/trl_fields.json.

A recipe's `training:` section accepts exactly the fields of the TRL config class of its objective
(SFTConfig, DPOConfig, KTOConfig, RewardConfig, ORPOConfig, CPOConfig, GRPOConfig), and its
`objective:` section the objective's own settings among them. Importing TRL takes ~10 s, too slow
for validating a recipe or printing `--help`, so the field names, value kinds, defaults and help
texts are snapshotted here and a test (tests/test_recipe.py::test_trl_snapshot_matches_installed_trl)
fails when TRL changes. SFTConfig is stored whole; every other class as its difference from it.

    python scripts/snapshot_trl_fields.py
"""
import dataclasses
import enum
import json
import types
import typing
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "llama_recipes" / "schema" / "trl_fields.json"
# (import path, class): the config classes recipes are validated against (llama_recipes/schema/objective.py)
CLASSES = {"SFTConfig": "trl", "DPOConfig": "trl", "KTOConfig": "trl", "RewardConfig": "trl",
           "GRPOConfig": "trl", "ORPOConfig": "trl.experimental.orpo", "CPOConfig": "trl.experimental.cpo"}


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


def fields_of(config) -> dict:
    fields = {}
    for f in dataclasses.fields(config):
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


def snapshot() -> dict:
    """{class name: fields}; SFTConfig whole, the others as {"same_as_sft_except": {...}, "absent": [...]}."""
    import importlib
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    full = {name: fields_of(getattr(importlib.import_module(mod), name)) for name, mod in CLASSES.items()}
    sft = full["SFTConfig"]
    out = {"SFTConfig": sft}
    for name, fields in full.items():
        if name != "SFTConfig":
            out[name] = {"differs": {k: v for k, v in fields.items() if sft.get(k) != v},
                         "absent": sorted(k for k in sft if k not in fields)}
    return out


if __name__ == "__main__":
    import trl

    OUT.write_text(json.dumps({"trl_version": trl.__version__, "configs": snapshot()}, indent=1) + "\n")
    print(f"wrote {OUT}")
