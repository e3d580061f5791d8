"""Train every method's tiny twin briefly and print the table in docs/methods.md.

    OMP_NUM_THREADS=1 python scripts/measure_methods.py [STEPS]
"""
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llama_recipes import pipeline  # noqa: E402
from llama_recipes.schema import load_recipe  # noqa: E402

TWINS = ["lora", "dora", "qlora", "llama_adapter", "prefix", "prompt_tuning", "ia3"]


def main(steps: int = 30) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for twin in TWINS:
            recipe = load_recipe(ROOT / f"recipes/demo/tiny_{twin}.yaml", [
                f"output_dir={tmp}/{twin}", f"training.max_steps={steps}", "training.logging_steps=10",
                "training.per_device_train_batch_size=8", "training.warmup_steps=0",
                "training.report_to=none", "eval.limit=64", "eval.generate=false"])
            m = pipeline.train(recipe).metrics
            rows.append((twin, m["trainable_params"], 100 * m["trainable_params"] / m["total_params"],
                         m["adapter_mb"] * 1024, m["adapter_pct_of_base"], m["eval_before"]["loss"],
                         m["eval_after"]["loss"], m["train"]["train_runtime"]))
    print(f"| method | trainable | % of total | adapter KB | % of base size | eval loss before | after "
          f"({steps} steps) | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:,} | {r[2]:.3f} | {r[3]:.1f} | {r[4]:.2f} | {r[5]:.3f} | {r[6]:.3f} | {r[7]:.1f} |")
    json.dump(rows, sys.stderr)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
