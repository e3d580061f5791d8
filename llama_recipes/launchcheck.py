"""A recipe under an accelerate config, checked without launching: `RECIPE --config CONFIG --validate`.

What `accelerate launch --config_file CONFIG run_recipe.py RECIPE` checks before it loads a model,
run in this one process, on any machine, in seconds:

1. accelerate's own validation of the config, and the environment it hands every rank: the
   launch plan (runtime/launchplan.py: accelerate's functions, not a copy of them);
2. in that environment, the recipe-by-config decisions every rank makes
   (`distributed.resolve`: activation checkpointing, precision, QLoRA storage under FSDP);
3. the checks that need only the model's architecture, on a meta-device model (no weights):
   the FSDP wrap class and FSDP1 with frozen parameters, the same functions the launch calls.

It returns the resolved settings (who checkpoints activations, precision, wrap class, sharding,
processes, global batch) for the CLI to print and for docs/distributed.md's table.
"""
import functools
from dataclasses import dataclass, field

from llama_recipes import memory
from llama_recipes.errors import UserError
from llama_recipes.runtime import distributed, launchplan
from llama_recipes.runtime.launchplan import LaunchPlan

@dataclass
class Check:
    """A validated pair: its resolved settings, in the order they are printed."""

    recipe: str
    config: str
    settings: dict[str, str] = field(default_factory=dict)
    plan: LaunchPlan | None = None


def check(recipe, config: str, recipe_path: str = "", *launch_flags: str) -> Check:
    """Every launch-time check of (recipe, config); raises the UserError the launch would raise."""
    plan = _plan(str(config), launch_flags)
    resolved = distributed.resolve(recipe, plan)
    t = resolved.training
    procs, machines = plan.num_processes, plan.num_machines
    out = Check(recipe_path, config, plan=plan)
    s = out.settings

    if plan.fsdp:
        shard = {"FULL_SHARD": "full shard (ZeRO-3)", "SHARD_GRAD_OP": "shard gradients + optimizer (ZeRO-2)",
                 "NO_SHARD": "no sharding (DDP-like)", "HYBRID_SHARD": "hybrid: full shard in a node, replicas across"}
        kind = f"FSDP{plan.fsdp_version} {shard.get(plan.fsdp_strategy, plan.fsdp_strategy)}"
        if plan.parallelism:
            kind += ", parallelism_config (hybrid sharding across machines)"
    elif plan.deepspeed:
        what = {3: "parameters, gradients and optimizer state partitioned", 2: "gradients and optimizer state partitioned",
                1: "optimizer state partitioned"}.get(plan.zero_stage, "no partitioning")
        kind = f"DeepSpeed ZeRO-{plan.zero_stage} ({what}; DeepSpeed's engine)"
    else:
        kind = "DDP (every process holds the whole model)" if procs > 1 else "one process"
    s["processes"] = f"{procs} over {machines} machine(s)"
    s["distribution"] = kind
    s["global batch"] = (f"{t.per_device_train_batch_size} x {t.gradient_accumulation_steps} accumulation x "
                         f"{procs} processes = {t.per_device_train_batch_size * t.gradient_accumulation_steps * procs}")
    s["precision"] = _precision(resolved, plan.mixed_precision, plan.fsdp)
    s["model weights"] = f"{resolved.model.dtype} (model.dtype)"
    if plan.fsdp_activation_checkpointing:
        s["activation checkpointing"] = "FSDP, per wrapped layer (fsdp_activation_checkpointing); off in the trainer"
    elif t.activation_checkpointing:
        s["activation checkpointing"] = "the trainer (training.activation_checkpointing)"
    else:
        s["activation checkpointing"] = "off"
    if resolved.method.name == "qlora" and plan.fsdp:
        s["4-bit storage"] = f"{resolved.method.quant_storage_dtype} (method.quant_storage_dtype; FSDP shards it)"
    if plan.fsdp:
        s.update(_model_checks(resolved, plan))
        s["CPU offload"] = "parameters, gradients, optimizer state in host RAM" if plan.fsdp_offload else "no"
        s["checkpoints"] = (f"{plan.fsdp_state_dict_type} per rank; the final artifact is "
                            "gathered to rank 0 (a normal model/adapter directory)")
    if plan.deepspeed:
        s["CPU offload"] = (f"optimizer state: {plan.offload_optimizer}, parameters: {plan.offload_param}"
                            if plan.offload else "no")
        if plan.zero_stage == 3:
            s["model loading"] = ("partitioned as it loads (zero3_init_flag: deepspeed.zero.Init)" if plan.zero3_init
                                  else "whole on every rank, partitioned when training starts (zero3_init_flag off)")
        s["checkpoints"] = ("DeepSpeed checkpoints per rank (global_stepN/); the final artifact is gathered to rank 0 "
                            "(a normal model/adapter directory)")
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            s["needs"] = 'pip install -e ".[deepspeed]"'
    return out


