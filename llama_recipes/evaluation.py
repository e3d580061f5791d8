"""`--eval-only`: evaluate one artifact (or the base) with the recipe's eval settings.

    run_recipe.py RECIPE --eval-only [--checkpoint PATH | --base]

Loads the artifact through artifacts.load, measures it with measure.py (sharded across ranks
under torchrun/accelerate launch): loss/perplexity, generation metrics, accuracy for heads and
the forgetting check on retain sets. Writes ARTIFACT/eval/{eval_results.json,predictions.jsonl}
on rank 0 and logs a table.
"""
import json
import time
from dataclasses import dataclass
from pathlib import Path

from llama_recipes import artifacts, chat, data, formats, harness, heads, modeling, objectives
from llama_recipes.errors import UserError

# The measurements themselves live in measure.py (training uses them too); re-exported here
# because `evaluation.eval_loss(...)` is how notebooks and tests call them.
from llama_recipes.heads import evaluate_artifact
from llama_recipes.log import get_logger, is_main_process
from llama_recipes.measure import (  # noqa: F401
    autocast,
    eval_loss,
    evaluate_lm,
    fingerprint_rows,
    generate,
    generation_pairs,
    pad_collate,
    tokenize_like_trl,
    within_max_length,
)
from llama_recipes.metrics import exact_match, generation_scores, normalize_answer  # noqa: F401  (re-exported)
from llama_recipes.paths import resolve
from llama_recipes.runtime import collectives
from llama_recipes.runtime.hardware import recipe_bf16
from llama_recipes.schema.data import DataConfig, SourceConfig

log = get_logger(__name__)
RESULTS_FILE = "eval_results.json"
PREDICTIONS_FILE = "predictions.jsonl"




# -- what to evaluate --------------------------------------------------------------------------
@dataclass
class Target:
    kind: str  # "base", "adapter", "model" or "head"
    path: Path | None  # the artifact directory (None for the base model)
    results_dir: Path  # where eval_results.json and predictions.jsonl go


