"""The programs a doc's commands call, as tests/test_doc_commands.py runs them (not a test itself).

tests/test_doc_commands.py runs every ```bash block of README.md and docs/*.md with real bash, in a
sandbox whose PATH starts with wrappers named `python`, `accelerate`, `torchrun`, `llama-recipes`,
`make`, `pip`, ... that all call this file with the program's name first. Here each command is
either run, or turned into the check that stands for it, or skipped with its reason, and one JSON
line says which (`$DOC_LOG`), so the test can show, per doc line, what was done:

  tier `default` (the fast suite): recipe commands are parsed by the real parser and run with
      `--validate` added (`--validate`, `--estimate-memory`, `--help` and `python -c` run as they are);
      a launch line becomes `run_recipe.py RECIPE --config CONFIG --validate` (every launch-time check);
      export/adapters arguments are parsed.
  tier `slow`: commands run for real on tiny stand-ins: a recipe naming a hub model or hub data trains
      its CPU twin (recipes/demo/, "twin of recipes/X.yaml" in its header) or the tiny Llama on bundled
      data, a few steps, into the original output_dir; a GPU launch line runs on 2 CPU processes (the
      CPU stand-in, as tests/test_launch_pairs.py does); an artifact a command reads is trained first
      when the doc does not train it.
"""
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TIER = os.environ.get("DOC_TIER", "default")
SANDBOX = Path(os.environ.get("DOC_SANDBOX", "."))

# Programs a doc may name that are not run here, and why (the test prints the reason).
NOT_RUN = {
    "pip": "installs packages (network); `make setup` installs what the project needs",
    "huggingface-cli": "logs into the HuggingFace Hub (network)",
    "hf": "logs into the HuggingFace Hub (network)",
    "tensorboard": "a viewer: it serves until stopped",
    "nvidia-smi": "needs a GPU",
}
MAKE_NOT_RUN = {
    "test": "the test suite itself",
    "test-all": "the test suite itself",
    "setup": "creates the venv; every make target does it first, and the test runs in it",
    "bench": "benchmarks, minutes each (docs/benchmarks.md)",
    "clean": "deletes the venv the test runs in",
}
# Scripts that regenerate a docs table or a pinned number from long runs: their own tests check
# that the table is their output; running them here would rewrite the docs.
SCRIPT_REASON = "regenerates docs or pinned numbers from runs (its test checks the output); compiled only"
# Hub data -> bundled data of the same shape, for recipes that have no CPU twin.
HUB_DATA = {"tatsu-lab/alpaca": "builtin:topic", "knkarthick/samsum": "builtin:summarize",
            "ybelkada/oasst1": "builtin:chat", "fancyzhx/ag_news": "builtin:classify"}
FAST = ["training.max_steps=2", "training.logging_steps=1", "training.save_strategy=no", "training.report_to=none",
        "data.max_samples=32", "data.max_eval_samples=8", "eval.limit=4", "eval.max_new_tokens=4"]
RECIPE_MODES = ("run", "eval", "estimate", "dry-run")


def record(action: str, argv: list[str], why: str = "", **extra) -> None:
    with open(os.environ["DOC_LOG"], "a") as f:
        f.write(json.dumps({"line": int(os.environ.get("DOC_LINE", "0")), "action": action, "argv": argv,
                            "why": why, **extra}) + "\n")


def run(cmd: list[str], ok=(0,)) -> int:
    rc = subprocess.run(cmd, cwd=os.getcwd()).returncode
    if rc not in ok:
        print(f"doc command failed (exit {rc}): {shlex.join(cmd)}", file=sys.stderr)
        return rc or 1
    return 0


