"""Cross-section checks that make a recipe impossible, and secrets kept out of what is written.

check_combinations runs inside Recipe's model_validator (ValueError -> a RecipeError naming the
keys and the fix). redact() is applied to the resolved recipe before it is printed or saved.
"""
import re
from typing import Any

# Keys whose values are credentials, and values that look like a Hugging Face token anywhere.
SECRET_KEY = re.compile(r"(^|_)(token|secret|password|api_key|apikey)$", re.I)
NOT_SECRET = {"pad_token", "eos_token", "bos_token", "unk_token"}  # tokenizer special tokens, not credentials
HF_TOKEN_VALUE = re.compile(r"hf_[A-Za-z0-9]{20,}")
REDACTED = "<redacted>"


def redact(data: Any, key: str = "") -> Any:
    """A copy of `data` with credential values replaced by <redacted>."""
    if isinstance(data, dict):
        return {k: redact(v, str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [redact(v, key) for v in data]
    if data is not None and SECRET_KEY.search(key) and key not in NOT_SECRET:
        return REDACTED
    if isinstance(data, str):
        return HF_TOKEN_VALUE.sub(REDACTED, data)
    return data


def check_combinations(recipe) -> None:
    t = recipe.training
    fsdp_cfg = getattr(t, "fsdp_config", None) or {}
    if (isinstance(fsdp_cfg, dict) and fsdp_cfg.get("activation_checkpointing")
            and "activation_checkpointing" in t.model_fields_set and t.activation_checkpointing):
        raise ValueError(
            "activation checkpointing is set twice (training.fsdp_config.activation_checkpointing and "
            "training.activation_checkpointing); transformers refuses both: keep only the FSDP one under FSDP")
