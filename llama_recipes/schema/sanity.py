"""Settings that validate one by one but cannot work together, refused before anything loads.

Each was accepted and then ignored (one is only warned about: warmup longer than training), or failed late (after the model loaded, after training):
issue 29's "settings accepted and ignored" and "late failures that validation can catch".
`check(recipe)` is called once from Recipe's combination checks.
"""
import importlib.util
import os
import re

from llama_recipes.log import get_logger
from llama_recipes.schema.finetune import HEAD_METHODS

log = get_logger(__name__)

# optim value prefix -> the package it needs (transformers imports it only when the optimizer is built)
OPTIM_PACKAGES = {"adamw_bnb": "bitsandbytes", "adamw_8bit": "bitsandbytes", "paged_": "bitsandbytes",
                  "lion_8bit": "bitsandbytes", "lion_32bit": "bitsandbytes", "rmsprop_bnb": "bitsandbytes",
                  "ademamix": "bitsandbytes", "adamw_apex": "apex", "galore": "galore_torch", "apollo": "apollo_torch",
                  "lomo": "lomo_optim", "adalomo": "lomo_optim", "grokadamw": "grokadamw", "schedule_free": "schedulefree",
                  "adamw_torch_4bit": "torchao", "adamw_torch_8bit": "torchao", "stable_adamw": "torch_optimi"}
MAX_FORMAT_WIDTH = 10_000  # a prompt template's {field:N} width; 300,000,000 allocated 300 MB per row
REPORTERS = {"wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml", "neptune": "neptune", "clearml": "clearml",
             "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio", "tensorboard": "tensorboard"}


def _real(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def check(recipe) -> None:
    """Raise ValueError (pydantic makes it a RecipeError naming the recipe) for a combination that cannot work."""
    t = recipe.training
    get = lambda key, default=None: getattr(t, key, default)  # noqa: E731 (TrainingConfig fields follow TRL)
    if not str(recipe.output_dir).strip() or recipe.output_dir == ".":
        raise ValueError("output_dir is empty: the run would write into the current directory; set output_dir")
    out = _real(recipe.output_dir)
    for key, value in (("model.name_or_path", recipe.model.name_or_path), ("model.tokenizer", recipe.model.tokenizer),
                       ("data.path", getattr(recipe.data, "path", None))):
        if isinstance(value, str) and os.path.exists(os.path.expanduser(value)) and out in (
                _real(value), os.path.dirname(_real(value)) if os.path.isfile(os.path.expanduser(value)) else None):
            raise ValueError(f"output_dir {recipe.output_dir} is the directory of {key} ({value}): the run would write "
                             f"its files among the {key.split('.')[0]}'s; choose another output_dir")
    if recipe.data.eval_split is not None and recipe.data.eval_split == getattr(recipe.data, "split", "train"):
        raise ValueError(f"data.eval_split is {recipe.data.eval_split!r}, the split training reads: the held-out numbers "
                         "would be measured on training rows; name another split or give a fraction (e.g. 0.1)")
    for ref in recipe.eval.retain or []:  # read only after the main eval: a missing file is said now
        if isinstance(ref, str) and ref.startswith(("/", ".", "~")) and not os.path.exists(os.path.expanduser(ref)):
            raise ValueError(f"eval.retain: {ref} does not exist (it would be found missing only after the main eval)")
    template = getattr(recipe.data, "prompt_template", None)
    if isinstance(template, str):
        import string

        try:
            specs = [spec for _, _, spec, _ in string.Formatter().parse(template) if spec]
        except ValueError:
            specs = []  # a malformed template: its own validator says so
        for spec in specs:
            width = max((int(n) for n in re.findall(r"\d+", spec)), default=0)
            if width > MAX_FORMAT_WIDTH:
                raise ValueError(f"data.prompt_template: the format spec {{...:{spec}}} pads every prompt to {width:,} "
                                 f"characters (at most {MAX_FORMAT_WIDTH:,}); remove the width")
    if get("bf16") is True and get("fp16") is True:
        raise ValueError("training.bf16 and training.fp16 are both true: choose one precision")
    steps, warmup = get("max_steps", -1), get("warmup_steps", 0)
    if steps and steps > 0 and isinstance(warmup, (int, float)) and warmup >= steps:  # a warning: a short trial run
        log.warning("training.warmup_steps=%g with max_steps=%d: the learning rate is still warming up when training "
                    "ends (training.learning_rate=%g is never reached); lower warmup_steps for a full run",
                    warmup, steps, get("learning_rate", 0) or 0)
    if get("load_best_model_at_end") and (recipe.data.eval_split is None or str(get("eval_strategy", "no")) == "no"):
        raise ValueError("training.load_best_model_at_end needs evaluation during training: set data.eval_split and "
                         "training.eval_strategy (steps or epoch, matching save_strategy)")
    if recipe.method.name in HEAD_METHODS and get("packing"):
        raise ValueError(f"training.packing with method {recipe.method.name}: a task head classifies one text per "
                         "row, packed rows mix several; remove training.packing")
    if get("lr_scheduler_type") == "cosine_with_min_lr":
        kw = get("lr_scheduler_kwargs") or {}
        if not isinstance(kw, dict) or not ({"min_lr", "min_lr_rate"} & set(kw)):
            raise ValueError("training.lr_scheduler_type: cosine_with_min_lr needs training.lr_scheduler_kwargs with "
                             "min_lr or min_lr_rate, e.g. {min_lr_rate: 0.1}")
    optim = str(get("optim", "") or "")
    for prefix, package in OPTIM_PACKAGES.items():
        if optim.startswith(prefix) and importlib.util.find_spec(package) is None:
            raise ValueError(f"training.optim={optim} needs the Python package {package}, which is not installed: "
                             f"pip install {package.replace('_', '-')}, or choose another optim (adamw_torch)")
    report = get("report_to")
    for name in [report] if isinstance(report, str) else list(report or []):
        package = REPORTERS.get(str(name))
        if package and importlib.util.find_spec(package) is None:
            raise ValueError(f"training.report_to: {name} needs the Python package {package}, which is not installed: "
                             f"pip install {package}, or use report_to: none")
    if get("push_to_hub") and os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes"):
        raise ValueError("training.push_to_hub with HF_HUB_OFFLINE set: the upload would fail after training; "
                         "unset HF_HUB_OFFLINE (and log in), or set push_to_hub: false")