def run_here(prefix: list[str], args: list[str], ok=(0,)) -> int:
    """A CLI command in this process when it is one (saves a second interpreter start), else a subprocess."""
    sys.path.insert(0, str(ROOT))
    from llama_recipes import cli

    if prefix[1:2] == [str(ROOT / "run_recipe.py")]:
        rc = cli.main(args)
    elif prefix[1:3] == ["-m", "llama_recipes.cli"] and len(prefix) == 4 and prefix[3] in cli.RECIPE_COMMANDS:
        rc = cli.run_command(prefix[3], args)
    else:
        return run([*prefix, *args], ok)
    if rc not in ok:
        print(f"doc command failed (exit {rc}): {shlex.join(args)}", file=sys.stderr)
        return rc or 1
    return 0


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


# -- recipe commands -------------------------------------------------------------------------------

def parse_recipe_command(mode: str | None, args: list[str]):
    """(command, parsed args) with the CLI's own parsers; mode None = run_recipe.py's flags."""
    sys.path.insert(0, str(ROOT))
    from llama_recipes import cli

    if mode is None:
        a = cli.build_parser().parse_intermixed_args(args)
        return cli._command_from_flags(a), a
    parser = cli.build_command_parser()[1][mode]
    return mode, parser.parse_intermixed_args(args) if mode in RECIPE_MODES else parser.parse_args(args)


def _yaml(path: str) -> dict:
    import yaml

    return yaml.safe_load(Path(path).read_text()) or {}


def twin_of(recipe: str) -> str | None:
    name = Path(recipe).name
    for p in sorted((ROOT / "recipes" / "demo").glob("*.yaml")):
        if f"twin of recipes/{name}" in p.read_text():
            return f"recipes/demo/{p.name}"
    return None


def stand_in(recipe: str, overrides: list[str]) -> tuple[str, list[str]]:
    """(recipe, overrides) that train the same command on CPU in seconds, into the same output_dir."""
    spec = _yaml(recipe)
    given = {o.split("=", 1)[0] for o in overrides if "=" in o}
    extra = []
    model = str((spec.get("model") or {}).get("name_or_path", ""))
    data = str((spec.get("data") or {}).get("path", ""))
    hub_model = "/" in model and not Path(model).exists() and "model.name_or_path" not in given
    hub_data = "/" in data and not Path(data).exists() and "data.path" not in given
    if hub_model or hub_data:
        twin = twin_of(recipe)
        if twin:
            extra.append(f"output_dir={spec.get('output_dir')}")
            # the launch config checks the recipe's precision and activation checkpointing against its own
            # (mixed_precision, FSDP's): the twin takes the real recipe's, so the pair is the one the doc shows
            for key in ("bf16", "fp16", "activation_checkpointing"):
                v = (spec.get("training") or {}).get(key)
                if v is not None and f"training.{key}" not in given:
                    extra.append(f"training.{key}={str(v).lower()}")
            recipe = twin
        else:
            if hub_model:
                extra.append("model.name_or_path=builtin:tiny-llama")
            if hub_data:
                if data not in HUB_DATA:
                    raise SystemExit(f"no stand-in for hub data {data}: add it to HUB_DATA in {__file__}")
                extra.append(f"data.path={HUB_DATA[data]}")
    keep = [o for o in FAST if o.split("=", 1)[0] not in given]
    return recipe, [*extra, *keep, *overrides]


def recipe_path(a) -> str:
    return getattr(a, "recipe", "")


def has_artifact(d: Path) -> bool:
    return any((d / f).is_file() for f in ("adapter_config.json", "config.json", "head_config.json"))


def ensure_artifact(out: str, recipe: str | None = None) -> None:
    """Train a stand-in into `out` when no artifact is there (the doc reads a run it does not show)."""
    if has_artifact(Path(out)):
        return
    if recipe is None:  # a shipped recipe that writes there, else the demo
        recipe = next((f"recipes/{p.name}" for p in sorted((ROOT / "recipes").glob("*.yaml"))
                       if str(_yaml(str(p)).get("output_dir")) == out.rstrip("/")), "recipes/demo/tiny_lora.yaml")
    r, ov = stand_in(recipe, [f"output_dir={out}"])
    rc = subprocess.run([PY, str(ROOT / "run_recipe.py"), r, *ov], cwd=os.getcwd()).returncode
    if rc:
        raise SystemExit(f"training the artifact {out} for the doc command failed ({rc})")


