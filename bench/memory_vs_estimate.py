"""Measured memory vs `--estimate-memory`, on CPU (fp32), ~9M-parameter Llama built from a config.

    OMP_NUM_THREADS=1 python bench/memory_vs_estimate.py [--seq 256 --batch 4]

1. Weights, gradients and optimizer states: tensor bytes after one real AdamW step
   (parameters, .grad, optimizer state) vs the estimate.
2. Activations: torch's memory profiler (profile_memory=True, MemoryProfileTimeline) gives the
   live CPU bytes over one forward+backward; its peak minus the weights is compared with the
   estimate's activations + gradients (what the step adds on top of the weights).
Prints a markdown table (the "Memory estimate" section of docs/benchmarks.md).
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llama_recipes import memory  # noqa: E402
from llama_recipes.schema import validate_recipe  # noqa: E402

CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 688,
       "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 8000,
       "max_position_embeddings": 2048, "tie_word_embeddings": False, "torch_dtype": "float32"}
CASES = [
    ("full", {"name": "full"}, {}, False),
    ("full + checkpointing", {"name": "full"}, {}, True),
    ("partial (layers 4-5 + head)", {"name": "full"}, {"train": [r"layers\.[45]\.", "lm_head"]}, False),
    ("lora r8 all-linear, dropout 0.05", {"name": "lora", "r": 8, "dropout": 0.05}, {}, False),
    ("lora r8 all-linear, dropout 0", {"name": "lora", "r": 8, "dropout": 0.0}, {}, False),
    ("lora + checkpointing", {"name": "lora", "r": 8, "dropout": 0.05}, {}, True),
]


def tensor_bytes(model, opt):
    seen, w, g = set(), 0, 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            w += p.numel() * p.element_size()
            g += p.grad.numel() * p.grad.element_size() if p.grad is not None else 0
    o = sum(t.numel() * t.element_size() for st in opt.state.values() for k, t in st.items() if k != "step")
    return w, g, o


def peak_step_bytes(model, ids):
    """Peak live CPU bytes during forward+backward, minus what was live before (the weights)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        model(input_ids=ids, labels=ids).loss.backward()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    totals = [sum(s) for s in sizes]
    return max(totals) - totals[0]


def run_case(model_dir, label, method, freeze, ckpt, seq, batch):
    from transformers import AutoConfig, AutoModelForCausalLM

    from llama_recipes.methods import apply_method

    recipe = validate_recipe({
        "output_dir": "/tmp/unused", "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "data": {"path": "builtin:demo"}, "method": method, "freeze": freeze,
        "training": {"bf16": False, "optim": "adamw_torch", "per_device_train_batch_size": batch,
                     "max_length": seq, "activation_checkpointing": ckpt}})
    shape, s, est = memory.estimate_recipe(recipe)
    torch.manual_seed(0)
    model = apply_method(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)), recipe)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, CFG["vocab_size"], (batch, seq))
    step = peak_step_bytes(model, ids)
    model.zero_grad(set_to_none=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model(input_ids=ids[:1, :16], labels=ids[:1, :16]).loss.backward()
    opt.step()
    w, g, o = tensor_bytes(model, opt)
    est_step = est.activations + est.gradients
    return {"case": label, "trainable": est.trainable, "w_est": est.weights, "w": w, "g_est": est.gradients, "g": g,
            "o_est": est.optimizer, "o": o, "step_est": est_step, "step": step, "ratio": est_step / step}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    a = ap.parse_args()
    d = Path(tempfile.mkdtemp()) / "llama-9m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CFG))
    t0 = time.time()
    rows = [run_case(d, *c, a.seq, a.batch) for c in CASES]
    mb = 2**20
    print(f"9M-parameter Llama (hidden 256, 6 layers, vocab 8000), fp32, AdamW, micro-batch {a.batch} x seq {a.seq}\n")
    print("| case | trainable | weights est/meas MiB | grads est/meas MiB | AdamW est/meas MiB | "
          "step peak above weights est/meas MiB | est/meas |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['trainable']:,} | {r['w_est'] / mb:.2f} / {r['w'] / mb:.2f} | "
              f"{r['g_est'] / mb:.2f} / {r['g'] / mb:.2f} | {r['o_est'] / mb:.2f} / {r['o'] / mb:.2f} | "
              f"{r['step_est'] / mb:.1f} / {r['step'] / mb:.1f} | {r['ratio']:.2f} |")
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
