"""Derive the bundled preference sets from the bundled instruction sets (deterministic; no new text).

    python scripts/make_preference_data.py

Each row of an answer-from-a-closed-set task (topic of a sentence; the stdlib package a docstring
comes from) becomes a preference pair: the prompt as trained in SFT (the Alpaca template), the
right answer as `chosen`, and a plausible wrong one (another answer of the same set, drawn with a
fixed seed) as `rejected`. The unpaired (KTO) sets take the same prompts, alternating a right
(label true) and a wrong (label false) answer. The docstrings of builtin:pydoc_* come from CPython
3.11's standard library (PSF License); nobody on this project wrote the texts.

    builtin:topic_preference        tiny twins (DPO, ORPO, CPO, SimPO, reward)   1000 / 200 pairs
    builtin:topic_unpaired          tiny twin (KTO)                               1000 / 200 rows
    builtin:pydoc_preference        SmolLM2 demo: which package a docstring comes from   420 / 120 pairs
"""
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from llama_recipes.data import render_alpaca  # noqa: E402

DATA = ROOT / "llama_recipes" / "assets" / "data"


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {path.relative_to(ROOT)}")


def pairs(rows: list[dict], seed: int) -> list[dict]:
    answers = sorted({r["output"] for r in rows})
    rng = random.Random(seed)
    out = []
    for r in rows:
        wrong = rng.choice([a for a in answers if a != r["output"]])
        out.append({"prompt": render_alpaca(r)["prompt"], "chosen": r["output"], "rejected": wrong})
    return out


def unpaired(rows: list[dict], seed: int) -> list[dict]:
    out = []
    for i, p in enumerate(pairs(rows, seed)):
        good = i % 2 == 0
        out.append({"prompt": p["prompt"], "completion": p["chosen"] if good else p["rejected"], "label": good})
    return out


if __name__ == "__main__":
    for split, src in (("train", "train"), ("eval", "eval")):
        topic = read(DATA / "topic" / f"{src}.jsonl")
        write(DATA / "topic_preference" / f"{split}.jsonl", pairs(topic, seed=1 if split == "train" else 2))
        write(DATA / "topic_unpaired" / f"{split}.jsonl", unpaired(topic, seed=1 if split == "train" else 2))
        pydoc = read(DATA / "pydoc_package" / f"{src}.jsonl")
        write(DATA / "pydoc_preference" / f"{split}.jsonl", pairs(pydoc, seed=3 if split == "train" else 4))