def recipe_command(argv: list[str], prefix: list[str], mode: str | None, args: list[str]) -> int:
    """`python run_recipe.py ...`, `llama-recipes MODE ...`, `python -m llama_recipes.X ...`."""
    if "--help" in args or "-h" in args:
        record("ran", argv)
        return run([*prefix, *args])
    command, a = parse_recipe_command(mode, args)
    if command in ("export", "adapters"):
        if TIER == "default":
            record("parsed", argv, "arguments parsed by the real parser; `make test-all` runs it")
            return 0
        if command == "export":
            ensure_artifact(a.output_dir)
        else:
            for item in a.adapters:
                ensure_artifact(item.partition("=")[2])
        record("ran", argv)
        return run([*prefix, *args])
    if getattr(a, "validate", False) or command == "estimate":
        record("ran", argv)
        return run_here(prefix, args, ok=(0, 1) if command == "estimate" else (0,))  # estimate: 1 = does not fit
    if TIER == "default":
        record("validated", argv, f"{command}: recipe and overrides validated (--validate); `make test-all` runs it")
        return run_here(prefix, [*args, "--validate"])
    recipe = recipe_path(a)
    r, ov = stand_in(recipe, list(a.overrides))
    if command == "eval" and not a.base:
        spec_out = next((o.split("=", 1)[1] for o in reversed(ov) if o.startswith("output_dir=")),
                        _yaml(r).get("output_dir"))
        ensure_artifact(a.checkpoint or str(spec_out), recipe)
    flags = [x for x in args if x.startswith("--")]
    tail = []
    if a.checkpoint:
        tail = ["--checkpoint", a.checkpoint]
        flags = [f for f in flags if f != "--checkpoint"]
    record("ran", argv, f"stand-in: {shlex.join([r, *ov])}" if (r, ov) != (recipe, list(a.overrides)) else "")
    if mode is None:
        return run([*prefix, r, *ov, *flags, *tail])
    return run([*prefix, r, *ov, *flags, *tail])


# -- launchers -------------------------------------------------------------------------------------

def split_launch(args: list[str]) -> tuple[list[str], list[str]] | None:
    i = next((i for i, x in enumerate(args) if x.endswith("run_recipe.py")), None)
    return (args[:i], args[i + 1:]) if i is not None else None


def launcher(name: str, argv: list[str], args: list[str]) -> int:
    split = split_launch(args)
    if split is None:
        record("skipped", argv, "a launch of a script other than run_recipe.py")
        return 0
    opts, script = split
    config = opts[opts.index("--config_file") + 1] if "--config_file" in opts else None
    command, a = parse_recipe_command(None, script)
    if TIER == "default":
        # The pair's launch-time checks (accelerate's own, ~4 s of imports each) run once per documented
        # pair in tests/test_launch_pairs.py; the test checks that this pair is one of them (`pair`).
        record("validated", argv, "recipe validated; the pair's launch checks: tests/test_launch_pairs.py; "
                                  "`make test-all` runs it on the CPU stand-in", pair=[config, recipe_path(a)])
        return run_here([PY, str(ROOT / "run_recipe.py")], [*script, "--validate"])
    cfg = _yaml(config) if config else {}
    if cfg.get("distributed_type") == "DEEPSPEED":
        record("skipped", argv, "DeepSpeed is not run by the CPU stand-in (docs/distributed.md); its pair is validated")
        return 0
    if int(cfg.get("num_machines", 1) or 1) > 1 or "--nnodes" in opts:
        record("skipped", argv, "needs several machines; its pair is validated by the default tier")
        return 0
    recipe = recipe_path(a)
    r, ov = stand_in(recipe, list(a.overrides))
    if command == "eval" and not a.base:
        ensure_artifact(a.checkpoint or str(_yaml(r).get("output_dir")), recipe)
    flags = [x for x in script if x.startswith("--")]
    if command == "run" and "--overwrite" not in flags:
        # a doc's launch lines are alternatives (README's "Launch lines": one recipe under several configs); the
        # stand-in of each trains into the recipe's output_dir, which the line before may have filled
        flags.append("--overwrite")
    if name == "accelerate":
        cmd = [PY, "-m", "accelerate.commands.launch", "--config_file", config or str(ROOT / "accelerate_configs" /
               "cpu_ddp_2proc.yaml"), "--num_processes", "2", "--main_process_port", free_port()]
    else:
        cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port()]
    record("ran", argv, f"CPU stand-in, 2 processes: {shlex.join([r, *ov, *flags])}")
    return run([*cmd, str(ROOT / "run_recipe.py"), r, *ov, *flags])


