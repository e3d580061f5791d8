"""--dry-run: a few real steps in a scratch directory, save, reload, same logits, short eval, timing."""
import argparse
import os
import subprocess
import sys

import pytest
from conftest import DEMO_RECIPE, FP32, ROOT, free_port

from llama_recipes import dryrun
from llama_recipes.schema import load_recipe

ARGS = argparse.Namespace()


def _snapshot(d):
    return {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()}


def _passes_every_stage(recipe, capsys) -> str:
    """Run the dry run in-process; every stage must PASS. Returns what it printed."""
    assert dryrun.main(recipe, ARGS) == 0
    out = capsys.readouterr().out
    for stage in ("train", "save", "reload", "eval", "timing"):
        assert f"PASS  {stage}" in out, out
    return out


@pytest.mark.parametrize("method", [["method.r=4"], ["method=" + "{name: full}"]], ids=["lora", "full"])
def test_dry_run_passes_every_stage_and_leaves_output_dir_alone(tmp_path, capsys, method):
    real = tmp_path / "real_out"
    real.mkdir()
    (real / "keep.txt").write_text("a previous run's file")
    before = _snapshot(real)
    recipe = load_recipe(DEMO_RECIPE, [FP32, f"output_dir={real}", "data.max_samples=64", *method])
    out = _passes_every_stage(recipe, capsys)
    assert "3 steps on 1 process(es)" in out and "max |logits difference| 0.00e+00" in out
    assert "full run max_steps=150" in out and "dry run: PASS" in out
    assert _snapshot(real) == before  # nothing written, nothing removed


def test_dry_run_reports_a_failing_stage(tmp_path, capsys):
    recipe = load_recipe(DEMO_RECIPE, [FP32, f"output_dir={tmp_path / 'o'}", f"data.path={tmp_path / 'missing.jsonl'}"])
    assert dryrun.main(recipe, ARGS) == 1
    out = capsys.readouterr().out
    assert "FAIL  train" in out and "dry run: FAIL" in out
    assert not (tmp_path / "o").exists()


def test_projection_from_epochs(tmp_path):
    recipe = load_recipe(DEMO_RECIPE, [FP32, f"output_dir={tmp_path}", "training.max_steps=-1",
                                       "training.num_train_epochs=2", "training.per_device_train_batch_size=16"])
    steps, how = dryrun.planned_steps(recipe)
    from llama_recipes.data import build_datasets

    rows = len(build_datasets(recipe.data)[0])
    assert steps == 2 * -(-rows // 16) and "2 epochs" in how


@pytest.mark.slow
def test_dry_run_two_ranks(tmp_path):
    """torchrun, 2 CPU processes (DDP over gloo): every stage passes on both ranks, one report."""
    real = tmp_path / "real_out"
    # On a machine without GPUs, accelerate only forms a process group when told to use the CPU
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(free_port()), str(ROOT / "run_recipe.py"), str(DEMO_RECIPE),
                        f"output_dir={real}", "data.max_samples=64", "--dry-run"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("dry run: PASS") == 1, r.stdout
    assert "PASS  reload" in r.stdout and "3 steps on 2 process(es)" in r.stdout and not real.exists()


@pytest.mark.parametrize("twin", ["tiny_classifier_head", "tiny_mlp_head"])
def test_dry_run_of_a_head_recipe_reloads_the_head(tmp_path, capsys, twin):
    """Heads go through the same lifecycle: train, save, reload through artifacts.load, same logits,
    the reloaded head's accuracy equal to what training measured."""
    recipe = load_recipe(ROOT / "recipes" / "demo" / f"{twin}.yaml", [f"output_dir={tmp_path / 'o'}"])
    out = _passes_every_stage(recipe, capsys)
    assert "head.safetensors" in out and "max |logits difference| 0.00e+00" in out
    assert "reloaded model: accuracy" in out and "trained model:" in out
    assert not (tmp_path / "o").exists()
