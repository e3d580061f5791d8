"""`objective:` section: what the model is trained FOR (`method:` says what trains).

    objective: {name: sft}                               # the default: next-token loss on demonstrations
    objective: {name: dpo, beta: 0.1, loss_type: [sigmoid]}
    objective: {name: kto, desirable_weight: 1.0, undesirable_weight: 1.0}

Each objective trains with one TRL config class. Its own settings (the ones below) live here,
typed from the snapshot of that class (trl_fields.json) exactly like `training:`; every other
field of the class lives in `training:`. The objective's behaviour (trainer, data preparation,
measurement, memory) is llama_recipes/objectives/; this module owns the names, settings and
defaults, and the combinations with methods and data formats that cannot work.
"""
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

from pydantic import Field, create_model

from llama_recipes import formats
from llama_recipes.schema import grpo
from llama_recipes.schema.base import Section
from llama_recipes.schema.finetune import HEAD_METHODS
from llama_recipes.schema.trl import config_fields


@dataclass(frozen=True)
class Spec:
    """What the schema knows of one objective."""

    config: str  # the TRL config class its training arguments come from
    doc: str
    settings: tuple[str, ...] = ()  # fields of `config` that live in `objective:` rather than `training:`
    formats: tuple[str, ...] = ()  # data formats it trains on (names of llama_recipes.formats; auto is detected)
    defaults: dict[str, Any] = field(default_factory=dict)  # where ours differ from TRL's, and why (in `doc`)
    fixed: dict[str, Any] = field(default_factory=dict)  # config values the objective implies (simpo: loss_type)
    types: dict[str, Any] = field(default_factory=dict)  # where TRL's annotation is looser than its code (loss names)
    base: type | None = None  # the section's base class when it has fields beyond TRL's (grpo: rewards)
    check: Any = None  # recipe -> None, cross-section checks of this objective (ValueError)
    no_adapter_start: str = ""  # why it cannot continue a previous run's adapter (model.adapter); '' = it can


# Loss names TRL 1.16 implements (from its config help and trainer code): a typo fails validation, not step 1.
DPO_LOSS = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                   "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
# What SFT trains on: every format that renders to text a causal LM learns next-token from.
LM_FORMATS = formats.in_families("prompt_completion", "chat", "text")
REFERENCE_SETTINGS = ("precompute_ref_log_probs", "precompute_ref_batch_size")

