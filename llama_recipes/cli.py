"""Command line: `python run_recipe.py RECIPE [overrides]` and `llama-recipes run RECIPE [overrides]`.

Only argparse, PyYAML and pydantic are imported before the recipe is validated, so `--help`
and recipe errors answer in well under a second.
"""
import argparse
import sys

from llama_recipes.errors import UserError


def build_parser(prog: str = "run_recipe.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune (or evaluate) a model from a YAML recipe.",
        epilog="Overrides use dotted keys: training.learning_rate=1e-4 method.r=16 data.max_samples=100",
    )
    p.add_argument("recipe", help="path to a recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides applied on top of the recipe")
    p.add_argument("--overwrite", action="store_true", help="write into an output_dir that holds another run")
    p.add_argument("--validate", action="store_true", help="only validate the recipe and print it resolved")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for user errors")
    ev = p.add_argument_group("evaluation (--eval-only)")
    ev.add_argument("--eval-only", action="store_true", help="evaluate the recipe's artifact instead of training")
    ev.add_argument("--checkpoint", help="with --eval-only: evaluate this artifact directory instead")
    ev.add_argument("--base", action="store_true", help="with --eval-only: evaluate the untrained base model")
    mem = p.add_argument_group("memory estimate (--estimate-memory)")
    mem.add_argument("--estimate-memory", action="store_true", help="print a per-device memory estimate and a verdict")
    mem.add_argument("--gpus", type=int, help="number of GPUs to estimate for (default: from --config or 1)")
    mem.add_argument("--gpu-memory", help="memory per GPU, e.g. 80GB or 24GiB")
    mem.add_argument("--config", help="accelerate config the run will use (sharding, precision)")
    mem.add_argument("--compare", action="store_true", help="estimate every method side by side")
    p.add_argument("--dry-run", action="store_true",
                   help="train a few steps, save, reload and eval in a scratch directory; print PASS/FAIL per stage")
    return p


def dispatch(recipe, args) -> int:
    """Run the mode the flags ask for. Each mode is one call into its module."""
    if args.estimate_memory:
        from llama_recipes import memory

        return memory.main(recipe, args)
    if args.dry_run:
        from llama_recipes import dryrun

        return dryrun.main(recipe, args)
    if (args.checkpoint or args.base) and not args.eval_only:
        raise UserError("--checkpoint and --base choose what --eval-only evaluates", "add --eval-only")
    if args.eval_only:
        from llama_recipes import evaluation

        return evaluation.eval_only(recipe, args)
    from llama_recipes import pipeline

    pipeline.train(recipe, overwrite=args.overwrite)
    return 0


def main(argv: list[str] | None = None, prog: str = "run_recipe.py") -> int:
    args = build_parser(prog).parse_intermixed_args(argv)
    try:
        from llama_recipes.schema import load_recipe

        recipe = load_recipe(args.recipe, args.overrides)
        if args.validate:
            import yaml

            print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
            return 0
        return dispatch(recipe, args)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)


def console_main() -> int:
    """`llama-recipes run RECIPE ...` (the installed console script)."""
    argv = sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: llama-recipes run RECIPE [overrides] [options]\n\n"
              "commands:\n  run   train or evaluate a recipe (see `llama-recipes run --help`)")
        return 0 if argv else 2
    if argv[0] != "run":
        print(f"error: unknown command {argv[0]!r}; use `llama-recipes run RECIPE`", file=sys.stderr)
        return 2
    return main(argv[1:], prog="llama-recipes run")
