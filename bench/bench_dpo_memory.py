"""DPO with LoRA: what the reference model costs in memory. Ours vs an explicit frozen copy vs TRL's default.

    HF_HUB_OFFLINE=1 python bench/bench_dpo_memory.py [--recipe R] [--steps N] [--cases ours,copy,trl_peft|all]
                                                      [--repeats K] [--out FILE.json]

Three cases, each in its own fresh subprocess (OMP_NUM_THREADS=1), so the peak RSS
(`ru_maxrss` at the end of the run) is that case's alone:

- `ours`: the real pipeline (objective: dpo through pipeline.train), the recipe's LoRA; the reference is the
  base with the adapter switched off (TRL 1.16 keeps a frozen copy of the *adapter*, "ref"): asserted
  `trainer.ref_model is None`.
- `copy`: a plain TRL 1.16 `DPOTrainer` with `peft_config` and an explicit `ref_model`: a second, frozen
  `AutoModelForCausalLM.from_pretrained(<same base>, dtype=float32)`, as a user of plain TRL would pass it.
- `trl_peft`: the same plain TRL `DPOTrainer` with `peft_config` and no `ref_model` (TRL's default).

Everything else is equal: the base (fp32), the rendered preference rows (the recipe's; TRL gets the rows
ours renders, as in bench_dpo.py), LoRA (the recipe's r, alpha, dropout, all-linear), batch size,
max_length, beta, learning rate, seed, the number of steps; no eval before/after, no harness, no checkpoints.
Measured: peak RSS (MiB), the RSS when training begins (models loaded, data tokenized), the bytes of the
parameters (one copy of the base, the adapters, the reference copy when there is one), the per-step losses
(all three compute the same reference, so the same losses). Not timed: memory only.
Where the bytes are: transformers 5 maps a float32 safetensors file without copying it, so the weights
are file-backed pages (RssFile), the activations anonymous memory (RssAnon); both peaks are sampled.
`copy - trl_peft` is the reference copy's cost with everything else identical code; `copy - ours` is the
same against our pipeline, which differs in more than the reference: on CPU its preference trainers
compute log-probabilities at the completion positions only (training.CompactLogProbsMixin), far fewer
activations than TRL's fused head. Two controls (`--cases all`): `copy_anon`, the copy's weights cloned
into the process's own memory (see trl_side), and `ours_trl_head`, ours without that mixin (TRL's head).

The children run with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_, default 128 KiB): glibc
otherwise raises the threshold as large blocks are freed and keeps later activation buffers in its heap,
and the peak RSS of identical runs then varies by a few hundred MiB (measured on SmolLM2: 4339-4575 MiB,
TRL's default, three runs). With it fixed every large tensor is its own mapping, returned when freed: the
peak RSS is the peak of live memory, reproducible to a few MiB. `--malloc-mmap-threshold 0`: glibc's default.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = ("ours", "copy", "trl_peft")
EXTRA = ("copy_anon", "ours_trl_head")  # controls, with --cases (or --cases all)
MIB = 2 ** 20
COMMON = ["training.bf16=false", "training.report_to=none", "training.save_strategy=no",
          "eval.before_after=false", "eval.harness=null"]


def _status_mib(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024  # kB -> MiB
    return float("nan")


def _rollup_mib() -> dict:
    """Whole-process Rss/Pss, anonymous and file-backed (MiB), from /proc/self/smaps_rollup."""
    out = {}
    for line in open("/proc/self/smaps_rollup"):
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss", "Pss_Anon", "Pss_File", "Anonymous"):
            out[key] = round(int(rest.split()[0]) / 1024, 1)
    return out


def _weights_mapped_mib(model_dir: str) -> dict:
    """How many times the base's weight files are mapped into this process, and their resident MiB in all."""
    n, rss, cur = 0, 0, None
    for line in open("/proc/self/smaps"):
        parts = line.split()
        if parts and not parts[0].endswith(":"):  # a mapping's header line
            cur = parts[-1] if len(parts) >= 6 else ""
            if cur.startswith(str(model_dir)) and cur.endswith(".safetensors"):
                n += 1
        elif parts and parts[0] == "Rss:" and cur and cur.startswith(str(model_dir)) and cur.endswith(".safetensors"):
            rss += int(parts[1])
    return {"mappings": n, "rss_mib": round(rss / 1024, 1)}


