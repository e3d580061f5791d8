"""Prove an exported GGUF answers in llama.cpp as the trained model answers in transformers.

    python scripts/llamacpp_check.py --build                      # once: llama-cpp-python into its own venv
    python scripts/llamacpp_check.py [RUN] [--quant f16 q8_0] [--prompts 12] [--max-new-tokens 48]

RUN defaults to outputs/demo_smollm2_chat_lora (recipes/demo/smollm2_chat_lora.yaml; trained first with
--train if absent). For each quantization: `export --format gguf` (with its transformers verification),
then llama.cpp (llama-cpp-python==0.3.36) loads the file and answers the run's held-out prompts greedily,
tokenizing the prompt text itself and stopping at what the file's metadata says ends a turn (llama.cpp's
end-of-generation set); transformers answers the same prompts with the trained model (adapter on its
base, fp32). Prints and writes (bench/results/llamacpp_check.json) per quantization: file size, export
seconds, whether llama.cpp's prompt tokens equal transformers', greedy agreement, whether every stop id
of the run is end-of-generation in llama.cpp, and llama.cpp's generation speed.

llama-cpp-python has no binary wheel for this Python: --build compiles it from the sdist (15-35 min on 2
cores, `nice -n 19`) into $LLAMA_RECIPES_CACHE/llama-cpp-python-0.3.36 (default ~/.cache/llama-recipes), with
-march=native: the build runs only on CPUs like the one that built it. Never part of `make test`;
tests/test_llamacpp.py (slow) runs this when that venv or `llama_cpp` is present.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.3.36"
DEFAULT_RUN = ROOT / "outputs" / "demo_smollm2_chat_lora"
RESULTS = ROOT / "bench" / "results" / "llamacpp_check.json"


def venv_dir() -> Path:
    root = Path(os.environ.get("LLAMA_RECIPES_CACHE") or "~/.cache/llama-recipes").expanduser()
    return root / f"llama-cpp-python-{VERSION}"


def llamacpp_python() -> str | None:
    """A Python that imports llama_cpp: this one, else the cached venv's; None if neither."""
    try:
        import llama_cpp  # noqa: F401

        return sys.executable
    except ImportError:
        pass
    py = venv_dir() / "bin" / "python"
    if py.is_file() and subprocess.run([str(py), "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return str(py)
    return None


def build() -> str:
    """Build llama-cpp-python into its own venv (once); returns that venv's python."""
    if (py := llamacpp_python()) is not None:
        print(f"llama_cpp already importable by {py}")
        return py
    venv = venv_dir()
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2"),
           # the text model only: no multimodal library, tests or examples (halves the build)
           "CMAKE_ARGS": "-DMTMD_BUILD=OFF -DLLAVA_BUILD=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF "
                         "-DLLAMA_BUILD_EXAMPLES=OFF"}
    started = time.time()
    subprocess.run(["nice", "-n", "19", str(venv / "bin" / "pip"), "install", "--no-cache-dir",
                    f"llama-cpp-python=={VERSION}"], check=True, env=env)
    print(f"built llama-cpp-python {VERSION} in {(time.time() - started) / 60:.1f} min into {venv}")
    return str(venv / "bin" / "python")


# -- the llama.cpp side (runs in the llama-cpp venv: imports llama_cpp and the standard library only) --

def worker(spec_file: str) -> None:
    import llama_cpp

    spec = json.loads(Path(spec_file).read_text())
    if not spec.get("extra_bufts", True):  # no repacked/AMX weight buffers (see check(): they crash on Q8_0 on AMX)
        import llama_cpp.llama as high_level

        defaults = high_level.llama_cpp.llama_model_default_params

        def without_extra_bufts():
            params = defaults()
            params.use_extra_bufts = False
            return params

        high_level.llama_cpp.llama_model_default_params = without_extra_bufts
    llm = llama_cpp.Llama(model_path=spec["gguf"], n_ctx=spec.get("n_ctx", 2048), n_threads=spec.get("threads", 2),
                          n_batch=512, verbose=False, seed=0, lora_path=spec.get("lora"))
    if hasattr(llama_cpp, "llama_vocab_is_eog"):  # llama.cpp's end-of-generation set: eos, eot, eom + known texts
        vocab = llama_cpp.llama_model_get_vocab(llm.model)

        def is_eog(t):
            return bool(llama_cpp.llama_vocab_is_eog(vocab, t))
    else:
        def is_eog(t):
            return bool(llama_cpp.llama_token_is_eog(llm.model, t))

    results, gen_tokens, gen_seconds = [], 0, 0.0
    for item in spec["prompts"]:
        ids = llm.tokenize(item["text"].encode("utf-8"), add_bos=item["special"], special=True)
        out = []
        llm.reset()
        started = time.time()
        for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(tok))
            if is_eog(tok) or len(out) >= spec["max_new_tokens"]:
                break
        gen_seconds += time.time() - started
        gen_tokens += len(out)
        results.append({"prompt_ids": ids, "output": out})
    print(json.dumps({"results": results, "eog": {str(t): is_eog(t) for t in spec["stop_ids"]},
                      "tokens": gen_tokens, "seconds": gen_seconds}))


