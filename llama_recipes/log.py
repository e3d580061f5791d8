"""Rank-aware logging: the one place that decides which process talks.

Under `accelerate launch` / `torchrun` every rank runs the same code; only rank 0 logs at
INFO, the others only warnings and errors. RANK is set by the launcher before Python starts,
so this needs no torch.distributed call and works before the process group exists.
"""
import logging
import os
import sys
import warnings

# bitsandbytes 0.50 on CPUs with avx512_bf16 tries, at import, to fetch an optional kernel from the
# HF hub ("Failed to load CPU gemm_4bit_forward from kernels-community ... pip install kernels")
# and falls back to its own kernel: a warning on every import (peft imports bitsandbytes) that
# sends users after a package they do not need. Only that message is dropped.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in record.getMessage())
# Offline, that same attempt makes the `kernels` package say "Skipping publisher trust check for
# 'kernels-community/quantization-bitsandbytes' because Hugging Face Hub is in offline mode" on every
# run: about bitsandbytes' own optional kernel, never one the user asked for. Only that repository's
# line is dropped (a kernel the user loads keeps its trust message).
logging.getLogger("kernels._internals.hf_hub").addFilter(
    lambda record: "kernels-community/quantization-bitsandbytes" not in record.getMessage())
# PEFT 0.21 reads transformers 5.24's deprecated alias `is_gradient_checkpointing` whenever it wraps a
# model: a FutureWarning on every run about code that is neither ours nor the user's.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
# transformers' Trainer asks DDP to look for unused parameters whenever the model is not a
# PreTrainedModel (every PEFT model), and torch then warns once per rank that it found none: a hint
# about a setting the recipe already exposes (training.ddp_find_unused_parameters: false), not a fault.
# training.trl_config defaults it to false; this covers a Python-side warning where it is still on
# (the autograd engine's C++ warning bypasses Python's filters).
warnings.filterwarnings("ignore", message=r"find_unused_parameters=True was specified in DDP constructor",
                        category=UserWarning)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def get_logger(name: str = "llama_recipes") -> logging.Logger:
    logger = logging.getLogger(name)
    root = logging.getLogger("llama_recipes")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        prefix = f"[rank{rank()}] " if world_size() > 1 else ""
        handler.setFormatter(logging.Formatter(f"{prefix}%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO if is_main_process() else logging.WARNING)
        root.propagate = False
    return logger
