"""Regenerate tests/pinned_losses.json: the per-step training losses of every demo twin.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python scripts/pin_losses.py [TWIN ...]

Each recipe in recipes/demo/*.yaml runs in-process through the real pipeline
(`pipeline.train(load_recipe(path, overrides))`) for a few fp32 steps, one log per step; the
losses, the overrides used and the library versions go into the JSON that
tests/test_pinned_losses.py replays. With TWIN names only those entries are rewritten.

Rerun this only when a change of the numbers is intended (a library upgrade, a new default),
and say so in the commit: the pins exist so that a refactor which changes numbers fails.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMO = ROOT / "recipes" / "demo"
PINS = ROOT / "tests" / "pinned_losses.json"
# Shrinks every twin to 4 logged steps. fp32 (the demo's bf16: auto would pick bf16 on some
# CPUs only); no warmup, so the weights move from step 1 and steps 2-4 pin the update too.
COMMON = [
    "training.bf16=false",
    "training.max_steps=4",
    "training.logging_steps=1",
    "training.warmup_steps=0",
    "training.save_strategy=no",
    "training.report_to=none",
    "data.max_samples=64",
    "data.max_eval_samples=8",
    "eval.before_after=false",
]
# Per-twin additions to COMMON (none needed so far).
EXTRA: dict[str, list[str]] = {}


def twins() -> list[str]:
    # the tiny twins; real-model demos (smollm2_*) are not pinned (tests/test_builtin_models.py)
    return sorted(p.stem for p in DEMO.glob("*.yaml") if not p.stem.startswith("smollm2_"))


def overrides_for(name: str) -> list[str]:
    return [*COMMON, *EXTRA.get(name, [])]


def history(name: str, overrides: list[str], output_dir: Path) -> list[dict]:
    """Train the twin with `overrides` into output_dir; the trainer's log history."""
    from llama_recipes import pipeline
    from llama_recipes.schema import load_recipe

    recipe = load_recipe(DEMO / f"{name}.yaml", [*overrides, f"output_dir={output_dir}"])
    return pipeline.train(recipe).trainer.state.log_history


def losses(name: str, overrides: list[str], output_dir: Path) -> list[float]:
    """The loss of every logged step."""
    return [h["loss"] for h in history(name, overrides, output_dir) if "loss" in h]


def environment() -> dict:
    import torch

    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {
        **{p: version(p) for p in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes")},
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # the last commit that changed the package (the code the numbers come from), and whether
        # the working tree had uncommitted changes to it
        "llama_recipes_commit": git("log", "-1", "--format=%H", "--", "llama_recipes") or None,
        "llama_recipes_modified": bool(git("status", "--porcelain", "--", "llama_recipes")),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="twins to re-pin (default: all of recipes/demo/*.yaml)")
    p.add_argument("--path", metavar="LABEL", help="record the losses as a second kernel path's pin (paths.LABEL: "
                   "e.g. QLoRA on a CPU whose bitsandbytes kernels differ) instead of replacing the main pin")
    args = p.parse_args(argv)
    unknown = sorted(set(args.names) - set(twins()))
    if unknown:
        p.error(f"no demo twin named {', '.join(unknown)}; have: {', '.join(twins())}")
    pins = json.loads(PINS.read_text()) if PINS.exists() and args.names else {"twins": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.names or twins():
            ov = overrides_for(name)
            logged = history(name, ov, Path(tmp) / name)
            got = [h["loss"] for h in logged if "loss" in h]
            old = pins["twins"].get(name, {})
            if args.path:  # another kernel path's numbers beside the main pin (tests/test_pinned_losses.py)
                pins["twins"][name] = {**old, "paths": {**old.get("paths", {}), args.path: got}}
                print(f"{name} [{args.path}]: {got}", flush=True)
                continue
            pins["twins"][name] = {"overrides": ov, "losses": got, **({"paths": old["paths"]} if "paths" in old else {})}
            rewards = [h["reward"] for h in logged if "reward" in h]  # online RL (grpo): the mean reward per step
            if rewards:
                pins["twins"][name]["rewards"] = rewards
            print(f"{name}: {pins['twins'][name]['losses']}", flush=True)
    pins["generated_with"] = environment()
    pins["twins"] = dict(sorted(pins["twins"].items()))
    PINS.write_text(json.dumps({"generated_with": pins["generated_with"], "twins": pins["twins"]}, indent=1) + "\n")
    print(f"wrote {PINS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
