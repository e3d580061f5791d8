"""Measure a model on held-out data: token-weighted loss/perplexity, generation metrics, forgetting.

Two entry points:
  evaluate_lm(...)     the before/after numbers of a training run (pipeline.py), on TRL's tokenized eval set;
  eval_only(recipe, args)  `run_recipe.py RECIPE --eval-only [--checkpoint PATH | --base]`: loads one
                       artifact, evaluates it (sharded across ranks under torchrun/accelerate launch),
                       writes ARTIFACT/eval/{eval_results.json,predictions.jsonl} on rank 0, logs a table.
"""
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from llama_recipes.errors import UserError
from llama_recipes.log import get_logger, is_main_process
from llama_recipes.metrics import exact_match, generation_scores, normalize_answer  # noqa: F401  (re-exported)
from llama_recipes.runtime import collectives

log = get_logger(__name__)
RESULTS_FILE = "eval_results.json"
PREDICTIONS_FILE = "predictions.jsonl"


def _progress(iterable, total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled or not is_main_process(), leave=False)


def autocast(args):
    """The mixed-precision context a trainer with these arguments computes in (a no-op for fp32).

    accelerate wraps the trained model's forward in it; a model loaded from disk for eval
    computes under the same one, so eval numbers are the numbers training measured.
    """
    import contextlib

    import torch

    dtype = torch.bfloat16 if getattr(args, "bf16", False) is True else (
        torch.float16 if getattr(args, "fp16", False) else None)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if torch.cuda.is_available() else "cpu", dtype=dtype)


# -- loss and perplexity -----------------------------------------------------------------------
def pad_collate(rows: list[dict], pad_token_id: int) -> dict:
    """Right-pad input_ids/labels rows into a batch (what TRL's collator does without packing)."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r.get("labels", r["input_ids"]))
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def eval_loss(model, dataset, collator, batch_size: int = 16, shard: bool = False, progress: bool = False) -> dict:
    """Token-weighted mean loss over every supervised token (labels != -100) of a tokenized dataset.

    Unlike Trainer.evaluate (a mean of per-batch means), every supervised token weighs the same,
    so the number does not depend on the batch size. With shard=True each rank takes every
    world_size-th row and the sums are added across ranks once at the end.
    """
    import torch

    model.eval()
    rank, world = collectives.rank_world() if shard else (0, 1)
    order = list(range(rank, len(dataset), world))
    if "input_ids" in dataset.column_names:  # longest first: less padding, and an early OOM if any
        lengths = [len(x) for x in dataset.select(order)["input_ids"]] if order else []
        order = [i for _, i in sorted(zip(lengths, order), key=lambda t: -t[0])]
    total, count = 0.0, 0
    device = next(model.parameters()).device
    starts = range(0, len(order), batch_size)
    with torch.inference_mode():
        for start in _progress(starts, len(starts), "eval loss", progress):
            rows = [dataset[i] for i in order[start:start + batch_size]]
            batch = {k: v.to(device) for k, v in collator(rows).items() if hasattr(v, "to")}
            labels = batch.pop("labels")
            # use_cache=False: with padding-free position_ids the cache path lets samples attend to each other
            logits = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")},
                           use_cache=False).logits
            logits = logits[:, -labels.shape[1]:]  # prompt tuning prepends virtual-token logits
            shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                ignore_index=-100, reduction="sum",
            )
            total += loss.item()
            count += int((shift_labels != -100).sum())
    if shard:
        total, count = collectives.all_sum([total, float(count)])
        count = int(count)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50)), "tokens": count}


# -- generation --------------------------------------------------------------------------------
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 16,
             add_special_tokens: bool = True, progress: bool = False) -> list[str]:
    """Greedy, batched, left-padded generation that stops at EOS; returns only the new text.

    Prompts are batched by length (less padding) and returned in the input order.
    """
    import torch

    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    outputs: dict[int, str] = {}
    starts = range(0, len(order), batch_size)
    try:
        with torch.inference_mode():
            for start in _progress(starts, len(starts), "generate", progress):
                idx = order[start:start + batch_size]
                enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                                add_special_tokens=add_special_tokens).to(device)
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                )
                new = out[:, enc["input_ids"].shape[1]:]
                outputs.update(zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)))
    finally:
        tokenizer.padding_side = side
    return [outputs[i] for i in range(len(prompts))]


def evaluate_lm(model, tokenizer, tokenized_eval, raw_eval, collator, cfg) -> dict:
    """Before/after numbers of a training run: loss/perplexity on TRL's tokenized eval set and,
    for prompt/completion data, the recipe's generation metrics."""
    n = min(len(tokenized_eval), cfg.limit or len(tokenized_eval))
    result = eval_loss(model, tokenized_eval.select(range(n)), collator, cfg.batch_size)
    if cfg.generate and cfg.metrics and raw_eval is not None and "prompt" in raw_eval.column_names:
        rows = raw_eval.select(range(min(n, len(raw_eval))))
        preds = generate(model, tokenizer, rows["prompt"], cfg.max_new_tokens, cfg.batch_size)
        result.update(generation_scores(preds, rows["completion"], cfg.metrics))
        result["examples"] = len(preds)
    return result


