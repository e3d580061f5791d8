"""The output directory: the one module that writes it, tells what it holds and loads it.

OUTPUT_DIR/
  recipe.yaml          the recipe after overrides (identifies the run that owns the directory)
  the artifact, one of three kinds (`detect`):
    adapter   adapter_model.safetensors + adapter_config.json (PEFT methods; the base is referenced)
    model     model.safetensors + config.json (full / partial fine-tuning)
    head      head_config.json + head.safetensors (or an adapter holding the head; heads.py)
  tokenizer files
  metrics.json         training log history, before/after eval, parameter counts, wall time
  trainable_parameters.json, loss_curve.png
  runs/                TensorBoard event files
  checkpoint-N/        intermediate checkpoints (resilience.py), eval/ (--eval-only results)

Every reader (evaluation, dry run, export, the adapters tool) goes through `detect`, `read_run`
and `load`, so an artifact loads the same way everywhere: adapters on the base as training loaded
it (4-bit for QLoRA), in the dtype they were trained in.
"""
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import yaml

from llama_recipes import bounds, heads, methods, modeling, objectives
from llama_recipes.errors import RunComplete, UserError, read_json
from llama_recipes.log import get_logger, is_main_process
from llama_recipes.runtime import collectives, distributed, resilience, zero3
from llama_recipes.schema import same_run
from llama_recipes.schema.method import METHOD_MODELS
from llama_recipes.schema.model import ModelConfig
from llama_recipes.schema.objective import default_objective

log = get_logger(__name__)
RECIPE_FILE = "recipe.yaml"


REPLACED_DIR = ".overwritten"  # where --overwrite moves a previous run until the new one has saved
LOCK_FILE = ".llama-recipes.lock"  # held (flock) by the run training into OUTPUT_DIR
ARTIFACT_STAGING = ".staging-artifact"  # the final artifact is written here, then moved into OUTPUT_DIR


def prepare_output_dir(recipe, overwrite: bool = False) -> Path:
    """Claim OUTPUT_DIR for this recipe, refusing a directory that belongs to another run.

    Empty or missing: created. Holding this same resolved recipe: reused (a rerun). Anything
    else: refused unless --overwrite, because silently mixing two runs' files loses data. With
    --overwrite the previous contents are moved aside (OUTPUT_DIR/.overwritten/STAMP), never
    deleted here: `claim` decides their fate once the new run has succeeded or failed.
    """
    out = Path(recipe.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} exists and is a file", "choose another output_dir")
    reused = False  # same recipe: its recipe.yaml stays as written by the first try
    # eval/ holds --eval-only results (--base may run before training), never a run's files
    occupied = out.is_dir() and any(p.name not in ("eval", REPLACED_DIR, LOCK_FILE) for p in out.iterdir())
    if occupied and not overwrite:
        saved = out / RECIPE_FILE
        if not saved.is_file():
            raise UserError(f"output_dir {out} is not empty and was not written by llama-recipes",
                            "choose another output_dir, or pass --overwrite to move its contents aside "
                            f"(into {out / REPLACED_DIR}) and write the new run there")
        if not same_run(_read_recipe_file(saved), recipe):
            raise UserError(f"output_dir {out} holds a run of a different recipe ({saved})",
                            "choose another output_dir, or pass --overwrite to replace that run")
        reused = True
    if is_main_process():
        try:
            if occupied and overwrite:
                _move_aside(out)
            out.mkdir(parents=True, exist_ok=True)
            if not reused:
                (out / RECIPE_FILE).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        except OSError as e:
            raise UserError(f"cannot write to output_dir {out}: {e.strerror}", "choose a writable output_dir") from None
    return out


def _read_recipe_file(path: Path) -> dict:
    """A run's recipe.yaml as a dict; a damaged one is a clear error, not a traceback."""
    try:
        data = bounds.safe_load(path.read_text(encoding="utf-8"))  # bounded: a run directory may come from elsewhere
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"{path} is damaged and cannot be read ({type(e).__name__})",
                        "restore it, or pass --overwrite to move that run aside and start again") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is damaged: not a recipe mapping",
                        "restore it, or pass --overwrite to move that run aside and start again")
    return data


MOVING = ".moving"  # inside a set-aside directory while entries are still being moved into it


def _move_aside(out: Path) -> Path:
    """Move everything in OUTPUT_DIR (but earlier set-asides) to OUTPUT_DIR/.overwritten/STAMP.

    STAMP/.moving exists until the last entry is moved: a run killed half way leaves it, and the
    next run on this directory moves those entries back (recover_interrupted_moves).
    """
    import time

    entries = sorted(p for p in out.iterdir() if p.name not in (REPLACED_DIR, LOCK_FILE))
    dest = out / REPLACED_DIR / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=False)
    (dest / MOVING).touch()
    for p in entries:
        os.replace(p, dest / p.name)  # a rename on the same filesystem: nothing is copied or lost
    (dest / MOVING).unlink()
    names = ", ".join(p.name for p in entries[:8]) + (f" and {len(entries) - 8} more" if len(entries) > 8 else "")
    log.warning("--overwrite: moved the previous contents of %s (%s) to %s; they are removed only when this run "
                "has saved its artifact, and only if llama-recipes wrote them", out, names, dest)
    return dest


def _set_aside(out: Path) -> list[Path]:
    root = out / REPLACED_DIR
    return sorted(root.iterdir()) if root.is_dir() else []


def recover_interrupted_moves(out: Path) -> None:
    """Undo an --overwrite that was killed while moving the previous run aside: its entries go back."""
    for d in _set_aside(out):
        if not (d / MOVING).exists():
            continue
        back, kept = [], []
        for p in sorted(d.iterdir()):
            if p.name == MOVING:
                continue
            if (out / p.name).exists():
                kept.append(p.name)
            else:
                os.replace(p, out / p.name)
                back.append(p.name)
        (d / MOVING).unlink()
        if not kept:
            d.rmdir()
        log.warning("an --overwrite was interrupted while moving the previous contents of %s aside: moved %d "
                    "entries back (%s)%s", out, len(back), ", ".join(back[:8]) or "none",
                    f"; kept in {d} (a file of that name is in {out} again): {', '.join(kept)}" if kept else "")
    root = out / REPLACED_DIR
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()


# What llama-recipes (and the libraries it calls) write into OUTPUT_DIR: --overwrite deletes only these, per
# entry, from a previous run it set aside; any other file there (NOTES.md, my_plots/) is the user's and kept.
OWN_FILES = {RECIPE_FILE, "metrics.json", "metrics.json.tmp", "trainable_parameters.json", "loss_curve.png",
             "training_args.bin", "adapter_config.json", "adapter_model.safetensors", "config.json",
             "generation_config.json", "model.safetensors", "model.safetensors.index.json", heads.HEAD_CONFIG,
             heads.HEAD_WEIGHTS, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt",
             "added_tokens.json", LOCK_FILE}
OWN_DIRS = {"runs", "eval", ".staging", ARTIFACT_STAGING}


def is_own_entry(p: Path) -> bool:
    """Whether a top-level entry of a run directory is one llama-recipes writes."""
    import re

    name = p.name
    if p.is_dir():
        return name in OWN_DIRS or re.fullmatch(r"checkpoint-\d+", name) is not None
    if name in OWN_FILES or re.fullmatch(r"model-\d+-of-\d+\.safetensors", name):
        return True
    if name == "README.md":  # the model card PEFT writes with an adapter; a user's README is kept
        try:
            return "library_name: peft" in p.read_text(encoding="utf-8", errors="replace")[:2000]
        except OSError:
            return False
    return False


def _clear_set_aside(out: Path, old: Path) -> None:
    """After a successful --overwrite: delete what llama-recipes wrote in the set-aside run, entry by entry;
    the user's own files go back into OUTPUT_DIR (or stay set aside when the new run wrote that name)."""
    if not (old / RECIPE_FILE).is_file():
        log.warning("--overwrite: %s keeps what was in %s before (not written by llama-recipes)", old, out)
        return
    theirs = [p for p in sorted(old.iterdir()) if not is_own_entry(p)]
    for p in old.iterdir():
        if p not in theirs:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    back = [p.name for p in theirs if not (out / p.name).exists()]
    for name in back:
        os.replace(old / name, out / name)
    if any(old.iterdir()):
        log.warning("--overwrite: removed the previous run's files; your own files %s are kept in %s (the new run "
                    "wrote files of the same names)", ", ".join(p.name for p in old.iterdir()), old)
    else:
        old.rmdir()
        log.info("--overwrite: removed the previous run set aside in %s%s", old,
                 f"; your own files are back in {out}: {', '.join(back)}" if back else "")


@contextmanager
def claim(recipe, overwrite: bool = False):
    """OUTPUT_DIR for a training run, with --overwrite made safe.

    On success, a previous run that --overwrite set aside is deleted if llama-recipes wrote it
    (it has recipe.yaml) and kept otherwise. On failure before the new run saved a checkpoint,
    what the new run wrote is removed and the previous contents are put back: a typo in an
    --overwrite rerun costs nothing.
    """
    target = Path(recipe.output_dir)
    created = not target.exists()
    fresh = not (target / RECIPE_FILE).is_file()  # this run writes the recipe record (not a rerun)
    # Under --overwrite the lock comes first: the files of a run still training must not be moved
    # aside. Otherwise prepare_output_dir refuses foreign directories before anything is written.
    interrupted = target.is_dir() and any((d / MOVING).exists() for d in _set_aside(target))
    lock = _lock(target) if is_main_process() and (overwrite or interrupted) and target.is_dir() else None
    try:
        if lock is not None and interrupted:
            recover_interrupted_moves(target)
        before = set(_set_aside(target))
        if before and is_main_process():
            log.warning("%s holds earlier contents set aside by --overwrite (a run that did not finish, or files "
                        "llama-recipes did not write): %s; they are kept: delete them when you no longer need them",
                        target / REPLACED_DIR,
                        ", ".join(p.name for p in sorted(before)))
        out = prepare_output_dir(recipe, overwrite)
        metrics = out / "metrics.json"
        if not overwrite and metrics.is_file() and detect(out) is not None:
            # metrics.json is written last: this recipe's run finished here. Training again would
            # add steps to a finished run and rewrite its artifact. Said before the lock is taken:
            # a finished run on read-only storage is complete, not an error.
            saved = read_json(metrics, "restore it, or pass --overwrite to train the run again")
            step = ((saved.get("train") if isinstance(saved, dict) else None) or {}).get("global_step", "?")
            raise RunComplete(f"this run is already complete: {out} holds its artifact and metrics.json "
                              f"(step {step}); nothing was changed", "evaluate it with --eval-only; pass "
                              "--overwrite to train it again, or choose another output_dir")
        if lock is None and is_main_process():
            lock = _lock(out)
        moved = [p for p in _set_aside(out) if p not in before]
        try:
            yield out
        except BaseException:
            if moved and is_main_process() and not any(out.glob("checkpoint-*")) and detect(out) is None:
                _restore(out, moved[-1])
            elif fresh and not moved and is_main_process() and not any(out.glob("checkpoint-*")) \
                    and detect(out) is None:  # a saved artifact (a failure after training) is never removed
                # Failed before its first checkpoint (a bad data path, a model that does not load):
                # nothing to resume, and its recipe.yaml would refuse the corrected rerun.
                _forget(out)
            elif moved and is_main_process():
                log.warning("the previous contents of %s stay in %s (this run saved checkpoints)", out, moved[-1])
            raise
        if moved and is_main_process():
            for old in moved:
                _clear_set_aside(out, old)
            root = out / REPLACED_DIR
            if root.is_dir() and not any(root.iterdir()):
                root.rmdir()
    finally:
        if lock is not None:  # empty again (the PID is only for a second run's message), then unlocked
            lock.seek(0)
            lock.truncate()
            lock.close()
        if created and is_main_process() and target.is_dir() and \
                {p.name for p in target.iterdir()} <= {LOCK_FILE}:  # nothing left of a failed first try
            (target / LOCK_FILE).unlink(missing_ok=True)
            target.rmdir()


def _forget(out: Path) -> None:
    """Remove what a run that failed before its first checkpoint wrote into a directory it found empty."""
    for p in out.iterdir():
        if p.name in (REPLACED_DIR, LOCK_FILE, "eval"):
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    log.info("this run failed before its first checkpoint: removed what it wrote to %s", out)



def _lock(out: Path):
    """Hold an exclusive lock on OUTPUT_DIR for the whole run: two runs never train into one directory.

    The lock (flock) dies with the process, so a killed run never leaves a stale lock behind.
    """
    import fcntl

    try:
        f = open(out / LOCK_FILE, "a+")
    except OSError as e:
        raise UserError(f"cannot write to output_dir {out}: {e.strerror}",
                        "choose a writable output_dir (read-only storage can be evaluated with --eval-only)") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise UserError(f"output_dir {out} is in use by another run (PID {holder})",
                        "wait for it to finish, stop it, or choose another output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def _restore(out: Path, old: Path) -> None:
    """Undo --overwrite: drop what the failed run wrote, put the previous contents back."""
    for p in out.iterdir():
        if p.name in (REPLACED_DIR, LOCK_FILE):
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    for p in old.iterdir():
        os.replace(p, out / p.name)
    old.rmdir()
    root = out / REPLACED_DIR
    if not any(root.iterdir()):
        root.rmdir()
    log.warning("--overwrite: this run failed before saving anything; the previous contents of %s are back", out)


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


def whole_run_loss(log_history: list[dict], resumed_at: int, steps_now: int, loss_now: float) -> float:
    """Mean training loss per optimizer step over the whole run, for a run resumed at step `resumed_at`.

    The Trainer's train_loss averages only the steps of this call (`steps_now` steps, mean `loss_now`).
    The steps before the resume come from the log history (restored from the checkpoint): each
    logged loss is the mean over the steps since the previous log. Steps after the last log before the
    checkpoint were never logged and cannot be counted (none when save_steps is a multiple of logging_steps).
    """
    total, counted, last = 0.0, 0, 0
    for h in log_history:
        step = h.get("step", 0)
        if "loss" in h and last < step <= resumed_at:
            total += h["loss"] * (step - last)
            counted += step - last
            last = step
    steps = counted + steps_now
    # steps_now == 0: resumed at the final step (nothing trained now; loss_now is NaN)
    return (total + (loss_now * steps_now if steps_now else 0.0)) / steps if steps else loss_now


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


def save(trainer, tokenizer, out: Path, method) -> None:
    """Write the final artifact of `method` (safetensors + JSON) and the tokenizer into OUTPUT_DIR.

    Written into OUTPUT_DIR/.staging-artifact, then moved in file by file: a save that fails (disk full)
    leaves no half artifact that a reader would take for a result, and says "disk full" with the bytes.
    """
    tmp = Path(out) / ARTIFACT_STAGING
    resilience.keep_run_record(trainer, out)  # OUTPUT_DIR removed during training: the record comes back first
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
    collectives.barrier()
    weights, _ = resilience.checkpoint_bytes(trainer.model, method.peft or method.kind == "head", save_only_model=True)
    try:
        # No refusal on the free-space estimate here: the trained weights exist only in memory, so the save
        # is always tried; a full disk during it is worded with the path and the bytes.
        with resilience.writing(out, weights, "the final artifact", precheck=False):
            if method.kind == "head":
                heads.save(trainer.model, tokenizer, trainer.model.head_config, tmp)  # collective under FSDP
            else:
                save_artifact(trainer, tokenizer, tmp)
        if is_main_process():
            for f in sorted(tmp.iterdir()):
                os.replace(f, Path(out) / f.name)
    finally:
        if is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
    if is_main_process() and method.kind != "head":
        _check_not_empty(Path(out))


def save_artifact(trainer, tokenizer, out: Path) -> None:
    """Write the final adapter or model (safetensors) and the tokenizer into OUTPUT_DIR.

    Under FSDP the model is gathered to the main process and written there (distributed.py);
    otherwise trainer.save_model writes on the main process only.
    """
    if distributed.is_sharded(trainer.model):
        distributed.save_sharded_model(trainer, out)
    else:
        trainer.save_model(str(out))
    if is_main_process():
        tokenizer.save_pretrained(str(out))
        # The Trainer also pickles its arguments; the artifact is safetensors + JSON only
        # (recipe.yaml already records every setting).
        (out / "training_args.bin").unlink(missing_ok=True)


def _check_not_empty(out: Path) -> None:
    """An artifact whose weights file holds no tensor is a failed save, not a result.

    (A wrapper that hides module names from PEFT once wrote a 40-byte adapter and exited 0.)
    """
    from safetensors import safe_open

    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            if not list(sf.keys()):
                raise RuntimeError(f"{f} holds no tensors: the save lost the trained weights "
                                   "(the checkpoints in the output directory still hold them)")


# -- reading --------------------------------------------------------------------------------------

MARKERS = (("head", heads.HEAD_CONFIG), ("adapter", "adapter_config.json"), ("model", "config.json"))


def detect(path) -> str | None:
    """The artifact kind a directory holds: "head", "adapter", "model", or None."""
    path = Path(path)
    return next((kind for kind, marker in MARKERS if (path / marker).is_file()), None)


def read_run(path) -> tuple[dict | None, dict | None]:
    """(adapter_config.json, recipe.yaml) of a run directory; None for what it lacks."""
    path = Path(path)
    cfg = path / "adapter_config.json"
    rec = path / RECIPE_FILE
    return (read_json(cfg) if cfg.is_file() else None, _read_recipe_file(rec) if rec.is_file() else None)


def read_adapter_run(path) -> tuple[dict, dict | None]:
    """read_run for a directory that must hold a PEFT adapter (a clear error otherwise)."""
    cfg, saved = read_run(path)
    if cfg is None and detect(path) == "head":
        raise UserError(f"{path} is a task-head run (head_config.json): its artifact is the head, used as it is, with "
                        "nothing to merge into the base", "evaluate it with --eval-only --checkpoint "
                        f"{path}, or load it in Python with llama_recipes.heads.load")
    if cfg is None:
        raise UserError(f"{path} has no adapter_config.json",
                        "pass the output_dir of a PEFT run (full fine-tuning already saves a standalone model)")
    return cfg, saved


def base_model_config(path, recipe=None, trust_remote_code: bool = False) -> tuple[ModelConfig, dict]:
    """(model section, method section) to load an adapter's base with: the recipe given (eval and
    dry run evaluate with the user's recipe), else the run's recipe.yaml, else the base named in
    adapter_config.json. Only the caller grants trust_remote_code (run_model_config)."""
    if recipe is not None:
        return recipe.model, recipe.method.model_dump()
    cfg, saved = read_adapter_run(path)
    if saved:
        return run_model_config(saved, path, trust_remote_code), saved.get("method", {})
    return ModelConfig(name_or_path=cfg["base_model_name_or_path"], trust_remote_code=trust_remote_code), {}


def run_model_config(saved: dict, path, trust_remote_code: bool = False) -> ModelConfig:
    """The `model:` section of a run directory's recipe.yaml, with trust_remote_code as the USER says.

    A run directory may come from someone else: its recipe.yaml never grants running the base's own
    Python code. One that asks for it is refused unless the command line grants it (--trust-remote-code).
    """
    model = saved.get("model") if isinstance(saved.get("model"), dict) else None
    if model is None or not isinstance(model.get("name_or_path"), str):
        raise UserError(f"{Path(path) / RECIPE_FILE} is damaged: it names no model.name_or_path",
                        "restore it, or point at an intact run's output_dir")
    if model.get("trust_remote_code") is True and not trust_remote_code:
        raise UserError(f"{Path(path) / RECIPE_FILE} was trained with model.trust_remote_code: true: loading its base "
                        f"({model['name_or_path']}) runs Python code shipped with that model, and a run directory "
                        "cannot grant that by itself", "read the base model's code; if you trust its authors, "
                        "pass --trust-remote-code")
    try:
        return ModelConfig(**{**model, "trust_remote_code": bool(trust_remote_code)})
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        raise UserError(f"{Path(path) / RECIPE_FILE} is damaged: its model section does not validate "
                        f"({str(e).splitlines()[0][:160]})", "restore it, or point at an intact run's output_dir") from None


def run_objective(path, recipe=None):
    """The objective a run trained for (recipe given, else its recipe.yaml; sft for a bare adapter directory)."""
    if recipe is not None:
        return objectives.get(recipe.objective.name)
    _, saved = read_run(path)
    saved = saved or {}
    name = (saved.get("objective") or {}).get("name") or default_objective((saved.get("method") or {}).get("name"))
    return objectives.get(name if name in objectives.REGISTRY else "sft")


def load_base(model_cfg: ModelConfig, method_section: dict, objective=None, tokenizer=None):
    """The base as training loaded it (QLoRA: quantized the same way; a reward model: a sequence classifier)."""
    objective = objective or objectives.get("sft")
    extra = {**objective.load_kwargs(tokenizer), "auto_class": objective.auto_class}
    name = method_section.get("name")
    if name in METHOD_MODELS:
        cfg = METHOD_MODELS[name].model_validate(method_section)
        return modeling.load_model(model_cfg, **methods.load_kwargs(cfg), **extra)
    return modeling.load_model(model_cfg, **extra)


def load(recipe, path=None):
    """(tokenizer, model) for any artifact directory, or the recipe's base model when path is None.

    Whole weights even inside a DeepSpeed ZeRO-3 run (runtime/zero3.py).
    """
    with zero3.plain_loading():
        return _load(recipe, path)


def _load(recipe, path=None):
    """load(), with whatever DeepSpeed registered set aside.

    adapter: the base as trained + PeftModel.from_pretrained, the adapter in its saved dtype (PEFT
    would upcast a bf16 QLoRA adapter to fp32: then it is not the model that was trained);
    model: the directory with the recipe's dtype and attention kernel; head: heads.load.
    The artifact's own tokenizer when it saved one, else the recipe's.
    """
    kind = "base" if path is None else detect(path)
    if kind == "head":
        head = heads.load(path)
        return head.tokenizer, head.model
    model_cfg = recipe.model
    tok_cfg = model_cfg
    if path is not None and (Path(path) / "tokenizer_config.json").is_file():
        tok_cfg = model_cfg.model_copy(update={"tokenizer": str(path)})
    tokenizer = modeling.load_tokenizer(tok_cfg)
    objective = run_objective(path, recipe)
    if kind == "model":
        return tokenizer, modeling.load_model(model_cfg.model_copy(update={"name_or_path": str(path), "revision": None}),
                                              objective.auto_class)
    if kind == "base":  # the model training started from: with model.adapter, the base + the adapter it continued
        base = load_base(recipe.model, recipe.method.model_dump(), objective, tokenizer)
        return tokenizer, modeling.load_adapter(base, recipe.model.adapter) if recipe.model.adapter else base
    if kind != "adapter":
        raise UserError(f"no model artifact in {path} (no adapter_config.json, config.json or head_config.json)",
                        "train the recipe first, or point at a run's output_dir")
    base_cfg, method_section = base_model_config(path, recipe)
    read_json(Path(path) / "adapter_config.json")  # damaged: a clear error before the base loads
    if not (Path(path) / "adapter_model.safetensors").is_file():
        raise UserError(f"{path} has adapter_config.json but no adapter_model.safetensors",
                        "point at a complete run's output_dir (or a checkpoint-N directory inside it)")
    base = load_base(base_cfg, method_section, objective, tokenizer)
    return tokenizer, modeling.load_adapter(base, path)


# -- sizes ----------------------------------------------------------------------------------------

def base_size_bytes(model) -> int:
    """Bytes of the base model's weights as they are stored in a checkpoint (unquantized).

    Quantized weights count at the compute dtype's width (what the dense checkpoint holds);
    adapter parameters are excluded.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    seen, total = set(), 0
    adapter_markers = ("lora_", "adaption_", "prompt_encoder", "ia3_", "modules_to_save", "prefix_encoder")
    for name, p in base.named_parameters():
        if id(p) in seen or any(m in name for m in adapter_markers):
            continue
        seen.add(id(p))
        n, _ = modeling.count_parameters_of(p)
        width = p.element_size() if p.is_floating_point() else _dense_width(model)
        total += n * width
    return total


def _dense_width(model) -> int:
    import torch

    dtype = getattr(model.config, "dtype", None) or torch.bfloat16
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return torch.tensor([], dtype=dtype).element_size()


def size_report(out: Path, model, method) -> tuple[str, dict]:
    """One log line (and metrics) for the saved artifact: what it weighs next to its base."""
    if method.kind == "head":
        return f"head artifact: {dir_size_mb(out):.3f} MiB of weights (the base is referenced, not copied)", {}
    if not method.peft:
        return f"model: {dir_size_mb(out):,.1f} MiB on disk", {}
    adapter_mb = dir_size_mb(out, "adapter_model.safetensors")
    base_mb = base_size_bytes(model) / 2**20
    pct = 100 * adapter_mb / base_mb if base_mb else float("nan")
    line = f"adapter: {adapter_mb:.3f} MiB on disk = {pct:.3f}% of the base model ({base_mb:,.1f} MiB)"
    return line, {"adapter_mb": round(adapter_mb, 4), "base_mb": round(base_mb, 2), "adapter_pct_of_base": round(pct, 4)}
