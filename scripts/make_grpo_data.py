"""Derive the bundled prompt-only (GRPO) sets from the bundled instruction sets (deterministic; no new text).

    python scripts/make_grpo_data.py

Each row of an answer-from-a-closed-set task becomes a prompt with its answer in an `answer`
column, which an exact-match reward reads (objective.rewards: [{exact_match: answer}]):

    builtin:topic_prompts    tiny twin: the Alpaca prompt as the SFT twins train on it (text)   400 / 100 rows
    builtin:pydoc_prompts    SmolLM2 demo: which stdlib package a docstring comes from, as a
                             one-turn conversation (the model's chat template renders it)        420 / 120 rows

The docstrings of builtin:pydoc_* come from CPython 3.11's standard library (PSF License).
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from llama_recipes.data import render_alpaca  # noqa: E402

DATA = ROOT / "llama_recipes" / "assets" / "data"
SIZES = {"topic_prompts": {"train": 400, "eval": 100}}


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write(name: str, split: str, rows: list[dict]) -> None:
    out = DATA / name
    out.mkdir(exist_ok=True)
    (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{out / split}.jsonl: {len(rows)} rows")


def main() -> None:
    for split in ("train", "eval"):
        rows = read(DATA / "topic" / f"{split}.jsonl")[: SIZES["topic_prompts"][split]]
        write("topic_prompts", split, [{"prompt": render_alpaca(r)["prompt"], "answer": r["output"]} for r in rows])
        rows = read(DATA / "pydoc_package" / f"{split}.jsonl")
        write("pydoc_prompts", split, [{"prompt": [{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"}],
                                        "answer": r["output"]} for r in rows])


if __name__ == "__main__":
    main()