SPECS: dict[str, Spec] = {
    "sft": Spec("SFTConfig", "Supervised fine-tuning: next-token loss on completions / assistant turns (the default "
                "for causal-LM methods). SFT's own options (packing, max_length, loss_type, ...) stay in `training:`.",
                formats=LM_FORMATS),
    "classification": Spec("SFTConfig", "Classification of text into labels by a task head (the default, and the "
                           "only objective, of classifier_head and mlp_head).", formats=("classification",)),
    "dpo": Spec("DPOConfig", "Direct Preference Optimization (Rafailov et al., 2023) on prompt/chosen/rejected pairs, "
                "against a frozen reference (the adapter switched off for PEFT methods, a frozen copy otherwise).",
                settings=("beta", "loss_type", "loss_weights", "label_smoothing", *REFERENCE_SETTINGS, "use_weighting",
                          "ld_alpha", "f_divergence_type", "f_alpha_divergence_coef", "discopop_tau",
                          "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps"),
                formats=("preference",), defaults={"loss_type": "sigmoid"},
                types={"loss_type": DPO_LOSS | list[DPO_LOSS]}),
    "kto": Spec("KTOConfig", "KTO (Ethayarajh et al., 2024) on unpaired prompt/completion/label rows (label true: "
                "desirable), against a frozen reference like DPO.",
                settings=("beta", "loss_type", "desirable_weight", "undesirable_weight", *REFERENCE_SETTINGS,
                          "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps"),
                formats=("unpaired_preference",), types={"loss_type": Literal["kto", "apo_zero_unpaired"]}),
    "orpo": Spec("ORPOConfig", "ORPO (Hong et al., 2024): SFT loss on chosen plus an odds-ratio penalty against "
                 "rejected; no reference model.", settings=("beta",), formats=("preference",)),
    "cpo": Spec("CPOConfig", "CPO (Xu et al., 2024): a reference-free DPO-style loss plus an SFT term on chosen.",
                settings=("beta", "label_smoothing", "loss_type", "cpo_alpha", "simpo_gamma"), formats=("preference",),
                types={"loss_type": Literal["sigmoid", "hinge", "ipo", "simpo", "alphapo"]}),
    "simpo": Spec("CPOConfig", "SimPO (Meng et al., 2024): length-normalised, reference-free margin loss (TRL's CPO "
                  "trainer with loss_type simpo). cpo_alpha defaults to 0 here (pure SimPO; > 0 adds CPO's SFT term).",
                  settings=("beta", "simpo_gamma", "cpo_alpha", "label_smoothing"), formats=("preference",),
                  defaults={"cpo_alpha": 0.0}, fixed={"loss_type": "simpo"}),
    "reward": Spec("RewardConfig", "A reward model (Bradley-Terry on chosen/rejected pairs): the base as a sequence "
                   "classifier with one output, the score of a whole conversation.",
                   settings=("center_rewards_coefficient",), formats=("preference",),
                   no_adapter_start="a reward model is a sequence classifier with a new score head, which the adapter "
                                    "of a causal LM does not hold"),
    "grpo": Spec("GRPOConfig", grpo.DOC, settings=grpo.SETTINGS, formats=("prompt_only",), defaults=grpo.DEFAULTS,
                 types=grpo.TYPES, base=grpo.GrpoSection, check=grpo.check),
}
OBJECTIVE_NAMES = tuple(SPECS)
if not {f for s in SPECS.values() for f in s.formats} <= set(formats.NAMES):  # a name the format registry lacks
    raise ImportError(f"objective formats {sorted({f for s in SPECS.values() for f in s.formats})} are not all "
                      f"formats of the registry {formats.NAMES}")
# Every field that some objective owns: these never appear in `training:` (loss_type only for sft)
OWNED_SETTINGS = {k for s in SPECS.values() for k in s.settings}

_KIND_TYPES = {"bool": bool, "int": int, "float": float, "str": str, "list": list, "dict": dict, "null": type(None)}
# Ranges TRL checks late or never (a negative beta fails in torch after the model loaded).
LIMITS: dict[str, dict] = {
    "beta": {"ge": 0}, "label_smoothing": {"ge": 0, "le": 0.5}, "desirable_weight": {"gt": 0},
    "undesirable_weight": {"gt": 0}, "cpo_alpha": {"ge": 0}, "simpo_gamma": {"ge": 0},
    "precompute_ref_batch_size": {"gt": 0}, "center_rewards_coefficient": {"ge": 0},
    "ref_model_mixup_alpha": {"ge": 0, "le": 1}, "ref_model_sync_steps": {"gt": 0},
}
LIMITS.update(grpo.LIMITS)


def annotation(spec: dict):
    """The pydantic type of a snapshotted TRL field (its value kinds, or its enum's values)."""
    if "any" in spec["kinds"]:
        return Any
    if spec.get("choices"):
        choice = Literal[tuple(spec["choices"])]  # type: ignore[valid-type]
        return choice | None if "null" in spec["kinds"] else choice
    types = tuple(_KIND_TYPES[k] for k in spec["kinds"])
    return types[0] if len(types) == 1 else Union[types]  # type: ignore[valid-type]


def _model(name: str, spec: Spec) -> type[Section]:
    fields_ = config_fields(spec.config)
    own = {}
    for key in spec.settings:
        f = fields_[key]
        own[key] = (spec.types.get(key, annotation(f)), Field(spec.defaults.get(key, f["default"]), description=f["help"] or None,
                                          **LIMITS.get(key, {})))
    model = create_model(f"{name.title()}Objective", __base__=spec.base or Section, __doc__=spec.doc,
                         name=(Literal[name], Field(description="The objective.")), **own)
    return model