class PeakSampler:
    """Samples /proc/self/status every few ms: the peaks of RssAnon and RssFile (VmHWM has no split)."""

    def __init__(self, every_s: float = 0.002):
        import threading

        self.every_s, self.peak = every_s, {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for line in open("/proc/self/status"):
                key = line.split(":")[0]
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], int(line.split()[1]))
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def result(self) -> dict:
        return {f"sampled_peak_{k}_mib": round(v / 1024, 1) for k, v in self.peak.items()}


def _at_train_begin(mem: dict):
    from transformers import TrainerCallback

    class AtTrainBegin(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            mem["rss_at_train_begin_mib"] = round(_status_mib("VmRSS:"), 1)
            mem["peak_rss_before_train_mib"] = round(_status_mib("VmHWM:"), 1)

    return AtTrainBegin()


def _param_bytes(model) -> dict:
    """Bytes of a model's parameters (tied weights once): the base's and the LoRA adapters'."""
    if model is None:
        return {"total": 0, "base": 0, "adapters": 0}
    base = adapters = 0
    for name, p in model.named_parameters():
        n = p.numel() * p.element_size()
        if "lora_" in name:
            adapters += n
        else:
            base += n
    return {"total": base + adapters, "base": base, "adapters": adapters}


def _losses(trainer):
    return [round(h["loss"], 6) for h in trainer.state.log_history if "loss" in h]


def ours(recipe_path: Path, steps: int, out: Path, mem: dict, trl_head: bool = False):
    from llama_recipes import pipeline
    from llama_recipes.objectives import preference
    from llama_recipes.schema import load_recipe

    if trl_head:  # control: without training.CompactLogProbsMixin (what ours adds on CPU), i.e. TRL's fused head
        preference.has_accelerator = lambda: True

    recipe = load_recipe(recipe_path, [f"output_dir={out}", f"training.max_steps={steps}", "training.logging_steps=1",
                                       *COMMON])
    run = pipeline.train(recipe, callbacks=[_at_train_begin(mem)])
    assert run.trainer.ref_model is None, "ours with LoRA: the reference must be the adapter switched off"
    return run.trainer


def trl_side(recipe, rows, steps: int, out: Path, mem: dict, with_copy: bool, anon: bool = False):
    """bench_dpo.py's trl_side; with_copy: an explicit frozen fp32 copy of the base as ref_model.

    transformers 5 maps a float32 safetensors file into memory without copying it: a second
    from_pretrained of the same file is a second mapping of the same page-cache pages (resident in
    both mappings, so counted twice in RSS, once in physical memory). anon: the copy's weights
    cloned into the process's own memory, as when they cannot be shared with the file (a dtype
    cast on load, a GPU, another file)."""
    import torch
    from bench_dpo import trl_trainer
    from transformers import AutoModelForCausalLM

    from llama_recipes import paths

    ref = None
    if with_copy:  # loaded first, so the policy and its LoRA draw the same random numbers as in trl_peft
        ref = AutoModelForCausalLM.from_pretrained(paths.model_path(recipe.model), dtype=torch.float32)
        ref.requires_grad_(False)
        ref.eval()
        if anon:
            for p_ in ref.parameters():  # tied weights are one Parameter: cloned once, still tied
                p_.data = p_.data.clone()
    trainer = trl_trainer(recipe, rows, steps, out, ref_model=ref, callbacks=[_at_train_begin(mem)])
    if with_copy:
        assert trainer.ref_model is not None
    else:
        assert trainer.ref_model is None, "TRL with peft_config: no reference copy"
    trainer.train()
    return trainer


def child(case: str, recipe_path: Path, steps: int) -> dict:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import datasets
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.getLogger("llama_recipes").setLevel(logging.WARNING)

    from llama_recipes import data, paths
    from llama_recipes.schema import load_recipe

    mem = {}
    recipe = load_recipe(recipe_path, [f"training.max_steps={steps}", *COMMON])
    with tempfile.TemporaryDirectory(prefix=f"dpo_mem_{case}_") as tmp, PeakSampler() as sampler:
        if case.startswith("ours"):
            trainer = ours(recipe_path, steps, Path(tmp) / "out", mem, trl_head=(case == "ours_trl_head"))
        else:
            raw, _, _ = data.build_datasets(recipe.data, recipe.formats)  # the rows ours renders, untokenized
            rows = datasets.Dataset.from_list([{k: x[k] for k in ("prompt", "chosen", "rejected")} for x in raw])
            trainer = trl_side(recipe, rows, steps, Path(tmp) / "out", mem, with_copy=case.startswith("copy"),
                               anon=(case == "copy_anon"))
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    mem.update(sampler.result())
    mem["at_end"] = {**_rollup_mib(), "weight_files": _weights_mapped_mib(Path(paths.model_path(recipe.model)).resolve())}
    policy = _param_bytes(trainer.model)
    ref = _param_bytes(getattr(trainer, "ref_model", None))
    peft_config = getattr(trainer.model, "peft_config", {})
    return {"case": case, "peak_rss_mib": round(peak_kib / 1024, 1), **mem,
            "rss_at_end_mib": round(_status_mib("VmRSS:"), 1),
            "ref_model_is_none": getattr(trainer, "ref_model", None) is None,
            "adapters": sorted(peft_config),
            "policy_base_param_mib": round(policy["base"] / MIB, 2),
            "policy_adapter_param_mib": round(policy["adapters"] / MIB, 2),
            "ref_model_param_mib": round(ref["total"] / MIB, 2),
            "steps": trainer.state.global_step, "losses": _losses(trainer),
            "torch_threads": torch.get_num_threads()}


def run_case(case: str, recipe: str, steps: int, mmap_threshold: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1"}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", case, "--recipe", recipe, "--steps", str(steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"case {case} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "demo" / "smollm2_dpo.yaml"))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--cases", default=",".join(CASES),
                   help="comma-separated, of: " + ", ".join(CASES + EXTRA) + "; or all")
    p.add_argument("--repeats", type=int, default=1, help="runs per case (peak RSS: the median; allocator noise)")
    p.add_argument("--malloc-mmap-threshold", type=int, default=128 * 1024,
                   help="glibc's MALLOC_MMAP_THRESHOLD_ in the children, bytes (0: glibc's dynamic default)")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--child", choices=CASES + EXTRA, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, Path(args.recipe), args.steps)), flush=True)
        return 0
    import torch

    names = CASES + EXTRA if args.cases == "all" else tuple(args.cases.split(","))
    runs = {c: [] for c in names}
    for r in range(args.repeats):  # rounds; within a round the order rotates, so no case is always first
        for case in names[r % len(names):] + names[:r % len(names)]:
            runs[case].append(run_case(case, args.recipe, args.steps, args.malloc_mmap_threshold))
            print(f"round {r} [{case}] peak RSS {runs[case][-1]['peak_rss_mib']} MiB", flush=True)
    cases = {c: rs[0] for c, rs in runs.items()}  # the first run's details; the peaks of all runs below
    one_copy = cases[names[0]]["policy_base_param_mib"]
    peak = {c: round(statistics.median(r["peak_rss_mib"] for r in rs), 1) for c, rs in runs.items()}
    result = {"bench": "dpo_memory", "recipe": Path(args.recipe).name, "steps": args.steps, "repeats": args.repeats,
              "model_param_mib_fp32": one_copy, "peak_rss_mib": peak,
              "peak_rss_mib_runs": {c: [r["peak_rss_mib"] for r in rs] for c, rs in runs.items()}}
    for a, b in (("copy", "ours"), ("copy", "trl_peft"), ("ours", "trl_peft"), ("copy_anon", "trl_peft"),
                 ("ours_trl_head", "trl_peft"), ("copy_anon", "ours")):
        if a in peak and b in peak:
            result[f"{a}_minus_{b}_mib"] = round(peak[a] - peak[b], 1)
    result.update({"cases": cases, "omp_num_threads": 1,
                   "malloc_mmap_threshold": args.malloc_mmap_threshold or "glibc default (dynamic)",
                   "torch_isa": torch.backends.cpu.get_cpu_capability(), "date": time.strftime("%Y-%m-%d")})
    text = json.dumps(result, indent=1)
    if args.out:  # first: a closed stdout (| head) must not lose the results
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
