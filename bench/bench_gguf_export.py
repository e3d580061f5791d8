"""Peak memory and time of `export --format gguf` on SmolLM2-135M (builtin:smollm2-135m-instruct).

    python bench/bench_gguf_export.py [--lora-run outputs/demo_smollm2_chat_lora] [--quant f16 q8_0]

Each export runs in a fresh process (`--no-verify`: the writer alone) and reports its peak RSS
(ru_maxrss) next to the RSS of the same process after importing torch/transformers/peft and before
touching the model, and next to the model's float32 size. Two kinds of runs:
  model    a full fine-tune's artifact (config.json + model.safetensors): the converted SmolLM2 directory
           itself, streamed tensor by tensor from safetensors;
  adapter  a LoRA run (if --lora-run exists): the base is loaded and the adapter merged in memory (one copy).
Writes bench/results/gguf_export.json.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, ROOT

CHILD = r"""
import json, resource, sys, time
import torch, transformers, peft  # what an export process imports anyway
sys.path.insert(0, {root!r})
from llama_recipes import gguf_export
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.time()
res = gguf_export.main({run!r}, {out!r}, quant={quant!r}, verify_it=False)
print(json.dumps({{"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "import_rss": base_rss,
                  "seconds": time.time() - t, "bytes": res["bytes"]}}))
"""


def smollm2_dir() -> Path:
    sys.path.insert(0, str(ROOT))
    from llama_recipes import builtin_models

    return builtin_models.convert(builtin_models.builtin_gguf("smollm2-135m-instruct"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lora-run", default=str(ROOT / "outputs" / "demo_smollm2_chat_lora"))
    p.add_argument("--quant", nargs="+", default=["f16", "q8_0"])
    p.add_argument("--out", default="/tmp/llr_bench_gguf")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = smollm2_dir()
    f32_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    runs = {"model": model_dir}
    if Path(args.lora_run, "adapter_config.json").is_file():
        runs["adapter"] = Path(args.lora_run)
    rows = []
    for kind, run in runs.items():
        for quant in args.quant:
            target = out / f"{kind}-{quant}.gguf"
            target.unlink(missing_ok=True)
            code = CHILD.format(root=str(ROOT), run=str(run), out=str(target), quant=quant)
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(proc.stderr[-2000:])
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            row = {"kind": kind, "quant": quant, "file_mib": round(r["bytes"] / 2**20, 1),
                   "seconds": round(r["seconds"], 1), "peak_rss_mib": round(r["peak_rss"] / 2**20),
                   "rss_after_imports_mib": round(r["import_rss"] / 2**20),
                   "added_by_export_mib": round((r["peak_rss"] - r["import_rss"]) / 2**20),
                   "model_f32_mib": round(f32_bytes / 2**20)}
            rows.append(row)
            print(json.dumps(row))
            target.unlink()
    RESULTS.mkdir(parents=True, exist_ok=True)
    import torch

    (RESULTS / "gguf_export.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"),
                                                          "isa": torch.backends.cpu.get_cpu_capability(),
                                                          "rows": rows}, indent=1) + "\n")
    print("| run | GGUF | file | seconds | peak RSS | RSS after imports | added by export | model (f32) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['quant'].upper()} | {r['file_mib']} MiB | {r['seconds']} | {r['peak_rss_mib']} MiB | "
              f"{r['rss_after_imports_mib']} MiB | {r['added_by_export_mib']} MiB | {r['model_f32_mib']} MiB |")


if __name__ == "__main__":
    main()
