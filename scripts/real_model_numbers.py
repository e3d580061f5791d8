"""The demos' measured numbers in the docs, from the demo runs' metrics.json (so the docs cannot drift).

    python run_recipe.py recipes/demo/tiny_lora.yaml                # `make demo` (under a minute)
    python run_recipe.py recipes/demo/smollm2_lora.yaml             # each real-model demo once (about 5 min each)
    python run_recipe.py recipes/demo/smollm2_classifier_head.yaml
    python run_recipe.py recipes/demo/smollm2_chat_lora.yaml
    python run_recipe.py recipes/demo/smollm2_grpo.yaml
    python scripts/real_model_numbers.py [--wall-pending] [DEMO ...]  # collect + rewrite the docs' blocks

Collects each run's held-out numbers before/after training and its wall time into
docs/real_model_numbers.json, generates two held-out examples before (the base) and after (the
artifact) with the same loader and greedy decoding as `--eval-only`, and rewrites the blocks between
the markers: `demo-numbers` in README.md (tiny_lora), `real-model-numbers` in docs/real_models.md
(the smollm2 demos), `dpo-numbers` (README, docs/preference.md), `harness-numbers` in docs/evaluation.md
(our numbers beside lm-evaluation-harness's on the same rows), `grpo-numbers` (README, docs/rl.md). A demo that has not run keeps its previous entry. `--wall-pending` marks the
wall times as measured on a busy machine (to be re-measured idle). tests/test_docs_numbers.py checks
that the blocks are the rendering of the JSON file; tests/test_demo_numbers.py (slow) reruns the
demos and compares their numbers with the file's.
"""
import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NUMBERS = ROOT / "docs" / "real_model_numbers.json"
# (doc, marker name, the demos its block shows, whether it shows held-out examples)
BLOCKS = [
    (ROOT / "README.md", "demo-numbers", ["tiny_lora"], False),
    (ROOT / "README.md", "dpo-numbers", ["smollm2_dpo"], False),
    (ROOT / "README.md", "grpo-numbers", ["smollm2_grpo"], False),
    (ROOT / "docs" / "rl.md", "grpo-numbers", ["smollm2_grpo"], False),
    (ROOT / "docs" / "real_models.md", "real-model-numbers", ["smollm2_lora", "smollm2_chat_lora",
                                                              "smollm2_classifier_head"], True),
    (ROOT / "docs" / "preference.md", "dpo-numbers", ["smollm2_dpo"], False),
    (ROOT / "docs" / "evaluation.md", "harness-numbers", ["smollm2_lora", "smollm2_classifier_head", "smollm2_dpo"],
     False),
]
DEMOS = list(dict.fromkeys(name for _, _, names, _ in BLOCKS for name in names))
N_EXAMPLES = 2


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def recipe_of(name: str):
    from llama_recipes.schema import load_recipe

    return load_recipe(ROOT / "recipes" / "demo" / f"{name}.yaml")


KEEP = ("loss", "perplexity", "exact_match", "rougeL", "accuracy", "macro_f1", "majority_baseline",
        "preference_accuracy", "logp_margin", "reward_accuracy", "reward_mean", "completion_length_mean",
        "examples", "tokens")
REWARD_KEYS = ("reward_mean_", "reward_pass_rate_")  # GRPO: one of each per reward, named after it


def numbers_of(result: dict | None) -> dict:
    """The recorded numbers of one eval result (metrics.json's eval_before / eval_after)."""
    out = {k: v for k, v in (result or {}).items() if k in KEEP or k.startswith(REWARD_KEYS)}
    tasks = ((result or {}).get("harness") or {}).get("tasks") or {}
    for task in tasks.values():  # lm-eval's numbers beside ours: a generation task's exact match, a choice task's acc
        for metric in ("exact_match", "acc"):
            if metric in task["metrics"]:
                out[f"harness_{metric}"] = task["metrics"][metric]
    return out


