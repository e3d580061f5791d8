"""Time to quality: one epoch of the same data, ours versus plain TRL, and the held-out loss each reaches.

    python bench/bench_time_to_quality.py [--rows 2048] [--eval-rows 256] [--batch 8] [--max-length 256]

Three sides train the same ~10M Llama (common.MODEL_10M) with LoRA r=16 all-linear, lr 1e-3,
fp32, no activation checkpointing, seed 42, for ONE epoch of the same Alpaca-like rows:
  trl_default  bench/peer_trl_sft.py: SFTTrainer as a TRL user writes it (padded batches of --batch)
  trl_packing  the same script with `packing=True` (TRL's bfd packing, padding-free: one flattened row)
  ours         our pipeline with `training.packing: true` (isolated [batch, width] packed rows)
Packed sides take rows holding about as many examples per step as --batch padded examples
(batch = round(--batch x mean tokens per example / max_length), at least 1), so all three make
about the same number of optimizer steps per epoch. Each side is timed from its start (model
load, tokenization, packing included) to the end of its last step; `train s` is the train()
loop alone. Eval loss: token-weighted loss on the completion tokens of the same held-out rows
(tokenized once by TRL, outside the timed sections), computed by the same function for all
three (`measure.eval_loss`). Writes bench/results/time_to_quality.{json,md}.
"""
import argparse
import functools
import shlex
import sys
import time

import common
import peer_trl_sft


def lora():
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2048, help="training rows (one epoch)")
    ap.add_argument("--eval-rows", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="padded examples per step")
    ap.add_argument("--max-length", type=int, default=256)
    a = ap.parse_args(argv)
    command = "python bench/bench_time_to_quality.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    common.quiet()
    common.set_threads()
    from llama_recipes import measure

    work = common.make_workdir(n_rows=a.rows)
    common.write_jsonl(common.alpaca_like_rows(a.eval_rows, seed=1), work / "held_out" / "eval.jsonl")
    model_dir, train_file = str(work / "model"), str(work / "data" / "train.jsonl")
    # The held-out rows, tokenized once as TRL tokenizes prompt/completion data (labels on the completion).
    eval_tok = peer_trl_sft.build_trainer(model_dir, str(work / "held_out" / "eval.jsonl"), str(work / "tok"),
                                          1, max_length=a.max_length).train_dataset
    sides = {}

    def finish(name, started, meter, model, tokenizer, **extra):
        res = meter.result()
        collate = functools.partial(measure.pad_collate, pad_token_id=tokenizer.pad_token_id)
        loss = measure.eval_loss(model, eval_tok, collate, batch_size=16)["loss"]
        sides[name] = {"wall_s": round(meter.ends[-1] - started, 2), "train_s": round(res["seconds"], 2),
                       "steps": res["timed_steps"], "real_tokens": res["real_tokens"],
                       "tokens_per_s": round(res["tokens_per_s"], 1), "real_fraction": round(res["real_fraction"], 4),
                       "final_train_loss": res["final_loss"], "eval_loss": round(loss, 4), **extra}
        print(f"[time to quality] {name}: {sides[name]}", flush=True)

    # trl_default first: its tokenized lengths size the packed sides' batch
    started, m = time.perf_counter(), common.Meter(warmup=0)
    trainer = peer_trl_sft.build_trainer(model_dir, train_file, str(work / "out-trl"), -1, peft_config=lora(),
                                         batch=a.batch, num_train_epochs=1, max_length=a.max_length)
    m.attach(trainer).train()
    finish("trl_default", started, m, trainer.model, trainer.processing_class, batch=a.batch)
    lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
    packed_batch = max(1, round(a.batch * sum(lengths) / len(lengths) / a.max_length))

    started, m = time.perf_counter(), common.Meter(warmup=0)
    trainer = peer_trl_sft.build_trainer(model_dir, train_file, str(work / "out-trl-packing"), -1, peft_config=lora(),
                                         batch=packed_batch, num_train_epochs=1, max_length=a.max_length,
                                         packing=True)
    m.attach(trainer).train()
    finish("trl_packing", started, m, trainer.model, trainer.processing_class, batch=packed_batch)

    started, m = time.perf_counter(), common.Meter(warmup=0)
    rec = common.recipe_dict(work, work / "out-ours", "lora", steps=-1, batch=packed_batch, max_length=a.max_length,
                             packing=True, num_train_epochs=1)
    run = common.run_pipeline(rec, m)
    finish("ours", started, m, run.trainer.model, run.tokenizer, batch=packed_batch)

    ours = sides["ours"]["wall_s"]
    out = {"command": command, "rows": a.rows, "eval_rows": a.eval_rows, "max_length": a.max_length,
           "packed_batch": packed_batch, "sides": sides,
           "speedup_vs_trl_default": round(sides["trl_default"]["wall_s"] / ours, 3),
           "speedup_vs_trl_packing": round(sides["trl_packing"]["wall_s"] / ours, 3)}
    names = {"trl_default": "TRL `SFTTrainer` defaults (padded)", "trl_packing": "TRL `packing=True` (padding-free)",
             "ours": "ours, `training.packing: true` (isolated rows)"}
    md = [f"`{command}`", "", "| side | batch | steps | wall s | train s | tokens/s | eval loss | wall ÷ ours |",
          "|---|---|---|---|---|---|---|---|"]
    for k, s in sides.items():
        md.append(f"| {names[k]} | {s['batch']} | {s['steps']} | {s['wall_s']:.1f} | {s['train_s']:.1f} | "
                  f"{s['tokens_per_s']:.0f} | {s['eval_loss']:.4f} | {s['wall_s'] / ours:.2f} |")
    text = "\n".join(md) + "\n"
    print("\n" + text)
    (common.RESULTS / "time_to_quality.md").parent.mkdir(parents=True, exist_ok=True)
    (common.RESULTS / "time_to_quality.md").write_text(text)
    return common.save("time_to_quality", out)


if __name__ == "__main__":
    main()
