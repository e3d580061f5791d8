"""DPO: ours (objective: dpo through pipeline.train) vs a plain TRL 1.16 `DPOTrainer`, side by side.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python bench/bench_dpo.py [--recipe R] [--steps N] [--rounds K] [KEY=VALUE ...]

Both sides train the same LoRA (r16, alpha 32, all-linear, fp32) on the same base, the same rendered
preference rows (ours renders `builtin:topic_preference`; TRL gets those rows), the same DPOConfig
settings (beta, lr, batch, max_length, seed); the reference is the base with the adapter off on both.
What differs is only what llama-recipes adds around TRL. Timed: the Trainer's `train_runtime` (start-up,
model load and tokenization excluded on both sides), tokens/s from the rows' chosen + rejected tokens.
Rounds alternate ours, TRL; the ratio is the median of TRL seconds / our seconds (> 1: ours faster).
Also printed: the per-step losses of both (they should agree: same data order, same seed) and, after the
last round, each side's held-out preference accuracy (the recipe's eval pairs, scored by the same function
for both: llama_recipes.preference). `--epoch` trains one epoch of the recipe's rows instead of `--steps`.
MFU, as for SFT (docs/benchmarks.md section 1): model FLOPs of the standard DPO step over the fp32 matmul
peak measured in the same run (common.peak_matmul_flops). Per token of the chosen and rejected sequences
(prompt + completion each, what TRL's DPOTrainer runs): the policy's forward and backward (6N, full
fine-tuning's count; a frozen base computes no weight gradients, ~4N) and the reference's forward (2N):
MFU(8N) = 8 * N * tokens/s / peak. Both sides count the same tokens; ours does less work for them (the
shared prompt once, completion positions only through the head), so its MFU may exceed what the matmuls
alone reach.
On CPU ours projects only the completion positions through the vocabulary (training.CompactLogProbsMixin);
TRL's fused head projects every position, twice.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COMMON = ["training.bf16=false", "training.report_to=none", "training.save_strategy=no",
          "eval.before_after=false", "eval.harness=null"]


def ours(recipe_path: Path, steps: int, out: Path, overrides=()):
    from llama_recipes import pipeline
    from llama_recipes.schema import load_recipe

    recipe = load_recipe(recipe_path, [*overrides, f"output_dir={out}", f"training.max_steps={steps}",
                                       "training.logging_steps=1", *COMMON])
    run = pipeline.train(recipe)
    hist = run.trainer.state.log_history
    return recipe, run.trainer, [h["loss"] for h in hist if "loss" in h], hist[-1]["train_runtime"]


def trl_trainer(recipe, rows, steps: int, out: Path, **kwargs):
    """A plain TRL 1.16 DPOTrainer at the recipe's settings (LoRA via peft_config, fp32); `kwargs` go to it
    (ref_model, callbacks). Seeded right before the policy loads, as ours is."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from llama_recipes import paths

    torch.manual_seed(recipe.seed)
    model_dir = paths.model_path(recipe.model)
    tok = AutoTokenizer.from_pretrained(paths.tokenizer_path(recipe.model))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    m = recipe.method
    peft = LoraConfig(task_type="CAUSAL_LM", r=m.r, lora_alpha=m.alpha, lora_dropout=m.dropout,
                      target_modules="all-linear")
    t = recipe.training
    cfg = DPOConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=t.per_device_train_batch_size,
                    learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_steps,
                    max_length=t.max_length, beta=recipe.objective.beta, seed=recipe.seed, bf16=False,
                    report_to=[], logging_steps=1, save_strategy="no", activation_checkpointing=False,
                    dataloader_pin_memory=False)
    return DPOTrainer(model=model, args=cfg, train_dataset=rows, processing_class=tok, peft_config=peft, **kwargs)


def trl_side(recipe, rows, steps: int, out: Path):
    trainer = trl_trainer(recipe, rows, steps, out)
    trainer.train()
    hist = trainer.state.log_history
    return trainer, [h["loss"] for h in hist if "loss" in h], hist[-1]["train_runtime"]


def held_out_accuracy(recipe, model, tokenizer, eval_rows) -> float:
    from llama_recipes import preference

    rows = eval_rows.select(range(min(len(eval_rows), recipe.eval.limit or len(eval_rows))))
    logps = preference.completion_logps(model, preference.sequences(tokenizer, rows, ("chosen", "rejected")),
                                        tokenizer.pad_token_id, recipe.eval.batch_size, recipe.training.max_length)
    return preference.pair_metrics(logps[0::2], logps[1::2], None, 1.0)["preference_accuracy"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "demo" / "tiny_dpo.yaml"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epoch", action="store_true", help="one epoch of the recipe's training rows (overrides --steps)")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. model.name_or_path=DIR (a plain model: the TRL "
                   "side trains a new LoRA on it)")
    args = p.parse_args(argv)
    import datasets
    import torch

    from llama_recipes import data

    from llama_recipes.schema import load_recipe

    recipe = load_recipe(Path(args.recipe), args.overrides)
    raw, eval_raw, _ = data.build_datasets(recipe.data, recipe.formats)  # the rows ours renders, untokenized
    rows = datasets.Dataset.from_list([{k: x[k] for k in ("prompt", "chosen", "rejected")} for x in raw])
    steps = -(-len(rows) // recipe.training.per_device_train_batch_size) if args.epoch else args.steps
    mine, theirs, loss_pairs, accuracy = [], [], None, {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            recipe, our_trainer, our_losses, s = ours(Path(args.recipe), steps, Path(tmp) / f"ours{r}", args.overrides)
            mine.append(s)
            trl_trainer, trl_losses, s = trl_side(recipe, rows, steps, Path(tmp) / f"trl{r}")
            theirs.append(s)
            loss_pairs = (our_losses, trl_losses)
            print(f"round {r}: ours {mine[-1]:.2f} s, TRL {theirs[-1]:.2f} s", flush=True)
        if eval_raw is not None:
            for side, trainer in (("ours", our_trainer), ("trl", trl_trainer)):
                accuracy[side] = held_out_accuracy(recipe, trainer.model, trainer.processing_class, eval_raw)
    ratio = statistics.median(t / o for t, o in zip(theirs, mine))
    from llama_recipes import preference
    from common import peak_matmul_flops

    tok, model = our_trainer.processing_class, our_trainer.model
    seqs = preference.sequences(tok, rows, ("chosen", "rejected"))
    per_side = statistics.mean(min(len(ids), recipe.training.max_length) for ids, _ in seqs)  # prompt + completion
    tokens = steps * recipe.training.per_device_train_batch_size * 2 * per_side  # chosen + rejected, every pair
    n = sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)
    peak = peak_matmul_flops()
    mfu = {side: round(8 * n * tokens / statistics.median(t) / peak, 3) for side, t in (("ours", mine), ("trl", theirs))}
    result = {"bench": "dpo", "recipe": Path(args.recipe).name, "steps": steps, "held_out_accuracy": accuracy, "ours_s": mine, "trl_s": theirs,
              "speed_ratio_trl_over_ours": round(ratio, 3),
              "mfu_8n": mfu, "fp32_peak_gflops": round(peak / 1e9, 1), "tokens_per_run": round(tokens), "base_params": n,
              "losses_ours": loss_pairs[0], "losses_trl": loss_pairs[1],
              "torch_isa": torch.backends.cpu.get_cpu_capability(), "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
