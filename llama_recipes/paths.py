"""Resolve `builtin:NAME` references to the assets shipped inside the package.

builtin:tiny-llama -> llama_recipes/assets/tiny-llama, builtin:demo -> llama_recipes/assets/data/demo,
builtin:smollm2-135m-instruct -> its GGUF converted once into the user cache (builtin_models.py).
Anything else is returned unchanged (a hub id or a path relative to the current directory).
`model_path`/`tokenizer_path` resolve a whole `model:` section (including `model.gguf_file`).
"""
from pathlib import Path

from llama_recipes import builtin_models
from llama_recipes.errors import UserError

ASSETS = Path(__file__).resolve().parent / "assets"
PREFIX = "builtin:"


def resolve(ref: str, kind: str) -> str:
    """kind is 'model' or 'data'."""
    if not ref.startswith(PREFIX):
        return ref
    name = ref[len(PREFIX):]
    if kind == "model" and name in builtin_models.BUILTIN_GGUF:
        return str(builtin_models.convert(builtin_models.builtin_gguf(name)))
    root = ASSETS if kind == "model" else ASSETS / "data"
    path = root / name
    if not path.exists():
        have = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in ("data", "configs")) if root.is_dir() else []
        have += sorted(builtin_models.BUILTIN_GGUF) if kind == "model" else []
        raise UserError(f"no builtin {kind} named {name!r}", f"use one of: {', '.join(PREFIX + h for h in have)}")
    return str(path)


def model_path(cfg) -> str:
    """What to hand `from_pretrained` for a `model:` section: a GGUF's converted directory
    (model.gguf_file, builtin GGUF models), a builtin asset, else name_or_path as written."""
    return builtin_models.model_dir(cfg) or resolve(cfg.name_or_path, "model")


def tokenizer_path(cfg) -> str:
    """The tokenizer of a `model:` section: model.tokenizer when set, else the tokenizer a starting
    adapter's run saved (model.adapter: the chat template and pad token it trained with), else the model's own."""
    if cfg.tokenizer:
        return resolve(cfg.tokenizer, "model")
    adapter = getattr(cfg, "adapter", None)
    if adapter and (Path(adapter) / "tokenizer_config.json").is_file():
        return adapter
    return model_path(cfg)


def shipped_config(ref: str) -> Path | None:
    """The package's copy of a hub model's config.json (the models shipped recipes name), or None.

    Only `--estimate-memory` uses it, so that every shipped recipe estimates offline; loading a
    model always goes to the hub or the local directory.
    """
    path = ASSETS / "configs" / ref
    return path if (path / "config.json").is_file() else None


def is_local(ref: str) -> bool:
    return ref.startswith(PREFIX) or Path(ref).exists() or ref.startswith((".", "/", "~"))
