"""Generate docs/recipes.md from the recipe schema: every key, its type, default and meaning.

    python -m llama_recipes.schema.docs > docs/recipes.md
"""
import re
import typing

from pydantic.fields import FieldInfo

from llama_recipes.schema import Recipe
from llama_recipes.schema.base import Section
from llama_recipes.schema.method import MethodConfig
from llama_recipes.schema.objective import SPECS, ObjectiveConfig


def _type_name(ann) -> str:
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in typing.get_args(ann))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")):
        return " \\| ".join(_type_name(a) for a in typing.get_args(ann))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(ann))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return "null" if ann is type(None) else getattr(ann, "__name__", str(ann))


def _default(f: FieldInfo) -> str:
    if f.is_required():
        return "**required**"
    if f.default_factory is not None:
        try:
            return f"`{f.default_factory()!r}`" if not isinstance(f.default_factory(), Section) else "(section defaults)"
        except TypeError:
            return ""
    return f"`{f.default!r}`"


def _one_line(text: str | None) -> str:
    text = (text or "").strip().replace("\n", " ").replace("|", "\\|")
    m = re.search(r"(?<!e\.g)(?<!i\.e)\.\s+(?=[A-Z`])", text)
    return text[: m.start() + 1] if m and m.start() < 240 else text[:240]


def section_table(cls: type[Section], prefix: str) -> list[str]:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, f in cls.model_fields.items():
        rows.append(f"| `{prefix}{name}` | {_type_name(f.annotation)} | {_default(f)} | {_one_line(f.description)} |")
    return rows


UNIONS = {"method": MethodConfig, "objective": ObjectiveConfig}


def render_markdown() -> str:
    out = ["# Recipe reference", "",
           "Generated from the schema by `python -m llama_recipes.schema.docs > docs/recipes.md`; "
           "a test keeps it current. Unknown keys are errors.", "", "## Top level", ""]
    top = [n for n, f in Recipe.model_fields.items()
           if not (isinstance(f.annotation, type) and issubclass(f.annotation, Section)) and n not in UNIONS]
    out += ["| key | type | default | meaning |", "|---|---|---|---|"]
    for n in top:
        f = Recipe.model_fields[n]
        out.append(f"| `{n}` | {_type_name(f.annotation)} | {_default(f)} | {_one_line(f.description)} |")
    for name, f in Recipe.model_fields.items():
        if name in UNIONS:
            out += ["", f"## `{name}:` (one of, chosen by `name`)", ""]
            if name == "objective":
                out += ["Default: `sft` for causal-LM methods, `classification` for heads. Each objective's "
                        "`training:` takes the fields of its TRL config class (below), less these settings.", ""]
            members = typing.get_args(typing.get_args(UNIONS[name])[0])
            for m in members:
                tag = typing.get_args(m.model_fields["name"].annotation)[0]
                extra = f" Trains with TRL's `{SPECS[tag].config}`." if name == "objective" else ""
                out += [f"### `{name}.name: {tag}`", "", _one_line(m.__doc__) + extra, ""]
                if len(m.model_fields) > 1 or name == "method":
                    out += section_table(m, f"{name}.") + [""]
        elif isinstance(f.annotation, type) and issubclass(f.annotation, Section):
            out += ["", f"## `{name}:`", ""]
            if name == "training":
                out += ["Exactly the fields of the objective's TRL config class (`SFTConfig` for sft and "
                        "classification, `DPOConfig` for dpo, ...; a snapshot of the installed TRL), less the "
                        "objective's own settings; `output_dir` and `seed` are set at the top level. The table "
                        "lists SFTConfig's fields and the other classes' additions.", ""]
            out += section_table(f.annotation, f"{name}.")
            for sub, sf in f.annotation.model_fields.items():  # an optional sub-section (eval.harness)
                inner = [a for a in typing.get_args(sf.annotation) if isinstance(a, type) and issubclass(a, Section)]
                if inner:
                    out += ["", f"### `{name}.{sub}:`", ""] + section_table(inner[0], f"{name}.{sub}.")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")
