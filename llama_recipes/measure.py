"""Measure a model: token-weighted loss/perplexity, greedy generation, the tokens TRL trains on.

What training (before/after numbers, methods/lm.py), the dry run and `--eval-only`
(evaluation.py) all measure with, so the three report the same numbers for the same model.
Under torchrun/accelerate launch `eval_loss(shard=True)` splits rows across ranks and sums once.
"""
import hashlib
import json
import math

from llama_recipes import chat
from llama_recipes.log import is_main_process
from llama_recipes.metrics import generation_scores
from llama_recipes.runtime import collectives, distributed
from llama_recipes.schema.objective import SPECS
from llama_recipes.schema.trl import config_fields


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
def pad_collate(rows: list[dict], pad_token_id: int, width: int | None = None) -> dict:
    """Right-pad input_ids/labels rows into a batch (what TRL's collator does without packing),
    to the longest row or to `width`."""
    import torch

    width = width or max(len(r["input_ids"]) for r in rows)
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
             add_special_tokens: bool = True, progress: bool = False, stop_ids: list[int] | None = None) -> list[str]:
    """Greedy, batched, left-padded generation that stops at EOS (or any of `stop_ids`: a chat template's
    end-of-turn token); returns only the new text.

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
        with torch.inference_mode(), distributed.full_params_for_generate(model):
            for start in _progress(starts, len(starts), "generate", progress):
                idx = order[start:start + batch_size]
                enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                                add_special_tokens=add_special_tokens).to(device)
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False,
                    eos_token_id=stop_ids or tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                )
                new = out[:, enc["input_ids"].shape[1]:]
                outputs.update(zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)))
    finally:
        tokenizer.padding_side = side
    return [outputs[i] for i in range(len(prompts))]


def evaluate_lm(model, tokenizer, tokenized_eval, raw_eval, collator, cfg) -> dict:
    """Before/after numbers of a training run: loss/perplexity on TRL's tokenized eval set and, for
    prompt/completion data and chats ending in an assistant turn, the recipe's generation metrics
    (generated as --eval-only does: generation_pairs)."""
    n = min(len(tokenized_eval), cfg.limit or len(tokenized_eval))
    result = eval_loss(model, tokenized_eval.select(range(n)), collator, cfg.batch_size)
    pairs = generation_pairs(raw_eval.select(range(min(n, len(raw_eval)))), tokenizer) \
        if cfg.generate and cfg.metrics and raw_eval is not None else None
    if pairs:
        prompts, refs, special, stop = pairs
        preds = generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, add_special_tokens=special,
                         stop_ids=stop)
        result.update(generation_scores(preds, refs, cfg.metrics))
        result["examples"] = len(preds)
    return result


# -- tokenization for --eval-only (the same tokens and loss mask TRL's SFTTrainer trains on) ---
def training_setting(recipe, key: str):
    """A `training:` value as the trainer sees it: the recipe's, else the default of its objective's TRL config."""
    kwargs = recipe.training.trainer_kwargs()
    return kwargs[key] if key in kwargs else config_fields(SPECS[recipe.objective.name].config).get(key, {}).get("default")


def tokenize_like_trl(ds, tokenizer, recipe):
    """input_ids + labels per row, as TRL 1.16's SFTTrainer prepares them (no packing).

    prompt/completion: EOS appended to the completion, loss only on completion tokens unless
    data.train_on_prompt; text: EOS appended, loss on every token; chat: chat.tokenize, as
    data.prepare hands it to TRL (loss on assistant turns through their end-of-turn token unless
    data.train_on_prompt). Truncated to training.max_length (training.truncation_mode); rows left
    without a supervised token are dropped, and with data.over_length: drop so are rows longer
    than max_length (data.prepare drops them before training sees them).
    """
    ds = _tokenized(ds, tokenizer, recipe)
    longest = training_setting(recipe, "max_length") if recipe.data.over_length == "drop" else None
    ds = ds.filter(lambda ex: any(x != -100 for x in ex["labels"]) and (longest is None or ex["length"] <= longest))
    return ds.remove_columns("length")


def within_max_length(ds, tokenizer, recipe) -> list[int]:
    """Indices of the rows data.over_length: drop keeps (all rows under truncate or without max_length)."""
    max_length = training_setting(recipe, "max_length")
    if recipe.data.over_length != "drop" or max_length is None:
        return list(range(len(ds)))
    return [i for i, n in enumerate(_tokenized(ds, tokenizer, recipe)["length"]) if n <= max_length]


def _tokenized(ds, tokenizer, recipe):
    """tokenize_like_trl's rows before filtering, with `length`: the row's token count before truncation."""
    eos = tokenizer.eos_token
    only_prompted = not recipe.data.train_on_prompt  # data.sft_overrides: the one switch for both families
    max_length = training_setting(recipe, "max_length")
    keep_end = training_setting(recipe, "truncation_mode") == "keep_end"
    text_field = training_setting(recipe, "dataset_text_field") or "text"

    def one(ex):
        if "prompt" in ex:
            completion = ex["completion"] if ex["completion"].endswith(eos) else ex["completion"] + eos
            prompt_ids = tokenizer(text=ex["prompt"])["input_ids"]
            ids = tokenizer(text=ex["prompt"] + completion)["input_ids"]
            k = 0
            while k < min(len(prompt_ids), len(ids)) and prompt_ids[k] == ids[k]:
                k += 1
            mask = [i >= k for i in range(len(ids))] if only_prompted else [True] * len(ids)
        elif "messages" in ex:
            out = chat.tokenize(tokenizer, ex["messages"], only_assistant=only_prompted)
            ids, mask = out["input_ids"], [bool(b) for b in out["assistant_masks"]]
        else:
            text = ex[text_field] if ex[text_field].endswith(eos) else ex[text_field] + eos
            ids = tokenizer(text=text)["input_ids"]
            mask = [True] * len(ids)
        labels = [t if m else -100 for t, m in zip(ids, mask)]
        length = len(ids)
        if max_length is not None:
            cut = slice(-max_length, None) if keep_end else slice(None, max_length)
            ids, labels = ids[cut], labels[cut]
        return {"input_ids": ids, "labels": labels, "length": length}

    return ds.map(one, remove_columns=ds.column_names)


def generation_pairs(raw, tokenizer) -> tuple[list[str], list[str], bool, list[int] | None] | None:
    """(prompts, references, add_special_tokens, stop ids) for generation, or None if the data has no answers.

    prompt/completion rows: the prompt as trained on, stopping at EOS. Chat rows ending in an assistant
    turn: the conversation before it rendered with the model's generation prompt (the template adds BOS
    itself), stopping at the template's end-of-turn token (the one training supervises) or EOS.
    """
    cols = raw.column_names
    if "prompt" in cols and "completion" in cols:
        return list(raw["prompt"]), list(raw["completion"]), True, None
    if "messages" in cols and getattr(tokenizer, "chat_template", None):
        prompts, refs = [], []
        for msgs in raw["messages"]:
            if msgs and msgs[-1]["role"] == "assistant":
                prompts.append(tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True))
                refs.append(msgs[-1]["content"])
        return (prompts, refs, False, chat.stop_token_ids(tokenizer, raw[0]["messages"])) if prompts else None
    return None


def fingerprint_rows(ds) -> str:
    """Content hash of the rows evaluated (the same rows give the same hash on any machine)."""
    h = hashlib.sha256()
    for row in ds:
        h.update(json.dumps(row, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


