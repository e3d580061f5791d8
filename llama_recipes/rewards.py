"""Reward functions of a GRPO recipe (objective.rewards), in TRL's reward-function form.

    fns = rewards.build(recipe, tokenizer, columns)      # one callable per reward, in recipe order
    fns[0](prompts=[...], completions=[...], completion_ids=[[...]], answer=[...]) -> [1.0, 0.0, ...]

The same callables score training's groups (TRL's GRPOTrainer) and the before/after evaluation
(objectives/grpo.py), so a reward means one thing everywhere. Built-ins need no code; a reward
model scores prompt + completion with its one-output head; a user function is imported from the
file the recipe names (the only code run from a recipe, by design) and every value it returns is
checked: wrong length, NaN or a non-number is one error naming the reward.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from llama_recipes import modeling
from llama_recipes.errors import UserError, read_json
from llama_recipes.log import get_logger
from llama_recipes.schema.grpo import function_problem, signature_problem
from llama_recipes.schema.model import ModelConfig

log = get_logger(__name__)


def text_of(completion) -> str:
    """A completion as text: TRL passes conversational completions as [{"role": "assistant", "content": ...}]."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion if isinstance(m, dict))


def _norm(s: str, ignore_case: bool) -> str:
    s = s.strip().rstrip(".").strip()
    return s.lower() if ignore_case else s


class Reward:
    """One reward: a callable with TRL's signature, its name (TRL logs rewards/<name>/mean) and weight."""

    binary = False  # 0/1 valued: its mean over held-out prompts is a pass rate

    def __init__(self, cfg):
        self.cfg = cfg
        self.__name__ = cfg.label()
        self.weight = cfg.weight

    def __repr__(self) -> str:
        return f"<reward {self.__name__}>"

    def __call__(self, prompts=None, completions=None, completion_ids=None, **columns) -> list[float]:
        raise NotImplementedError


class ExactMatch(Reward):
    binary = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.pattern = re.compile(cfg.extract) if cfg.extract else None

    def answer(self, text: str) -> str | None:
        """The final answer of a completion: what `extract` captures (group 1, else the match), or the whole text."""
        if self.pattern is None:
            return text
        m = self.pattern.search(text)
        if m is None:
            return None
        return m.group(1) if m.groups() else m.group(0)

    def __call__(self, prompts=None, completions=None, completion_ids=None, **columns):
        expected = columns[self.cfg.exact_match]
        out = []
        for c, want in zip(completions, expected):
            got = self.answer(text_of(c))
            out.append(float(got is not None and _norm(got, self.cfg.ignore_case) == _norm(str(want), self.cfg.ignore_case)))
        return out


class Regex(Reward):
    binary = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.pattern = re.compile(cfg.regex)

    def __call__(self, prompts=None, completions=None, completion_ids=None, **columns):
        return [float(self.pattern.search(text_of(c)) is not None) for c in completions]


class LengthPenalty(Reward):
    def __init__(self, cfg, max_completion_length: int):
        super().__init__(cfg)
        self.span = max(1, max_completion_length - cfg.length_penalty)

    def __call__(self, prompts=None, completions=None, completion_ids=None, **columns):
        return [-min(1.0, max(0, len(ids) - self.cfg.length_penalty) / self.span) for ids in completion_ids]


class RewardModel(Reward):
    """A sequence classifier's score of prompt + completion (its tokenizer, its chat template for conversations)."""

    def __init__(self, cfg, tokenizer, model, batch_size: int = 8):
        super().__init__(cfg)
        self.tokenizer, self.model, self.batch_size = tokenizer, model, batch_size

    def __call__(self, prompts=None, completions=None, completion_ids=None, **columns):
        import torch

        texts = []
        for p, c in zip(prompts, completions):
            if isinstance(p, list):  # a conversation: rendered as the reward model was trained on it
                texts.append(self.tokenizer.apply_chat_template(p + list(c), tokenize=False))
            else:
                texts.append(p + text_of(c))
        device = next(self.model.parameters()).device
        scores = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                     padding_side="right", add_special_tokens=False).to(device)
                scores += self.model(**enc).logits[:, 0].float().tolist()
        return scores


class Function(Reward):
    """The user's own function (imported from the file the recipe names); its output is checked every call."""

    def __init__(self, cfg, fn, where: str):
        super().__init__(cfg)
        self.fn, self.where = fn, where

    def __call__(self, prompts=None, completions=None, completion_ids=None, **columns):
        try:
            out = self.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except Exception as e:  # noqa: BLE001 - the user's code: name it, and where it failed
            import traceback

            frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == self.where]
            at = f" at {self.where}:{frames[-1].lineno}" if frames else ""
            raise UserError(f"reward {self.__name__} ({self.cfg.function}) raised {type(e).__name__}: {e}{at}",
                            "fix the reward function (it is called with prompts=, completions=, completion_ids= "
                            "and the data's columns as keyword lists)") from None
        return check_output(self.__name__, out, len(completions))


def check_output(name: str, out, n: int) -> list[float]:
    """A reward function's return value as floats: one finite number per completion, else a UserError."""
    fix = "return a list with one finite float per completion (same order as `completions`)"
    if hasattr(out, "tolist"):  # numpy / torch
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise UserError(f"reward {name} returned {type(out).__name__}, not a list of numbers", fix)
    if len(out) != n:
        raise UserError(f"reward {name} returned {len(out)} values for {n} completions", fix)
    values = []
    for i, v in enumerate(out):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UserError(f"reward {name} returned {v!r} ({type(v).__name__}) for completion {i}, not a number", fix)
        if not math.isfinite(v):
            raise UserError(f"reward {name} returned {v} for completion {i}", fix + " (no NaN or infinity)")
        values.append(float(v))
    return values


