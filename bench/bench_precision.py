"""fp32 vs `training.bf16: auto`, side by side on the machine at hand, with its ISA.

    python bench/bench_precision.py            # ~5 min on an idle 2-core machine
    python bench/bench_precision.py --quick    # matmul + 135M step only (no demo runs)

Three measures, each alternating the two sides (A B A B) in one run:
  matmul   2048x2048 GFLOP/s, fp32 vs bf16;
  step     one LoRA r16 (all-linear) optimizer step of a 135M Llama shaped like SmolLM2-135M
           (random weights: the speed does not depend on them), batch 4 x 96 tokens, fp32 vs bf16 autocast;
  demo     `run_recipe.py recipes/demo/tiny_lora.yaml` with training.bf16=false and =auto: training
           seconds, held-out loss and exact match (auto must stay within the tolerance of fp32).
On an AVX2-only CPU `auto` is fp32, so the demo ratio is ~1 by construction.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, ROOT, quiet

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)


def machine() -> dict:
    from llama_recipes.runtime import hardware

    use, why = hardware.auto_bf16()
    return {"isa": hardware.cpu_isa(), "bf16_flags": sorted(set(hardware.NATIVE_BF16_FLAGS) & hardware.cpu_flags()),
            "auto_picks": "bf16" if use else "fp32", "why": why, "threads": __import__("torch").get_num_threads()}


def matmul(rounds: int) -> dict:
    import torch

    n = 2048
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
    times = {"fp32": [], "bf16": []}
    for _ in range(rounds):
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            t = time.perf_counter()
            for _ in range(5):
                a @ b
            times[name].append(5 * 2 * n**3 / (time.perf_counter() - t) / 1e9)
    for k, v in times.items():
        out[f"{k}_gflops"] = round(statistics.median(v), 1)
    out["bf16_over_fp32"] = round(out["bf16_gflops"] / out["fp32_gflops"], 2)
    return out


def lora_step(rounds: int, steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
    params = sum(p.numel() for p in model.parameters())
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (4, 96))

    def step(bf16: bool) -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    step(False), step(True)  # warm-up both paths
    times = {"fp32": [], "bf16": []}
    for _ in range(rounds):
        for name in ("fp32", "bf16"):
            times[name] += [step(name == "bf16") for _ in range(steps)]
    f, b = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    return {"params": params, "batch": "4x96", "fp32_s_per_step": round(f, 3), "bf16_s_per_step": round(b, 3),
            "speedup_bf16": round(f / b, 2)}


def demo(precision: str, out: Path) -> dict:
    t = time.time()
    r = subprocess.run([sys.executable, str(ROOT / "run_recipe.py"), str(ROOT / "recipes/demo/tiny_lora.yaml"),
                        f"training.bf16={precision}", f"output_dir={out}", "training.report_to=none"],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    m = json.loads((out / "metrics.json").read_text())
    return {"train_seconds": round(m["train"]["train_runtime"], 1), "wall_seconds": round(time.time() - t, 1),
            "eval_loss": round(m["eval_after"]["loss"], 4), "exact_match": m["eval_after"].get("exact_match"),
            "bf16": "bf16: true" in (out / "recipe.yaml").read_text()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    quiet()
    result = {"machine": machine(), "matmul": matmul(args.rounds), "lora_step_135m": lora_step(args.rounds, args.steps)}
    print(json.dumps(result, indent=1), flush=True)
    if not args.quick:
        with tempfile.TemporaryDirectory() as tmp:
            runs = {"fp32": demo("false", Path(tmp) / "a"), "auto": demo("auto", Path(tmp) / "b")}
        runs["train_speedup_auto"] = round(runs["fp32"]["train_seconds"] / runs["auto"]["train_seconds"], 2)
        runs["eval_loss_delta"] = round(runs["auto"]["eval_loss"] - runs["fp32"]["eval_loss"], 4)
        result["demo"] = runs
    print(json.dumps(result, indent=1))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "precision.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
