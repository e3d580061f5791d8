"""On CPU the LM loss comes from the model's own logits (training.LogitsLossMixin), not TRL's fused
LM head: the same numbers, step for step, including TRL's logged metrics.

The fused head is what runs on a GPU; it also runs on CPU, so each case trains twice through the
real pipeline, once per path (has_accelerator decides which: forced True for the fused one), and
compares the logged history: loss, entropy, mean_token_accuracy, num_tokens and the eval loss.
Cases cover what could tell the paths apart: gradient accumulation (the token-weighted loss over
two micro-batches), prompt tuning (logits include the virtual tokens), packed rows (position ids,
no attention mask) and full fine-tuning (the LM head trains).
"""
import pytest

from conftest import ROOT

# fp32 summation-order tolerance: the fused head sums the log-softmax in vocabulary chunks
RTOL = 1e-5
KEYS = ("loss", "entropy", "mean_token_accuracy", "num_tokens", "eval_loss")
CASES = {
    "lora_accumulation": ("tiny_lora", ["training.gradient_accumulation_steps=2"]),
    "prompt_tuning": ("tiny_prompt_tuning", []),
    "full_packed": ("tiny_full", ["training.packing=true"]),
    # DFT weights each token's loss by its probability: only TRL's path computes it, so CPU must not bypass it
    "lora_dft": ("tiny_lora", ["training.loss_type=dft"]),
}


def history(name, overrides, tmp_path, monkeypatch, fused: bool):
    from llama_recipes import pipeline, training
    from llama_recipes.schema import load_recipe

    monkeypatch.setattr(training, "has_accelerator", lambda: fused)
    recipe = load_recipe(ROOT / "recipes" / "demo" / f"{name}.yaml", [
        "training.max_steps=4", "training.logging_steps=1", "training.eval_strategy=steps", "training.eval_steps=4",
        "training.report_to=none", "training.save_strategy=no", "eval.before_after=false", "eval.limit=16",
        f"output_dir={tmp_path / ('fused' if fused else 'logits')}", *overrides])
    run = pipeline.train(recipe)
    cls = type(run.trainer)
    assert any(c.__name__ == "LogitsLossMixin" for c in cls.__mro__) != fused
    return [{k: h[k] for k in KEYS if k in h} for h in run.trainer.state.log_history]


@pytest.mark.parametrize("case", CASES)
def test_logits_loss_equals_trl_fused_head(case, tmp_path, monkeypatch):
    name, overrides = CASES[case]
    ours = history(name, overrides, tmp_path, monkeypatch, fused=False)
    trl = history(name, overrides, tmp_path, monkeypatch, fused=True)
    assert [sorted(h) for h in ours] == [sorted(h) for h in trl]
    logged = [h for h in ours if "loss" in h]
    assert len(logged) == 4 and all({"entropy", "mean_token_accuracy", "num_tokens"} <= set(h) for h in logged)
    assert any("eval_loss" in h for h in ours)
    for a, b in zip(ours, trl):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=RTOL, abs=1e-6), (k, ours, trl)


# Preference trainers (training.CompactLogProbsMixin): on CPU only the completion positions are projected through
# the vocabulary; TRL's head projects every position. The same logged numbers, step for step, and the same eval.
PREFERENCE_KEYS = ("loss", "entropy", "mean_token_accuracy", "logits/chosen", "logits/rejected", "logps/chosen",
                   "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                   "kl", "eval_loss", "eval_rewards/margins")
PREFERENCE_CASES = {
    "dpo_lora_accumulation": ("tiny_dpo", ["training.gradient_accumulation_steps=2"]),
    "kto_lora": ("tiny_kto", []),
    # a frozen copy as the reference (full fine-tuning): its head is re-patched too
    "dpo_full": ("tiny_dpo", ["method={name: full}", "training.learning_rate=1e-4"]),
    # the logits include the virtual tokens first
    "dpo_prompt_tuning": ("tiny_prompt_tuning", ["objective.name=dpo", "data.path=builtin:topic_preference",
                                                 "data.format=preference", "eval.generate=false"]),
}


def preference_history(name, overrides, tmp_path, monkeypatch, trl_head: bool):
    from llama_recipes import pipeline, training
    from llama_recipes.objectives import preference
    from llama_recipes.schema import load_recipe

    monkeypatch.setattr(preference, "has_accelerator", lambda: trl_head)
    recipe = load_recipe(ROOT / "recipes" / "demo" / f"{name}.yaml", [
        "training.max_steps=4", "training.logging_steps=1", "training.eval_strategy=steps", "training.eval_steps=4",
        "training.report_to=none", "training.save_strategy=no", "eval.before_after=false", "eval.limit=16",
        f"output_dir={tmp_path / ('trl' if trl_head else 'compact')}", *overrides])
    run = pipeline.train(recipe)
    models = [run.trainer.model, getattr(run.trainer, "ref_model", None)]
    compact = [m for m in models if m is not None and "compact_fused_head" in repr(
        getattr(getattr(m, "get_base_model", lambda: m)(), "forward", None))]
    assert bool(compact) != trl_head
    return [{k: h[k] for k in PREFERENCE_KEYS if k in h} for h in run.trainer.state.log_history]


# gradient accumulation doubles the batch of the slowest case (~30 s): `make test-all` runs it
SLOW_PREFERENCE_CASES = {"dpo_lora_accumulation"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=[pytest.mark.slow] if c in SLOW_PREFERENCE_CASES else [])
                                  for c in PREFERENCE_CASES])