# -- the transformers side ------------------------------------------------------------------------------

def check(run: Path, quants: list[str], n_prompts: int, max_new_tokens: int, out_dir: Path, py: str,
          threads: int = 2) -> list[dict]:
    sys.path.insert(0, str(ROOT))
    import torch

    from llama_recipes import gguf_export

    info = gguf_export.inspect_run(run, "gguf")
    tokenizer, model = gguf_export.load_trained(info)
    model.eval()
    texts, special, stop = gguf_export.held_out_prompts(info, tokenizer, n_prompts)
    hf = []
    started = time.time()
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=special)
        seq, scores = gguf_export._greedy(model, ids, max_new_tokens, stop, tokenizer.pad_token_id or 0)
        hf.append({"prompt_ids": ids["input_ids"][0].tolist(), "output": gguf_export._trim(seq, stop),
                   "margins": gguf_export.top2_margins(scores)})
    hf_seconds = time.time() - started
    hf_tokens = sum(len(h["output"]) for h in hf)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    rows = []
    for quant in quants:
        lora = quant.startswith("lora")  # "lora": the base as F16 GGUF + the adapter as a LoRA GGUF (F32)
        path = out_dir / f"{run.name}-{quant}.gguf"
        base_path = out_dir / f"{run.name}-base-f16.gguf"
        for p in (path, base_path, out_dir / "Modelfile"):
            p.unlink(missing_ok=True)
        t = time.time()
        if lora:
            from llama_recipes.paths import model_path

            gguf_export.main(Path(model_path(info.model_cfg)), base_path, quant="f16", verify_it=False)
            res = gguf_export.main(run, path, fmt="gguf-lora", quant="f32")
            # llama.cpp runs the base in F16: F16's rounding is what differs (measured when f16 ran first)
            rounding = next((r["file_max_logit_diff"] for r in rows if r["quant"] == "f16"),
                            gguf_export.tolerance("f16", info.config.get("num_hidden_layers", 4)))
        else:
            res = gguf_export.main(run, path, quant=quant, ollama=True)
            rounding = res["verdict"].max_logit_diff
        export_s = time.time() - t
        spec = out_dir / f"spec-{quant}.json"
        spec.write_text(json.dumps({"gguf": str(base_path if lora else path), "lora": str(path) if lora else None,
                                    "max_new_tokens": max_new_tokens, "stop_ids": stop, "threads": threads,
                                    "prompts": [{"text": x, "special": special} for x in texts]}))
        proc = subprocess.run([py, __file__, "--worker", str(spec)], capture_output=True, text=True)
        extra_bufts = True
        if proc.returncode == -11:  # SIGSEGV: llama-cpp-python 0.3.36's repacked CPU buffers (AMX_INT8 / REPACK)
            # crash on Q8_0 on an AMX CPU (2026-12-06, Xeon with amx_int8); the plain CPU buffers run the same file
            extra_bufts = False
            spec.write_text(json.dumps({**json.loads(spec.read_text()), "extra_bufts": False}))
            print(f"llama.cpp crashed (SIGSEGV) on {path.name} with its repacked CPU buffers; rerunning without them")
            proc = subprocess.run([py, __file__, "--worker", str(spec)], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"llama.cpp worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        lc = json.loads(proc.stdout.strip().splitlines()[-1])
        same_prompt = sum(a["prompt_ids"] == b["prompt_ids"] for a, b in zip(hf, lc["results"]))
        agree = sum(a["output"] == b["output"] for a, b in zip(hf, lc["results"]))
        ties = near_ties(hf, lc["results"], rounding)
        stopped = sum(bool(b["output"]) and b["output"][-1] in stop for b in lc["results"])
        v = res["verdict"]
        rows.append({
            "quant": "F16 base + LoRA GGUF" if lora else quant, "file_mib": round(res["bytes"] / 2**20, 1),
            "export_s": round(export_s, 1),
            "write_s": round(res["seconds"], 1),
            "transformers_max_logit_diff": round(v.max_logit_diff, 5), "transformers_greedy_agree": f"{v.agree}/{v.prompts}",
            "prompts": len(texts), "llamacpp_prompt_tokens_equal": f"{same_prompt}/{len(texts)}",
            "llamacpp_greedy_agree": f"{agree}/{len(texts)}", "llamacpp_near_ties": ties,
            "file_max_logit_diff": round(rounding, 5),
            "llamacpp_stopped_at_end_of_turn": f"{stopped}/{len(texts)}",
            "stop_ids_are_eog": all(lc["eog"].values()), "stop_ids": stop,
            "llamacpp_tokens_per_s": round(lc["tokens"] / max(lc["seconds"], 1e-9), 1),
            "llamacpp_extra_bufts": extra_bufts,
            "transformers_tokens_per_s": round(hf_tokens / max(hf_seconds, 1e-9), 1), "threads": threads,
            "differs": [{"prompt": texts[i][-80:], "transformers": tokenizer.decode(a["output"]),
                         "llama.cpp": tokenizer.decode(b["output"])}
                        for i, (a, b) in enumerate(zip(hf, lc["results"])) if a["output"] != b["output"]][:3],
        })
        print(json.dumps(rows[-1], indent=1))
    return rows


def near_ties(hf: list[dict], lc: list[dict], rounding: float) -> list[float]:
    """The transformers top-2 margins where a llama.cpp answer parts from transformers' at a near tie: the
    margin is within twice the file's measured max logit difference (its rounding alone can flip the
    choice; the rule export --verify applies). A parting at a wider margin is not listed (a real difference)."""
    from llama_recipes.gguf_export import parting_margin

    out = []
    for a, b in zip(hf, lc):
        if a["output"] == b["output"]:
            continue
        margin = parting_margin(a["output"], b["output"], a["margins"])
        if margin is not None and margin <= 2 * rounding:
            out.append(round(margin, 5))
    return out


def agreed(row: dict) -> bool:
    """Every answer equal, or parted only at a near tie; and every stop id ends generation in llama.cpp."""
    same, n = (int(x) for x in row["llamacpp_greedy_agree"].split("/"))
    return same + len(row["llamacpp_near_ties"]) == n and row["stop_ids_are_eog"]


def table(rows: list[dict]) -> str:
    head = ("| GGUF | file | export (write + verify) | transformers: max logit diff, greedy | llama.cpp: prompt tokens "
            "equal | llama.cpp = transformers greedy | stopped at end of turn | llama.cpp tok/s |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['quant'] if ' ' in r['quant'] else r['quant'].upper()} | {r['file_mib']} MiB | {r['export_s']} s ({r['write_s']} s) | "
                     f"{r['transformers_max_logit_diff']}, {r['transformers_greedy_agree']} | "
                     f"{r['llamacpp_prompt_tokens_equal']} | {r['llamacpp_greedy_agree']}"
                     f"{f' (+{len(t)} at a near tie)' if (t := r.get('llamacpp_near_ties')) else ''} | "
                     f"{r['llamacpp_stopped_at_end_of_turn']} | {r['llamacpp_tokens_per_s']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", nargs="?", default=str(DEFAULT_RUN))
    p.add_argument("--build", action="store_true", help="build llama-cpp-python into its cached venv and exit")
    p.add_argument("--train", action="store_true", help="train the default demo run first if it is missing")
    p.add_argument("--quant", nargs="+", default=["f16", "q8_0"],
                   help="f32, f16, q8_0, and `lora`: an F16 base GGUF with the run's LoRA GGUF applied by llama.cpp")
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "outputs" / "llamacpp_check"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    if args.build:
        build()
        return 0
    py = llamacpp_python()
    if py is None:
        print(f"llama_cpp is not importable here nor in {venv_dir()}: run `python {__file__} --build` first (15-35 min)",
              file=sys.stderr)
        return 2
    run = Path(args.run)
    if not run.is_dir() and args.train and run == DEFAULT_RUN:
        subprocess.run([sys.executable, str(ROOT / "run_recipe.py"), str(ROOT / "recipes/demo/smollm2_chat_lora.yaml")],
                       check=True, cwd=ROOT)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = check(run, args.quant, args.prompts, args.max_new_tokens, out, py, args.threads)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    import torch

    RESULTS.write_text(json.dumps({"run": str(run), "date": time.strftime("%Y-%m-%d"), "llama_cpp_python": VERSION,
                                   "isa": torch.backends.cpu.get_cpu_capability(), "rows": rows}, indent=1) + "\n")
    print(table(rows))
    ok = all(agreed(r) for r in rows if r["quant"] != "q8_0")  # Q8_0's agreement is reported, not required
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
