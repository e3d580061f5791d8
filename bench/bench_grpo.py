"""GRPO: ours (objective: grpo) vs TRL 1.16's GRPOTrainer defaults, same model, prompts, rewards and seed.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python bench/bench_grpo.py [RECIPE] [--steps N] [--rounds R] [key=value ...]

Ours is the trainer pipeline.train builds for RECIPE (default recipes/demo/tiny_grpo.yaml): its sampler
(objectives/grpo.sample_groups: one generate call, each group seeded on its own, each prompt prefilled once). TRL's is a plain `trl.GRPOTrainer` on the same
LoRA model, data, reward callables and GRPOConfig (so only the sampler differs; TRL's own defaults
otherwise apply to both). Each round trains N steps with each, alternating (ratios taken side by
side on a loaded machine are what is comparable). Reported: generation tokens/s (completion tokens
sampled / seconds inside `_generate_single_turn`), training tokens/s (prompt + completion tokens
/ the rest of the step), the fraction of a step spent generating, and seconds per step (which also
depend on how long the sampled completions are: the two sides sample different ones).
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(cls):
    """A subclass of a GRPO trainer class that records generation seconds, steps and tokens."""

    class Timed(cls):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.gen_s, self.gen_tokens, self.step_s, self.train_tokens = 0.0, 0, 0.0, 0

        def _generate_single_turn(self, prompt_ids, *a, **k):
            t = time.perf_counter()
            ids, lps = super()._generate_single_turn(prompt_ids, *a, **k)
            self.gen_s += time.perf_counter() - t
            self.gen_tokens += sum(len(x) for x in ids)
            self.train_tokens += sum(len(x) for x in ids) + sum(len(p) for p in prompt_ids)
            return ids, lps

        def training_step(self, *a, **k):
            t = time.perf_counter()
            out = super().training_step(*a, **k)
            self.step_s += time.perf_counter() - t
            return out

    return Timed


def build(recipe_path: str, steps: int, out: Path, ours: bool, overrides: list[str] = ()):
    """(trainer) for RECIPE: ours through the objective, or TRL's plain GRPOTrainer with the same pieces."""
    from trl import GRPOConfig, GRPOTrainer

    from llama_recipes import data, methods, modeling, objectives, rewards, training
    from llama_recipes.objectives import grpo
    from llama_recipes.schema import load_recipe

    recipe = load_recipe(recipe_path, [*overrides, f"training.max_steps={steps}", "training.report_to=none",
                                       "training.bf16=false", f"output_dir={out}", "training.logging_steps=1"])
    from transformers import set_seed

    set_seed(recipe.seed)
    objective = objectives.get("grpo")
    tokenizer = modeling.load_tokenizer(recipe.model)
    built = data.build_datasets(recipe.data, recipe.formats)
    model = methods.get(recipe.method.name).build_model(recipe, tokenizer, built, objective)
    train, _, _ = objective.prepare_data(recipe, tokenizer, built)
    fns = rewards.build(recipe, train.column_names)
    args = training.trl_config(recipe, GRPOConfig, extra={"reward_weights": [f.weight for f in fns]})
    cls = timed(grpo.seeded_trainer_class() if ours else GRPOTrainer)
    return cls(model=model, reward_funcs=list(fns), args=args, train_dataset=train, processing_class=tokenizer)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe", nargs="?", default=str(ROOT / "recipes" / "demo" / "tiny_grpo.yaml"))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("overrides", nargs="*", help="recipe overrides, key=value (as run_recipe.py takes them)")
    a = p.parse_intermixed_args(argv)
    import torch

    rows = {"ours": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for name in ("trl", "ours") if r % 2 else ("ours", "trl"):
                tr = build(a.recipe, a.steps, Path(tmp) / f"{name}{r}", ours=name == "ours", overrides=a.overrides)
                tr.train()
                rows[name].append({"gen_tok_s": tr.gen_tokens / tr.gen_s,
                                   "train_tok_s": tr.train_tokens / max(tr.step_s - tr.gen_s, 1e-9),
                                   "gen_fraction": tr.gen_s / tr.step_s,
                                   "step_s": tr.step_s / a.steps})
    med = {n: {k: statistics.median(x[k] for x in v) for k in v[0]} for n, v in rows.items()}
    result = {"recipe": a.recipe, "overrides": a.overrides, "steps": a.steps, "rounds": a.rounds, "isa": torch.backends.cpu.get_cpu_capability(),
              "date": time.strftime("%Y-%m-%d"), **med,
              "ratio_ours_over_trl": {k: med["ours"][k] / med["trl"][k] for k in ("gen_tok_s", "train_tok_s")},
              "step_time_trl_over_ours": med["trl"]["step_s"] / med["ours"]["step_s"]}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
