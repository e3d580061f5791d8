"""The snapshot of TRL's trainer-config fields (trl_fields.json), read without importing TRL.

scripts/snapshot_trl_fields.py writes it; a test compares it with the installed TRL. SFTConfig is
stored whole, every other config class as its difference from SFTConfig.
"""
import json
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def _snapshot() -> dict:
    return json.loads(Path(__file__).with_name("trl_fields.json").read_text())


def trl_version() -> str:
    return _snapshot()["trl_version"]


@lru_cache(maxsize=None)
def config_fields(config: str) -> dict[str, dict]:
    """{field: {kinds, default, help[, choices]}} of one TRL config class (SFTConfig, DPOConfig, ...)."""
    configs = _snapshot()["configs"]
    sft = configs["SFTConfig"]
    if config == "SFTConfig":
        return sft
    spec = configs[config]
    out = {k: v for k, v in sft.items() if k not in spec["absent"]}
    out.update(spec["differs"])
    return out


def config_names() -> list[str]:
    return list(_snapshot()["configs"])
