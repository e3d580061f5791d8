"""`objective: {name: grpo}`: GRPO's settings beyond TRL's snapshot, and its `rewards:` list.

    objective:
      name: grpo
      num_generations: 4          # group size (TRL's GRPOConfig fields, typed from the snapshot)
      max_completion_length: 16
      beta: 0.0
      rewards:
        - exact_match: answer     # 1 if the completion (or what `extract` captures) equals the column
          extract: '(\\w+)'
          weight: 1.0
        - regex: '^\\s*\\w+\\s*$'   # 1 if the pattern is found in the completion
          weight: 0.5
        - length_penalty: 8       # -(tokens beyond 8) / (max_completion_length - 8), in [-1, 0]
        - reward_model: outputs/my_rm      # an AutoModelForSequenceClassification dir (or a reward run's adapter)
        - function: my_rewards.py:score    # YOUR code, run by design; the path is relative to the recipe

Only fields and cheap checks live here (no file is imported, nothing heavy loads): the reward
functions are built by llama_recipes/rewards.py, the objective by llama_recipes/objectives/grpo.py.
A user function file is read (parsed, never executed) at validation so that a missing file or
function or a wrong signature fails before the model loads.
"""
from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from llama_recipes.schema.base import Section

# TRL 1.16's GRPOConfig fields that live in `objective:` (everything else of GRPOConfig is `training:`).
SETTINGS = (
    # the group and its generation
    "num_generations", "num_generations_eval", "max_completion_length", "temperature", "top_p", "top_k", "min_p",
    "repetition_penalty", "generation_kwargs", "generation_batch_size", "steps_per_generation",
    # the loss
    "beta", "num_iterations", "epsilon", "epsilon_high", "delta", "loss_type", "scale_rewards",
    "importance_sampling_level", "mask_truncated_completions", "top_entropy_quantile", "multi_objective_aggregation",
    "reward_weights", "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps",
    # the generation engine (vLLM is TRL's passthrough: validated, refused where it cannot run)
    "use_vllm", "vllm_mode",
)
LOSS = Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "vespo", "luspo"]
TYPES = {
    "loss_type": LOSS,
    "scale_rewards": Literal["group", "batch", "none"] | bool,
    "importance_sampling_level": Literal["token", "sequence"],
    "multi_objective_aggregation": Literal["sum_then_normalize", "normalize_then_sum"],
    "vllm_mode": Literal["server", "colocate"],
}
LIMITS = {
    "num_generations": {"ge": 2}, "num_generations_eval": {"ge": 1}, "max_completion_length": {"gt": 0},
    "temperature": {"gt": 0}, "top_p": {"gt": 0, "le": 1}, "top_k": {"ge": 0}, "min_p": {"ge": 0, "le": 1},
    "repetition_penalty": {"gt": 0}, "generation_batch_size": {"gt": 0}, "steps_per_generation": {"gt": 0},
    "num_iterations": {"gt": 0}, "epsilon": {"ge": 0}, "epsilon_high": {"ge": 0}, "delta": {"gt": 0},
    "top_entropy_quantile": {"gt": 0, "le": 1},
}
# Ours differ from TRL's for CPU-sized runs: 512 completion tokens x 8 generations per prompt is
# minutes per step on a CPU; a verifiable short answer needs a few dozen.
DEFAULTS = {"max_completion_length": 64}
DOC = ("GRPO (Shao et al., 2024; TRL's GRPOTrainer): sample `num_generations` completions per prompt, score them "
       "with the recipe's `rewards`, and push the policy toward the completions that beat their group's mean. "
       "Trains on prompt_only data (a `prompt` plus the columns rewards read). A reference model (for the KL "
       "term) only when beta > 0. max_completion_length defaults to 64 here (TRL: 512). See docs/rl.md.")
KINDS = ("exact_match", "regex", "length_penalty", "reward_model", "function")
# What a user reward function is called with (TRL's reward-function convention) besides the data's columns.
CALL_KEYWORDS = ("prompts", "completions", "completion_ids")


