"""Load the tokenizer and the base model named by the recipe's `model:` section."""
from pathlib import Path

from llama_recipes.errors import UserError
from llama_recipes.log import get_logger
from llama_recipes.paths import is_local, model_path, tokenizer_path
from llama_recipes.runtime.hardware import limit_bnb_cpu_packing
from llama_recipes.schema.model import ModelConfig

log = get_logger(__name__)


def _hub_hint(ref: str) -> str:
    return (
        f"{ref!r} is neither a local directory nor a reachable hub model. Offline (HF_HUB_OFFLINE=1) only cached "
        "models load: download it once with the network, or point model.name_or_path at a local directory"
    )


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    ref = tokenizer_path(cfg)
    if ref.startswith((".", "/", "~")) and not Path(ref).expanduser().exists():
        raise UserError(f"model path {ref} does not exist",
                        "point model.name_or_path at a directory with config.json, tokenizer files and "
                        "*.safetensors, or at a hub id")
    try:
        tok = AutoTokenizer.from_pretrained(ref, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise UserError(f"cannot load tokenizer: {e}".splitlines()[0], _hub_hint(ref)) from None
    if tok.pad_token is None:
        # Llama-2/3 tokenizers ship without a pad token. Padding positions are masked out of
        # attention and loss, so reusing EOS is safe (TRL's collator builds labels from masks).
        tok.pad_token = tok.eos_token
        log.info("tokenizer has no pad token: using eos %r for padding", tok.eos_token)
    return tok


def torch_dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def load_model(cfg: ModelConfig, auto_class: str = "AutoModelForCausalLM", **kwargs):
    """Load the base model with the recipe's dtype and attention kernel."""
    import transformers

    ref = model_path(cfg)
    if cfg.gguf_file and kwargs.get("quantization_config") is not None:
        log.warning("quantizing the dequantized GGUF %s again for this method: its weights are rounded twice "
                    "(GGUF, then bitsandbytes); compare with --eval-only --base, which loads it the same way",
                    cfg.gguf_file)
    if cfg.trust_remote_code:
        log.warning("trust_remote_code is on: running Python code shipped with %s", ref)
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
        if "Unrecognized configuration class" not in str(e):
            raise
        raise UserError(f"{ref} is not a {auto_class.replace('AutoModelFor', '')} architecture: {str(e).splitlines()[0][:200]}",
                        "use a decoder-only model (Llama, Mistral, Qwen, ...) for this recipe") from None
    except OSError as e:
        if not is_local(ref):
            raise UserError(f"cannot load model: {str(e).splitlines()[0]}", _hub_hint(ref)) from None
        raise UserError(f"cannot load model from {ref}: {str(e).splitlines()[0]}",
                        "the directory needs config.json and *.safetensors weights") from None
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
