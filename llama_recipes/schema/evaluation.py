"""`eval:` section: what is measured on the held-out split (before/after training and with --eval-only)."""
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from llama_recipes.schema.base import SEED_MAX, Section, expand_user

GenerationMetric = Literal["rouge", "exact_match", "f1"]
HARNESS_BUILTIN = "builtin:"  # builtin:NAME = llama_recipes/assets/harness/NAME.yaml (offline tasks over bundled data)
HARNESS_TASKS_DIR = Path(__file__).resolve().parent.parent / "assets" / "harness"


def is_task_file(entry: str) -> bool:
    """A harness task entry that names a local task YAML (else it is a harness task name)."""
    return entry.endswith((".yaml", ".yml"))


class HarnessConfig(Section):
    tasks: list[str] = Field(
        min_length=1,
        description="Harness task names (hellaswag, mmlu: the network, once), local task YAMLs (relative to the "
        "recipe) or builtin:NAME, offline tasks over bundled data (pydoc_package_mc, pydoc_package_gen, topic_mc, topic_gen).",
    )
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples per prompt (None: each task's own default, else 0).")
    limit: int | None = Field(None, gt=0, description="Evaluate only the first N documents of each task.")
    batch_size: int = Field(16, gt=0, description="Batch size of the harness's log-likelihood and generation requests.")

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, tasks):
        out = []
        for entry in expand_user(tasks):
            entry = entry.strip()
            if not entry:
                raise ValueError("an empty task name")
            if entry.startswith(HARNESS_BUILTIN):
                name = entry[len(HARNESS_BUILTIN):]
                if not (HARNESS_TASKS_DIR / f"{name}.yaml").is_file():
                    have = sorted(HARNESS_BUILTIN + p.stem for p in HARNESS_TASKS_DIR.glob("*.yaml"))
                    raise ValueError(f"no builtin harness task {entry!r} (builtin ones: {', '.join(have)})")
            elif is_task_file(entry) and not os.path.isfile(entry):
                raise ValueError(f"task file {entry!r} not found (a relative path is read relative to the recipe file)")
            out.append(entry)
        if len(set(out)) != len(out):
            raise ValueError(f"a task is listed twice: {sorted(t for t in set(out) if out.count(t) > 1)}")
        return out


def resolve_task_paths(data: dict, recipe_dir: Path) -> dict:
    """eval.harness.tasks entries that are local task YAMLs, made absolute relative to the recipe's directory.

    Called on the raw recipe dict (before validation), so the saved recipe.yaml and --eval-only
    from another directory name the same file.
    """
    harness = (data.get("eval") or {}).get("harness") if isinstance(data.get("eval"), dict) else None
    tasks = harness.get("tasks") if isinstance(harness, dict) else None
    if not isinstance(tasks, list):
        return data
    resolved = []
    for t in tasks:
        if isinstance(t, str) and is_task_file(t) and not os.path.isabs(os.path.expanduser(t)) \
                and (recipe_dir / t).is_file():
            t = str((recipe_dir / t).resolve())
        resolved.append(t)
    harness["tasks"] = resolved
    return data


class EvalConfig(Section):
    before_after: bool = Field(True, description="Evaluate the model before and after training and report both.")
    generate: bool = Field(
        True, description="Greedy-generate answers for eval prompts (prompt/completion data) and score `metrics`."
    )
    metrics: list[GenerationMetric] = Field(
        default_factory=lambda: ["rouge", "exact_match", "f1"],
        description="Generation metrics: rouge (ROUGE-1/2/L F), exact_match (normalised), f1 (token-level). "
        "Loss and perplexity on supervised tokens are always reported.",
    )
    max_new_tokens: int = Field(32, gt=0, description="Generation length limit; generation also stops at EOS.")
    batch_size: int = Field(16, gt=0, description="Batch size for eval loss and generation.")
    limit: int | None = Field(None, gt=0, description="Evaluate only the first N eval examples (and N rows of each retain set).")
    seed: int = Field(42, ge=0, le=SEED_MAX, description="Seed set before evaluating, so repeated evals give identical numbers.")
    retain: list[str] = Field(
        default_factory=list,
        description="Forgetting check: datasets (builtin:retain, a .jsonl/.json/.csv/.parquet file or directory) whose "
        "loss/perplexity --eval-only reports for the base model, the artifact and the difference.",
    )

    harness: HarnessConfig | None = Field(
        None, description="EleutherAI lm-evaluation-harness tasks run before/after training and by --eval-only "
        "(results under `harness` in metrics.json and eval_results.json). Needs pip install -e \".[harness]\".",
    )

    _paths = field_validator("retain")(expand_user)