def summarize(name: str) -> dict | None:
    """The numbers of one finished demo run, or None when it has not run."""
    recipe = recipe_of(name)
    path = ROOT / recipe.output_dir / "metrics.json"
    if not path.is_file():
        return None
    m = json.loads(path.read_text())

    return {"recipe": f"recipes/demo/{name}.yaml", "method": recipe.method.name, "steps": m["train"]["global_step"],
            "trainable_params": m["trainable_params"], "total_params": m["total_params"],
            "before": numbers_of(m.get("eval_before")), "after": numbers_of(m.get("eval_after")),
            "train_seconds": round(m["train"].get("train_runtime", 0.0)), "wall_seconds": round(m["wall_seconds"])}


def examples_of(name: str) -> list[dict]:
    """N_EXAMPLES held-out prompts answered greedily by the base and by the trained artifact."""
    recipe = recipe_of(name)
    if recipe.method.name in ("classifier_head", "mlp_head") or recipe.objective.name != "sft":
        return []  # an untrained head's "before" answer is a random label; preference pairs have no one answer
    from llama_recipes import artifacts, data, measure

    _, eval_raw, _ = data.build_datasets(recipe.data)  # rendered as training saw them
    tok, _ = artifacts.load(recipe, ROOT / recipe.output_dir)
    _, all_refs, _, _ = measure.generation_pairs(eval_raw, tok)
    picked = [i for i, r in enumerate(all_refs) if r not in all_refs[:i]][:N_EXAMPLES]  # distinct answers
    rows = eval_raw.select(picked)
    prompts, refs, special, stop = measure.generation_pairs(rows, tok)
    if "messages" in rows.column_names:
        shown = [r["messages"][-2]["content"] for r in rows]  # the user turn
    else:  # the alpaca prompt: show its input
        shown = [p.split("### Input:", 1)[-1].split("### Response:", 1)[0].strip() for p in prompts]
    out = [{"prompt": s, "reference": r} for s, r in zip(shown, refs)]
    for tag, path in (("before", None), ("after", ROOT / recipe.output_dir)):
        tok, model = artifacts.load(recipe, path)
        model.eval()
        for row, pred in zip(out, measure.generate(model, tok, prompts, recipe.eval.max_new_tokens,
                                                             add_special_tokens=special, stop_ids=stop)):
            row[tag] = pred.strip()
    return out


def unit_of(after: dict) -> str:
    if "preference_accuracy" in after:
        return "pairs"
    return "prompts, greedy" if "reward_mean" in after else "rows"


def _fmt(v, key: str) -> str:
    if v is None:
        return "–"
    if key == "perplexity":
        return f"{v:,.2f}" if v < 1e4 else f"{v:,.0f}"
    if key == "completion_length_mean":
        return f"{v:.1f}"
    return f"{v:.3f}"


LABELS = {"loss": "eval loss", "perplexity": "perplexity", "exact_match": "exact match (greedy)",
          "rougeL": "ROUGE-L", "accuracy": "accuracy", "macro_f1": "macro F1", "majority_baseline": "majority class",
          "preference_accuracy": "preference accuracy (log p chosen > rejected)", "logp_margin": "log-prob margin",
          "reward_accuracy": "implicit-reward accuracy (vs the reference)",
          "harness_exact_match": "exact match on the SFT task's rows, through lm-eval (builtin:pydoc_package_gen)",
          "harness_acc": "6-way multiple choice on the same rows, through lm-eval (acc)",
          "reward_mean": "mean reward (weighted total)", "completion_length_mean": "completion length (tokens)"}


def label_of(key: str) -> str:
    """A row's label: LABELS, or a GRPO reward's own row (`reward_mean_<name>`, `reward_pass_rate_<name>`)."""
    if key.startswith("reward_pass_rate_"):
        return f"pass rate of reward `{key[len('reward_pass_rate_'):]}`"
    if key.startswith("reward_mean_"):
        return f"mean of reward `{key[len('reward_mean_'):]}`"
    return LABELS[key]


