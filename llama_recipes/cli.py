"""The command line: one parser, one subcommand per task.

    llama-recipes run RECIPE [overrides] [--overwrite] [--validate [--config CONFIG]]   train
    llama-recipes eval RECIPE [overrides] [--checkpoint DIR | --base]   = run_recipe.py --eval-only
    llama-recipes estimate RECIPE [--gpus N --gpu-memory 80GB ...]      = run_recipe.py --estimate-memory
    llama-recipes dry-run RECIPE [overrides]                            = run_recipe.py --dry-run
    llama-recipes export OUTPUT_DIR MERGED_DIR [--dtype D] [--verify]   = python -m llama_recipes.export
    llama-recipes export OUTPUT_DIR OUT.gguf --format gguf|gguf-lora [--quant Q] [--ollama] [--no-verify]
    llama-recipes adapters NAME=DIR ... [--prompt TEXT [--input TEXT]]  = python -m llama_recipes.adapters

`python run_recipe.py RECIPE [flags]` (`main`) is the same recipe commands chosen by flags, and
shares their arguments. Only argparse is imported before a command runs (and PyYAML and pydantic
before the recipe is validated), so `--help`, a typo and recipe errors answer in well under a
second: each command imports its module, and with it torch, when it runs.
"""
import argparse
import errno
import json
import sys

from llama_recipes import __version__
from llama_recipes.errors import UserError
from llama_recipes.log import is_main_process

OVERRIDES_HELP = "Overrides use dotted keys: training.learning_rate=1e-4 method.r=16 data.max_samples=100"


# -- arguments, shared by the subcommands and run_recipe.py's single parser ------------------------

def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (argparse then prints one usage line, exit 2, no traceback)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is not a positive number")
    return n


