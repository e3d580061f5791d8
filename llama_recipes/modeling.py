"""Load the tokenizer and the base model named by the recipe's `model:` section."""
from pathlib import Path

from llama_recipes.errors import UserError, damaged_weights
from llama_recipes.log import get_logger
from llama_recipes.paths import is_local, model_path, resolve, tokenizer_path
from llama_recipes.runtime.hardware import limit_bnb_cpu_packing
from llama_recipes.schema.model import ModelConfig

log = get_logger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _hub_hint(ref: str) -> str:
    hint = (
        f"{ref!r} is neither a local directory nor a reachable hub model. Offline (HF_HUB_OFFLINE=1) only cached "
        "models load: download it once with the network, or point model.name_or_path at a local directory"
    )
    writer = _recipe_writing(ref)
    return hint + (f"; it is the output_dir of {writer}: run that recipe first" if writer else "")


def _recipe_writing(ref: str) -> str | None:
    """The shipped recipe whose output_dir is `ref` (a demo that starts from another demo's run names it), if any."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    for recipe in sorted((root / "recipes").rglob("*.yaml")):
        try:
            out = (yaml.safe_load(recipe.read_text()) or {}).get("output_dir")
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if out and Path(out) == Path(ref):
            return str(recipe.relative_to(root))
    return None


_WARNED: set[str] = set()


def warn_remote_code(cfg: ModelConfig) -> None:
    """Say that a model's own Python code will run, before anything loads it (once per model)."""
    ref = resolve(cfg.name_or_path, "model")
    if cfg.trust_remote_code and ref not in _WARNED:
        _WARNED.add(ref)
        log.warning("trust_remote_code is on: running Python code shipped with %s", ref)


def _remote_code_error(e: Exception, ref: str, key: str) -> UserError | None:
    """transformers' 'contains custom code ... trust_remote_code=True' ValueError, as a UserError."""
    if "trust_remote_code" not in str(e):
        return None
    return UserError(f"{ref} ships its own Python code (auto_map in its config), and model.trust_remote_code is false",
                     f"read that code; if you trust its authors set {key}: true")


def check_remote_code(cfg: ModelConfig, ref: str) -> None:
    """A local model whose architecture exists only as its own code (auto_map, a model_type transformers
    does not know) needs trust_remote_code: say so before the tokenizer half-loads it."""
    import json

    config = Path(ref) / "config.json"
    if cfg.trust_remote_code or not config.is_file():
        return
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return  # a damaged config.json: the load reports it
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if isinstance(data, dict) and data.get("auto_map") and data.get("model_type") not in CONFIG_MAPPING_NAMES:
        raise _remote_code_error(ValueError("trust_remote_code"), ref, "model.trust_remote_code")