class RewardConfig(Section):
    """One reward: exactly one of exact_match, regex, length_penalty, reward_model, function."""

    exact_match: str | None = Field(None, description="Column holding the expected answer: reward 1 when the "
                                    "completion (or what `extract` captures from it) equals it, else 0.")
    extract: str | None = Field(None, description="exact_match: a regex whose first group (or whole match) is the "
                                "final answer; no match scores 0 (e.g. 'answer: (\\w+)').")
    ignore_case: bool = Field(True, description="exact_match: compare case-insensitively, surrounding whitespace "
                              "and a final period stripped.")
    regex: str | None = Field(None, description="A format reward: 1 when the pattern is found in the completion "
                              "(re.search; anchor it with ^...$ for the whole completion), else 0.")
    length_penalty: int | None = Field(None, ge=0, description="A length penalty: completions longer than this many "
                                       "tokens score -(excess) / (max_completion_length - this), down to -1; "
                                       "shorter ones 0.")
    reward_model: str | None = Field(None, description="A reward model directory: a saved "
                                     "AutoModelForSequenceClassification (num_labels 1), or the output_dir of a "
                                     "`objective: reward` run (adapter + its recipe.yaml). Scores prompt+completion.")
    function: str | None = Field(None, description="PATH.py:FUNCTION, your own reward in Python, relative to the "
                                 "recipe file. This RUNS YOUR CODE (by design, only from the file the recipe names). "
                                 "Called as f(prompts=, completions=, completion_ids=, **columns) -> one float per "
                                 "completion.")
    weight: float = Field(1.0, description="Weight of this reward in the total (TRL's reward_weights).")
    name: str | None = Field(None, description="Name in logs and metrics (default: derived from the reward).")

    @field_validator("extract", "regex")
    @classmethod
    def _compiles(cls, v, info):
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"{info.field_name}: not a valid regular expression ({e})") from None
        return v

    @model_validator(mode="after")
    def _one_kind(self):
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"each reward names exactly one of {', '.join(KINDS)} (got "
                             f"{', '.join(given) or 'none'}); write several rewards as several list items")
        if self.extract is not None and self.exact_match is None:
            raise ValueError("`extract` belongs to an exact_match reward")
        if self.function is not None:
            path, sep, func = self.function.rpartition(":")
            if not sep or not path.endswith(".py") or not func.isidentifier():
                raise ValueError(f"function {self.function!r}: write PATH.py:FUNCTION (e.g. my_rewards.py:score)")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    def label(self) -> str:
        """The reward's name in logs and metrics (unique per recipe: checked by the section)."""
        if self.name:
            return self.name
        value = getattr(self, self.kind)
        if self.kind == "exact_match":
            return f"exact_match_{value}"
        if self.kind == "function":
            return value.rpartition(":")[2]
        if self.kind == "reward_model":
            return "rm_" + Path(value).name
        return self.kind


class GrpoSection(Section):
    """Base of the grpo objective's section: the snapshot's settings are added by schema/objective.py."""

    rewards: list[RewardConfig] = Field(default_factory=list,  # not a GRPOConfig field
                                        description="What the completions are scored by (several: weighted sum).")

    @model_validator(mode="after")
    def _grpo(self):
        if not self.rewards:
            raise ValueError("objective.rewards: GRPO needs at least one reward (exact_match, regex, length_penalty, "
                             "reward_model or function; docs/rl.md)")
        names = [r.label() for r in self.rewards]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"objective.rewards: two rewards are named {dupes[0]!r}: give them distinct `name:`s")
        if getattr(self, "reward_weights", None) is not None:
            raise ValueError("objective.reward_weights: give each reward its own `weight:` in objective.rewards")
        if getattr(self, "use_vllm", False) and importlib.util.find_spec("vllm") is None:
            raise ValueError("objective.use_vllm: vLLM is not installed (it needs a CUDA GPU and `pip install vllm`); "
                             "set use_vllm: false to generate with transformers (CPU or one GPU)")
        level, loss = getattr(self, "importance_sampling_level", "token"), getattr(self, "loss_type", "dapo")
        if loss == "luspo" and level != "sequence":
            raise ValueError("objective.loss_type luspo needs importance_sampling_level: sequence")
        if loss == "vespo" and level != "token":
            raise ValueError("objective.loss_type vespo needs importance_sampling_level: token")
        if level == "sequence" and loss in ("bnpo", "dr_grpo", "dapo", "cispo"):
            raise ValueError(f"objective.loss_type {loss} normalises per token: with importance_sampling_level "
                             "sequence use loss_type grpo (or luspo)")
        return self


