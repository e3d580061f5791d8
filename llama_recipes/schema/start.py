"""Starting from a previous run's adapter (SFT -> DPO): `model.adapter`, or `model.name_or_path` naming a run.

A PEFT run's output_dir holds an adapter, not a model. Pointed at by `model.name_or_path`, it is read
here (its recipe.yaml and adapter_config.json only: small files, no torch) and the model section
becomes the base that run trained on plus `model.adapter: <that run>`. The method then continues
training that adapter (methods/peft.py), so a DPO/KTO reference is the starting model (TRL copies the
starting adapter into a frozen "ref" adapter) and the new artifact is one adapter on the same base:
export, --eval-only, dry run and resume read it as any adapter run. docs/preference.md, SFT -> DPO.
"""
from __future__ import annotations

import json
from pathlib import Path

from llama_recipes import bounds
from llama_recipes.schema.method import PEFT_METHODS
from llama_recipes.schema.objective import SPECS

RUN_RECIPE = "recipe.yaml"  # = artifacts.RECIPE_FILE (artifacts imports the schema, not the reverse)
ADAPTER_CONFIG = "adapter_config.json"
# Method settings that may differ from the run's: they act during training only, not on the adapter's shape.
TRAINING_ONLY = {"dropout"}
# Keys of the base taken from the run: what it trained on. dtype, attention kernel and trust stay the user's.
BASE_KEYS = ("name_or_path", "gguf_file", "revision")


def is_adapter_dir(path) -> bool:
    p = Path(str(path))
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file()


def _saved_recipe(run: Path) -> dict | None:
    f = run / RUN_RECIPE
    if not f.is_file():
        return None
    try:
        data = bounds.safe_load(f.read_text(encoding="utf-8"))
    except Exception as e:  # noqa: BLE001 - YAML, decoding or bound errors: one message
        raise ValueError(f"{f} cannot be read ({type(e).__name__}): restore it, or point at an intact run") from None
    if not isinstance(data, dict):
        raise ValueError(f"{f} is damaged (not a recipe mapping): restore it, or point at an intact run")
    return data


def _adapter_base(run: Path) -> str:
    try:
        base = json.loads((run / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (ValueError, OSError, AttributeError):
        base = None
    if not isinstance(base, str) or not base:
        raise ValueError(f"{run / ADAPTER_CONFIG} names no base_model_name_or_path: set model.name_or_path to the "
                         f"base it was trained on and model.adapter: {run}")
    return base


def from_run(data):
    """Recipe data before validation: model.name_or_path naming an adapter run -> its base + model.adapter."""
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        return data
    model = data["model"]
    ref = model.get("name_or_path")
    if not isinstance(ref, str) or not is_adapter_dir(Path(ref).expanduser()):
        return data
    if model.get("adapter") is not None:
        raise ValueError(f"model.name_or_path {ref} is an adapter run and model.adapter is set too: name the run "
                         "once, in model.name_or_path (its base is then read from it)")
    run = Path(ref).expanduser()
    saved = _saved_recipe(run)
    saved_model = saved.get("model") if saved else None
    if isinstance(saved_model, dict) and isinstance(saved_model.get("name_or_path"), str):
        base = {k: saved_model[k] for k in BASE_KEYS if saved_model.get(k) is not None}
    else:
        base = {"name_or_path": _adapter_base(run)}
    if is_adapter_dir(Path(base["name_or_path"]).expanduser()):
        raise ValueError(f"{run} was itself trained from another run's adapter ({base['name_or_path']}): "
                         "point model.name_or_path at that run's base")
    resolved = {k: v for k, v in model.items() if k not in BASE_KEYS}
    return {**data, "model": {**resolved, **base, "adapter": ref}}


def check(recipe) -> None:
    """After validation: the method can continue the adapter model.adapter names (ValueError: why and the fix)."""
    ref = recipe.model.adapter
    if ref is None:
        return
    run = Path(ref)
    merge = (f"merge it into its base first (`llama-recipes export {ref} {ref.rstrip('/')}_merged`) and set "
             f"model.name_or_path: {ref.rstrip('/')}_merged (docs/preference.md, SFT -> DPO)")
    if recipe.method.name not in PEFT_METHODS:
        raise ValueError(f"model.adapter {ref}: method {recipe.method.name} trains the base's own weights and cannot "
                         f"continue an adapter; {merge}")
    why = SPECS[recipe.objective.name].no_adapter_start
    if why:
        raise ValueError(f"model.adapter {ref}: {why}; {merge}")
    saved = _saved_recipe(run)
    saved_method = saved.get("method") if saved else None
    if not isinstance(saved_method, dict):
        return  # a bare adapter: its adapter_config.json sets its shape (methods/peft.py loads it as it is)
    ours = recipe.method.model_dump(mode="json")
    if saved_method.get("name") != ours["name"]:
        raise ValueError(f"model.adapter {ref} is a {saved_method.get('name')} adapter and method is {ours['name']}: "
                         f"set method.name: {saved_method.get('name')} to continue it, or {merge} to train a new "
                         f"{ours['name']} on top")
    differ = sorted(k for k in ours if k not in TRAINING_ONLY and k != "name" and k in saved_method
                    and saved_method[k] != ours[k])
    if differ:
        want = ", ".join(f"method.{k}: {json.dumps(saved_method[k])}" for k in differ)
        raise ValueError(f"model.adapter {ref} has another shape than this recipe's method ({want} in that run): "
                         f"set those to continue its adapter, or {merge} to train a new adapter on top")
