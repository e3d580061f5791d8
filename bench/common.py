"""Shared pieces of the CPU benchmarks: the ~10M-parameter model, Alpaca-like data, timing.

Everything is side by side in one process where possible, alternating the two sides
(A B A B ...) and reporting the median ratio, because the machine these run on is shared.
"""
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "llama_recipes" / "assets" / "tiny-llama"
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# ~10M parameters with the tiny asset's 1015-token vocabulary.
MODEL_10M = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                 num_key_value_heads=2, head_dim=64, max_position_embeddings=512)
# LLR_BENCH_SMOKE=1: a ~0.2M model, to check that the scripts run (numbers then mean nothing).
if os.environ.get("LLR_BENCH_SMOKE"):
    MODEL_10M = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=32, max_position_embeddings=512)

# Approximate per-field length statistics of tatsu-lab/alpaca (52k rows, whitespace words),
# as published in dataset summaries: instruction median ~12 words; ~40% of rows have an input,
# median ~10 words when present; output median ~25 words with a long right tail (mean ~45).
# Lognormal(mu=ln(median), sigma) reproduces median and tail; sigma chosen so mean/median match.
ALPACA_LENGTHS = {
    "instruction": (12, 0.45),   # median words, sigma
    "input": (10, 0.8),
    "output": (25, 1.05),        # mean = 25 * exp(1.05^2 / 2) ~ 43
}
INPUT_FRACTION = 0.4


def quiet():
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("llama_recipes").setLevel(logging.WARNING)
    try:
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass


def vocabulary() -> list[str]:
    """Whole words of the bundled demo data (each is one or two tokens of the tiny tokenizer)."""
    words = set()
    for line in (ROOT / "llama_recipes/assets/data/demo/train.jsonl").read_text().splitlines():
        row = json.loads(line)
        for field in ("instruction", "input", "output"):
            words.update(w.strip(".,?!") for w in row[field].split() if w.strip(".,?!").isalpha())
    return sorted(words)


def alpaca_like_rows(n: int, seed: int = 0, max_words: int = 300) -> list[dict]:
    """Alpaca-format rows whose field lengths follow ALPACA_LENGTHS (words from the bundled vocabulary)."""
    rng = random.Random(seed)
    vocab = vocabulary()

    def text(field):
        median, sigma = ALPACA_LENGTHS[field]
        k = max(1, min(max_words, round(rng.lognormvariate(math.log(median), sigma))))
        return " ".join(rng.choice(vocab) for _ in range(k))

    return [{"instruction": text("instruction"),
             "input": text("input") if rng.random() < INPUT_FRACTION else "",
             "output": text("output")} for _ in range(n)]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_workdir(n_rows: int = 512, seed: int = 0, model: str | None = None) -> Path:
    """Temp dir with model/ (random ~10M Llama + the tiny tokenizer, or a link to `model`, a real
    model directory) and data/train.jsonl."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    work = Path(tempfile.mkdtemp(prefix="llr-bench-"))
    if model:
        (work / "model").symlink_to(Path(model).resolve())
        write_jsonl(alpaca_like_rows(n_rows, seed), work / "data" / "train.jsonl")
        return work
    cfg = AutoConfig.from_pretrained(TINY)
    for k, v in MODEL_10M.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(work / "model")
    AutoTokenizer.from_pretrained(TINY).save_pretrained(work / "model")
    write_jsonl(alpaca_like_rows(n_rows, seed), work / "data" / "train.jsonl")
    return work


def n_params(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def recipe_dict(work: Path, out: Path, method: str = "lora", steps: int = 8, batch: int = 8,
                max_length: int = 256, **training) -> dict:
    """The recipe both our side and the peers are configured from."""
    meth = {"name": "full"} if method == "full" else {
        "name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
    return {
        "output_dir": str(out),
        "seed": 42,
        "model": {"name_or_path": str(work / "model"), "dtype": "float32"},
        "data": {"path": str(work / "data"), "format": "alpaca"},
        "method": meth,
        "training": {"max_steps": steps, "learning_rate": 1e-4 if method == "full" else 1e-3,
                     "per_device_train_batch_size": batch, "max_length": max_length, "bf16": False,
                     "activation_checkpointing": False, "save_strategy": "no", "report_to": [],
                     "logging_steps": 1, "dataloader_drop_last": True, **training},
        "eval": {"before_after": False},
    }


def real_tokens(batch: dict, pad_token_id: int | None = None) -> int:
    """Non-pad tokens in a collated batch: padded (attention mask), our packed rows (pad tails), TRL padding-free."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "position_ids" in batch and batch["input_ids"].shape[0] > 1 and pad_token_id is not None:
        from llama_recipes.batching import packed_real_tokens

        return packed_real_tokens(batch, pad_token_id)
    return int(batch["input_ids"].numel())  # one padding-free row: no pad (unless pad_to_multiple_of)


class Meter:
    """Times trainer steps after `warmup` steps and counts the real tokens those steps saw.

    `attach(trainer)` adds a TrainerCallback and wraps the data collator (batches are collated
    in step order; one is prefetched, which does not change the order).
    """

    def __init__(self, warmup: int = 2, keep_batches: int = 0):
        self.warmup, self.keep = warmup, keep_batches
        self.ends, self.tokens, self.positions, self.batches, self.losses = [], [], [], [], []

    def attach(self, trainer):
        from transformers import TrainerCallback

        meter, collate = self, trainer.data_collator
        pad_id = getattr(collate, "pad_token_id", None)

        def counting(features):
            batch = collate(features)
            meter.tokens.append(real_tokens(batch, pad_id))
            meter.positions.append(int(batch["input_ids"].numel()))
            if len(meter.batches) < meter.keep:
                meter.batches.append({k: v.clone() for k, v in batch.items() if hasattr(v, "clone")})
            return batch

        class Cb(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                meter.ends.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kw):
                meter.ends.append(time.perf_counter())

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    meter.losses.append(float(logs["loss"]))

        trainer.data_collator = counting
        trainer.add_callback(Cb())
        return trainer

    def result(self) -> dict:
        """ends[0] is train begin, ends[i] the end of step i."""
        steps = len(self.ends) - 1
        t = self.ends[steps] - self.ends[self.warmup]
        tok = sum(self.tokens[self.warmup:steps])
        pos = sum(self.positions[self.warmup:steps])
        return {"timed_steps": steps - self.warmup, "seconds": t, "real_tokens": tok,
                "tokens_per_s": tok / t, "real_fraction": tok / pos,
                "final_loss": self.losses[-1] if self.losses else None}


def run_pipeline(recipe: dict, meter: Meter):
    """Our pipeline (`llama_recipes.pipeline.train`) with the meter attached to its trainer."""
    from llama_recipes import pipeline, training
    from llama_recipes.schema import validate_recipe

    original = training.build_trainer

    def build(*a, **kw):
        return meter.attach(original(*a, **kw))

    training.build_trainer = build
    try:
        return pipeline.train(validate_recipe(recipe), overwrite=True)
    finally:
        training.build_trainer = original


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def save(name: str, result: dict) -> dict:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


def set_threads():
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def peak_matmul_flops(dtype: str = "float32", n: int = 2048, reps: int = 8) -> float:
    """Measured peak of this machine: FLOP/s of an n x n matmul in `dtype` (best of `reps`), the
    denominator of MFU, measured in the same run and with the same threads as the training."""
    import torch

    dt = getattr(torch, dtype)
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
