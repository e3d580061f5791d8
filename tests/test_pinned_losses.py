"""Pinned per-step losses of every demo twin (recipes/demo/*.yaml), as torchtune pins its recipes.

Each twin trains 4 fp32 steps in-process through the real pipeline with the overrides stored in
tests/pinned_losses.json, and its per-step losses must equal the pinned ones: a refactor that
changes the numbers (initialisation order, data order, loss normalisation, which parameters
train) fails here. Regenerate the pins with `python scripts/pin_losses.py [TWIN ...]` only when
a change of numbers is intended, and say why in the commit.
"""
import json

import pytest
import torch

from conftest import ROOT

PINS = json.loads((ROOT / "tests" / "pinned_losses.json").read_text())
# The tiny twins; the real-model demos (smollm2_*) are covered by tests/test_builtin_models.py
# (marked smollm2) and the README's numbers (scripts/real_model_numbers.py).
TWINS = sorted(p.stem for p in (ROOT / "recipes" / "demo").glob("*.yaml") if not p.stem.startswith("smollm2_"))
STEPS = 4  # training.max_steps in the pinned overrides (checked below)
# fp32 summation-order tolerance, derived as in tests/test_distributed.py, not tuned: AVX2 and
# AVX512 kernels (and thread counts) sum in different orders, so one matmul differs by about
# sqrt(K) * u relative (a random walk of rounding errors; u = 2**-24, fp32's unit roundoff;
# K = 352, the tiny model's longest dot product), a forward has 2 matmul stages per layer (L = 4),
# and each optimizer step carries one forward's worth into the weights (Adam's update is
# scale-free). The last logged loss carries STEPS - 1 updates plus its own forward; the bound
# uses test_distributed's (STEPS + 1) count, a little looser. Applied to the magnitude compared
# (the largest pinned loss of the twin): (4 + 1) * 2 * 4 * sqrt(352) * 2**-24 = 4.5e-5 relative.
REL_TOL = (STEPS + 1) * 2 * 4 * 352 ** 0.5 * 2.0 ** -24


def versions() -> str:
    from importlib.metadata import version

    now = {p: version(p) for p in ("torch", "transformers", "trl", "peft")}
    pinned = {p: PINS["generated_with"].get(p) for p in now}
    return f"pinned with {pinned}, running {now}" + ("" if now == pinned else " (versions differ)")


def test_every_demo_twin_is_pinned():
    assert sorted(PINS["twins"]) == TWINS, "pin the new twin: python scripts/pin_losses.py NAME"


@pytest.mark.parametrize("name", TWINS)
def test_losses_equal_pinned(name, tmp_path):
    from llama_recipes import pipeline
    from llama_recipes.schema import load_recipe

    pin = PINS["twins"].get(name)
    assert pin, f"{name} has no pin: python scripts/pin_losses.py {name}"
    assert f"training.max_steps={STEPS}" in pin["overrides"]
    recipe = load_recipe(ROOT / "recipes" / "demo" / f"{name}.yaml", [*pin["overrides"], f"output_dir={tmp_path}"])
    run = pipeline.train(recipe)
    got = [h["loss"] for h in run.trainer.state.log_history if "loss" in h]
    if "rewards" in pin:  # online RL (grpo): the sampled completions' mean reward of every step, exactly
        rewards = [h["reward"] for h in run.trainer.state.log_history if "reward" in h]
        assert rewards == pytest.approx(pin["rewards"], abs=1e-6), f"{name}: rewards {rewards} != {pin['rewards']}"

    # A twin whose arithmetic has a second kernel path (QLoRA: bitsandbytes' AVX512 C kernels for the
    # double-quantized absmax vs its generic torch ops on other CPUs) keeps one pin per path under
    # "paths"; the run must equal one of them. A refactor that changes the numbers equals none.
    candidates = {"pinned": pin["losses"], **pin.get("paths", {})}
    assert all(len(c) == STEPS for c in candidates.values()) and len(got) == STEPS, f"{name}: logged {got}"
    atol = REL_TOL * max(abs(x) for c in candidates.values() for x in c)
    if not any(all(abs(a - b) <= atol for a, b in zip(got, c)) for c in candidates.values()):
        expected = torch.tensor(pin["losses"], dtype=torch.float64)
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), expected, rtol=0, atol=atol,
                                   msg=lambda m: f"{name}: losses {got} != pinned {candidates}; {versions()}\n{m}")
