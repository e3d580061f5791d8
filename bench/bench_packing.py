"""2. Packing: real-token fraction and tokens/s, padded batches versus TRL packing (bfd).

Same model, data (Alpaca-like lengths, see common.ALPACA_LENGTHS), batch size and max_length;
only `training.packing` differs. Padded batches pad to the longest row of the batch (TRL's
default collator). Packed batches are bfd-packed rows of up to max_length, which TRL runs
padding-free (rows concatenated, position ids restart per sample): no pad is computed at all.
`fill` = real tokens ÷ (batch × max_length): how full the packed rows are.
"""
import argparse

import common


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    a = ap.parse_args(argv)
    common.quiet()
    common.set_threads()
    work = common.make_workdir(n_rows=1024)
    runs = {"padded": [], "packed": []}
    for r in range(a.rounds):
        for side in ("padded", "packed"):
            m = common.Meter(warmup=a.warmup)
            rec = common.recipe_dict(work, work / f"out-{side}", "lora", steps=a.steps, batch=a.batch,
                                     max_length=a.max_length, packing=side == "packed")
            common.run_pipeline(rec, m)
            res = m.result()
            res["fill"] = res["real_tokens"] / (res["timed_steps"] * a.batch * a.max_length)
            runs[side].append(res)
            print(f"[packing {side} round {r}] {res['tokens_per_s']:.0f} tok/s, real fraction "
                  f"{res['real_fraction']:.3f}, fill {res['fill']:.3f}", flush=True)
    out = {"steps": a.steps, "warmup": a.warmup, "batch": a.batch, "max_length": a.max_length,
           "padded_real_fraction": runs["padded"][0]["real_fraction"],
           "packed_real_fraction": runs["packed"][0]["real_fraction"],
           "packed_fill": runs["packed"][0]["fill"],
           "speedup_median": common.median_ratio([x["tokens_per_s"] for x in runs["packed"]],
                                                 [x["tokens_per_s"] for x in runs["padded"]]),
           "padded_tokens_per_s": [round(x["tokens_per_s"], 1) for x in runs["padded"]],
           "packed_tokens_per_s": [round(x["tokens_per_s"], 1) for x in runs["packed"]]}
    return common.save("packing", out)


if __name__ == "__main__":
    main()