# -- the programs ----------------------------------------------------------------------------------

def python(argv: list[str], args: list[str]) -> int:
    if args[:1] == ["-c"]:
        record("ran", argv)
        return run([PY, *args])
    if args[:2] in (["-m", "llama_recipes.export"], ["-m", "llama_recipes.adapters"]):
        return recipe_command(argv, [PY, *args[:2]], args[1].split(".")[-1], args[2:])
    if args[:2] == ["-m", "llama_recipes.cli"]:
        return recipe_command(argv, [PY, *args[:2]], args[2], args[3:])
    if args and args[0].endswith("run_recipe.py"):
        return recipe_command(argv, [PY, str(ROOT / "run_recipe.py")], None, args[1:])
    if args and args[0].startswith(("scripts/", "tests/", "bench/")) and args[0].endswith(".py"):
        record("compiled", argv, SCRIPT_REASON if args[0].startswith("scripts/") else
               "a measurement script (timings; docs/benchmarks.md); compiled only")
        return run([PY, "-m", "py_compile", args[0]])
    print(f"tests/doc_commands_shim.py has no rule for `python {shlex.join(args)}`: add one", file=sys.stderr)
    return 3


def make(argv: list[str], args: list[str]) -> int:
    target = args[0] if args else "setup"
    if target in MAKE_NOT_RUN:
        record("skipped", argv, MAKE_NOT_RUN[target])
        return 0
    # The target's own command lines from the Makefile, with the venv's python as `python`.
    text = (ROOT / "Makefile").read_text()
    m = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", text, re.M)
    if not m:
        print(f"make {target}: no such target in the Makefile", file=sys.stderr)
        return 2
    rc = 0
    for line in m.group(1).splitlines():
        cmd = line.strip().replace("$(BIN)/python", "python")
        rc = rc or subprocess.run(["bash", "-c", cmd], cwd=os.getcwd()).returncode
    return rc


def main() -> int:
    name, args = sys.argv[1], sys.argv[2:]
    argv = [name, *args]
    if name in NOT_RUN:
        record("skipped", argv, NOT_RUN[name])
        return 0
    if name in ("python", "python3"):
        return python(argv, args)
    if name == "llama-recipes":
        if not args or args[0] not in ("run", "eval", "estimate", "dry-run", "export", "adapters"):
            record("ran", argv)
            return run([PY, "-m", "llama_recipes.cli", *args])
        return recipe_command(argv, [PY, "-m", "llama_recipes.cli", args[0]], args[0], args[1:])
    if name == "accelerate":
        if args[:1] != ["launch"]:
            record("skipped", argv, "an accelerate command other than launch")
            return 0
        return launcher(name, argv, args[1:])
    if name == "torchrun":
        return launcher(name, argv, args)
    if name == "make":
        return make(argv, args)
    print(f"no rule for {name}", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
