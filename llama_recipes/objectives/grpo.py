"""GRPO: online RL with the recipe's rewards, on TRL's GRPOTrainer (generation by transformers `generate`).

What is ours: the rewards (llama_recipes/rewards.py: built-ins, reward models, the user's checked
function), the config from `training:` + `objective:` (reward weights from objective.rewards),
per-step seeded sampling (so a resumed run draws the same completions as an uninterrupted one), and
the measurement: greedy completions of held-out prompts scored by the same rewards, before and
after training (mean reward per reward and weighted, pass rate of 0/1 rewards, completion length,
example completions).
"""
from __future__ import annotations

import os

from llama_recipes import data, rewards, training
from llama_recipes.measure import fingerprint_rows, generate
from llama_recipes.errors import UserError
from llama_recipes.log import get_logger
from llama_recipes.objectives.base import Objective

log = get_logger(__name__)
EXAMPLES = 3  # example completions kept in metrics.json per evaluation
STEP_SEED_STRIDE = 1_000_003  # a prime: (step, rank) -> distinct sampling seeds


def step_seed(seed: int, step: int, rank: int) -> int:
    """The sampling seed of one optimizer step on one rank: a function of the step, not of the RNG's history."""
    return (seed * STEP_SEED_STRIDE + step * 1009 + rank) % (2**63 - 1)


def seeded_trainer_class():
    """TRL's GRPOTrainer, sampling each step's completions from a generator seeded by (seed, step, rank).

    TRL 1.16 samples from the global torch RNG, whose state after a resume comes from the checkpoint's
    rng_state file; seeding per step makes the completions of step N independent of how the run got
    there (killed and resumed, or not)."""
    import torch
    from trl import GRPOTrainer

    class SeededGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            seed = step_seed(self.args.seed, self.state.global_step, self.accelerator.process_index)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                if torch.cuda.is_available():
                    torch.cuda.manual_seed_all(seed)
                return super()._generate_and_score_completions(inputs)

    return SeededGRPOTrainer


class GRPO(Objective):
    name = "grpo"
    primary_metric = "reward_mean"

    def has_reference(self, recipe) -> bool:
        return float(recipe.objective.beta) > 0

    def prepare_data(self, recipe, tokenizer, built):
        train, eval_ds, _ = built
        stats = dict(built.stats)
        if len(train) and not isinstance(train[0]["prompt"], str):  # conversations: the chat template renders them
            data.apply_chat_template_choice(recipe, tokenizer, assistant_spans=False)
        return train, eval_ds, stats

    def build_trainer(self, recipe, model, tokenizer, train_ds, eval_raw, callbacks=None):
        from trl import GRPOConfig

        fns = rewards.build(recipe, train_ds.column_names)
        obj = recipe.objective
        world = int(os.environ.get("WORLD_SIZE", "1"))  # the process group starts with the trainer's arguments
        t = recipe.training
        per_device = getattr(t, "per_device_train_batch_size", 8)
        steps = obj.steps_per_generation or getattr(t, "gradient_accumulation_steps", 1)
        generation_batch = obj.generation_batch_size or per_device * steps * world
        if generation_batch % obj.num_generations:
            raise UserError(f"a generation batch of {generation_batch} completions (training.per_device_train_batch_"
                            f"size {per_device} x {steps} steps per generation x {world} processes) does not hold "
                            f"whole groups of objective.num_generations={obj.num_generations}",
                            "make per_device_train_batch_size (x gradient_accumulation_steps x processes) a multiple "
                            "of num_generations")
        args = training.trl_config(recipe, GRPOConfig, extra={"reward_weights": [f.weight for f in fns]})
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        trainer = seeded_trainer_class()(model=model, reward_funcs=list(fns), args=args, train_dataset=train_ds,
                                         processing_class=tokenizer, callbacks=callbacks)
        trainer.recipe_rewards = fns  # evaluate() scores with the same callables
        return trainer

    def evaluate(self, model, tokenizer, trainer, eval_raw, recipe, reference=None):
        if eval_raw is None:
            return None
        fns = getattr(trainer, "recipe_rewards", None) or rewards.build(recipe, eval_raw.column_names)
        return measure_rewards(model, tokenizer, eval_raw, recipe, fns)

    def fallback_eval(self, model, trainer, batch_size):
        return None

    def memory(self, shape, setup, recipe, estimate):
        """--estimate-memory of a GRPO recipe (memory.estimate_recipe asks): see memory_estimate."""
        return memory_estimate(shape, setup, recipe, estimate)

    def probe_batch(self, run):
        """The dry run's logits probe: a few prompts (held-out, else train) as the trainer tokenizes them."""
        rows = run.eval_raw if run.eval_raw is not None else run.trainer.train_dataset
        rows = rows.select(range(min(4, len(rows))))
        texts, special = eval_prompts(rows, run.tokenizer)
        side = run.tokenizer.padding_side
        run.tokenizer.padding_side = "left"
        try:
            enc = run.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=special)
        finally:
            run.tokenizer.padding_side = side
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def eval_artifact(self, recipe, target, tokenizer, model):
        """--eval-only (evaluation.eval_only asks for it, with the loaded artifact): results and example predictions."""
        return eval_artifact(recipe, target, tokenizer, model)

    def describe(self, r):
        parts = [f"reward_mean={r['reward_mean']:.4f}"]
        parts += [f"{k}={v:.4f}" for k, v in r.items() if k.startswith("reward_pass_rate_")]
        parts.append(f"completion_length={r['completion_length_mean']:.1f} ({r['examples']} prompts, greedy)")
        return " ".join(parts)

    def before_after_table(self, before, after):
        rows = ["| metric | before | after |", "|---|---|---|"]
        for k, v in after.items():
            if k in before and isinstance(v, (int, float)) and k != "examples":
                rows.append(f"| {k} | {before[k]:.4f} | {v:.4f} |")
        return "\n".join(rows)


