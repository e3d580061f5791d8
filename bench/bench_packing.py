"""2. Packing and length grouping: real-token fraction and tokens/s, side by side in one run.

Same model, data (Alpaca-like lengths, see common.ALPACA_LENGTHS), batch size and max_length;
only the batching differs:
  padded   TRL's collator: each batch padded to its longest example (random order).
  grouped  `training.train_sampling_strategy: group_by_length`: batches of similar lengths
           (seeded per epoch, batching.SeededLengthGroupedSampler), padded to their longest.
  packed   `training.packing: true`: bfd-packed rows of up to max_length kept as a [batch, width]
           tensor, each sample attending only to itself (batching.PackedRowCollator).
`real fraction` = real tokens ÷ positions computed (batch × width); `fill` = real tokens ÷
(batch × max_length). Rounds alternate padded, grouped, packed; ratios are medians over rounds.
"""
import argparse
from pathlib import Path

import common

SIDES = {"padded": {}, "grouped": {"train_sampling_strategy": "group_by_length"}, "packed": {"packing": True}}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--model", default=None,
                    help="a real model directory (e.g. SmolLM2-135M converted by builtin:smollm2-135m-instruct); "
                         "default: the random ~10M Llama. Results go to packing_<dir name>.json")
    a = ap.parse_args(argv)
    common.quiet()
    common.set_threads()
    work = common.make_workdir(n_rows=1024, model=a.model)
    runs = {side: [] for side in SIDES}
    for r in range(a.rounds):
        for side, training in SIDES.items():
            m = common.Meter(warmup=a.warmup)
            rec = common.recipe_dict(work, work / f"out-{side}", "lora", steps=a.steps, batch=a.batch,
                                     max_length=a.max_length, **training)
            common.run_pipeline(rec, m)
            res = m.result()
            res["fill"] = res["real_tokens"] / (res["timed_steps"] * a.batch * a.max_length)
            runs[side].append(res)
            print(f"[packing {side} round {r}] {res['tokens_per_s']:.0f} tok/s, real fraction "
                  f"{res['real_fraction']:.3f}, fill {res['fill']:.3f}", flush=True)

    def speed(side):
        return [x["tokens_per_s"] for x in runs[side]]

    out = {"model": a.model or "10M bench Llama", "steps": a.steps, "warmup": a.warmup, "batch": a.batch, "max_length": a.max_length,
           **{f"{side}_real_fraction": round(runs[side][0]["real_fraction"], 4) for side in SIDES},
           "packed_fill": round(runs["packed"][0]["fill"], 4),
           "speedup_median": common.median_ratio(speed("packed"), speed("padded")),
           "grouped_speedup_median": common.median_ratio(speed("grouped"), speed("padded")),
           **{f"{side}_tokens_per_s": [round(x, 1) for x in speed(side)] for side in SIDES}}
    print(f"\n| batching | tokens/s (median of {a.rounds}) | ÷ padded | real-token fraction |\n|---|---|---|---|")
    for side in SIDES:
        ratio = common.median_ratio(speed(side), speed("padded"))
        print(f"| {side} | {sorted(speed(side))[len(speed(side)) // 2]:.0f} | {ratio:.2f} | "
              f"{out[side + '_real_fraction']:.3f} |")
    return common.save("packing" if not a.model else f"packing_{Path(a.model).resolve().name}", out)


if __name__ == "__main__":
    main()