# -- tokenization for --eval-only (the same tokens and loss mask TRL's SFTTrainer trains on) ---
def _training_setting(recipe, key: str):
    from llama_recipes.schema.training import sft_fields

    kwargs = recipe.training.sft_kwargs()
    return kwargs[key] if key in kwargs else sft_fields().get(key, {}).get("default")


def tokenize_like_trl(ds, tokenizer, recipe):
    """input_ids + labels per row, as TRL 1.16's SFTTrainer prepares them (no packing).

    prompt/completion: EOS appended to the completion, loss only on completion tokens unless
    training.completion_only_loss is false; text: EOS appended, loss on every token; chat: the
    chat template, loss on assistant tokens when training.assistant_only_loss. Truncated to
    training.max_length (keep_start); rows left without a supervised token are dropped.
    """
    eos = tokenizer.eos_token
    only_completion = _training_setting(recipe, "completion_only_loss")
    only_assistant = bool(_training_setting(recipe, "assistant_only_loss"))
    max_length = _training_setting(recipe, "max_length")
    text_field = _training_setting(recipe, "dataset_text_field") or "text"

    def one(ex):
        if "prompt" in ex:
            completion = ex["completion"] if ex["completion"].endswith(eos) else ex["completion"] + eos
            prompt_ids = tokenizer(text=ex["prompt"])["input_ids"]
            ids = tokenizer(text=ex["prompt"] + completion)["input_ids"]
            k = 0
            while k < min(len(prompt_ids), len(ids)) and prompt_ids[k] == ids[k]:
                k += 1
            mask = [i >= k for i in range(len(ids))] if only_completion is not False else [True] * len(ids)
        elif "messages" in ex:
            out = tokenizer.apply_chat_template(ex["messages"], tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=only_assistant)
            ids = list(out["input_ids"])
            mask = [bool(b) for b in out["assistant_masks"]] if only_assistant else [True] * len(ids)
        else:
            text = ex[text_field] if ex[text_field].endswith(eos) else ex[text_field] + eos
            ids = tokenizer(text=text)["input_ids"]
            mask = [True] * len(ids)
        labels = [t if m else -100 for t, m in zip(ids, mask)]
        if max_length is not None:
            ids, labels = ids[:max_length], labels[:max_length]
        return {"input_ids": ids, "labels": labels}

    ds = ds.map(one, remove_columns=ds.column_names)
    return ds.filter(lambda ex: any(x != -100 for x in ex["labels"]))


def generation_pairs(raw, tokenizer) -> tuple[list[str], list[str], bool] | None:
    """(prompts, references, add_special_tokens) for generation, or None if the data has no answers.

    prompt/completion rows: the prompt as trained on. Chat rows ending in an assistant turn: the
    conversation before it rendered with the generation prompt (the template adds BOS itself).
    """
    cols = raw.column_names
    if "prompt" in cols and "completion" in cols:
        return list(raw["prompt"]), list(raw["completion"]), True
    if "messages" in cols and getattr(tokenizer, "chat_template", None):
        prompts, refs = [], []
        for msgs in raw["messages"]:
            if msgs and msgs[-1]["role"] == "assistant":
                prompts.append(tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True))
                refs.append(msgs[-1]["content"])
        return (prompts, refs, False) if prompts else None
    return None