PROMPT_TOKENS = 256  # prompt length the estimate assumes (the data is not read by --estimate-memory)


def memory_estimate(shape, setup, recipe, estimate):
    """The estimate of a GRPO step: every completion is a training sequence of prompt + max_completion_length
    tokens; generation adds the KV cache of the whole local generation batch (per_device_train_batch_size x
    steps_per_generation sequences, num_generations per prompt) and its last-step logits; beta > 0 adds a frozen
    reference copy of the base unless the method is PEFT (TRL 1.16 then switches the adapter off instead)."""

    obj, t = recipe.objective, recipe.training
    seq = PROMPT_TOKENS + obj.max_completion_length
    setup.seq_len = seq
    e = estimate(shape, setup)
    steps = obj.steps_per_generation or getattr(t, "gradient_accumulation_steps", 1)
    batch = obj.generation_batch_size or setup.micro_batch * steps
    kv_bytes = 2 if setup.mixed else 4
    kv = 2 * shape.num_layers * shape.kv_heads * shape.head_dim * seq * batch * kv_bytes
    logits = batch * shape.vocab * 4
    e.buffers += kv + logits
    e.notes.append(f"GRPO: each of the {batch} sequences of a generation batch is {PROMPT_TOKENS} prompt tokens "
                   f"(assumed) + max_completion_length {obj.max_completion_length}; the generation KV cache "
                   f"({batch} x {seq} tokens) adds {kv / 2**20:.1f} MiB and its logits {logits / 2**20:.1f} MiB "
                   "(counted under temporary buffers)")
    if float(obj.beta) > 0:
        if recipe.is_peft:
            e.notes.append("GRPO beta > 0: the reference model is the base with the adapter switched off (no copy)")
        else:
            ref = shape.total * kv_bytes if setup.mixed else shape.total * 4
            e.weights += ref
            e.notes.append(f"GRPO beta > 0: a frozen reference copy of the model adds {ref / 2**20:.1f} MiB")
    return e


def eval_prompts(rows, tokenizer) -> tuple[list[str], bool]:
    """The held-out prompts as the trainer feeds them to generate: (texts, add_special_tokens)."""
    prompts = rows["prompt"]
    if prompts and not isinstance(prompts[0], str):
        return [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts], False
    return list(prompts), True


def stop_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion in TRL's GRPOTrainer: the tokenizer's EOS and the model's generation EOS."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return [tokenizer.eos_token_id, *[i for i in ids if i != tokenizer.eos_token_id]]


def measure_rewards(model, tokenizer, eval_raw, recipe, fns) -> dict:
    """Greedy completions of the held-out prompts (the first eval.limit), scored by every reward."""

    rows = eval_raw.select(range(min(len(eval_raw), recipe.eval.limit or len(eval_raw))))
    texts, special = eval_prompts(rows, tokenizer)
    completions = generate(model, tokenizer, texts, recipe.objective.max_completion_length, recipe.eval.batch_size,
                           add_special_tokens=special, stop_ids=stop_ids(model, tokenizer))
    ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    conversational = not isinstance(rows[0]["prompt"], str)
    given = [[{"role": "assistant", "content": c}] for c in completions] if conversational else completions
    columns = {c: rows[c] for c in rows.column_names if c != "prompt"}
    scores = rewards.score(fns, rows["prompt"], given, ids, columns)
    n = len(completions)
    out = {"reward_mean": sum(scores["reward"]) / n}
    for fn in fns:
        values = scores[fn.__name__]
        out[f"reward_mean_{fn.__name__}"] = sum(values) / n
        if fn.binary:
            out[f"reward_pass_rate_{fn.__name__}"] = sum(v == 1.0 for v in values) / n
    out["completion_length_mean"] = sum(len(i) for i in ids) / n
    out["examples"] = n
    out["reward_examples"] = [{"prompt": texts[i][-300:], "completion": completions[i], "reward": scores["reward"][i]}
                              for i in range(min(EXAMPLES, n))]
    return out


def eval_artifact(recipe, target, tokenizer, model) -> tuple[dict, list[dict]]:
    """--eval-only of a GRPO run: the artifact (or the base) measured as training's eval_after/eval_before is
    (greedy completions of the first eval.limit held-out prompts, the recipe's rewards). (results, predictions)."""
    import time

    from transformers import set_seed


    started = time.time()
    set_seed(recipe.eval.seed)
    _, eval_raw, fmt = data.build_datasets(recipe.data, recipe.formats)
    if eval_raw is None:
        raise UserError("--eval-only needs held-out prompts, and data.eval_split is not set",
                        "set data.eval_split to a split name (eval) or a fraction (0.05)")
    if not isinstance(eval_raw[0]["prompt"], str):
        data.apply_chat_template_choice(recipe, tokenizer, assistant_spans=False)
    fns = rewards.build(recipe, eval_raw.column_names)
    metrics = measure_rewards(model, tokenizer, eval_raw, recipe, fns)
    examples = metrics.pop("reward_examples")
    results = {"artifact": str(target.path) if target.path else f"base:{recipe.model.name_or_path}",
               "kind": target.kind, "recipe_fingerprint": recipe.fingerprint(),
               "dataset": {"path": recipe.data.path, "split": recipe.data.eval_split, "format": fmt,
                           "fingerprint": fingerprint_rows(eval_raw)},
               "examples": metrics["examples"], "metrics": metrics,
               "seconds": {"total": round(time.time() - started, 3)}}
    return results, examples