def row_keys(before: dict, after: dict) -> list[str]:
    """The table's rows in order: LABELS' keys, with the per-reward rows right after the mean reward."""
    keys = [k for k in LABELS if k in before or k in after]
    rewards = [k for k in dict.fromkeys([*after, *before]) if k.startswith(REWARD_KEYS)
               and "reward_pass_rate_" + k.removeprefix("reward_mean_") not in after]  # a 0/1 reward's mean is its pass rate
    at = keys.index("reward_mean") + 1 if "reward_mean" in keys else len(keys)
    return keys[:at] + rewards + keys[at:]


def render(data: dict, block: tuple) -> str:
    """A doc's block: one table per demo, its examples, its wall time."""
    _, marker, names, with_examples = block
    start, end = markers(marker)
    lines = [start, ""]
    for name in names:
        d = data["demos"].get(name)
        if d is None:
            lines += [(f"**`{name}`**: not measured yet (`python run_recipe.py recipes/demo/{name}.yaml`, then "
                       "`python scripts/real_model_numbers.py`)."), ""]
            continue
        lines += [(f"**`{d['recipe']}`** ({d['method']}, {d['steps']} steps, {d['trainable_params']:,} of "
                   f"{d['total_params']:,} parameters train)"), "",
                  f"| held-out ({d['after'].get('examples') or d['before'].get('examples') or '?'} "
                  f"{unit_of(d['after'])}) | before | after |",
                  "|---|---|---|"]
        for key in row_keys(d["before"], d["after"]):
            lines.append(f"| {label_of(key)} | {_fmt(d['before'].get(key), key)} | {_fmt(d['after'].get(key), key)} |")
        wall = f"{d['wall_seconds']} s in all, {d['train_seconds']} s of training"
        if d.get("wall_pending"):
            wall += " — measured on a busy shared machine, pending re-measurement on idle cores"
        lines += ["", f"Wall time: {wall} ({d['cpu']}).", ""]
        for i, ex in enumerate(d.get("examples", []) if with_examples else [], 1):
            prompt = ex["prompt"].replace("\n", " ").strip()
            lines += [f"Example {i}: {_quote(prompt, 300)}", "",
                      f"- reference: {_quote(ex['reference'])}",
                      f"- before: {_quote(ex['before'])}",
                      f"- after: {_quote(ex['after'])}", ""]
    lines.append(end)
    return "\n".join(lines)


def _quote(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."
    return "`" + text.replace("`", "'") + "`"


def replace_block(text: str, rendered: str, block: tuple) -> str:
    doc, marker = block[:2]
    start, end = markers(marker)
    if start not in text or end not in text:
        sys.exit(f"{doc.relative_to(ROOT)} has no {start} ... {end} block")
    head, rest = text.split(start, 1)
    return head + rendered + rest.split(end, 1)[1]


def cpu_line() -> str:
    import torch

    flags = ""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    name = next((ln.split(":", 1)[1].strip() for ln in flags.splitlines() if ln.startswith("model name")),
                platform.processor() or "?")
    return f"{name}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}{' (native bf16)' if bf16 else ''}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wall-pending", action="store_true", help="wall times from a busy machine: mark them pending")
    p.add_argument("--no-examples", action="store_true", help="keep the stored examples (no model load)")
    p.add_argument("demos", nargs="*", choices=[[], *DEMOS], metavar="DEMO",
                   help=f"collect only these (default: all of {', '.join(DEMOS)}); the others keep their entries")
    args = p.parse_args()
    data = json.loads(NUMBERS.read_text()) if NUMBERS.is_file() else {"demos": {}}
    for name in args.demos or DEMOS:
        entry = summarize(name)
        if entry is None:
            print(f"{name}: no metrics.json yet (run the recipe); keeping the stored entry", file=sys.stderr)
            continue
        old = data["demos"].get(name, {})
        with_examples = any(w for _, _, names, w in BLOCKS if name in names)
        entry["examples"] = old.get("examples", []) if args.no_examples or not with_examples else examples_of(name)
        entry["wall_pending"] = args.wall_pending
        entry["cpu"] = cpu_line()
        data["demos"][name] = entry
    NUMBERS.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    for block in BLOCKS:
        doc = block[0]
        doc.write_text(replace_block(doc.read_text(), render(data, block), block))
        print(render(data, block))
    return 0


if __name__ == "__main__":
    sys.exit(main())
