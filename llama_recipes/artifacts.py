"""What a run leaves on disk: the resolved recipe, the artifact, metrics and a loss curve.

OUTPUT_DIR/
  recipe.yaml          the recipe after overrides (identifies the run that owns the directory)
  adapter_model.safetensors + adapter_config.json   (PEFT methods)  or  model.safetensors + config.json
  tokenizer files
  metrics.json         training log history, before/after eval, parameter counts, wall time
  loss_curve.png
  runs/                TensorBoard event files
"""
import json
import os
from pathlib import Path

import yaml

from llama_recipes.errors import UserError
from llama_recipes.log import get_logger, is_main_process

log = get_logger(__name__)
RECIPE_FILE = "recipe.yaml"


def prepare_output_dir(recipe, overwrite: bool = False) -> Path:
    """Claim OUTPUT_DIR for this recipe, refusing a directory that belongs to another run.

    Empty or missing: created. Holding this same resolved recipe: reused (a rerun). Anything
    else: refused unless --overwrite, because silently mixing two runs' files loses data.
    """
    out = Path(recipe.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} exists and is a file", "choose another output_dir")
    reused = False  # same recipe: its recipe.yaml stays as written by the first try
    # eval/ holds --eval-only results (--base may run before training), never a run's files
    if out.is_dir() and any(p.name != "eval" for p in out.iterdir()) and not overwrite:
        saved = out / RECIPE_FILE
        if not saved.is_file():
            raise UserError(f"output_dir {out} is not empty and was not written by llama-recipes",
                            "choose another output_dir, or pass --overwrite to write into it anyway")
        from llama_recipes.schema.guards import RUN_CONTROL_KEYS  # resume/guards may change between tries

        before = {k: v for k, v in (yaml.safe_load(saved.read_text()) or {}).items() if k not in RUN_CONTROL_KEYS}
        if before != recipe.identity():
            raise UserError(f"output_dir {out} holds a run of a different recipe ({saved})",
                            "choose another output_dir, or pass --overwrite to replace that run")
        reused = True
    if is_main_process():
        try:
            out.mkdir(parents=True, exist_ok=True)
            if not reused:
                (out / RECIPE_FILE).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        except OSError as e:
            raise UserError(f"cannot write to output_dir {out}: {e.strerror}", "choose a writable output_dir") from None
    return out


def run_metrics(recipe, trainer, result, started: float, **fields) -> dict:
    """metrics.json of a finished run: identity, the caller's fields, the training log, wall time."""
    import time

    return {
        "recipe_fingerprint": recipe.fingerprint(),
        **fields,
        "train": {**result.metrics, "global_step": result.global_step},
        "log_history": trainer.state.log_history,
        "wall_seconds": round(time.time() - started, 1),
    }


def write_metrics(out: Path, metrics: dict) -> None:
    if is_main_process():
        tmp = out / "metrics.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=2, default=float) + "\n")
        os.replace(tmp, out / "metrics.json")


def plot_loss(out: Path, log_history: list[dict]) -> Path | None:
    """loss_curve.png from the trainer's log history (train loss, and eval loss if logged)."""
    if not is_main_process():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "loss_curve.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def dir_size_mb(path: Path, pattern: str = "*.safetensors") -> float:
    return sum(f.stat().st_size for f in Path(path).glob(pattern)) / 2**20


def save_artifact(trainer, tokenizer, out: Path) -> None:
    """Write the final adapter or model (safetensors) and the tokenizer into OUTPUT_DIR.

    Under FSDP the model is gathered to the main process and written there (distributed.py);
    otherwise trainer.save_model writes on the main process only.
    """
    from llama_recipes import distributed

    if distributed.is_sharded(trainer.model):
        distributed.save_sharded_model(trainer, out)
    else:
        trainer.save_model(str(out))
    if is_main_process():
        tokenizer.save_pretrained(str(out))
        # The Trainer also pickles its arguments; the artifact is safetensors + JSON only
        # (recipe.yaml already records every setting).
        (out / "training_args.bin").unlink(missing_ok=True)