def test_compact_log_probs_equal_trl_fused_head(case, tmp_path, monkeypatch):
    name, overrides = PREFERENCE_CASES[case]
    ours = preference_history(name, overrides, tmp_path, monkeypatch, trl_head=False)
    trl = preference_history(name, overrides, tmp_path, monkeypatch, trl_head=True)
    assert [sorted(h) for h in ours] == [sorted(h) for h in trl]
    logged = [h for h in ours if "loss" in h]
    assert len(logged) == 4 and all({"entropy", "logps/chosen"} <= set(h) for h in logged)
    assert any("eval_loss" in h for h in ours)
    assert any(h["loss"] != logged[0]["loss"] for h in logged)  # it trained: the steps differ
    for a, b in zip(ours, trl):
        for k in a:
            # rewards and KL are beta x (log p - log p_ref): a difference of two sums of ~30 nats, so their
            # error is absolute: beta (<= 1) x |log p| (<= 50) x RTOL = 5e-4 at most
            tol = 5e-4 if k.startswith(("rewards/", "eval_rewards/")) or k == "kl" else 1e-6
            assert a[k] == pytest.approx(b[k], rel=RTOL, abs=tol), (k, ours, trl)


def test_shared_prompt_rows_give_each_row_its_own_log_probs():
    """Pairs laid out as `prompt, chosen, rejected`: every completion token's log-probability equals the one of
    TRL's separate rows (the tiny Llama, sdpa, fp32), and batches that are not such pairs are left alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from llama_recipes.training import shared_prompt_rows

    model = AutoModelForCausalLM.from_pretrained(ROOT / "llama_recipes" / "assets" / "tiny-llama",
                                                 dtype=torch.float32).eval()
    pad = 3
    pairs = [([5, 6, 7, 20], [8, 9], [10]), ([5, 11], [12], [13, 14, 15])]  # prompt, chosen, rejected
    rows = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    attn = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    prompts = [len(p) for p, _, _ in pairs] * 2
    labels = ids.masked_fill(torch.arange(width)[None] < torch.tensor(prompts)[:, None], -100).masked_fill(attn == 0, -100)
    tree = shared_prompt_rows({"input_ids": ids, "attention_mask": attn, "use_cache": False}, labels)
    assert tree is not None
    tree_ids, positions, allowed, index = tree
    assert tree_ids.tolist()[0] == [5, 6, 7, 20, 8, 9, 10] and positions.tolist()[0] == [0, 1, 2, 3, 4, 5, 4]
    assert not allowed[0, 6, 4:6].any() and allowed[0, 6, :4].all()  # rejected sees the prompt, not chosen
    with torch.no_grad():
        separate = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1], -1)
        mask = labels[:, 1:] != -100
        expected = separate[mask].gather(-1, labels[:, 1:][mask][:, None]).squeeze(-1)
        mask4d = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
        hidden = model.model(input_ids=tree_ids, attention_mask=mask4d, position_ids=positions).last_hidden_state
        got = torch.log_softmax(model.lm_head(hidden.reshape(-1, hidden.shape[-1])[index]), -1)
        got = got.gather(-1, labels[:, 1:][mask][:, None]).squeeze(-1)
    assert len(expected) == 2 + 1 + 1 + 3
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), (got, expected)
    # not pairs: prompts differ, an odd row count, a row with nothing before its completion
    other = ids.clone()
    other[2, 0] = 30
    assert shared_prompt_rows({"input_ids": other, "attention_mask": attn}, labels) is None
    assert shared_prompt_rows({"input_ids": ids[:3], "attention_mask": attn[:3]}, labels[:3]) is None
    assert shared_prompt_rows({"input_ids": ids, "attention_mask": attn, "inputs_embeds": torch.zeros(1)}, labels) is None
