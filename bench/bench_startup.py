"""6. Start-up: command to first optimizer step for the demo recipe, and the light commands.

- `imports`: torch, transformers, trl, peft, datasets, imported first thing by the probe in the
  same process that then trains (what any training run pays before its first step).
- `first_step`: `run_recipe.py recipes/demo/tiny_lora.yaml` (through first_step_probe.py, which
  exits at the end of step 1), as shipped (eval before training included) and with
  eval.before_after=false.
- `--help`, a validation error (unknown key), `--estimate-memory` on the demo recipe and on the
  headline recipe (Llama-2-7B, lora_alpaca.yaml, --gpu-memory 24GB): these must stay off the
  heavy imports (the estimate reads config.json; run with HF_HUB_OFFLINE=1 where there is no network).
Each is the median of --repeat runs.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import common

PY = sys.executable
DEMO = str(common.ROOT / "recipes" / "demo" / "tiny_lora.yaml")


def timed(cmd, expect_rc=None):
    t0 = time.time()
    p = subprocess.run(cmd, cwd=common.ROOT, capture_output=True, text=True,
                       env={**os.environ, "LLR_T0": repr(t0)})
    wall = time.time() - t0
    if expect_rc is not None and p.returncode != expect_rc:
        raise RuntimeError(f"{cmd}: rc {p.returncode}, expected {expect_rc}\n{p.stderr[-2000:]}")
    return wall, p


def first_step(extra):
    out = tempfile.mkdtemp(prefix="llr-startup-")
    _, p = timed([PY, "bench/first_step_probe.py", DEMO, f"output_dir={out}", "training.report_to=none",
                  "--overwrite", *extra], expect_rc=0)
    line = next(x for x in p.stdout.splitlines() if x.startswith("FIRST_STEP "))
    return json.loads(line[len("FIRST_STEP "):])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)
    med = lambda xs: round(statistics.median(xs), 2)  # noqa: E731
    R = range(a.repeat)
    out = {
        "python_bare_s": med([timed([PY, "-c", "pass"], 0)[0] for _ in R]),
        "help_s": med([timed([PY, "run_recipe.py", "--help"], 0)[0] for _ in R]),
        "validation_error_s": med([timed([PY, "run_recipe.py", DEMO, "training.no_such_key=1"], 2)[0] for _ in R]),
    }
    if (common.ROOT / "llama_recipes" / "memory.py").exists():
        out["estimate_memory_s"] = med([timed([PY, "run_recipe.py", DEMO, "--estimate-memory"])[0] for _ in R])
        headline = str(common.ROOT / "recipes" / "lora_alpaca.yaml")  # Llama-2-7B: the shipped config.json
        out["estimate_memory_headline_s"] = med([timed([PY, "run_recipe.py", headline, "--estimate-memory",
                                                        "--gpu-memory", "24GB"], 0)[0] for _ in R])
    else:
        out["estimate_memory_s"] = None
        out["estimate_memory_note"] = "llama_recipes/memory.py not on this branch yet"
    shipped = [first_step([]) for _ in R]
    no_eval = [first_step(["eval.before_after=false"]) for _ in R]
    out["first_step_shipped_s"] = med([x["first_step"] for x in shipped])
    out["first_step_no_eval_s"] = med([x["first_step"] for x in no_eval])
    out["imports_s"] = med([x["imports_done"] for x in shipped + no_eval])
    out["imports_share_of_first_step_no_eval"] = round(
        statistics.median(x["imports_done"] / x["first_step"] for x in no_eval), 2)
    return common.save("startup", out)


if __name__ == "__main__":
    main()
