"""Run by test_memory.py under torchrun: per-rank tensor bytes of a FSDP2-sharded model after one
AdamW step, next to the estimate for FSDP full shard over WORLD_SIZE devices. Prints JSON on rank 0."""
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoConfig, AutoModelForCausalLM

from llama_recipes import memory


def local(t):
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def main(model_dir, train_regex):
    dist.init_process_group("gloo")
    n = dist.get_world_size()
    cfg = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    for name, p in model.named_parameters():
        p.requires_grad_(not train_regex or __import__("re").search(train_regex, name) is not None)
    for layer in model.model.layers:  # one FSDP unit per decoder layer, then the root
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 100, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    w = sum(local(p) for p in model.parameters())
    g = sum(local(p.grad) for p in model.parameters() if p.grad is not None)
    o = sum(local(t) for st in opt.state.values() for k, t in st.items() if k != "step")
    s = memory.Setup(method={"name": "full"}, freeze_train=[train_regex] if train_regex else [], weight_dtype="float32",
                     mixed=None, optim="adamw_torch", gpus=n, sharding="full_shard")
    e = memory.estimate(memory.model_shape(cfg), s)
    out = {"rank": dist.get_rank(), "measured": [w, g, o], "estimate": [e.weights, e.gradients, e.optimizer]}
    every = [None] * n
    dist.all_gather_object(every, out)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(every), flush=True)
    # Both ranks leave the last collective before either tears gloo down: without the barrier a
    # rank could close its connections while the other still read from them, and gloo aborted
    # ("terminate called without an active exception") in about one run of six.
    dist.barrier()
    dist.destroy_process_group()
    # ...and still, in about one run of ten, the interpreter's shutdown raced a gloo thread
    # (SIGABRT after RESULT was printed): leave without running C++ static destructors.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")