def _path(text: str) -> str:
    """argparse type: a path on the command line, not empty (an empty --checkpoint used to mean none at all)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path")
    return text


def _add_recipe(p) -> None:
    p.add_argument("recipe", help="path to a recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides applied on top of the recipe")


def _add_train(p) -> None:
    p.add_argument("--overwrite", action="store_true", help="write into an output_dir that holds another run")
    p.add_argument("--validate", action="store_true",
                   help="only validate the recipe and print it resolved; with --config, every launch-time check "
                        "of the pair and the resolved settings")


def _add_config(p) -> None:
    p.add_argument("--config", metavar="FILE", type=_path,
                   help="the accelerate config the run will be launched with (read by --validate and --estimate-memory)")


def _add_debug(p) -> None:
    p.add_argument("--debug", action="store_true", help="show full tracebacks for user errors")


def _add_eval_target(p, when: str = "") -> None:
    p.add_argument("--checkpoint", metavar="DIR", type=_path, help=f"{when}evaluate this artifact directory instead of the recipe's output_dir")
    p.add_argument("--base", action="store_true", help=f"{when}evaluate the untrained base model")


def _add_estimate(p) -> None:
    p.add_argument("--gpus", type=_positive_int, metavar="N", help="number of GPUs to estimate for (default: from --config or 1)")
    p.add_argument("--gpu-memory", metavar="SIZE", help="memory per GPU, e.g. 80GB or 24GiB")
    p.add_argument("--compare", action="store_true", help="estimate every method side by side")


def _add_export(p) -> None:
    p.add_argument("output_dir", help="the run's output_dir (holds adapter_config.json and recipe.yaml)")
    p.add_argument("merged_dir", metavar="OUT",
                   help="safetensors: the directory the merged model is written to (new or empty); "
                        "gguf/gguf-lora: the .gguf file to write (docs/export.md)")
    p.add_argument("--format", choices=["safetensors", "gguf", "gguf-lora"], default="safetensors",
                   help="safetensors: merged model directory (default); gguf: one GGUF for llama.cpp/Ollama; "
                        "gguf-lora: the LoRA adapter alone as a llama.cpp LoRA GGUF")
    p.add_argument("--quant", choices=["f32", "f16", "q8_0"], default=None,
                   help="GGUF tensor type (default: f16 for gguf, f32 for gguf-lora)")
    p.add_argument("--ollama", action="store_true", help="gguf: also write an Ollama Modelfile next to the file")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the merged weights (default: the recipe's model.dtype; QLoRA: compute_dtype)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                   help="reload and compare with the trained model (default: on for GGUF, off for safetensors)")
    _add_trust(p)


def _add_trust(p) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code shipped with the base model (a run directory's recipe.yaml never grants it)")


def _add_adapters(p) -> None:
    p.add_argument("adapters", nargs="+", help="NAME=OUTPUT_DIR of a PEFT run (all on the same base)")
    p.add_argument("--prompt", action="append", default=[],
                   help="a prompt to answer with every adapter, rendered as each run's training rendered prompts "
                        "(its prompt or chat template)")
    p.add_argument("--input", action="append", default=[], metavar="TEXT",
                   help="the alpaca `input` of the i-th --prompt, in order (alpaca runs only; that --prompt is the "
                        "instruction; --input '' for a prompt without one)")
    p.add_argument("--raw", action="store_true", help="pass --prompt text to the model exactly as given")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32, metavar="N")
    _add_trust(p)


# -- parsers -----------------------------------------------------------------------------------------

def build_parser(prog: str = "run_recipe.py") -> argparse.ArgumentParser:
    """run_recipe.py's parser: one recipe, the command chosen by flags (default: train)."""
    p = argparse.ArgumentParser(prog=prog, description="Fine-tune (or evaluate) a model from a YAML recipe.",
                                epilog=OVERRIDES_HELP)
    _add_recipe(p)
    _add_train(p)
    _add_config(p)
    _add_debug(p)
    ev = p.add_argument_group("evaluation (--eval-only)")
    ev.add_argument("--eval-only", action="store_true", help="evaluate the recipe's artifact instead of training")
    _add_eval_target(ev, when="with --eval-only: ")
    mem = p.add_argument_group("memory estimate (--estimate-memory)")
    mem.add_argument("--estimate-memory", action="store_true", help="print a per-device memory estimate and a verdict")
    _add_estimate(mem)
    p.add_argument("--dry-run", action="store_true",
                   help="train a few steps, save, reload and eval in a scratch directory; print PASS/FAIL per stage")
    return p


# name: (one-line help, the arguments it takes)
COMMANDS = {
    "run": ("train a model from a recipe", (_add_recipe, _add_train, _add_config, _add_debug)),
    "eval": ("evaluate the recipe's artifact, another artifact (--checkpoint) or the base model (--base)",
             (_add_recipe, _add_eval_target, _add_debug)),
    "estimate": ("per-device memory estimate and a fits/does-not-fit verdict (reads only the model config)",
                 (_add_recipe, _add_estimate, _add_config, _add_debug)),
    "dry-run": ("train a few steps, save, reload and eval in a scratch directory; PASS/FAIL per stage",
                (_add_recipe, _add_debug)),
    "export": ("merge an adapter into its base model, or write a run as GGUF for llama.cpp/Ollama", (_add_export,)),
    "adapters": ("load one base and several adapters; print memory and answers", (_add_adapters,)),
}
RECIPE_COMMANDS = ("run", "eval", "estimate", "dry-run")


def build_command_parser(prog: str = "llama-recipes") -> tuple[argparse.ArgumentParser, dict]:
    """The `llama-recipes COMMAND` parser and each command's own parser, by name."""
    p = argparse.ArgumentParser(prog=prog, description="Fine-tune Llama-family models from one YAML recipe.",
                                epilog=f"`{prog} COMMAND --help` shows a command's arguments.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parsers = {}
    for name, (help_, adders) in COMMANDS.items():
        parsers[name] = sub.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".",
                                       epilog=OVERRIDES_HELP if name in RECIPE_COMMANDS else None)
        for add in adders:
            add(parsers[name])
    return p, parsers


