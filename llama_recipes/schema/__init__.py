"""The recipe: a YAML file validated into typed sections before anything heavy is loaded.

    recipe = load_recipe("recipes/lora_alpaca.yaml", ["training.learning_rate=1e-4"])

Every section forbids unknown keys; errors name the file, the key path and the fix.
"""
import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from llama_recipes import bounds
from llama_recipes.errors import RecipeError
from llama_recipes.schema.base import SEED_MAX, Section, expand_user
from llama_recipes.schema.checks import redact
from llama_recipes.schema.data import DataConfig
from llama_recipes.schema.data import check_recipe as check_data
from llama_recipes.schema.evaluation import EvalConfig, resolve_task_paths
from llama_recipes.schema.finetune import check_method_freeze
from llama_recipes.schema.freeze import FreezeConfig
from llama_recipes.schema.guards import (
    RESUME_DESCRIPTION,
    RUN_CONTROL_KEYS,
    GuardsConfig,
)
from llama_recipes.schema.method import PEFT_METHODS, MethodConfig, check_combinations
from llama_recipes.schema import grpo
from llama_recipes.schema.model import ModelConfig
from llama_recipes.schema.objective import SPECS as OBJECTIVE_SPECS
from llama_recipes.schema.objective import ObjectiveConfig, default_objective
from llama_recipes.schema.objective import check_combinations as check_objective
from llama_recipes.schema import sanity, start
from llama_recipes.schema.training import TrainingConfig


class Recipe(Section):
    output_dir: str = Field(description="Where checkpoints, the final artifact and metrics are written.")
    seed: int = Field(42, ge=0, le=SEED_MAX, description="Seed for model init of new modules, data order and dropout.")
    model: ModelConfig
    data: DataConfig
    method: MethodConfig
    objective: ObjectiveConfig = Field(description="What the model is trained for: sft (default), dpo, kto, orpo, "
                                       "cpo, simpo, reward; classification for heads. See docs/preference.md.")
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)  # type: ignore[valid-type]
    eval: EvalConfig = Field(default_factory=EvalConfig)
    resume: str = Field("auto", description=RESUME_DESCRIPTION)
    guards: GuardsConfig = Field(default_factory=GuardsConfig)

    @field_validator("output_dir", "resume")
    @classmethod
    def _paths(cls, v, info):
        v = expand_user(v)
        # OUT/, OUT and ./OUT are one directory (a run is found by its recipe.yaml in it, see artifacts)
        return os.path.normpath(v) if info.field_name == "output_dir" and v else v

    @model_validator(mode="before")
    @classmethod
    def _default_objective(cls, data):
        # No `objective:` section: what the method trains for by default (sft, or classification for heads).
        if isinstance(data, dict) and data.get("objective") is None and isinstance(data.get("method"), dict):
            data = {**data, "objective": {"name": default_objective(data["method"].get("name"))}}
        return start.from_run(data)  # model.name_or_path naming an adapter run: its base + model.adapter

    @model_validator(mode="after")
    def _combinations(self):
        # Impossible combinations are refused here, before any model is loaded.
        t = self.training
        if self.data.eval_split is None and getattr(t, "eval_strategy", "no") != "no":
            raise ValueError("training.eval_strategy needs data.eval_split (a split name or a fraction)")
        t.check_for_objective(self.objective.name)
        check_objective(self)
        check_combinations(self)
        check_method_freeze(self)
        start.check(self)  # model.adapter: a method that can continue it
        check_data(self)
        sanity.check(self)  # settings that cannot work together (schema/sanity.py)
        return self

    @property
    def formats(self) -> tuple[str, ...]:
        """The data formats the recipe's objective trains on."""
        return OBJECTIVE_SPECS[self.objective.name].formats

    @property
    def is_peft(self) -> bool:
        return self.method.name in PEFT_METHODS

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data (what is written to OUTPUT_DIR/recipe.yaml)."""
        data = self.model_dump(mode="json", exclude={"training"})
        data["training"] = self.training.trainer_kwargs(mode="json")
        return redact(data)

    def identity(self) -> dict[str, Any]:
        """to_dict() without run-control keys (resume, guards): what makes two runs the same run."""
        return {k: v for k, v in self.to_dict().items() if k not in RUN_CONTROL_KEYS}

    def fingerprint(self) -> str:
        """Hash of the resolved recipe; a different hash in an existing output_dir is another run."""
        blob = json.dumps(self.identity(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# Path-valued keys of a recipe dict: ("section", "key"); a list value is a list of paths.
PATH_KEYS = (("model", "name_or_path"), ("model", "tokenizer"), ("model", "adapter"), ("data", "path"), ("data", "chat_template"),
             ("eval", "retain"))


def same_run(saved: dict, recipe: "Recipe") -> bool:
    """Whether recipe.yaml `saved` (read from OUTPUT_DIR) records the same run as `recipe`.

    Run-control keys (resume, guards) may change between tries. output_dir is not compared: the
    recipe.yaml is found in the directory, so `OUT/`, `./OUT` and `~/x/OUT` are the same run. Local
    paths compare by their real path (data/x.jsonl from the repo root = /abs/repo/data/x.jsonl).
    """
    def norm(d: dict) -> dict:
        d = {k: v for k, v in d.items() if k not in RUN_CONTROL_KEYS and k != "output_dir"}
        if "objective" not in d and isinstance(d.get("method"), dict):  # written before the objective axis
            d["objective"] = {"name": default_objective(d["method"].get("name"))}
        if isinstance(d.get("model"), dict) and d["model"].get("adapter", 0) is None:  # no model.adapter before it existed
            d["model"] = {k: v for k, v in d["model"].items() if k != "adapter"}
        for section, key in PATH_KEYS:
            if isinstance(d.get(section), dict) and key in d[section]:
                d[section] = {**d[section], key: _real(d[section][key])}
        if isinstance(d.get("data"), dict) and isinstance(d["data"].get("mix"), list):
            d["data"] = {**d["data"], "mix": [{**m, "path": _real(m.get("path"))} if isinstance(m, dict) else m
                                              for m in d["data"]["mix"]]}
        return d

    return norm(saved) == norm(recipe.to_dict())


def _real(value):
    if isinstance(value, list):
        return [_real(v) for v in value]
    if isinstance(value, str) and "\n" not in value and len(value) < 4096:
        try:
            if os.path.exists(os.path.expanduser(value)):
                return os.path.realpath(os.path.expanduser(value))
        except (OSError, ValueError):
            pass
    return value


class _StrictLoader(bounds.BoundedComposer, yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error, and an alias bomb
    or a deeply nested document is refused before it is built (bounds.py).

    Plain YAML keeps the last one: a second `training:` block would silently replace the whole
    first section.
    """


