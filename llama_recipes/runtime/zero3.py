"""Whole weights while DeepSpeed ZeRO-3 is registered: `plain_loading()`.

Once a ZeRO-3 config is registered with transformers (by the launch before the model loads, or by
the Trainer's arguments), every `from_pretrained` / `from_config` in the process builds its
parameters inside `deepspeed.zero.Init`: partitioned, empty placeholders, and every parameter a
collective that all ranks must reach together. Code that wants the model itself, or that runs on
one rank only (an artifact reader, the one-time GGUF conversion of builtin_models), loads inside
this block. No sibling imports: builtin_models (under paths) and runtime/distributed both use it.
"""
from contextlib import contextmanager


@contextmanager
def plain_loading():
    """`from_pretrained`/`from_config` inside this block load whole weights, whatever DeepSpeed registered."""
    import sys

    hf_deepspeed = sys.modules.get("transformers.integrations.deepspeed")
    if hf_deepspeed is None:  # never imported: nothing can be registered
        yield
        return
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref  # transformers 5.24: the module-level weak reference
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved
