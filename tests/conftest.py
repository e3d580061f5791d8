"""Shared test helpers. Tests run on CPU, offline, on the tiny Llama shipped in the package."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "llama_recipes" / "assets" / "tiny-llama"
DEMO_RECIPE = ROOT / "recipes" / "demo" / "tiny_lora.yaml"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The demo recipe says `training.bf16: auto` (bf16 on CPUs with native bf16, fp32 elsewhere).
# Tests that compare numbers pin fp32 so that they hold on every CPU; tests/test_hardware.py
# covers the auto choice itself.
FP32 = "training.bf16=false"
# Overrides that shrink the demo recipe to a few seconds of training.
FAST = [
    FP32,
    "training.max_steps=8",
    "training.logging_steps=2",
    "training.save_strategy=no",
    "training.report_to=none",
    "data.max_samples=128",
    "data.max_eval_samples=32",
]


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the real entry point (run_recipe.py) in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "run_recipe.py"), *args],
        cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tiny_path() -> Path:
    return TINY


@pytest.fixture(autouse=True)
def _no_log_handler_left_on_a_closed_stream():
    """A library logger configured during a test that captured stderr (capsys) keeps that test's stream,
    closed once it ends; its next message prints a 'Logging error' traceback into a later test's output
    (transformers' handler takes sys.stderr when first used). Point such handlers at the current stderr."""
    import logging

    yield
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    for logger in loggers:
        for h in logger.handlers:
            if not isinstance(h, logging.StreamHandler):
                continue
            # transformers also binds the handler's flush to the stderr of that moment (h.flush = sys.stderr.flush)
            bound = getattr(vars(h).get("flush"), "__self__", None)
            if getattr(h.stream, "closed", False) or getattr(bound, "closed", False):
                h.stream = sys.stderr  # (setStream would flush the closed one first)
                vars(h).pop("flush", None)
