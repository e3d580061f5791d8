"""Forward+backward time of the tiny Llama: padded vs packed layouts (docs/data.md).

    OMP_NUM_THREADS=1 python tests/data_packing_speed.py
"""
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

TINY = Path(__file__).resolve().parents[1] / "llama_recipes" / "assets" / "tiny-llama"
model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32, attn_implementation="sdpa")
ids = torch.randint(5, 1000, (1, 2048))
pos = torch.cat([torch.arange(64)] * 32)[None]  # 32 packed samples of 64 tokens


def step_seconds(**inputs) -> float:
    start = time.time()
    for _ in range(3):
        model(**inputs, use_cache=False).logits.sum().backward()
    return (time.time() - start) / 3


print("padded 4x512", step_seconds(input_ids=ids.view(4, 512), attention_mask=torch.ones(4, 512, dtype=torch.long)))
print("packed, batch 4 flattened (TRL padding-free: one row of 2048)", step_seconds(input_ids=ids, position_ids=pos))
print("packed rows, batch 4 x 512 (ours: batching.PackedRowCollator)",
      step_seconds(input_ids=ids.view(4, 512), position_ids=pos.view(4, 512)))
print("packed, batch 1 x 512, x4 accumulation", 4 * step_seconds(input_ids=ids[:, :512], position_ids=pos[:, :512]))
