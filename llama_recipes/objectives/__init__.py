"""The objective registry: one object per `objective.name`, the one place behaviour differs by objective.

    objective = objectives.get(recipe.objective.name)
    train, eval_raw, stats = objective.prepare_data(recipe, tokenizer, built)
    trainer = objective.build_trainer(recipe, model, tokenizer, train, eval_raw)
    after = objective.evaluate(model, tokenizer, trainer, eval_raw, recipe, reference=before)

The schema (llama_recipes/schema/objective.py) owns the names, settings, defaults and the
method x objective combinations that cannot work; the registry must cover exactly those names
(checked at import). Adding an objective: its Spec in the schema, a subclass of base.Objective
here, one entry in REGISTRY, a tiny twin under recipes/demo/ and its pinned losses.
"""
from __future__ import annotations

from llama_recipes.objectives.base import Objective
from llama_recipes.objectives.classification import Classification
from llama_recipes.objectives.grpo import GRPO
from llama_recipes.objectives.preference import CPO, DPO, KTO, ORPO, Reward, SimPO
from llama_recipes.objectives.sft import SFT
from llama_recipes.schema.objective import OBJECTIVE_NAMES

REGISTRY: dict[str, Objective] = {o.name: o for o in (SFT(), Classification(), DPO(), KTO(), ORPO(), CPO(), SimPO(),
                                                     Reward(), GRPO())}
if set(REGISTRY) != set(OBJECTIVE_NAMES):  # a schema entry without behaviour, or the reverse
    raise ImportError(f"objective registry {sorted(REGISTRY)} != schema objectives {sorted(OBJECTIVE_NAMES)}")


def get(name: str) -> Objective:
    return REGISTRY[name]
