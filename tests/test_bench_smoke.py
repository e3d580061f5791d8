"""Smoke tests of the benchmark helpers (bench/): token accounting and the synthetic data. No timing."""
import importlib.util
import statistics

import pytest
from conftest import ROOT


def _load(name):
    """bench/NAME.py under a unique module name (bench/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


common = _load("common")
run_all = _load("run_all")


def test_alpaca_like_lengths_follow_the_stated_medians():
    rows = common.alpaca_like_rows(2000, seed=0)
    words = {f: [len(r[f].split()) for r in rows if r[f]] for f in ("instruction", "input", "output")}
    for field, (median, _) in common.ALPACA_LENGTHS.items():
        assert abs(statistics.median(words[field]) - median) <= 0.15 * median, field
    assert abs(len(words["input"]) / len(rows) - common.INPUT_FRACTION) < 0.05
    out = words["output"]
    assert statistics.mean(out) > 1.4 * statistics.median(out)  # long right tail, as in Alpaca
    vocab = set(common.vocabulary())
    assert all(w in vocab for r in rows[:50] for w in r["output"].split())


def test_real_tokens_counts_non_pad_and_padding_free():
    torch = pytest.importorskip("torch")
    padded = {"input_ids": torch.ones(2, 5, dtype=torch.long),
              "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    assert common.real_tokens(padded) == 8
    packed = {"input_ids": torch.ones(1, 7, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3]])}
    assert common.real_tokens(packed) == 7
    # our packed rows: [batch, width]; the second row ends in a pad tail of 2 (pad id 0)
    rows = {"input_ids": torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0]]), "position_ids": torch.tensor([[0, 1, 0, 1], [0, 1, 0, 1]])}
    assert common.real_tokens(rows, pad_token_id=0) == 6


def test_meter_excludes_warmup_steps():
    m = common.Meter(warmup=1)
    m.ends = [0.0, 10.0, 12.0, 14.0]  # train begin, step 1 (warmup), steps 2 and 3
    m.tokens, m.positions = [100, 30, 50], [100, 40, 50]
    r = m.result()
    assert (r["timed_steps"], r["seconds"], r["real_tokens"]) == (2, 4.0, 80)
    assert r["tokens_per_s"] == 20.0 and r["real_fraction"] == 80 / 90


def test_table_has_goal_rows():
    rows = run_all.table({"fsdp": {"ratio": 1.0004}, "overhead": {"full": {"ratio_median": 0.97}}})
    assert ("fsdp 2 ranks: per-rank bytes ÷ (single / 2)", "1.000", "<= 1.1") in rows
    assert ("overhead full: ours ÷ plain loop tokens/s", "0.97", ">= 0.95") in rows
    assert "goal" in run_all.render(rows)
    ttq = {"speedup_vs_trl_default": 1.5, "speedup_vs_trl_packing": 1.1,
           "sides": {k: {"eval_loss": 2.0} for k in ("ours", "trl_default", "trl_packing")}}
    rows = run_all.table({"time_to_quality": ttq})
    assert ("time to quality: TRL default wall ÷ ours", "1.50", ">= 1.45") in rows


def test_grpo_bench_builds_both_sides_with_the_recipes_overrides(tmp_path):
    """bench_grpo's two trainers differ in the sampler only: same model size, data, reward weights and the
    overrides given on its command line (a recipe's settings, as the docs' commands pass them)."""
    bench = _load("bench_grpo")
    recipe = str(ROOT / "recipes" / "demo" / "tiny_grpo.yaml")
    ours = bench.build(recipe, 1, tmp_path / "ours", ours=True, overrides=["objective.num_generations=2"])
    trl = bench.build(recipe, 1, tmp_path / "trl", ours=False, overrides=["objective.num_generations=2"])
    assert type(ours).__mro__[1].__name__ == "SeededGRPOTrainer" and type(trl).__mro__[1].__name__ == "GRPOTrainer"
    assert ours.num_generations == trl.num_generations == 2
    assert ours.args.reward_weights == trl.args.reward_weights and len(ours.train_dataset) == len(trl.train_dataset)
    assert sum(p.numel() for p in ours.model.parameters()) == sum(p.numel() for p in trl.model.parameters())