def resolve_target(recipe, checkpoint: str | None, base: bool) -> Target:
    """Which artifact the flags name, and what kind it is (artifacts.detect)."""
    out = Path(recipe.output_dir)
    if base and checkpoint:
        raise UserError("--base and --checkpoint name two different models", "pass one of them")
    if base:
        return Target("base", None, out / "eval" / "base")
    path = Path(checkpoint) if checkpoint else out
    if not path.is_dir():
        what = f"--checkpoint {path}" if checkpoint else f"output_dir {path}"
        raise UserError(f"{what} is not a directory", "train the recipe first, or pass --checkpoint DIR (or --base)")
    kind = artifacts.detect(path)
    if kind is not None:
        return Target(kind, path, path / "eval")
    ckpts = sorted(path.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
    hint = f"intermediate checkpoints here: {', '.join(p.name for p in ckpts)}; pass --checkpoint {ckpts[-1]}" if ckpts \
        else "train the recipe first (or pass --checkpoint DIR or --base)"
    raise UserError(f"no model artifact in {path} (no adapter_config.json, config.json or head_config.json)", hint)


def load_for_eval(recipe, target: Target):
    """(tokenizer, model) of the target, loaded by artifacts.load (the one loader of every reader)."""
    return artifacts.load(recipe, target.path)


def _load_retain(ref: str, limit: int | None):
    """A retain set as rendered rows (text, prompt/completion or chat)."""
    import datasets


    path = Path(resolve(ref, "data"))
    cfg = DataConfig(path=ref)
    if path.is_dir():  # every data file in the directory (builtin:retain holds generic.jsonl)
        files = sorted(str(p) for p in path.iterdir() if p.suffix in data._EXTENSIONS)
        if not files:
            raise UserError(f"eval.retain {ref!r}: no .jsonl/.json/.csv/.parquet file in {path}")
        ds = datasets.load_dataset(data._EXTENSIONS[Path(files[0]).suffix], data_files=files, split="train")
    else:
        ds = data.load_split(cfg, "train").ds  # Rows: the dataset and where each row came from
    if limit:
        ds = ds.select(range(min(limit, len(ds))))

    return data.render(ds, SourceConfig(path=ref), formats.detect(ds.column_names))


# -- --eval-only -------------------------------------------------------------------------------
def eval_only(recipe, args) -> int:
    """Evaluate one artifact (or the base) with the recipe's eval settings; returns the exit code."""
    target = resolve_target(recipe, getattr(args, "checkpoint", None), getattr(args, "base", False))
    harness.check(recipe)  # lm-eval installed: before minutes of loading and measuring
    _check_writable(target.results_dir)  # before minutes of eval, not after
    if target.kind == "head":
        return _eval_head(recipe, target)
    objective = objectives.get(recipe.objective.name)
    own = getattr(objective, "eval_artifact", None)  # an objective with its own measurement (grpo: rewards)
    try:
        if objective.pairwise:  # preference objectives and reward models: held-out pairs, not loss/generation
            results, predictions = evaluate_pairs(recipe, target, objective), []
        elif own:
            results, predictions = own(recipe, target, *load_for_eval(recipe, target))
        else:
            results, predictions = evaluate_target(recipe, target)
        write_results(target.results_dir, results, predictions)
    finally:
        collectives.destroy()
    log.info("\n%s", results_table(results))
    log.info("eval results in %s", target.results_dir / RESULTS_FILE)
    return 0


def evaluate_target(recipe, target: Target) -> tuple[dict, list[dict]]:
    """Load, evaluate (loss, generation, retain sets), gather across ranks; (results, predictions)."""
    import datasets
    from transformers import set_seed


    datasets.disable_progress_bars()  # a few thousand rows map in a blink; the eval bars are the ones that matter
    cfg = recipe.eval
    started = time.time()
    device = collectives.init_for_eval()
    set_seed(cfg.seed)
    rank, world = collectives.rank_world()
    seconds: dict[str, float] = {}

    _, eval_raw, fmt = data.build_datasets(recipe.data, recipe.formats)
    if eval_raw is None:
        raise UserError("--eval-only needs held-out data, and data.eval_split is not set",
                        "set data.eval_split to a split name (eval) or a fraction (0.05)")

    t = time.time()
    tokenizer, model = load_for_eval(recipe, target)
    if "messages" in eval_raw.column_names:  # the template training used (a --base tokenizer lacks it)
        chat.install_template(tokenizer, recipe.data.chat_template)
    # The rows training evaluates on: data.over_length: drop first (data.prepare), then the first eval.limit
    eval_raw = eval_raw.select(within_max_length(eval_raw, tokenizer, recipe))
    if cfg.limit:
        eval_raw = eval_raw.select(range(min(cfg.limit, len(eval_raw))))
    if not getattr(model, "is_quantized", False) and not getattr(model, "hf_device_map", None):
        model.to(device)
    seconds["load"] = time.time() - t

    collate = lambda rows: pad_collate(rows, tokenizer.pad_token_id)  # noqa: E731
    with autocast(recipe_precision(recipe)):  # the precision the recipe trains in
        return _evaluate_loaded(recipe, target, cfg, eval_raw, fmt, tokenizer, model, collate, started, seconds)


def evaluate_pairs(recipe, target: Target, objective) -> dict:
    """The objective's own held-out numbers (preference accuracy, implicit reward against the reference,
    a reward model's pairwise accuracy), as training measures them after its last step.

    The reference is the model training started from: an adapter's base with the adapter off (no second
    load), otherwise the recipe's model (with model.adapter, the adapter it continued), loaded after the
    artifact's numbers are taken.
    """
    started = time.time()
    device = collectives.init_for_eval()
    _, eval_raw, fmt = data.build_datasets(recipe.data, recipe.formats)
    if eval_raw is None:
        raise UserError("--eval-only needs held-out data, and data.eval_split is not set",
                        "set data.eval_split to a split name (eval) or a fraction (0.05)")
    tokenizer, model = load_for_eval(recipe, target)
    if eval_raw.column_names and not isinstance(eval_raw[0]["prompt"], str):  # conversations: training's template
        chat.install_template(tokenizer, recipe.data.chat_template)
    if not getattr(model, "is_quantized", False) and not getattr(model, "hf_device_map", None):
        model.to(device)
    with autocast(recipe_precision(recipe)):
        reference = None
        if objective.reference_metrics and target.kind != "base":
            if target.kind == "adapter" and not recipe.model.adapter:
                with model.disable_adapter():
                    reference = objective.evaluate(model, tokenizer, None, eval_raw, recipe)
                metrics = objective.evaluate(model, tokenizer, None, eval_raw, recipe, reference=reference)
            else:
                metrics = objective.evaluate(model, tokenizer, None, eval_raw, recipe)
                model.to("meta")  # free the artifact's weights before loading the base
                _, base = artifacts.load(recipe, None)
                reference = objective.evaluate(base.to(device), tokenizer, None, eval_raw, recipe)
                metrics = objective.evaluate_against(metrics, reference, recipe)
        else:
            metrics = objective.evaluate(model, tokenizer, None, eval_raw, recipe)
    return {
        "artifact": str(target.path) if target.path else f"base:{recipe.model.name_or_path}",
        "kind": target.kind,
        "objective": recipe.objective.name,
        "recipe_fingerprint": recipe.fingerprint(),
        "dataset": {"path": recipe.data.path, "split": recipe.data.eval_split, "format": fmt,
                    "fingerprint": fingerprint_rows(eval_raw)},
        "examples": metrics.get("examples"),
        "metrics": metrics,
        "eval_settings": recipe.eval.model_dump(mode="json"),
        "seconds": {"total": round(time.time() - started, 3)},
    }


def recipe_precision(recipe):
    """The recipe's training precision on this machine (bf16: auto resolved as training does)."""
    from types import SimpleNamespace

    t = recipe.training
    bf16 = t.bf16 if t.bf16 != "auto" else recipe_bf16(recipe)[0]
    return SimpleNamespace(bf16=bool(bf16), fp16=bool(t.fp16))


def _evaluate_loaded(recipe, target, cfg, eval_raw, fmt, tokenizer, model, collate, started, seconds):
    rank, world = collectives.rank_world()
    t = time.time()
    metrics = eval_loss(model, tokenize_like_trl(eval_raw, tokenizer, recipe), collate, cfg.batch_size,
                        shard=True, progress=True)
    seconds["loss"] = time.time() - t

    predictions: list[dict] = []
    pairs = generation_pairs(eval_raw, tokenizer) if cfg.generate and cfg.metrics else None
    if pairs:
        prompts, refs, special, stop = pairs
        t = time.time()
        mine = list(range(rank, len(prompts), world))
        preds = generate(model, tokenizer, [prompts[i] for i in mine], cfg.max_new_tokens, cfg.batch_size,
                         add_special_tokens=special, progress=True, stop_ids=stop)
        gathered = dict(kv for part in collectives.all_gather_object(list(zip(mine, preds))) for kv in part)
        preds = [gathered[i] for i in range(len(prompts))]
        seconds["generate"] = time.time() - t
        metrics.update(generation_scores(preds, refs, cfg.metrics))
        predictions = [{"prompt": p, "reference": r, "prediction": y} for p, r, y in zip(prompts, refs, preds)]

    harnessed = None
    if recipe.eval.harness is not None:  # before retain: a full model's weights are freed there
        t = time.time()
        harnessed = harness.evaluate(model, tokenizer, recipe.eval.harness, recipe_precision(recipe))
        seconds["harness"] = time.time() - t

    t = time.time()
    retain = evaluate_retain(recipe, target, model, tokenizer, collate)
    if retain:
        seconds["retain"] = time.time() - t
    seconds["total"] = time.time() - started
    results = {
        "artifact": str(target.path) if target.path else f"base:{recipe.model.name_or_path}",
        "kind": target.kind,
        "recipe_fingerprint": recipe.fingerprint(),
        "dataset": {"path": recipe.data.path, "split": recipe.data.eval_split, "format": fmt,
                    "fingerprint": fingerprint_rows(eval_raw)},
        "examples": len(eval_raw),
        "metrics": metrics,
        "retain": retain,
        **({"harness": harnessed} if harnessed is not None else {}),
        "eval_settings": cfg.model_dump(mode="json"),
        "world_size": world,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "examples_per_second": {  # across all ranks
            k: round(len(eval_raw) / max(seconds[k], 1e-9), 2) for k in ("loss", "generate") if k in seconds
        },
    }
    return results, predictions


def evaluate_retain(recipe, target: Target, model, tokenizer, collate) -> dict:
    """Loss/perplexity of each retain set for the artifact and the base model, and the difference.

    An adapter's base is the same model with the adapter switched off (no reload); a full model's
    base is loaded after the artifact's numbers are taken.
    """
    cfg = recipe.eval
    if not cfg.retain:
        return {}
    sets = {ref: tokenize_like_trl(_load_retain(ref, cfg.limit), tokenizer, recipe) for ref in cfg.retain}

    def measure(m):
        return {ref: eval_loss(m, ds, collate, cfg.batch_size, shard=True) for ref, ds in sets.items()}

    if target.kind == "base":
        return {ref: {"base": r} for ref, r in measure(model).items()}
    mine = measure(model)
    if target.kind == "adapter":
        with model.disable_adapter():
            base = measure(model)
    else:

        device = next(model.parameters()).device
        model.to("meta")  # free the artifact's weights before loading the base
        base = measure(modeling.load_model(recipe.model).to(device))
    return {
        ref: {"base": base[ref], "artifact": mine[ref],
              "delta_loss": mine[ref]["loss"] - base[ref]["loss"],
              "delta_perplexity": mine[ref]["perplexity"] - base[ref]["perplexity"]}
        for ref in sets
    }


def _eval_head(recipe, target: Target) -> int:
    started = time.time()
    metrics = evaluate_artifact(recipe, target.path, recipe.eval.limit)
    harnessed = None
    if recipe.eval.harness is not None:  # the head scored through lm-eval (multiple choice over its labels)
        head = heads.load(target.path)
        harnessed = harness.evaluate(head.model, head.tokenizer, recipe.eval.harness, recipe_precision(recipe))
    if isinstance(metrics, dict):
        results = {"artifact": str(target.path), "kind": "head", "recipe_fingerprint": recipe.fingerprint(),
                   "metrics": metrics, **({"harness": harnessed} if harnessed is not None else {}),
                   "seconds": {"total": round(time.time() - started, 3)}}
        write_results(target.results_dir, results, [])
        log.info("\n%s", results_table(results))
    return 0


# -- output ------------------------------------------------------------------------------------
def _check_writable(out: Path) -> None:
    """Results go to OUT (the artifact's eval/): a read-only place is said before the eval runs."""
    import tempfile

    if not is_main_process():
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise UserError(f"cannot write the eval results to {out}: {e.strerror}",
                        "copy the run to writable storage (or make it writable), then rerun --eval-only") from None


def write_results(out: Path, results: dict, predictions: list[dict]) -> None:
    """eval_results.json (+ predictions.jsonl) in OUT, written once, by rank 0."""
    if not is_main_process():
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2, default=float) + "\n")
    if predictions:
        with open(out / PREDICTIONS_FILE, "w") as f:
            for p in predictions:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")


