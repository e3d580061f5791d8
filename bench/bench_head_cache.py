"""Frozen-base heads: training time with the base's features cached (the default) versus the base on every step.

    python bench/bench_head_cache.py [--model DIR] [--epochs 3] [--rounds 2] [--method mlp_head]

Our pipeline trains a head (mlp_head: hidden [256], mean pooling; or classifier_head) on the
bundled `builtin:classify` rows (1000 train) for --epochs epochs, batch 32, max_length 64, fp32,
once with `method.cache_features: true` and once false, alternating for --rounds rounds. The
base is the ~10M bench Llama (random weights: the speed is what is measured here; equality of
the numbers is tests/test_heads.py's job) unless --model points at a real one (e.g. the
SmolLM2-135M of the real-model benchmark). Reported: the Trainer's train_runtime of each side plus,
for the cached side, the time computing the features, the median ratio uncached ÷ cached, and the
final training loss of each (equal up to fp32 summation order).
"""
import argparse
import statistics

import common


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="a local model directory (default: the ~10M bench Llama)")
    ap.add_argument("--method", default="mlp_head", choices=["mlp_head", "classifier_head"])
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args(argv)
    common.quiet()
    common.set_threads()
    from llama_recipes import pipeline
    from llama_recipes.schema import validate_recipe

    model = a.model or str(common.make_workdir(n_rows=8) / "model")
    method = {"name": a.method, **({"hidden_sizes": [256], "pooling": "mean"} if a.method == "mlp_head" else {})}
    runs = {True: [], False: []}
    for r in range(a.rounds):
        for cache in (True, False):
            rec = {"output_dir": f"/tmp/llr-bench-head-{cache}", "seed": 42,
                   "model": {"name_or_path": model, "dtype": "float32"},
                   "data": {"path": "builtin:classify", "format": "classification", "eval_split": "eval"},
                   "method": {**method, "cache_features": cache},
                   "training": {"num_train_epochs": a.epochs, "learning_rate": 3e-3, "per_device_train_batch_size": 32,
                                "max_length": 64, "bf16": False, "activation_checkpointing": False,
                                "save_strategy": "no", "report_to": [], "logging_steps": 10},
                   "eval": {"before_after": False}}
            run = pipeline.train(validate_recipe(rec), overwrite=True)
            end = next(h for h in reversed(run.trainer.state.log_history) if "train_runtime" in h)
            loss = [h["loss"] for h in run.trainer.state.log_history if "loss" in h][-1]
            # train_runtime starts after the train dataloader is built, i.e. after the features are computed
            seconds = end["train_runtime"] + getattr(run.trainer, "feature_seconds", 0.0)
            runs[cache].append({"train_s": seconds, "final_loss": loss})
            print(f"[head cache round {r}] cache={cache}: {seconds:.1f} s, final loss {loss:.5f}", flush=True)
    out = {"model": a.model or "10M bench Llama (common.MODEL_10M)", "method": a.method, "epochs": a.epochs,
           "cached_train_s": [x["train_s"] for x in runs[True]], "uncached_train_s": [x["train_s"] for x in runs[False]],
           "speedup_median": statistics.median(u["train_s"] / c["train_s"] for c, u in zip(runs[True], runs[False])),
           "final_loss_cached": runs[True][-1]["final_loss"], "final_loss_uncached": runs[False][-1]["final_loss"]}
    print(f"\n| {a.method}, {a.epochs:g} epochs | train s | final loss |\n|---|---|---|")
    for cache in (True, False):
        print(f"| cache_features: {str(cache).lower()} | {statistics.median(x['train_s'] for x in runs[cache]):.1f} | "
              f"{runs[cache][-1]['final_loss']:.5f} |")
    print(f"speed-up (uncached ÷ cached, median of {a.rounds}): {out['speedup_median']:.2f}")
    return common.save("head_cache", out)


if __name__ == "__main__":
    main()
