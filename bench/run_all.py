"""`make bench`: run every CPU benchmark (one subprocess each), print a table, write results/latest.json.

    python bench/run_all.py            # defaults: a few minutes on an idle 2-core machine
    python bench/run_all.py --quick    # fewer steps and rounds (a loaded machine); noisier
    python bench/run_all.py --only overhead,packing   # re-runs those, keeps the others in latest.json
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# name -> (script, default args, --quick args)
BENCHES = {
    "overhead": ("bench_overhead.py", [], ["--steps", "4", "--warmup", "1", "--rounds", "3"]),
    "packing": ("bench_packing.py", [], ["--steps", "4", "--warmup", "1", "--rounds", "3"]),
    "memory": ("bench_memory.py", [], ["--steps", "2"]),
    "fsdp": ("bench_fsdp.py", [], []),
    "peer": ("bench_peer.py", [], ["--steps", "4", "--warmup", "1", "--rounds", "3"]),
    "startup": ("bench_startup.py", [], ["--repeat", "1"]),
    "time_to_quality": ("bench_time_to_quality.py", [], ["--rows", "512"]),
    "head_cache": ("bench_head_cache.py", [], ["--epochs", "2", "--rounds", "1"]),
}


def fmt(x, nd=2):
    return "n/a" if x is None else f"{x:.{nd}f}"


def table(r: dict) -> list[tuple[str, str, str]]:
    """(measure, value, goal) rows from whatever benchmarks produced results."""
    rows = []
    if "overhead" in r:
        for m in ("full", "lora"):
            if m in r["overhead"]:
                rows.append((f"overhead {m}: ours ÷ plain loop tokens/s", fmt(r["overhead"][m]["ratio_median"]), ">= 0.95"))
    if "packing" in r:
        p = r["packing"]
        rows += [("packing: real-token fraction, padded", fmt(p["padded_real_fraction"]), ""),
                 ("packing: real-token fraction, grouped by length", fmt(p.get("grouped_real_fraction")), ""),
                 ("packing: real-token fraction, packed rows", fmt(p["packed_real_fraction"]), ">= 0.95"),
                 ("packing: packed-row fill (real ÷ batch×max_length)", fmt(p["packed_fill"]), ""),
                 ("packing: tokens/s packed ÷ padded", fmt(p["speedup_median"]), ">= 1.4"),
                 ("packing: tokens/s grouped by length ÷ padded", fmt(p.get("grouped_speedup_median")), "")]
    if "time_to_quality" in r:
        t = r["time_to_quality"]
        rows += [("time to quality: TRL default wall ÷ ours", fmt(t["speedup_vs_trl_default"]), ">= 1.45"),
                 ("time to quality: TRL packing wall ÷ ours", fmt(t["speedup_vs_trl_packing"]), ""),
                 ("time to quality: eval loss ours / TRL default / TRL packing",
                  " / ".join(fmt(t["sides"][s]["eval_loss"], 4) for s in ("ours", "trl_default", "trl_packing")),
                  "ours <= TRL")]
    if "head_cache" in r:
        h = r["head_cache"]
        rows += [(f"head cache: {h['method']} {h['epochs']:g} epochs, uncached ÷ cached time", fmt(h["speedup_median"]),
                  ""),
                 ("head cache: final loss cached / uncached",
                  f"{fmt(h['final_loss_cached'], 4)} / {fmt(h['final_loss_uncached'], 4)}", "equal")]
    if "memory" in r:
        m = r["memory"]
        rows += [("memory: LoRA ÷ full, RSS growth during training", fmt(m["lora_over_full_train_peak"]), ""),
                 ("memory: LoRA ÷ full, param+grad+optimizer bytes", fmt(m["lora_over_full_state"]), "")]
    if "fsdp" in r:
        rows.append(("fsdp 2 ranks: per-rank bytes ÷ (single / 2)", fmt(r["fsdp"]["ratio"], 3), "<= 1.1"))
    if "peer" in r:
        p = r["peer"]
        rows += [("peer: ours ÷ TRL script tokens/s", fmt(p["ratio_median"]), ">= 1.0"),
                 ("peer: final loss ours / TRL", f"{fmt(p['ours_final_loss'], 4)} / {fmt(p['trl_final_loss'], 4)}", "equal")]
    if "startup" in r:
        s = r["startup"]
        rows += [("start-up: demo recipe to first step, s", fmt(s["first_step_shipped_s"], 1), ""),
                 ("start-up: same, eval.before_after=false, s", fmt(s["first_step_no_eval_s"], 1), ""),
                 ("start-up: heavy imports, s", fmt(s["imports_s"], 1), ""),
                 ("start-up: --help, s", fmt(s["help_s"]), "< 1"),
                 ("start-up: validation error, s", fmt(s["validation_error_s"]), "< 2"),
                 ("start-up: --estimate-memory, s", fmt(s["estimate_memory_s"]), "< 2")]
    return rows


def render(rows) -> str:
    w = max(len(a) for a, _, _ in rows)
    lines = [f"{'measure':<{w}}  {'value':>15}  goal", "-" * (w + 27)]
    lines += [f"{a:<{w}}  {b:>15}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=",".join(BENCHES))
    a = ap.parse_args()
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per side keeps side-by-side runs comparable
    env.setdefault("MKL_NUM_THREADS", env["OMP_NUM_THREADS"])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    results, errors, seconds = {}, {}, {}
    load_before = os.getloadavg()
    for name in a.only.split(","):
        script, args, quick = BENCHES[name]
        print(f"== {name}", flush=True)
        t0 = time.time()
        p = subprocess.run([sys.executable, str(HERE / script), *(quick if a.quick else args)], cwd=HERE.parent,
                           env=env, capture_output=True, text=True)
        seconds[name] = round(time.time() - t0, 1)
        f = RESULTS / f"{name}.json"
        if p.returncode == 0 and f.exists():
            results[name] = json.loads(f.read_text())
        else:
            errors[name] = p.stderr[-3000:]
            print(f"   FAILED (rc {p.returncode}):\n{p.stderr[-1500:]}", flush=True)
        print(f"   {seconds[name]} s", flush=True)
    import torch

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python bench/run_all.py", *sys.argv[1:]]),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "torch": torch.__version__, "threads": env["OMP_NUM_THREADS"],
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "seconds": seconds}
    latest = RESULTS / "latest.json"
    if set(a.only.split(",")) != set(BENCHES) and latest.exists():  # keep the benchmarks not re-run
        old = json.loads(latest.read_text())
        for name, res in old.get("results", {}).items():
            if name not in results and name not in errors:
                results[name] = res
                seconds.setdefault(name, f"kept from the run of {old['meta']['date']}")
    rows = table(results)
    text = render(rows) if rows else "(no results)"
    print("\n" + text)
    print(f"\nload average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} "
          f"(on a loaded machine the ratios are noisy; rerun on a quiet one)")
    RESULTS.mkdir(exist_ok=True)
    latest.write_text(json.dumps({"meta": meta, "table": rows, "results": results,
                                                     "errors": errors}, indent=1))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
