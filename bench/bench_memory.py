"""3. Memory: peak memory of LoRA ÷ full fine-tuning at the same settings (CPU).

Each side trains in a forked child (so neither inherits the other's allocator state). The
child resets the kernel's peak-RSS counter (/proc/self/clear_refs, 5) when training begins
and reads VmHWM when it ends: `train_peak_mb` is the growth of resident memory during
training (gradients, optimizer state, activations), `peak_rss_mb` the whole process. Also
the exact bytes of parameters + gradients + optimizer state after training.
"""
import argparse
import multiprocessing as mp

import common


def _status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024  # kB -> MiB


def _child(work, method, steps, batch, q):
    from transformers import TrainerCallback

    mem = {}

    class Peak(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            mem["start_mb"] = _status("VmRSS:")

        def on_train_end(self, *a, **kw):
            mem["peak_rss_mb"] = _status("VmHWM:")

    meter = common.Meter(warmup=0)
    original = meter.attach

    def attach(trainer):
        trainer.add_callback(Peak())
        return original(trainer)

    meter.attach = attach
    rec = common.recipe_dict(work, work / f"out-mem-{method}", method, steps=steps, batch=batch)
    run = common.run_pipeline(rec, meter)
    model, opt = run.trainer.model, run.trainer.optimizer
    state = sum(p.numel() * p.element_size() for p in model.parameters())
    state += sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    for s in opt.state.values():
        state += sum(v.numel() * v.element_size() for v in s.values() if hasattr(v, "numel"))
    mem["train_peak_mb"] = mem["peak_rss_mb"] - mem["start_mb"]
    mem["param_grad_optim_mb"] = state / 2**20
    q.put(mem)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args(argv)
    common.quiet()
    common.set_threads()
    work = common.make_workdir()
    ctx = mp.get_context("fork")
    out = {"steps": a.steps, "batch": a.batch}
    for method in ("full", "lora"):
        q = ctx.Queue()
        p = ctx.Process(target=_child, args=(work, method, a.steps, a.batch, q))
        p.start()
        out[method] = q.get()
        p.join()
        print(f"[memory {method}] {out[method]}", flush=True)
    out["lora_over_full_train_peak"] = out["lora"]["train_peak_mb"] / out["full"]["train_peak_mb"]
    out["lora_over_full_peak_rss"] = out["lora"]["peak_rss_mb"] / out["full"]["peak_rss_mb"]
    out["lora_over_full_state"] = out["lora"]["param_grad_optim_mb"] / out["full"]["param_grad_optim_mb"]
    if (common.ROOT / "llama_recipes" / "memory.py").exists():  # the estimate (another branch builds it)
        out["estimate"] = "llama_recipes.memory exists: measured ÷ estimated is the memory benchmark's"
    else:
        out["estimate"] = "llama_recipes.memory not on this branch: no measured ÷ estimated"
    return common.save("memory", out)


if __name__ == "__main__":
    main()
