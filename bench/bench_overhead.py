"""1. Framework overhead: our pipeline's tokens/s ÷ a plain PyTorch loop's, full and LoRA.

Both sides train the same ~10M-parameter Llama (fp32, CPU) on the same batches: the plain
loop replays the exact batches our trainer collated (so it pays no data loading at all: a
strict baseline), with fused AdamW (our default optim; same lr, weight decay 0, eps 1e-8), grad-norm clipping at 1.0
like the Trainer, no scheduler, no Trainer. Start-up is excluded on both sides: the first
WARMUP steps are not timed. Rounds alternate ours, plain, ours, plain; the ratio is the median.
"""
import argparse
import time
from pathlib import Path

import common


def plain_loop(model_dir, method, batches, lr, warmup):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(42)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules="all-linear"))
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # The optimizer our side gets by default (TRL's optim adamw_torch_fused): the same update, the same kernel
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, eps=1e-8, fused=True)
    tokens = 0
    for i, batch in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        if i >= warmup:
            tokens += common.real_tokens(batch)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "real_tokens": tokens, "tokens_per_s": tokens / seconds, "final_loss": float(loss)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--methods", default="full,lora")
    ap.add_argument("--model", default=None,
                    help="a real model directory (e.g. SmolLM2-135M converted by builtin:smollm2-135m-instruct); "
                         "default: the random ~10M Llama. Results go to overhead_<dir name>.json")
    a = ap.parse_args(argv)
    common.quiet()
    common.set_threads()
    work = common.make_workdir(model=a.model)
    n = common.n_params(work / "model")
    peak = common.peak_matmul_flops("float32")
    out = {"model": a.model or "10M bench Llama", "model_params": n, "steps": a.steps, "warmup": a.warmup,
           "rounds": a.rounds, "batch": a.batch, "peak_fp32_matmul_flops": round(peak)}
    for method in a.methods.split(","):
        ours, plain = [], []
        for r in range(a.rounds):
            m = common.Meter(warmup=a.warmup, keep_batches=a.steps)
            rec = common.recipe_dict(work, work / f"out-{method}", method, steps=a.steps, batch=a.batch)
            common.run_pipeline(rec, m)
            ours.append(m.result())
            plain.append(plain_loop(work / "model", method, m.batches, rec["training"]["learning_rate"], a.warmup))
            print(f"[overhead {method} round {r}] ours {ours[-1]['tokens_per_s']:.0f} tok/s, "
                  f"plain {plain[-1]['tokens_per_s']:.0f} tok/s", flush=True)
        best = max(o["tokens_per_s"] for o in ours)
        out[method] = {
            "ratio_median": common.median_ratio([o["tokens_per_s"] for o in ours], [p["tokens_per_s"] for p in plain]),
            # model FLOPs utilisation: 6N FLOPs per token (forward + backward of every weight) over the
            # measured fp32 matmul peak. LoRA's frozen base skips weight gradients (~4N of work).
            "mfu_6n": round(6 * n * best / peak, 4),
            "ours_tokens_per_s": [round(o["tokens_per_s"], 1) for o in ours],
            "plain_tokens_per_s": [round(p["tokens_per_s"], 1) for p in plain],
            "real_tokens_per_round": ours[0]["real_tokens"],
        }
    return common.save("overhead" if not a.model else f"overhead_{Path(a.model).resolve().name}", out)


if __name__ == "__main__":
    main()