def fingerprint_rows(ds) -> str:
    """Content hash of the rows evaluated (the same rows give the same hash on any machine)."""
    h = hashlib.sha256()
    for row in ds:
        h.update(json.dumps(row, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


# -- what to evaluate --------------------------------------------------------------------------
@dataclass
class Target:
    kind: str  # "base", "adapter", "model" or "head"
    path: Path | None  # the artifact directory (None for the base model)
    results_dir: Path  # where eval_results.json and predictions.jsonl go


def resolve_target(recipe, checkpoint: str | None, base: bool) -> Target:
    """Which artifact the flags name, and what kind it is (from the files it holds)."""
    out = Path(recipe.output_dir)
    if base and checkpoint:
        raise UserError("--base and --checkpoint name two different models", "pass one of them")
    if base:
        return Target("base", None, out / "eval" / "base")
    path = Path(checkpoint) if checkpoint else out
    if not path.is_dir():
        what = f"--checkpoint {path}" if checkpoint else f"output_dir {path}"
        raise UserError(f"{what} is not a directory", "train the recipe first, or pass --checkpoint DIR (or --base)")
    for marker, kind in (("head_config.json", "head"), ("adapter_config.json", "adapter"), ("config.json", "model")):
        if (path / marker).is_file():
            return Target(kind, path, path / "eval")
    ckpts = sorted(path.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
    hint = f"intermediate checkpoints here: {', '.join(p.name for p in ckpts)}; pass --checkpoint {ckpts[-1]}" if ckpts \
        else "train the recipe first (or pass --checkpoint DIR or --base)"
    raise UserError(f"no model artifact in {path} (no adapter_config.json, config.json or head_config.json)", hint)


def load_for_eval(recipe, target: Target):
    """(tokenizer, model): the artifact's own tokenizer when it saved one, the recipe's otherwise.

    adapter -> the recipe's base model + PeftModel.from_pretrained; model -> the directory itself
    loaded with the recipe's dtype and attention kernel; base -> the recipe's base model.
    """
    from llama_recipes import modeling

    model_cfg = recipe.model
    tok_cfg = model_cfg
    if target.path is not None and (target.path / "tokenizer_config.json").is_file():
        tok_cfg = model_cfg.model_copy(update={"tokenizer": str(target.path)})
    tokenizer = modeling.load_tokenizer(tok_cfg)
    if target.kind == "model":
        model = modeling.load_model(model_cfg.model_copy(update={"name_or_path": str(target.path), "revision": None}))
    else:  # the base as training loaded it (4-bit for QLoRA), so adapter numbers match training's
        from llama_recipes import methods

        model = modeling.load_model(model_cfg, **methods.load_kwargs(recipe.method))
    if target.kind == "adapter":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(target.path))
    return tokenizer, model


def _load_retain(ref: str, limit: int | None):
    """A retain set as rendered rows (text, prompt/completion or chat)."""
    import datasets

    from llama_recipes import data
    from llama_recipes.paths import resolve
    from llama_recipes.schema.data import DataConfig

    path = Path(resolve(ref, "data"))
    cfg = DataConfig(path=ref)
    if path.is_dir():  # every data file in the directory (builtin:retain holds generic.jsonl)
        files = sorted(str(p) for p in path.iterdir() if p.suffix in data._EXTENSIONS)
        if not files:
            raise UserError(f"eval.retain {ref!r}: no .jsonl/.json/.csv/.parquet file in {path}")
        ds = datasets.load_dataset(data._EXTENSIONS[Path(files[0]).suffix], data_files=files, split="train")
    else:
        ds = data.load_split(cfg, "train")
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    from llama_recipes.schema.data import SourceConfig

    return data.render(ds, SourceConfig(path=ref), data.detect_format(ds.column_names))


# -- --eval-only -------------------------------------------------------------------------------
def eval_only(recipe, args) -> int:
    """Evaluate one artifact (or the base) with the recipe's eval settings; returns the exit code."""
    target = resolve_target(recipe, getattr(args, "checkpoint", None), getattr(args, "base", False))
    if target.kind == "head":
        return _eval_head(recipe, target)
    try:
        results, predictions = evaluate_target(recipe, target)
        write_results(target.results_dir, results, predictions)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    log.info("\n%s", results_table(results))
    log.info("eval results in %s", target.results_dir / RESULTS_FILE)
    return 0


def evaluate_target(recipe, target: Target) -> tuple[dict, list[dict]]:
    """Load, evaluate (loss, generation, retain sets), gather across ranks; (results, predictions)."""
    import datasets
    from transformers import set_seed

    from llama_recipes import data

    datasets.disable_progress_bars()  # a few thousand rows map in a blink; the eval bars are the ones that matter
    cfg = recipe.eval
    started = time.time()
    device = collectives.init_for_eval()
    set_seed(cfg.seed)
    rank, world = collectives.rank_world()
    seconds: dict[str, float] = {}

    _, eval_raw, fmt = data.build_datasets(recipe.data)
    if eval_raw is None:
        raise UserError("--eval-only needs held-out data, and data.eval_split is not set",
                        "set data.eval_split to a split name (eval) or a fraction (0.05)")
    if cfg.limit:
        eval_raw = eval_raw.select(range(min(cfg.limit, len(eval_raw))))

    t = time.time()
    tokenizer, model = load_for_eval(recipe, target)
    if not getattr(model, "is_quantized", False) and not getattr(model, "hf_device_map", None):
        model.to(device)
    seconds["load"] = time.time() - t

    collate = lambda rows: pad_collate(rows, tokenizer.pad_token_id)  # noqa: E731
    with autocast(recipe_precision(recipe)):  # the precision the recipe trains in
        return _evaluate_loaded(recipe, target, cfg, eval_raw, fmt, tokenizer, model, collate, started, seconds)


def recipe_precision(recipe):
    """The recipe's training precision on this machine (bf16: auto resolved as training does)."""
    from types import SimpleNamespace

    from llama_recipes.hardware import auto_bf16

    t = recipe.training
    bf16 = t.bf16 if t.bf16 != "auto" else (not t.fp16 and auto_bf16()[0])
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
        prompts, refs, special = pairs
        t = time.time()
        mine = list(range(rank, len(prompts), world))
        preds = generate(model, tokenizer, [prompts[i] for i in mine], cfg.max_new_tokens, cfg.batch_size,
                         add_special_tokens=special, progress=True)
        gathered = dict(kv for part in collectives.all_gather_object(list(zip(mine, preds))) for kv in part)
        preds = [gathered[i] for i in range(len(prompts))]
        seconds["generate"] = time.time() - t
        metrics.update(generation_scores(preds, refs, cfg.metrics))
        predictions = [{"prompt": p, "reference": r, "prediction": y} for p, r, y in zip(prompts, refs, preds)]

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
        from llama_recipes import modeling

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
    try:
        from llama_recipes.heads import evaluate_artifact
    except ImportError as e:
        raise UserError(f"{target.path} is a classification-head artifact, but head evaluation is not available "
                        f"in this install ({e})",
                        "update llama-recipes to a version with llama_recipes/heads.py") from None
    started = time.time()
    metrics = evaluate_artifact(recipe, target.path, recipe.eval.limit)
    if isinstance(metrics, dict):
        results = {"artifact": str(target.path), "kind": "head", "recipe_fingerprint": recipe.fingerprint(),
                   "metrics": metrics, "seconds": {"total": round(time.time() - started, 3)}}
        write_results(target.results_dir, results, [])
        log.info("\n%s", results_table(results))
    return 0


# -- output ------------------------------------------------------------------------------------
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
