"""`python -m llama_recipes.export` is the `llama-recipes export` command (the same parser and errors).

A module of its own rather than an `if __name__ == "__main__":` block in llama_recipes/export: cli
imports export to run the command, so export importing cli would close an import circle (and run
export's code twice, once as `__main__`).
"""
import sys

from llama_recipes.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("export", prog="python -m llama_recipes.export"))