# -- commands ----------------------------------------------------------------------------------------
# Each command imports its module when it runs, so `--help` and a typo never pay for what a command's
# module imports at its top (heads.py imports torch there; pipeline.py may reach it through siblings).

def _command_from_flags(args) -> str:
    """The command run_recipe.py's flags name, in the order they always took precedence."""
    chosen = [f for f, on in (("--estimate-memory", args.estimate_memory), ("--dry-run", args.dry_run),
                              ("--eval-only", args.eval_only or args.checkpoint or args.base)) if on]
    if len(chosen) > 1:  # one of them would be ignored without a word
        raise UserError(f"{' and '.join(chosen)} are different commands (--checkpoint and --base belong to --eval-only)",
                        "run one of them at a time")
    if args.checkpoint and args.base:
        raise UserError("--checkpoint and --base name two different models to evaluate", "pass one of them")
    if args.estimate_memory:
        return "estimate"
    if args.dry_run:
        return "dry-run"
    if (args.checkpoint or args.base) and not args.eval_only:
        raise UserError("--checkpoint and --base choose what --eval-only evaluates", "add --eval-only")
    return "eval" if args.eval_only else "run"


def _recipe_command(args, command: str | None) -> int:
    """Load and validate the recipe, then run `command` on it (None: the command run_recipe.py's flags name)."""
    from llama_recipes.schema import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    validate = getattr(args, "validate", False)
    if validate and getattr(args, "config", None):
        from llama_recipes import launchcheck

        return launchcheck.main(recipe, args)
    if validate:
        import yaml

        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
        return 0
    command = command or _command_from_flags(args)
    if getattr(args, "config", None) and command != "estimate":
        raise UserError("--config is read by --validate and --estimate-memory only",
                        f"to train under it: accelerate launch --config_file {args.config} run_recipe.py {args.recipe}")
    if command == "estimate":
        from llama_recipes import launchcheck, memory

        if args.config:  # the pair's conflicts are errors here too, as under --validate and at launch
            launchcheck.check(recipe, args.config, args.recipe)
        return memory.main(recipe, args)
    if command == "dry-run":
        from llama_recipes import dryrun

        return dryrun.main(recipe, args)
    if command == "eval":
        from llama_recipes import evaluation

        return evaluation.eval_only(recipe, args)
    from llama_recipes import pipeline

    pipeline.train(recipe, overwrite=args.overwrite)
    return 0


def _export(args) -> int:
    if args.format != "safetensors":
        from llama_recipes import gguf_export

        quant = args.quant or ("f32" if args.format == "gguf-lora" else "f16")
        gguf_export.main(args.output_dir, args.merged_dir, args.format, quant, args.ollama,
                         args.verify is not False, args.dtype)
        return 0
    if args.quant or args.ollama:
        raise UserError("--quant and --ollama are GGUF options", "add --format gguf")
    from llama_recipes import export

    export.merge_and_export(args.output_dir, args.merged_dir, args.dtype, trust_remote_code=args.trust_remote_code)
    if args.verify:
        diff = export.max_logit_difference(args.output_dir, args.merged_dir, trust_remote_code=args.trust_remote_code)
        print(f"max |logit difference| base+adapter vs merged: {diff:.3g}")
    return 0


def _adapters(args) -> int:
    from llama_recipes import adapters

    runs = {}
    for item in args.adapters:
        name, sep, path = item.partition("=")
        if not sep:
            raise UserError(f"bad adapter argument {item!r}", "write NAME=OUTPUT_DIR")
        if not name or not path:
            raise UserError(f"bad adapter argument {item!r}: empty {'name' if not name else 'path'}", "write NAME=OUTPUT_DIR")
        if name in runs:
            raise UserError(f"two adapters are named {name!r} ({runs[name]} and {path}): the second would replace "
                            "the first", "give each adapter its own NAME")
        runs[name] = path
    multi = adapters.MultiAdapter(runs, trust_remote_code=args.trust_remote_code)
    print(multi.memory().render())
    inputs = args.input + [""] * max(0, len(args.prompt) - len(args.input))
    for name in runs:
        answers = multi.generate(name, args.prompt, args.max_new_tokens, raw=args.raw, inputs=args.input)
        for prompt, inp, answer in zip(args.prompt, inputs, answers):
            print(json.dumps({"adapter": name, "prompt": prompt, **({"input": inp} if inp else {}), "answer": answer}))
    return 0


