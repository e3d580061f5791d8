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


@pytest.mark.parametrize("case", PREFERENCE_CASES)
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