def results_table(results: dict) -> str:
    """A short markdown table of the metrics (and the retain sets, base vs artifact)."""
    rows = [f"eval of {results['artifact']} on {results.get('examples', '?')} examples", "",
            "| metric | value |", "|---|---|"]
    for k, v in results["metrics"].items():
        if isinstance(v, float):
            rows.append(f"| {k} | {v:.4f} |")
        elif isinstance(v, int):
            rows.append(f"| {k} | {v} |")
    speed = results.get("examples_per_second") or {}
    if speed:
        rows.append(f"| examples/s | {', '.join(f'{k} {v:.1f}' for k, v in speed.items())} |")
    matrix = results["metrics"].get("confusion_matrix")
    if matrix:  # classification heads: rows are true labels, columns predictions
        labels = results["metrics"].get("labels") or [str(i) for i in range(len(matrix))]
        rows += ["", "| true \\ predicted | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        rows += [f"| {lab} | " + " | ".join(map(str, r)) + " |" for lab, r in zip(labels, matrix)]
    rows += harness.results_rows(results.get("harness"))
    retain = results.get("retain") or {}
    if retain and all("artifact" in r for r in retain.values()):
        rows += ["", "| retain set | base loss | artifact loss | delta loss | base ppl | artifact ppl |",
                 "|---|---|---|---|---|---|"]
        for ref, r in retain.items():
            b, a = r["base"], r["artifact"]
            rows.append(f"| {ref} | {b['loss']:.4f} | {a['loss']:.4f} | {r['delta_loss']:+.4f} | "
                        f"{b['perplexity']:.3f} | {a['perplexity']:.3f} |")
    elif retain:
        rows += ["", "| retain set | loss | perplexity |", "|---|---|---|"]
        rows += [f"| {ref} | {r['base']['loss']:.4f} | {r['base']['perplexity']:.3f} |" for ref, r in retain.items()]
    return "\n".join(rows)
