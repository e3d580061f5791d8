"""GPU benchmark (bench/gpu.sh): random-init Llama ~1B and ~3B, full fine-tuning and LoRA.

Built from config (no hub, no tokenizer: random token ids in fixed-length, packing-like
batches of SEQ tokens), bf16 compute with FSDP2 `fully_shard` per decoder layer and the root
on ONE rank (torchrun --nproc_per_node 1), sdpa attention, activation checkpointing on and
off. Full: fp32 master weights, MixedPrecisionPolicy(param bf16, reduce fp32), fused AdamW.
LoRA (r=16, all linear layers): bf16 frozen base, fp32 adapters, same policy.

Reported per case: tokens/s, MFU = k * N * tokens/s / 989e12 (k = 6 full, 4 LoRA; N = the
parameters of all Linear layers including lm_head, i.e. the matmul work; attention-score FLOPs
are not counted, which understates MFU at long sequence), torch.cuda.max_memory_allocated,
and our estimate when llama_recipes.memory exists. Each case runs in try/except; results go to
--out as JSON after every case, and a table is printed at the end.

    torchrun --standalone --nproc_per_node 1 bench/gpu_bench.py --out $OUT/gpu.json
    python bench/gpu_bench.py --dry-cpu     # tiny config, CPU/gloo, 2 steps: checks the code path
"""
import argparse
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path

PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)
LLAMA_3B = dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True)
TINY = dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
# (name, config, method, activation checkpointing, micro-batch); sequence length is --seq.
CASES = [
    ("1B full ac=off", LLAMA_1B, "full", False, 4),
    ("1B full ac=on", LLAMA_1B, "full", True, 4),
    ("1B lora ac=off", LLAMA_1B, "lora", False, 4),
    ("3B full ac=off", LLAMA_3B, "full", False, 2),
    ("3B full ac=on", LLAMA_3B, "full", True, 2),
    ("3B lora ac=off", LLAMA_3B, "lora", False, 2),
    ("3B lora ac=on", LLAMA_3B, "lora", True, 2),
]


def init_dist(cpu: bool):
    import torch.distributed as dist

    if "RANK" not in os.environ:  # plain `python gpu_bench.py`: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo" if cpu else "nccl")


def linear_params(model) -> int:
    import torch

    seen, n = set(), 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and id(m.weight) not in seen and "lora_" not in type(m).__name__.lower():
            seen.add(id(m.weight))
            n += m.weight.numel()
    return n


def our_estimate(cfg, method, ac, batch, seq):
    """Our memory estimate for the case, when llama_recipes.memory exists (another branch builds it)."""
    # Look for the file in THIS checkout: with the editable install, a module missing here is
    # otherwise imported from /work/main's working tree.
    if not (Path(__file__).resolve().parents[1] / "llama_recipes" / "memory.py").exists():
        return None
    from llama_recipes import memory

    fn = getattr(memory, "estimate_for_config", None)
    if fn is None:
        return "llama_recipes.memory present, but no estimate_for_config(cfg, method, ac, batch, seq) to call"
    try:
        return fn(cfg, method=method, activation_checkpointing=ac, batch=batch, seq=seq)
    except Exception as e:  # noqa: BLE001
        return f"estimate failed: {e!r}"


def run_case(name, cfg_kw, method, ac, batch, seq, steps, warmup, device):
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    cpu = device.type == "cpu"
    if not cpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = LlamaConfig(**cfg_kw, max_position_embeddings=max(seq, 2048), rope_theta=500000.0, use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    n_linear = linear_params(model)
    n_total = sum(p.numel() for p in model.parameters())
    if ac:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model.to(torch.bfloat16)
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules="all-linear"))  # adapters stay fp32
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    base = model.get_base_model() if method == "lora" else model
    for layer in base.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-5, fused=not cpu)
    gen = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device, generator=gen)
    sync = (lambda: None) if cpu else torch.cuda.synchronize
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    seconds = time.perf_counter() - t0
    tok_s = batch * seq * steps / seconds
    k = 6 if method == "full" else 4
    res = {"case": name, "method": method, "activation_checkpointing": ac, "batch": batch, "seq": seq,
           "steps": steps, "params_total": n_total, "params_linear_N": n_linear, "trainable": trainable,
           "tokens_per_s": tok_s, "mfu": k * n_linear * tok_s / PEAK_FLOPS, "final_loss": loss.item(),
           "max_memory_allocated_gb": None if cpu else torch.cuda.max_memory_allocated() / 2**30,
           "estimate": our_estimate(cfg_kw, method, ac, batch, seq)}
    del model, opt, loss
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT") or "bench/results", "gpu.json"))
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=420, help="skip the remaining cases after this many seconds")
    ap.add_argument("--only", help="comma-separated case indices")
    ap.add_argument("--dry-cpu", action="store_true", help="tiny config on CPU (gloo), 2 steps per case")
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    cases = CASES
    if a.dry_cpu:
        cases = [(n.replace("1B", "tiny").replace("3B", "tiny"), TINY, m, ac, 2) for n, _, m, ac, _ in CASES[:3]]
        a.seq, a.steps, a.warmup = 64, 2, 1
    if a.only:
        cases = [cases[int(i)] for i in a.only.split(",")]
    init_dist(a.dry_cpu)
    device = torch.device("cpu") if a.dry_cpu else torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if not a.dry_cpu:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "torch": torch.__version__,
            "device": "cpu" if a.dry_cpu else torch.cuda.get_device_name(device), "seq": a.seq,
            "steps": a.steps, "warmup": a.warmup, "peak_flops": PEAK_FLOPS}
    results, started = [], time.time()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    for name, cfg, method, ac, batch in cases:
        if time.time() - started > a.budget_s:
            results.append({"case": name, "skipped": f"time budget {a.budget_s:.0f} s spent"})
            continue
        t = time.time()
        try:
            r = run_case(name, cfg, method, ac, batch, a.seq, a.steps, a.warmup, device)
        except Exception as e:  # noqa: BLE001 - one failing case must not lose the others
            r = {"case": name, "error": f"{type(e).__name__}: {str(e)[:500]}", "traceback": traceback.format_exc()[-2000:]}
        r["wall_s"] = round(time.time() - t, 1)
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "traceback"}), flush=True)
        Path(a.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"\n{'case':<16} {'tokens/s':>10} {'MFU':>6} {'max alloc GB':>13} {'loss':>7}  goal MFU")
    for r in results:
        if "tokens_per_s" in r:
            mem = "-" if r["max_memory_allocated_gb"] is None else f"{r['max_memory_allocated_gb']:.1f}"
            goal = ">= 0.45" if r["method"] == "full" else ">= 0.35"
            print(f"{r['case']:<16} {r['tokens_per_s']:>10.0f} {r['mfu']:>6.3f} {mem:>13} {r['final_loss']:>7.3f}  {goal}")
        else:
            print(f"{r['case']:<16} {r.get('error') or r.get('skipped')}")
    import torch.distributed as dist

    dist.destroy_process_group()
    return 0 if all("tokens_per_s" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