def _guarded(command, args) -> int:
    """Run a command; a UserError becomes `error: ...` on stderr and its exit code (2), no traceback."""
    try:
        code = command(args)
        _leave_process_group()
        return code
    except KeyboardInterrupt:  # Ctrl-C outside training, or a second one (the first stops training at a step and saves)
        if getattr(args, "debug", False):
            raise
        if is_main_process():
            print("error: interrupted (Ctrl-C)\n  fix: rerun the same command (resume: auto continues from the "
                  "newest checkpoint)", file=sys.stderr)
        return 130
    except OSError as e:  # a path the file system refuses outright (too long): the user's input, not our bug
        if getattr(args, "debug", False) or e.errno != errno.ENAMETOOLONG:
            raise
        if is_main_process():
            print(f"error: a path is longer than the file system allows ({len(str(e.filename or ''))} characters)\n"
                  "  fix: check the paths on the command line and in the recipe", file=sys.stderr)
        return 2
    except UserError as e:
        if getattr(args, "debug", False):
            raise
        code = getattr(e, "exit_code", 2)
        # Under a launcher every rank validates the same recipe and meets the same error: rank 0
        # says it, every rank exits with the code (the launcher then stops the others).
        if is_main_process():
            print(f"{'error: ' if code else ''}{e}", file=sys.stderr)
        return code


def _leave_process_group() -> None:
    """Leave torch.distributed's process group before the interpreter exits: gloo's threads can
    otherwise abort one rank's exit after a successful run ("terminate called without an active
    exception", SIGABRT), and the launcher then reports the whole run as failed."""
    if "torch.distributed" in sys.modules:
        from llama_recipes.runtime import collectives

        collectives.destroy()


def exit_process(code: int) -> None:
    """End a `run_recipe.py` process with `code`. Under a launcher (WORLD_SIZE > 1) without the
    interpreter's teardown: a rank that finished could still abort there, in a gloo or DeepSpeed thread
    ("terminate called without an active exception", SIGABRT: 1 in ~10 DeepSpeed 2-rank runs on CPU
    after the process group was left), and the launcher then fails the whole run. What the process wrote
    is flushed first; files are closed and the lock released by the OS."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def run_command(name: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse `argv` with command `name`'s parser and run the command; returns the exit code."""
    parser = build_command_parser()[1][name]
    if prog:
        parser.prog = prog
    # The command's own parser reads its arguments: argparse cannot intermix options and
    # positionals (`RECIPE a=1 --validate b=2`) across a subparser boundary.
    args = parser.parse_intermixed_args(argv)
    if name in RECIPE_COMMANDS:
        return _guarded(lambda a: _recipe_command(a, name), args)
    return _guarded(_export if name == "export" else _adapters, args)


# -- entry points ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None, prog: str = "run_recipe.py") -> int:
    """`python run_recipe.py RECIPE [overrides] [flags]`; returns the exit code."""
    args = build_parser(prog).parse_intermixed_args(argv)
    return _guarded(lambda a: _recipe_command(a, None), args)


def console_main(argv: list[str] | None = None) -> int:
    """`llama-recipes COMMAND ...` (the installed console script); returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, parsers = build_command_parser()
    if argv and argv[0] in parsers:
        return run_command(argv[0], argv[1:])
    if argv and argv[0].endswith((".yaml", ".yml")):
        parser.error(f"{argv[0]} is not a command; to train it: {parser.prog} run {argv[0]}")
    parser.parse_args(argv)  # --help, --version or a usage error: argparse prints it and exits
    return 2


if __name__ == "__main__":
    sys.exit(console_main())