def function_problem(path: Path, func: str) -> str:
    """'' if `path` defines a top-level `func` that accepts TRL's reward call, else what is wrong (parsed, not run)."""
    if not path.is_file():
        return f"file {path} not found"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError) as e:
        return f"{path} does not parse as Python: {e}"
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == func]
    if not defs:
        assigned = any(isinstance(n, (ast.Assign, ast.ImportFrom, ast.Import)) and func in ast.dump(n) for n in tree.body)
        if not assigned:
            return f"{path} defines no function {func!r}"
        return ""  # bound by assignment or import: checked by inspect when it is loaded
    return signature_problem([a.arg for a in defs[-1].args.posonlyargs], [a.arg for a in defs[-1].args.args]
                             + [a.arg for a in defs[-1].args.kwonlyargs], defs[-1].args.kwarg is not None,
                             len(defs[-1].args.defaults) + sum(d is not None for d in defs[-1].args.kw_defaults))


def signature_problem(positional_only: list[str], named: list[str], var_kw: bool, n_defaults: int) -> str:
    """Whether f(prompts=..., completions=..., completion_ids=..., **columns) can bind."""
    if positional_only:
        return f"its parameters {positional_only} are positional-only; rewards are called with keywords"
    if "completions" not in named and not var_kw:
        return "it takes no `completions` parameter (expected: def f(completions, **kwargs) -> list[float])"
    if not var_kw:
        return ("it has no **kwargs: rewards are also given prompts, completion_ids and every data column "
                "(expected: def f(completions, **kwargs) -> list[float])")
    return ""


def anchor(data: dict, recipe_dir: Path) -> dict:
    """Make relative `function:` reward paths absolute against the recipe's directory (before validation)."""
    obj = data.get("objective") if isinstance(data, dict) else None
    rewards = obj.get("rewards") if isinstance(obj, dict) else None
    if not isinstance(rewards, list):
        return data
    out = []
    for r in rewards:
        f = r.get("function") if isinstance(r, dict) else None
        if isinstance(f, str) and ":" in f and not Path(f.rpartition(":")[0]).expanduser().is_absolute():
            path, _, func = f.rpartition(":")
            r = {**r, "function": f"{(recipe_dir / path).resolve()}:{func}"}
        out.append(r)
    return {**data, "objective": {**obj, "rewards": out}}


def check(recipe) -> None:
    """Cross-section checks of a grpo recipe (ValueError naming the reward and the fix): reward files exist,
    user code never comes from a data or model directory, the columns rewards read can be checked later."""
    local_dirs = []
    for ref in [recipe.model.name_or_path, *(s.path for s in recipe.data.sources())]:
        p = Path(str(ref)).expanduser()
        if p.exists():
            local_dirs.append((p if p.is_dir() else p.parent).resolve())
    for r in recipe.objective.rewards:
        if r.kind == "function":
            raw, _, func = r.function.rpartition(":")
            path = Path(raw).expanduser().resolve()
            inside = next((d for d in local_dirs if d in path.parents), None)
            if inside is not None:
                raise ValueError(f"objective.rewards {r.label()}: {path} lies inside the data or model directory "
                                 f"{inside}; reward code never runs from a dataset or a model: keep your reward file "
                                 "next to the recipe")
            problem = function_problem(path, func)
            if problem:
                raise ValueError(f"objective.rewards {r.label()} ({r.function}): {problem}")
        if r.kind == "reward_model":
            p = Path(r.reward_model).expanduser()
            if not p.is_dir():
                raise ValueError(f"objective.rewards {r.label()}: reward_model directory {p} not found (train one "
                                 "with `objective: reward`, docs/rl.md)")
            if not any((p / m).is_file() for m in ("config.json", "adapter_config.json")):
                raise ValueError(f"objective.rewards {r.label()}: {p} holds no model (no config.json or "
                                 "adapter_config.json)")