def load_function(cfg):
    """Import PATH.py and take FUNCTION from it: the user's code runs here, and only here."""
    import importlib.util
    import inspect


    raw, _, name = cfg.function.rpartition(":")
    path = Path(raw).expanduser().resolve()
    problem = function_problem(path, name)
    if problem:
        raise UserError(f"reward {cfg.label()} ({cfg.function}): {problem}", "fix objective.rewards[].function")
    log.info("reward %s: running your code from %s (objective.rewards names it)", cfg.label(), path)
    spec = importlib.util.spec_from_file_location(f"llama_recipes_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's module failed to import
        raise UserError(f"reward {cfg.label()}: importing {path} raised {type(e).__name__}: {e}",
                        "fix the reward file (it is imported once, before training)") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"reward {cfg.label()}: {path} has no function {name!r}", "fix objective.rewards[].function")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return Function(cfg, fn, str(path))
    params = list(sig.parameters.values())
    problem = signature_problem([p.name for p in params if p.kind == p.POSITIONAL_ONLY],
                                [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)],
                                any(p.kind == p.VAR_KEYWORD for p in params), 0)
    if problem:
        raise UserError(f"reward {cfg.label()} ({cfg.function}): wrong signature: {problem}",
                        "def score(completions, **kwargs) -> list[float]")
    return Function(cfg, fn, str(path))


def load_reward_model(cfg, recipe):
    """(tokenizer, model) of a reward_model directory: a saved sequence classifier, or a reward run's adapter
    (its base loaded from the run's recipe.yaml as a one-output classifier, the adapter merged in)."""

    path = Path(cfg.reward_model).expanduser()
    # read here, not through artifacts (which imports the methods, which import the objectives: a cycle)
    kind = "adapter" if (path / "adapter_config.json").is_file() else "model" if (path / "config.json").is_file() else None
    if kind == "adapter":
        adapter_cfg, saved = read_json(path / "adapter_config.json"), _saved_recipe(path)
        base = ModelConfig(**saved["model"]) if saved else ModelConfig(name_or_path=adapter_cfg["base_model_name_or_path"])
        tok_cfg = base.model_copy(update={"tokenizer": str(path)}) if (path / "tokenizer_config.json").is_file() else base
        tokenizer = modeling.load_tokenizer(tok_cfg)
        if adapter_cfg.get("task_type") != "SEQ_CLS":
            raise UserError(f"reward {cfg.label()}: {path} holds a {adapter_cfg.get('task_type')} adapter, not a "
                            "reward model (SEQ_CLS)", "point reward_model at the output_dir of an `objective: reward` run")
        from peft import PeftModel

        model = modeling.load_model(base, "AutoModelForSequenceClassification", num_labels=1,
                                    pad_token_id=tokenizer.pad_token_id)
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    elif kind == "model":
        tokenizer = modeling.load_tokenizer(ModelConfig(name_or_path=str(path)))
        model = modeling.load_model(ModelConfig(name_or_path=str(path), dtype=recipe.model.dtype),
                                    "AutoModelForSequenceClassification")
        if model.config.num_labels != 1:
            raise UserError(f"reward {cfg.label()}: {path} has {model.config.num_labels} outputs; a reward model has "
                            "one (a score)", "point reward_model at a one-output classifier (objective: reward)")
    else:
        raise UserError(f"reward {cfg.label()}: no model in {path}", "point reward_model at a reward run's output_dir")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval().requires_grad_(False)
    return tokenizer, model


def _saved_recipe(path: Path) -> dict | None:
    """The model section source of a reward run: its recipe.yaml (None when absent)."""
    import yaml

    f = path / "recipe.yaml"
    if not f.is_file():
        return None
    try:
        saved = yaml.safe_load(f.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{f} is damaged: {e}", "restore it, or train the reward model again") from None
    return saved if isinstance(saved, dict) and isinstance(saved.get("model"), dict) else None


def build(recipe, columns: list[str]) -> list[Reward]:
    """The recipe's rewards as callables; a column a reward reads that the data lacks is an error here."""
    objective = recipe.objective
    out: list[Reward] = []
    for cfg in objective.rewards:
        if cfg.kind == "exact_match":
            if cfg.exact_match not in columns:
                raise UserError(f"reward {cfg.label()}: the data has no column {cfg.exact_match!r} (columns: "
                                f"{columns})", "name an existing column, or map yours with data.columns")
            out.append(ExactMatch(cfg))
        elif cfg.kind == "regex":
            out.append(Regex(cfg))
        elif cfg.kind == "length_penalty":
            out.append(LengthPenalty(cfg, objective.max_completion_length))
        elif cfg.kind == "reward_model":
            tok, model = load_reward_model(cfg, recipe)
            out.append(RewardModel(cfg, tok, model, recipe.eval.batch_size))
        else:
            out.append(load_function(cfg))
    return out


def score(fns: list[Reward], prompts, completions, completion_ids, columns: dict) -> dict[str, list[float]]:
    """Every reward of every completion, plus the weighted total: {name: [...], "reward": [...]}."""
    out = {}
    for fn in fns:
        values = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        out[fn.__name__] = check_output(fn.__name__, values, len(completions))
    out["reward"] = [sum(fn.weight * out[fn.__name__][i] for fn in fns) for i in range(len(completions))]
    return out
