"""Resolve `builtin:NAME` references to the assets shipped inside the package.

builtin:tiny-llama -> llama_recipes/assets/tiny-llama, builtin:demo -> llama_recipes/assets/data/demo.
Anything else is returned unchanged (a hub id or a path relative to the current directory).
"""
from pathlib import Path

from llama_recipes.errors import UserError

ASSETS = Path(__file__).resolve().parent / "assets"
PREFIX = "builtin:"


def resolve(ref: str, kind: str) -> str:
    """kind is 'model' or 'data'."""
    if not ref.startswith(PREFIX):
        return ref
    name = ref[len(PREFIX):]
    root = ASSETS if kind == "model" else ASSETS / "data"
    path = root / name
    if not path.exists():
        have = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in ("data", "configs")) if root.is_dir() else []
        raise UserError(f"no builtin {kind} named {name!r}", f"use one of: {', '.join(PREFIX + h for h in have)}")
    return str(path)


def shipped_config(ref: str) -> Path | None:
    """The package's copy of a hub model's config.json (the models shipped recipes name), or None.

    Only `--estimate-memory` uses it, so that every shipped recipe estimates offline; loading a
    model always goes to the hub or the local directory.
    """
    path = ASSETS / "configs" / ref
    return path if (path / "config.json").is_file() else None


def is_local(ref: str) -> bool:
    return ref.startswith(PREFIX) or Path(ref).exists() or ref.startswith((".", "/", "~"))
