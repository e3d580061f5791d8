"""Measure a model on preference data: summed completion log-probabilities, pairwise accuracies.

    preference_accuracy   share of held-out pairs where log p(chosen | prompt) > log p(rejected | prompt)
    logp_margin           mean of log p(chosen) - log p(rejected) (completion tokens only, summed)
    reward_accuracy       after training: share of pairs whose implicit reward beta * (log p - log p_ref)
                          is higher for chosen (against the reference: the model before training)
    pairwise_accuracy     reward models: share of pairs the model scores chosen above rejected

Tokenized the way TRL 1.16's preference trainers tokenize (DPOTrainer._prepare_dataset: EOS
appended to text completions, the chat template for conversations, the completion starting where
prompt and prompt+completion diverge; the sequence cut to training.max_length from the start, as
its collator does), so training, the dry run and `--eval-only` measure the same tokens.
"""
from __future__ import annotations

import math

from llama_recipes.measure import _progress


def _completion_ids(tokenizer, prompt, completion) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) as TRL tokenizes a prompt and one completion."""
    from trl.data_utils import _tokenize  # TRL 1.16's own per-example tokenizer (chat template or plain)

    if isinstance(completion, str):
        eos = tokenizer.eos_token
        completion = completion if completion.endswith(eos) else completion + eos
        prompt_ids = _tokenize(tokenizer, prompt)["input_ids"]
        full = _tokenize(tokenizer, prompt + completion)["input_ids"]
    else:
        prompt_ids = _tokenize(tokenizer, prompt, add_generation_prompt=True)["input_ids"]
        full = _tokenize(tokenizer, prompt + completion)["input_ids"]
    k = 0
    while k < min(len(prompt_ids), len(full)) and prompt_ids[k] == full[k]:
        k += 1
    return full[:k], full[k:]


def sequences(tokenizer, rows, sides: tuple[str, ...]) -> list[tuple[list[int], int]]:
    """For each row and side: (prompt + completion ids, where the completion starts)."""
    out = []
    for row in rows:
        for side in sides:
            prompt_ids, comp = _completion_ids(tokenizer, row["prompt"], row[side])
            out.append((prompt_ids + comp, len(prompt_ids)))
    return out


def reward_sequences(tokenizer, rows) -> list[tuple[list[int], int]]:
    """prompt + chosen and prompt + rejected per row, whole, as TRL's RewardTrainer tokenizes them."""
    from trl.data_utils import _tokenize

    eos, out = tokenizer.eos_token, []
    for row in rows:
        for side in ("chosen", "rejected"):
            text = row[side]
            if isinstance(text, str) and not text.endswith(eos):
                text += eos
            out.append((_tokenize(tokenizer, row["prompt"] + text)["input_ids"], 0))
    return out


def completion_logps(model, seqs: list[tuple[list[int], int]], pad_id: int, batch_size: int,
                     max_length: int | None = None, progress: bool = False) -> list[float]:
    """Summed log-probability of each sequence's completion tokens (sequence cut to max_length from the start)."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    seqs = [(ids[:max_length] if max_length else ids, start) for ids, start in seqs]
    out: list[float] = []
    starts = range(0, len(seqs), batch_size)
    with torch.inference_mode():
        for b in _progress(starts, len(starts), "preference log-probs", progress):
            chunk = seqs[b:b + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            comp = torch.zeros((len(chunk), width), dtype=torch.bool)
            for i, (row, start) in enumerate(chunk):
                ids[i, :len(row)] = torch.tensor(row)
                mask[i, :len(row)] = 1
                comp[i, start:len(row)] = True
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            logits = logits[:, -width:].float()  # prompt tuning: the virtual tokens' logits come first
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device)).squeeze(-1)
            out += (logp * comp[:, 1:].to(device)).sum(-1).tolist()
    return out


def sequence_scores(model, seqs: list[tuple[list[int], int]], pad_id: int, batch_size: int,
                    max_length: int | None = None) -> list[float]:
    """A reward model's score of each whole sequence (the classifier's one output at its last token)."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    out: list[float] = []
    with torch.inference_mode():
        for b in range(0, len(seqs), batch_size):
            chunk = [ids[:max_length] if max_length else ids for ids, _ in seqs[b:b + batch_size]]
            width = max(len(ids) for ids in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, row in enumerate(chunk):
                ids[i, :len(row)] = torch.tensor(row)
                mask[i, :len(row)] = 1
            out += model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float().tolist()
    return out


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def pair_metrics(chosen: list[float], rejected: list[float], reference: dict | None, beta: float) -> dict:
    """Accuracy and margins of paired log-probs; against `reference` (its per_pair) the implicit reward too."""
    out = {
        "preference_accuracy": _mean(c > r for c, r in zip(chosen, rejected)),
        "logp_margin": _mean(c - r for c, r in zip(chosen, rejected)),
        "chosen_logp": _mean(chosen),
        "rejected_logp": _mean(rejected),
        "examples": len(chosen),
    }
    ref = (reference or {}).get("per_pair")
    if ref and len(ref["chosen"]) == len(chosen):
        deltas = [(c - rc) - (r - rr) for c, r, rc, rr in zip(chosen, rejected, ref["chosen"], ref["rejected"])]
        out["reward_accuracy"] = _mean(d > 0 for d in deltas)
        out["reward_margin"] = beta * _mean(deltas)
    out["per_pair"] = {"chosen": list(chosen), "rejected": list(rejected)}
    return out


def unpaired_metrics(logps: list[float], labels: list[bool], reference: dict | None, beta: float) -> dict:
    """KTO's held-out numbers: mean log-prob of desirable and undesirable completions, their gap; against
    `reference`, the share of rows whose implicit reward has the sign of their label."""
    good = [x for x, y in zip(logps, labels) if y]
    bad = [x for x, y in zip(logps, labels) if not y]
    out = {"desirable_logp": _mean(good), "undesirable_logp": _mean(bad), "examples": len(logps)}
    out["logp_margin"] = out["desirable_logp"] - out["undesirable_logp"] if good and bad else float("nan")
    ref = (reference or {}).get("per_row")
    if ref and len(ref) == len(logps):
        out["reward_accuracy"] = _mean((x - r > 0) == y for x, r, y in zip(logps, ref, labels))
        out["reward_margin"] = beta * (_mean(x - r for x, r, y in zip(logps, ref, labels) if y)
                                       - _mean(x - r for x, r, y in zip(logps, ref, labels) if not y))
    out["per_row"] = list(logps)
    out["labels"] = [int(y) for y in labels]
    return {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}


def score_metrics(chosen: list[float], rejected: list[float]) -> dict:
    return {"pairwise_accuracy": _mean(c > r for c, r in zip(chosen, rejected)),
            "reward_margin": _mean(c - r for c, r in zip(chosen, rejected)),
            "chosen_reward": _mean(chosen), "rejected_reward": _mean(rejected), "examples": len(chosen)}
