"""Worker of bench_fsdp.py (run under torchrun, gloo, CPU): bytes of params + grads + optimizer state.

Every rank builds the same ~10M Llama from config, shards it with torch's FSDP2 `fully_shard`
per decoder layer and then the root, takes one AdamW step on random tokens and counts its
LOCAL bytes (DTensor shards). Rank 0 also counts one unsharded process doing the same step.
"""
import json
import os
import sys

import common


def local_bytes(model, opt):
    def nbytes(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = sum(nbytes(p) for p in model.parameters())
    grads = sum(nbytes(p.grad) for p in model.parameters() if p.grad is not None)
    optim = sum(nbytes(v) for s in opt.state.values() for v in s.values() if hasattr(v, "numel") and v.dim() > 0)
    return {"params": params, "grads": grads, "optim": optim, "total": params + grads + optim}


def build():
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(common.TINY)
    for k, v in common.MODEL_10M.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def step(model):
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return opt


def main():
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    common.set_threads()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    sharded = local_bytes(model, step(model))
    per_rank = [None] * world
    dist.all_gather_object(per_rank, sharded)
    if rank == 0:
        single = local_bytes(m := build(), step(m))
        out = {"world": world, "per_rank": per_rank, "single": single,
               "ratio": max(r["total"] for r in per_rank) / (single["total"] / world)}
        with open(sys.argv[1], "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
