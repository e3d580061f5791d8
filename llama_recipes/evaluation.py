"""Measure a model on held-out data: token-weighted loss/perplexity and greedy-generation metrics."""
import math
import re
import string

from llama_recipes.log import get_logger

log = get_logger(__name__)


def normalize_answer(s: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def eval_loss(model, dataset, collator, batch_size: int = 16) -> dict:
    """Token-weighted mean loss over every supervised token (labels != -100) of a tokenized dataset.

    Unlike Trainer.evaluate (a mean of per-batch means), every supervised token weighs the same,
    so the number does not depend on the batch size.
    """
    import torch

    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
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
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50)), "tokens": count}


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """Greedy, batched, left-padded generation that stops at EOS; returns only the new text."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    outputs: list[str] = []
    try:
        with torch.inference_mode():
            for start in range(0, len(prompts), batch_size):
                enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True).to(device)
                out = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                )
                new = out[:, enc["input_ids"].shape[1]:]
                outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outputs


def evaluate_lm(model, tokenizer, tokenized_eval, raw_eval, collator, cfg) -> dict:
    """Loss/perplexity on the tokenized eval set and, for prompt/completion data, exact match."""
    n = min(len(tokenized_eval), cfg.limit or len(tokenized_eval))
    result = eval_loss(model, tokenized_eval.select(range(n)), collator, cfg.batch_size)
    if cfg.generate and raw_eval is not None and "prompt" in raw_eval.column_names:
        rows = raw_eval.select(range(min(n, len(raw_eval))))
        preds = generate(model, tokenizer, rows["prompt"], cfg.max_new_tokens, cfg.batch_size)
        result["exact_match"] = sum(map(exact_match, preds, rows["completion"])) / max(len(preds), 1)
        result["examples"] = len(preds)
    return result