def _mapping_without_duplicates(loader, node, deep=False):
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise RecipeError(f"key {key!r} appears twice, at lines {seen[key]} and {line}: the second would "
                              "silently replace the first", "keep one of them (merge the two into one block)")
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def read_text(path: Path, what: str = "the recipe") -> str:
    """A text file as UTF-8 (a BOM is fine; UTF-16 with its BOM is read too); anything else is a RecipeError."""
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 with a byte-order mark (Windows editors)
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            pass
    if b"\x00" in raw:  # UTF-16/32 without a byte-order mark: valid UTF-8 bytes, but NULs between the letters
        raise RecipeError(f"{what} is not UTF-8 text (it holds NUL bytes: UTF-16 or a binary file?)",
                          "save the file as UTF-8", str(path))
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{what} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 4]!r})",
                          "save the file as UTF-8", str(path)) from None


def _read_yaml(path: Path) -> dict:
    if path.is_dir():
        raise RecipeError(f"the recipe path {path} is a directory", "pass a recipe .yaml file (e.g. recipes/demo/tiny_lora.yaml)")
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}", "check the path (recipes live under recipes/)")
    try:
        data = yaml.load(read_text(path), Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except RecipeError as e:
        raise RecipeError(e.problem, e.fix, str(path)) from None
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else "?"
        raise RecipeError(f"YAML syntax error at line {line}: {e.problem}", "fix the YAML syntax", str(path)) from None
    except yaml.YAMLError as e:
        raise RecipeError(f"YAML error: {e}", "fix the YAML syntax", str(path)) from None
    if not isinstance(data, dict):
        raise RecipeError("the recipe must be a YAML mapping of sections (model:, data:, method:, ...)",
                          "start from a recipe under recipes/ and edit it", str(path))
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides; the value is parsed as YAML (1e-4, true, [q_proj, v_proj])."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"bad override {item!r}", "write overrides as dotted.key=value, e.g. training.learning_rate=1e-4")
        try:
            value = bounds.safe_load(raw) if raw else ""
        except yaml.YAMLError as e:
            if raw.lstrip()[:1] in ("{", "[", '"'):  # meant as structured YAML: say it does not parse
                problem = getattr(e, "problem", None) or str(e).splitlines()[0]
                raise RecipeError(f"override {key}: the value is not valid YAML ({problem}): {raw}",
                                  "fix the YAML; backslashes go in single quotes, e.g. patterns: ['a\\.(b|c)']") from None
            value = raw  # a plain string that happens not to parse (a: b: c) is taken as written
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if isinstance(node.get(part), list):  # `a.b.0=x` would replace the list by a mapping {0: x}
                where = ".".join(parts[:i + 1])
                raise RecipeError(f"override {item!r}: {where} is a list, and list items cannot be set one by one",
                                  f"set the whole list: {where}=[a, b, c]")
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return data


def _fields_for(loc: tuple) -> list[str]:
    import typing

    node: Any = Recipe
    for part in loc[:-1]:
        if isinstance(node, list):  # discriminated union: the part is the tag; a list: the part is an index
            match = node if part.isdigit() else [
                m for m in node if "name" in m.model_fields and typing.get_args(m.model_fields["name"].annotation) == (part,)]
            node = match[0] if match else None
            continue
        if not (isinstance(node, type) and issubclass(node, Section)) or part not in node.model_fields:
            return []
        ann = node.model_fields[part].annotation
        members = [a for a in typing.get_args(typing.get_args(ann)[0] if typing.get_origin(ann) is typing.Annotated else ann)
                   if isinstance(a, type) and issubclass(a, Section)]
        node = members if members else ann
    if isinstance(node, list) and len(node) == 1:  # an optional section (X | None)
        node = node[0]
    if isinstance(node, type) and issubclass(node, Section):
        return list(node.model_fields)
    return []


def _render_error(err: dict, source: str) -> str:
    loc = tuple(str(p) for p in err["loc"])
    # pydantic puts the union tag (e.g. 'lora') into the location; users never write it.
    shown = ".".join(loc[:1] + loc[2:] if loc[:1] in (("method",), ("objective",)) and len(loc) > 2 else loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _fields_for(loc)
        close = difflib.get_close_matches(loc[-1], allowed, n=1, cutoff=0.6)
        hint = f"did you mean `{close[0]}`?" if close else "remove it, or check the docs for this section's keys"
        return f"{shown}: unknown key `{loc[-1]}` — {hint}"
    if kind == "missing":
        return f"{shown}: missing required key — add `{loc[-1]}:` to the recipe"
    if kind == "union_tag_invalid":
        return f"{shown}: {err['msg']}"
    got = err.get("input")
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    choices = (err.get("ctx") or {}).get("expected", "")
    if kind == "literal_error" and isinstance(got, str) and choices.count(",") >= 6:  # a long enum: suggest one
        names = [c.strip(" '") for c in choices.replace(" or ", ", ").split(",")]
        close = difflib.get_close_matches(got, names, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{shown}: {got!r} is not one of its values — {hint}(accepted: {', '.join(names)})"
    if not loc:  # a cross-section check: its message already names the keys
        return err["msg"].removeprefix("Value error, ")
    return f"{shown or '(top level)'}: {err['msg'].removeprefix('Value error, ')}{got_s}"


_UNION_MEMBER = re.compile(r"^(str|int|float|bool|none|(list|dict|literal|tuple)\[.*\])$")


def _one_per_key(errors: list[dict]) -> list[dict]:
    """pydantic reports a bad value of a union field once per member (`eval_split.str`, `eval_split.float`):
    keep one, the member of the value's own type (its message is the one that explains), at the field's key."""
    kept: dict[tuple, dict] = {}
    for err in errors:
        loc = tuple(err["loc"])
        tag = str(loc[-1]) if loc else ""
        key = loc[:-1] if _UNION_MEMBER.match(tag) and len(loc) > 1 else loc
        err = {**err, "loc": key}
        if key not in kept or tag == type(err.get("input")).__name__:
            kept[key] = err
    return list(kept.values())


def validate_recipe(data: dict, source: str = "<recipe>") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        lines = [_render_error(err, source) for err in _one_per_key(e.errors(include_url=False))]
        raise RecipeError(
            "invalid recipe:\n  " + "\n  ".join(lines),
            "edit the recipe (or the override) at the key named above; docs/recipes.md lists every key",
            source,
        ) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe. Raises RecipeError with file, key and fix."""
    path = Path(path)
    data = apply_overrides(_read_yaml(path), overrides or [])
    data = resolve_task_paths(data, path.parent)  # eval.harness task YAMLs are relative to the recipe
    data = grpo.anchor(data, path.resolve().parent)  # reward files are relative to the recipe (docs/rl.md)
    return validate_recipe(data, str(path))


__all__ = ["Recipe", "load_recipe", "validate_recipe", "apply_overrides", "same_run"]
