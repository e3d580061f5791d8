"""Print docs/distributed.md's DeepSpeed tables from fresh runs (the code of tests/test_distributed.py).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python scripts/deepspeed_table.py

One process (batch 4) vs 2 CPU ranks (batch 2 each) under DDP, DeepSpeed ZeRO-2 and ZeRO-3
(accelerate_configs/cpu_ddp_2proc.yaml, cpu_deepspeed_2proc.yaml [--zero_stage 2]), LoRA and
full fine-tuning of the packaged tiny Llama, fp32, 4 steps: rank 0's bytes after the first step
(LLAMA_RECIPES_SHARDING_REPORT) and the per-step losses. About 10 minutes on 2 cores.
"""
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import test_distributed as t  # noqa: E402

B2, B4 = "training.per_device_train_batch_size=2", "training.per_device_train_batch_size=4"
RUNS = [
    ("LoRA, 1 process, batch 4", None, (), (B4,)),
    ("LoRA, DDP 2 × batch 2", "cpu_ddp_2proc.yaml", (), (B2,)),
    ("LoRA, ZeRO-2 2 × batch 2", t.DS, t.ZERO2, (B2,)),
    ("LoRA, ZeRO-3 2 × batch 2", t.DS, (), (B2,)),
    ("full, 1 process, batch 4", None, (), (*t.FULL, B4)),
    ("full, ZeRO-2 2 × batch 2", t.DS, t.ZERO2, (*t.FULL, B2)),
    ("full, ZeRO-3 2 × batch 2", t.DS, (), (*t.FULL, B2)),
]

with tempfile.TemporaryDirectory() as tmp:
    bytes_rows, loss_rows = [], []
    for i, (label, config, flags, over) in enumerate(RUNS):
        root = Path(tmp) / str(i)
        run = t.one_process(root, *over) if config is None else t.two_processes(config, root, *over, flags=flags)
        loss_rows.append(f"| {label} | " + " | ".join(f"{x:.6f}" for x in run.losses) + " |")
        if config is not None:
            m = run.reports[0]["memory"]
            optim = m["optim_bytes_local"] + m["master_bytes_local"]
            full = m["optim_bytes_full"] + (m["master_bytes_local"] * 2 if m["master_bytes_local"] else 0)
            bytes_rows.append(f"| {label} | {m['param_bytes_local']:,} of {m['param_bytes_full']:,} | "
                              f"{optim:,} of {full:,} | {(m['param_bytes_local'] + optim) / (m['param_bytes_full'] + full):.2f} |")
    print("| run | rank 0 parameter bytes | rank 0 optimizer bytes (Adam m, v + ZeRO's fp32 partition) | share held |")
    print("|---|---|---|---|")
    print("\n".join(bytes_rows))
    print()
    print("| run | step 1 | step 2 | step 3 | step 4 |")
    print("|---|---|---|---|---|")
    print("\n".join(loss_rows))
