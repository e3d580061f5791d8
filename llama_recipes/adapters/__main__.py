"""`python -m llama_recipes.adapters` is the `llama-recipes adapters` command (the same parser and errors).

A module of its own rather than an `if __name__ == "__main__":` block in llama_recipes/adapters: cli
imports adapters to run the command, so adapters importing cli would close an import circle (and run
adapters's code twice, once as `__main__`).
"""
import sys

from llama_recipes.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("adapters", prog="python -m llama_recipes.adapters"))
