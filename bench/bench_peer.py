"""5. A peer side by side: our pipeline versus a plain TRL SFTTrainer script (peer_trl_sft.py).

Same ~10M Llama, same Alpaca-like data, LoRA r=16 all-linear, batch 8, lr 1e-3, max_length 256,
fp32, seed 42, no activation checkpointing. Each side runs with its OWN defaults otherwise
(ours: the recipe as a user writes it). Rounds alternate ours, TRL, ours, TRL; both are timed
by the same callback after WARMUP steps. Reported: median tokens/s ratio (ours ÷ TRL) and the
final training loss of each (same data order and seed: equal when the defaults agree).
"""
import argparse

import common
import peer_trl_sft


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    common.quiet()
    common.set_threads()
    from peft import LoraConfig

    work = common.make_workdir()
    ours, theirs = [], []
    for r in range(a.rounds):
        m = common.Meter(warmup=a.warmup)
        common.run_pipeline(common.recipe_dict(work, work / "out-ours", "lora", steps=a.steps, batch=8), m)
        ours.append(m.result())
        m = common.Meter(warmup=a.warmup)
        lora = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
        trainer = peer_trl_sft.build_trainer(str(work / "model"), str(work / "data" / "train.jsonl"),
                                             str(work / "out-trl"), a.steps, peft_config=lora)
        m.attach(trainer).train()
        theirs.append(m.result())
        print(f"[peer round {r}] ours {ours[-1]['tokens_per_s']:.0f} tok/s loss {ours[-1]['final_loss']:.4f}; "
              f"TRL {theirs[-1]['tokens_per_s']:.0f} tok/s loss {theirs[-1]['final_loss']:.4f}", flush=True)
    out = {"steps": a.steps, "warmup": a.warmup, "rounds": a.rounds,
           "ratio_median": common.median_ratio([o["tokens_per_s"] for o in ours], [t["tokens_per_s"] for t in theirs]),
           "ours_tokens_per_s": [round(o["tokens_per_s"], 1) for o in ours],
           "trl_tokens_per_s": [round(t["tokens_per_s"], 1) for t in theirs],
           "ours_final_loss": ours[-1]["final_loss"], "trl_final_loss": theirs[-1]["final_loss"],
           "ours_real_tokens": ours[-1]["real_tokens"], "trl_real_tokens": theirs[-1]["real_tokens"]}
    return common.save("peer", out)


if __name__ == "__main__":
    main()
