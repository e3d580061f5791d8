"""Peak host RSS per rank with and without ZeRO-3's zero3_init_flag, on the real SmolLM2-135M.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python bench/bench_zero3_init.py [--model DIR]

`--model DIR`: another saved Llama (config.json, safetensors, tokenizer files) in place of SmolLM2, e.g.
a larger one, where loading rather than training sets the peak (docs/distributed.md).

Two CPU ranks (accelerate_configs/cpu_deepspeed_2proc.yaml: ZeRO-3, fp32), recipes/demo/smollm2_lora.yaml
for one step. With the flag (the config's default) the model loads partitioned (deepspeed.zero.Init,
registered by distributed.setup before the model loads); with `--zero3_init_flag false` every rank
materialises the whole model first and DeepSpeed partitions it when training starts. Peak RSS is
each rank's ru_maxrss after the first step (LLAMA_RECIPES_SHARDING_REPORT): a memory figure, not a
timing, so other jobs on the machine do not change it much.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MODEL = sys.argv[sys.argv.index("--model") + 1] if "--model" in sys.argv else None


def run(flag: str, tmp: Path) -> list[dict]:
    rep = tmp / f"rep-{flag}"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs/cpu_deepspeed_2proc.yaml"), "--zero3_init_flag", flag,
           "--main_process_port", str(port()), str(ROOT / "run_recipe.py"), str(ROOT / "recipes/demo/smollm2_lora.yaml"),
           f"output_dir={tmp / flag}", "training.max_steps=1", "training.per_device_train_batch_size=2",
           "training.save_strategy=no", "training.report_to=none", "eval.before_after=false", "data.max_samples=32",
           *([f"model.name_or_path={MODEL}"] if MODEL else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "LLAMA_RECIPES_SHARDING_REPORT": str(rep)}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        sys.exit(r.stderr[-4000:])
    return [json.loads(p.read_text())["memory"] for p in sorted(tmp.glob(f"rep-{flag}.rank*.json"))]


with tempfile.TemporaryDirectory() as d:
    on, off = run("true", Path(d)), run("false", Path(d))
    mib = 2 ** 20
    print("| zero3_init_flag | rank 0 peak RSS | rank 1 peak RSS | rank 0 parameter bytes held |")
    print("|---|---|---|---|")
    for name, reps in (("true (partitioned as it loads)", on), ("false (whole model, then partitioned)", off)):
        print(f"| {name} | {reps[0]['peak_rss_bytes'] / mib:,.0f} MiB | {reps[1]['peak_rss_bytes'] / mib:,.0f} MiB | "
              f"{reps[0]['param_bytes_local'] / mib:,.0f} of {reps[0]['param_bytes_full'] / mib:,.0f} MiB |")
    print(f"\nratio (flag on / off), rank 0: {on[0]['peak_rss_bytes'] / off[0]['peak_rss_bytes']:.2f}")
