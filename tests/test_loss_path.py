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
