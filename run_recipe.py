#!/usr/bin/env python
"""Fine-tune or evaluate a model from a YAML recipe.

    python run_recipe.py recipes/demo/tiny_lora.yaml [dotted.key=value ...]
    accelerate launch --config_file accelerate_configs/single_gpu.yaml run_recipe.py RECIPE.yaml

All logic lives in the llama_recipes package (llama_recipes/cli.py parses the arguments,
llama_recipes/pipeline.py runs the stages); `llama-recipes run RECIPE.yaml` is the same command.
"""
import sys

from llama_recipes.cli import exit_process, main

if __name__ == "__main__":
    exit_process(main(sys.argv[1:]))
