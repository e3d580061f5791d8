"""Run `run_recipe.py ARGS` in this process and exit at the end of the first optimizer step.

Prints one JSON line: seconds from LLR_T0 (the launcher's clock before it spawned us) to the
interpreter start of this file, to the heavy imports done (imported first, in this process), and to the first optimizer step.
"""
import json
import os
import sys
import time

T_START = time.time()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    t0 = float(os.environ["LLR_T0"])
    # The heavy imports the run does anyway (cached afterwards), timed here in the same process.
    import datasets, peft, torch, transformers, trl  # noqa: E401,F401

    t_imports = time.time()
    from llama_recipes import cli, training

    original = training.build_trainer

    def build(*a, **kw):
        from transformers import TrainerCallback

        class FirstStep(TrainerCallback):
            def on_step_end(self, *a, **kw):
                print("FIRST_STEP " + json.dumps({"python_started": T_START - t0,
                                                  "imports_done": t_imports - t0,
                                                  "first_step": time.time() - t0}), flush=True)
                os._exit(0)

        trainer = original(*a, **kw)
        trainer.add_callback(FirstStep())
        return trainer

    training.build_trainer = build
    sys.exit(cli.main(sys.argv[1:]))


if __name__ == "__main__":
    main()