def check_local(ref: str, key: str = "model.name_or_path", need: str = "config.json") -> None:
    """Clear errors for a local model path: missing, a file, or a directory without `need`."""
    path = Path(ref)
    if ref.startswith((".", "/", "~")) and not path.exists():
        raise UserError(f"model path {ref} does not exist",
                        f"point {key} at a directory with config.json, tokenizer files and *.safetensors, or at a hub id")
    if path.is_file():
        raise UserError(f"{key} {ref} is a file, not a model directory",
                        f"point {key} at the directory that holds it ({path.parent})")
    if path.is_dir() and need and not (path / need).is_file() and (path / "adapter_config.json").is_file():
        # a previous run's adapter where a model is needed (a recipe resolves it: schema/start.py)
        raise UserError(f"{key} {ref} is a PEFT adapter (a run's output_dir), not a model",
                        f"to train on from it, name it in a recipe's model.name_or_path (its adapter continues); to "
                        f"use it as a model, merge it first: `llama-recipes export {ref} {ref.rstrip('/')}_merged` "
                        "(docs/preference.md, SFT -> DPO)")
    if path.is_dir() and need and not (path / need).is_file():
        raise UserError(f"{key} {ref} is a directory without {need} (not a saved model)",
                        "point it at a directory written by save_pretrained (config.json, tokenizer files, "
                        "*.safetensors)")


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    warn_remote_code(cfg)  # before: a custom tokenizer or config class runs its code while loading
    key = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
    ref = tokenizer_path(cfg)
    check_local(ref, key, need="")
    if Path(ref).is_dir() and not any(Path(ref).iterdir()):
        raise UserError(f"{key} {ref} is an empty directory",
                        "point it at a directory written by save_pretrained (config.json, tokenizer files, *.safetensors)")
    check_remote_code(cfg, ref)
    if Path(ref).is_dir() and not any((Path(ref) / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{key} {ref} has no tokenizer files ({', '.join(TOKENIZER_FILES)})",
                        "save the tokenizer there (tokenizer.save_pretrained), or set model.tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(ref, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        if is_local(ref):
            raise UserError(f"cannot load the tokenizer from {ref}: {str(e).splitlines()[0][:300]}",
                            "the directory needs the tokenizer files save_pretrained writes (tokenizer.json, "
                            "tokenizer_config.json)") from None
        raise UserError(f"cannot load tokenizer: {e}".splitlines()[0], _hub_hint(ref)) from None
    except ValueError as e:
        err = _remote_code_error(e, ref, "model.trust_remote_code")
        if err is None and not is_local(ref):
            raise
        raise err or UserError(f"cannot load the tokenizer from {ref}: {str(e).splitlines()[0][:300]}",
                               "the directory needs the tokenizer files save_pretrained writes "
                               "(tokenizer.json, tokenizer_config.json)") from None
    if tok.pad_token is None:
        # Llama-2/3 tokenizers ship without a pad token. Padding positions are masked out of
        # attention and loss, so reusing EOS is safe (TRL's collator builds labels from masks).
        tok.pad_token = tok.eos_token
        log.info("tokenizer has no pad token: using eos %r for padding", tok.eos_token)
    return tok


def load_adapter(base, path, trainable: bool = False):
    """A PEFT adapter directory on a loaded base, in its saved dtype (PEFT would upcast a bf16 QLoRA
    adapter to fp32: then it is not the model that was trained). trainable: its weights train on
    (model.adapter: a run continues a previous run's adapter)."""
    from peft import PeftModel

    with damaged_weights(path, "adapter"):
        return PeftModel.from_pretrained(base, str(path), is_trainable=trainable, autocast_adapter_dtype=False)


def torch_dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def load_model(cfg: ModelConfig, auto_class: str = "AutoModelForCausalLM", **kwargs):
    """Load the base model with the recipe's dtype and attention kernel."""
    import transformers

    ref = model_path(cfg)
    warn_remote_code(cfg)
    check_local(ref)
    if cfg.gguf_file and kwargs.get("quantization_config") is not None:
        log.warning("quantizing the dequantized GGUF %s again for this method: its weights are rounded twice "
                    "(GGUF, then bitsandbytes); compare with --eval-only --base, which loads it the same way",
                    cfg.gguf_file)
    cls = getattr(transformers, auto_class)
    try:
        model = cls.from_pretrained(
            ref,
            revision=cfg.revision,
            dtype=torch_dtype(cfg.dtype),
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True,
            **kwargs,
        )
    except ValueError as e:  # an architecture this auto class does not cover (e.g. T5 for a causal LM)
        err = _remote_code_error(e, ref, "model.trust_remote_code")
        if err is not None:
            raise err from None
        if "Unrecognized" in str(e) and "model_type" in str(e):  # config.json without model_type
            raise UserError(f"{ref}/config.json names no model_type: {str(e).splitlines()[0][:200]}",
                            "use the config.json save_pretrained wrote for this model") from None
        if "Unrecognized configuration class" not in str(e):
            raise
        raise UserError(f"{ref} is not a {auto_class.replace('AutoModelFor', '')} architecture: {str(e).splitlines()[0][:200]}",
                        "use a decoder-only model (Llama, Mistral, Qwen, ...) for this recipe") from None
    except OSError as e:
        if not is_local(ref):
            raise UserError(f"cannot load model: {str(e).splitlines()[0]}", _hub_hint(ref)) from None
        raise UserError(f"cannot load model from {ref}: {str(e).splitlines()[0]}",
                        "the directory needs config.json and *.safetensors weights") from None
    except Exception as e:  # safetensors' own error type (no common base): a damaged or truncated file
        if type(e).__name__ != "SafetensorError":
            raise
        raise UserError(f"cannot read the weights in {ref}: {str(e).splitlines()[0][:200]} (a truncated or damaged "
                        "*.safetensors file?)", "copy or download the model again") from None
    qc = kwargs.get("quantization_config")
    if qc is not None and getattr(qc, "load_in_4bit", False):
        limit_bnb_cpu_packing(model, qc.bnb_4bit_compute_dtype)
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors are counted once.

    bitsandbytes 4-bit weights are packed (two values per byte): they count at their logical shape.
    """
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n, _ = count_parameters_of(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def count_parameters_of(p) -> tuple[int, bool]:
    """(logical element count, is_quantized) of one parameter; bnb 4-bit params are packed."""
    qs = getattr(p, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        import math

        return math.prod(qs.shape), True
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel(), False
