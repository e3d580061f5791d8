"""The command line: `llama-recipes COMMAND` answers as run_recipe.py and `python -m llama_recipes.X` do.

Every test runs a real entry point in a subprocess of this checkout (`python -m llama_recipes.cli`
is what the installed `llama-recipes` console script calls) and needs no model download.
"""
import os
import subprocess
import sys

import pytest
from conftest import DEMO_RECIPE, ROOT, run_cli

HEAVY = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes")
ARGUMENTS = {
    "run": ["recipe", "overrides", "--overwrite", "--validate", "--debug"],
    "eval": ["recipe", "overrides", "--checkpoint", "--base", "--debug"],
    "estimate": ["recipe", "overrides", "--gpus", "--gpu-memory", "--config", "--compare"],
    "dry-run": ["recipe", "overrides", "--debug"],
    "export": ["output_dir", "OUT", "--format", "--quant", "--ollama", "--dtype", "--verify"],
    "adapters": ["adapters", "--prompt", "--max-new-tokens"],
}


def python(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def llama_recipes(*args: str) -> subprocess.CompletedProcess:
    """`llama-recipes ARGS`, run from this checkout."""
    return python("-m", "llama_recipes.cli", *args)


def help_imports(entry: str, *argv: str) -> tuple[int, str, set]:
    """(exit code, stdout, heavy libraries imported) of `--help` through an entry point, in a fresh process."""
    code = (f"import sys\nfrom llama_recipes.cli import {entry}\n"
            f"try:\n    {entry}({list(argv)!r})\nexcept SystemExit as e:\n    rc = e.code\n"
            f"print('HEAVY', sorted(set({HEAVY!r}) & set(sys.modules)), 'RC', rc)\n")
    r = python("-c", code)
    out, _, tail = r.stdout.rpartition("HEAVY ")
    heavy, rc = tail.split(" RC ")
    return int(rc), out, set(eval(heavy))


def test_help_lists_every_command_and_imports_no_heavy_library():
    rc, out, heavy = help_imports("console_main", "--help")
    assert rc == 0 and heavy == set(), (rc, heavy)
    for name in ARGUMENTS:
        assert f"\n    {name} " in out, (name, out)
    rc, out, heavy = help_imports("main", "--help")  # run_recipe.py keeps every flag
    assert rc == 0 and heavy == set()
    for flag in ("--eval-only", "--checkpoint", "--base", "--estimate-memory", "--gpus", "--gpu-memory", "--config",
                 "--compare", "--dry-run", "--validate", "--overwrite", "--debug"):
        assert flag in out, flag


@pytest.mark.parametrize("command", ARGUMENTS)
def test_command_help_names_its_arguments(command):
    rc, out, heavy = help_imports("console_main", command, "--help")
    assert rc == 0 and heavy == set(), (rc, heavy)
    assert out.startswith(f"usage: llama-recipes {command} ")
    for arg in ARGUMENTS[command]:
        assert arg in out, (command, arg, out)


def test_module_entry_points_use_the_same_parsers():
    for module, command in (("llama_recipes.export", "export"), ("llama_recipes.adapters", "adapters")):
        r = python("-m", module, "--help")
        assert r.returncode == 0 and r.stdout.startswith(f"usage: python -m {module} "), r.stdout
        for arg in ARGUMENTS[command]:
            assert arg in r.stdout


def test_estimate_equals_run_recipe_estimate_memory():
    """Config only, offline: the tiny Llama of the demo recipe (the 7B recipes need the hub for config.json)."""
    new = llama_recipes("estimate", str(DEMO_RECIPE), "--gpus", "1", "--gpu-memory", "80GB")
    old = run_cli(str(DEMO_RECIPE), "--estimate-memory", "--gpus", "1", "--gpu-memory", "80GB")
    assert new.returncode == old.returncode == 0, new.stderr
    assert new.stdout == old.stdout and "FITS" in new.stdout


def test_run_validate_equals_run_recipe_validate():
    # overrides before and after a flag: each command's parser intermixes them like run_recipe.py
    new = llama_recipes("run", str(DEMO_RECIPE), "method.r=4", "--validate", "training.max_steps=3")
    old = run_cli(str(DEMO_RECIPE), "method.r=4", "--validate", "training.max_steps=3")
    assert new.returncode == old.returncode == 0, new.stderr
    assert new.stdout == old.stdout and "max_steps: 3" in new.stdout


def test_eval_is_eval_only(tmp_path):
    """Same target resolution and the same user error when there is nothing to evaluate."""
    missing = f"output_dir={tmp_path / 'none'}"
    new = llama_recipes("eval", str(DEMO_RECIPE), missing)
    old = run_cli(str(DEMO_RECIPE), missing, "--eval-only")
    assert new.returncode == old.returncode == 2
    assert new.stderr == old.stderr and new.stderr.startswith("error: output_dir ")
    both = llama_recipes("eval", str(DEMO_RECIPE), "--base", "--checkpoint", str(tmp_path))
    assert both.returncode == 2 and "--base and --checkpoint name two different models" in both.stderr
    stray = run_cli(str(DEMO_RECIPE), "--base")  # not silently a training run
    assert stray.returncode == 2 and "add --eval-only" in stray.stderr


def test_unknown_command_is_a_usage_error():
    r = llama_recipes("train", str(DEMO_RECIPE))
    assert r.returncode == 2 and r.stdout == ""
    assert "invalid choice: 'train'" in r.stderr and "'run'" in r.stderr and "'export'" in r.stderr
    r = llama_recipes(str(DEMO_RECIPE))  # a recipe without a command
    assert r.returncode == 2 and f"llama-recipes run {DEMO_RECIPE}" in r.stderr
    r = llama_recipes()
    assert r.returncode == 2 and "required: COMMAND" in r.stderr
    r = llama_recipes("run", str(DEMO_RECIPE), "--eval-only")  # run_recipe.py's mode flags are commands here
    assert r.returncode == 2 and "unrecognized arguments: --eval-only" in r.stderr


def test_user_errors_exit_2_with_error_line(tmp_path):
    r = python("-m", "llama_recipes.adapters", "no-equals-sign")
    assert r.returncode == 2 and r.stderr.startswith("error: bad adapter argument 'no-equals-sign'"), r.stderr
    r = python("-m", "llama_recipes.export", str(tmp_path / "missing"), str(tmp_path / "merged"))
    # (importing PEFT may log a bitsandbytes kernel warning first)
    assert r.returncode == 2 and "\nerror: " in "\n" + r.stderr, r.stderr
    assert "missing has no adapter_config.json" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("argv, message", [
    (["estimate", "recipes/demo/tiny_lora.yaml", "--gpus", "-2"], "argument --gpus: -2 is not a positive number"),
    (["estimate", "recipes/demo/tiny_lora.yaml", "--gpus", "two"], "argument --gpus: 'two' is not a whole number"),
    (["adapters", "a=x", "--max-new-tokens", "0"], "argument --max-new-tokens: 0 is not a positive number"),
])
def test_flag_values_that_make_no_sense_are_one_usage_line(argv, message, capsys):
    """Issue 29 item 10: `--estimate-memory --gpus -2` answered FITS on main."""
    from llama_recipes.cli import console_main

    with pytest.raises(SystemExit) as e:
        console_main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err
