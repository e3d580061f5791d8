"""docs/evaluation.md's forgetting table, from runs (so it cannot drift from the code).

    python scripts/forgetting_table.py            # 3 trainings + 4 evals of the tiny model (minutes on CPU)
    python scripts/forgetting_table.py --render   # rewrite the doc from docs/forgetting_numbers.json only

Runs exactly the commands docs/evaluation.md shows (tiny_lora on builtin:demo, 100 steps, LoRA vs
full at two learning rates, then `--eval-only` with the retain set builtin:retain, and `--eval-only
--base`), stores what they measured in docs/forgetting_numbers.json and rewrites the block between
the `forgetting-table` markers. tests/test_docs_numbers.py checks that the block is the rendering of
the file.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "evaluation.md"
NUMBERS = ROOT / "docs" / "forgetting_numbers.json"
START, END = "<!-- forgetting-table:start -->", "<!-- forgetting-table:end -->"
RECIPE = "recipes/demo/tiny_lora.yaml"
COMMON = ["data.path=builtin:demo", "training.max_steps=100", "training.bf16=false", "training.report_to=none",
          "eval.retain=[builtin:retain]"]
# (row label, learning rate shown, run directory name, overrides): the doc's three commands
RUNS = [("LoRA r=16, all-linear", "2e-3", "lora", []),
        ("full", "2e-3", "full2", ["method={name: full}"]),
        ("full", "5e-4", "full", ["method={name: full}", "training.learning_rate=5e-4"])]


def cli(*args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run([sys.executable, str(ROOT / "run_recipe.py"), *args], cwd=ROOT, env=env, check=True)


def measure(work: Path) -> dict:
    rows = []
    for label, lr, name, extra in RUNS:
        out = work / name
        over = [f"output_dir={out}", *COMMON, *extra]
        cli(RECIPE, *over)
        cli(RECIPE, *over, "--eval-only")
        res = json.loads((out / "eval" / "eval_results.json").read_text())
        retain = res["retain"]["builtin:retain"]
        rows.append({"method": label, "lr": lr, "trainable": json.loads((out / "metrics.json").read_text())["trainable_params"],
                     "loss": res["metrics"]["loss"], "perplexity": res["metrics"]["perplexity"],
                     "rougeL": res["metrics"]["rougeL"], "exact_match": res["metrics"]["exact_match"],
                     "retain_loss": retain["artifact"]["loss"], "retain_perplexity": retain["artifact"]["perplexity"],
                     "retain_delta": retain["delta_loss"]})
    lora = work / "lora"
    cli(RECIPE, f"output_dir={lora}", *COMMON, "--eval-only", "--base")
    base = json.loads((lora / "eval" / "base" / "eval_results.json").read_text())
    r = base["retain"]["builtin:retain"]["base"]
    return {"measured": str(date.today()), "examples": base["examples"] if "examples" in base else None,
            "base": {"loss": base["metrics"]["loss"], "retain_loss": r["loss"], "retain_perplexity": r["perplexity"]},
            "rows": rows}


def render(data: dict) -> str:
    b = data["base"]
    lines = [START, "",
             f"Base model: task loss {b['loss']:.2f}, retain loss {b['retain_loss']:.3f} (ppl {b['retain_perplexity']:.2f}). "
             f"Measured {data['measured']} by `python scripts/forgetting_table.py` (the commands below).", "",
             "| method | lr | trainable params | task loss (ppl) | ROUGE-L | exact match | retain loss (ppl) | retain delta |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['method']} | {r['lr']} | {r['trainable']:,} | {r['loss']:.3f} ({r['perplexity']:.1f}) | "
                     f"{r['rougeL']:.3f} | {r['exact_match']:.3f} | {r['retain_loss']:.3f} ({r['retain_perplexity']:.2f}) | "
                     f"**{r['retain_delta']:+.3f}** |")
    lines += ["", END]
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    if START not in text or END not in text:
        sys.exit(f"{DOC} has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    return head + block + rest.split(END, 1)[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--render", action="store_true", help="only rewrite the doc from the stored numbers")
    args = p.parse_args()
    if not args.render:
        with tempfile.TemporaryDirectory() as work:
            NUMBERS.write_text(json.dumps(measure(Path(work)), indent=2) + "\n")
    data = json.loads(NUMBERS.read_text())
    DOC.write_text(replace_block(DOC.read_text(), render(data)))
    print(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