OBJECTIVE_MODELS: dict[str, type[Section]] = {n: _model(n, s) for n, s in SPECS.items()}
ObjectiveConfig = Annotated[Union[tuple(OBJECTIVE_MODELS.values())], Field(discriminator="name")]


def default_objective(method_name: str) -> str:
    """The objective a recipe without `objective:` trains for: classification for heads, else sft."""
    return "classification" if method_name in HEAD_METHODS else "sft"


def trainer_settings(objective) -> dict:
    """The objective section as TRL config keyword arguments: what the recipe set and where our defaults differ
    from TRL's (TRL supplies the rest, as for `training:`), plus the values the objective implies."""
    spec = SPECS[objective.name]
    # only the TRL settings: a section's own fields (grpo's rewards) are not config keys
    given = {k: v for k, v in objective.model_dump(exclude={"name"}, exclude_unset=True).items() if k in spec.settings}
    return {**{k: v for k, v in spec.defaults.items() if k not in given}, **given, **spec.fixed}


def training_keys(name: str) -> set[str]:
    """The fields `training:` accepts under objective `name`: its TRL config class, less its own settings."""
    spec = SPECS[name]
    return set(config_fields(spec.config)) - set(spec.settings)


PREFERENCE_OBJECTIVES = ("dpo", "kto", "orpo", "cpo", "simpo")
# method x objective pairs that cannot work, and why: the one table of them (tests/test_objectives.py
# tries every pair). Keys are method names; "*" is every other objective of the row.
_HEAD_WHY = ("a task head predicts labels and has no language-model output to score completions with; "
             "use a causal-LM method (lora, dora, qlora, ia3, full, partial) for this objective")
_REFUSED: dict[str, dict[str, str]] = {
    "classifier_head": {"*": _HEAD_WHY},
    "mlp_head": {"*": _HEAD_WHY},
    "llama_adapter": {
        **{o: "TRL's preference trainers compute log-probabilities through a fused LM head patched onto the base "
              "model, which PEFT's adaption-prompt wrapper never calls (it keeps its own reference to the base "
              "forward); use lora or dora" for o in PREFERENCE_OBJECTIVES},
        "reward": "a reward model is a sequence classifier; PEFT's adaption prompt wraps causal LMs only; use lora",
    },
    "prefix": {"reward": "a reward model is a sequence classifier: prefix tuning's key/value prefixes are not "
                         "supported by the sequence-classification forward; use lora, ia3 or full"},
    "prompt_tuning": {"reward": "a reward model scores the last token of each sequence; prompt tuning prepends virtual "
                                "tokens that shift those positions; use lora, ia3 or full"},
}


def refusal(method: str, objective: str) -> str:
    """Why `method` cannot train for `objective` ('' when it can)."""
    if objective == "classification" and method not in HEAD_METHODS:
        return "classification trains a task head on the base: use method classifier_head or mlp_head"
    row = _REFUSED.get(method, {})
    if objective == "classification":
        return ""
    return row.get(objective, row.get("*", ""))


def check_combinations(recipe) -> None:
    """method x objective x data format (called by Recipe's validator): ValueError with the reason and the fix."""
    method, name = recipe.method.name, recipe.objective.name
    why = refusal(method, name)
    if why:
        raise ValueError(f"method {method} with objective {name}: {why}")
    if SPECS[name].check:
        SPECS[name].check(recipe)
    accepted = SPECS[name].formats
    for src in recipe.data.sources():
        if src.format != "auto" and src.format not in accepted:
            raise ValueError(f"data.format {src.format} cannot train objective {name}, which trains on "
                             f"{' or '.join(accepted)} data (docs/preference.md lists the formats)")