@functools.lru_cache(maxsize=64)
def _plan(config: str, launch_flags: tuple[str, ...]) -> LaunchPlan:
    """accelerate's parse of a config, once per (config, flags): a table checks many recipes under it."""
    return launchplan.from_config(config, *launch_flags)


def _precision(recipe, launch: str, fsdp: bool) -> str:
    t = recipe.training
    if t.fp16:
        what = "fp16 autocast"
    elif t.bf16 is True:
        what = "bf16 autocast"
    elif t.bf16 == "auto":
        return "training.bf16: auto: bf16 on GPUs that support it (Ampere or newer), else fp32; decided at launch"
    else:
        return "fp32"
    source = f"the accelerate config (mixed_precision: {launch})" if launch in ("bf16", "fp16") else "the recipe"
    text = f"{what}, from {source}"
    if fsdp:
        text += "; FSDP keeps trainable parameters in fp32 (accelerate upcasts them) and reduces gradients in fp32"
    return text


def _model_checks(recipe, plan: LaunchPlan) -> dict[str, str]:
    """The FSDP checks that need the architecture: a meta-device model from config.json."""
    m = recipe.model
    try:
        cfg, shape = _architecture(m.name_or_path, m.revision, m.trust_remote_code)
    except UserError as e:
        return {"wrap class": f"decided at launch (the model config is not readable here: {e.problem})"}
    named = plan.fsdp_wrap_classes
    arch = (getattr(cfg, "architectures", None) or [type(cfg).__name__])[0]
    classes = distributed.wrap_classes(named, shape.no_split, shape.module_classes, arch)
    _, trained = memory.trainable_params(shape, memory.setup_from_recipe(recipe))
    base_frozen = [n for n in shape.params if n not in set(trained)]
    distributed.check_fsdp1_orig_params(plan.fsdp_version, plan.fsdp_use_orig_params, base_frozen)
    source = "the accelerate config" if named else "the model's _no_split_modules"
    return {"wrap class": f"{', '.join(classes)} (from {source})"}


@functools.lru_cache(maxsize=16)
def _architecture(name: str, revision: str | None, trust_remote_code: bool):
    """(config, meta-device shape) of a model; cached, since a table checks one model under many configs."""
    cfg = memory.load_config(name, revision, trust_remote_code)
    return cfg, memory.meta_shape(cfg)  # the module classes too: the wrap checks need them


def render(c: Check) -> str:
    width = max(len(k) for k in c.settings)
    head = f"launch check: PASS  {c.recipe or 'recipe'} under {c.config}"
    return "\n".join([head] + [f"  {k:<{width}}  {v}" for k, v in c.settings.items()])


def main(recipe, args) -> int:
    """`--validate --config CONFIG`: print the resolved settings; exit 0 (a failed check raises)."""
    print(render(check(recipe, args.config, args.recipe)))
    return 0
