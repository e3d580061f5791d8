"""Secrets kept out of what is written: redact() is applied to the resolved recipe before it is
printed (--validate) or saved (OUTPUT_DIR/recipe.yaml)."""
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
        if HF_TOKEN_VALUE.search(data) and _is_local_path(data):  # a directory named like a token is no secret,
            return data                                            # and redacting it loses the run's base or data
        return HF_TOKEN_VALUE.sub(REDACTED, data)
    return data


def _is_local_path(value: str) -> bool:
    import os

    try:
        return "\n" not in value and len(value) < 4096 and os.path.exists(os.path.expanduser(value))
    except (OSError, ValueError):
        return False
