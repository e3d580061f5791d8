"""A recipe under an accelerate config, checked without launching: `RECIPE --config CONFIG --validate`.

What `accelerate launch --config_file CONFIG run_recipe.py RECIPE` checks before it loads a model,
run in this one process, on any machine, in seconds:

1. accelerate's own validation of the config, and the environment it hands every rank
   (`launch_env`: accelerate's functions, not a copy of them);
2. in that environment, the recipe-by-config decisions every rank makes
   (`distributed.resolve`: activation checkpointing, precision, QLoRA storage under FSDP);
3. the checks that need only the model's architecture, on a meta-device model (no weights):
   the FSDP wrap class and FSDP1 with frozen parameters, the same functions the launch calls.

It returns the resolved settings (who checkpoints activations, precision, wrap class, sharding,
processes, global batch) for the CLI to print and for docs/distributed.md's table.
"""
import functools
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from llama_recipes import memory
from llama_recipes.errors import UserError
from llama_recipes.runtime import distributed

# The environment accelerate hands to a rank; replaced as a whole while a pair is checked.
_LAUNCH_PREFIXES = ("ACCELERATE_", "FSDP_")


@dataclass
class Check:
    """A validated pair: its resolved settings, in the order they are printed."""

    recipe: str
    config: str
    settings: dict[str, str] = field(default_factory=dict)


def launch_env(config: str) -> tuple[object, dict[str, str]]:
    """(accelerate's launch arguments, the environment each rank gets) for an accelerate config."""
    path = Path(config)
    if not path.is_file():
        raise UserError(f"accelerate config not found: {config}",
                        "pass --config accelerate_configs/NAME.yaml (the shipped ones are listed in docs/distributed.md)")
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
    )
    from accelerate.utils.launch import (
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    try:
        args = launch_command_parser().parse_args(["--config_file", str(path), "run_recipe.py"])
        args, _, _ = _validate_launch_command(args)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - accelerate raises ValueError/TypeError/KeyError or exits
        raise UserError(f"accelerate rejects {config}: {type(e).__name__}: {e}",
                        "compare it with the shipped configs in accelerate_configs/") from None
    if args.use_deepspeed:
        # accelerate builds a DeepSpeed rank's environment only with deepspeed installed; what the
        # recipe checks read from it is the precision and that DeepSpeed runs.
        env = prepare_simple_launcher_cmd_env(args)[1]
        env.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE=str(args.zero_stage))
    elif args.use_fsdp or args.multi_gpu:
        env = prepare_multi_gpu_env(args)
    else:
        env = prepare_simple_launcher_cmd_env(args)[1]
    return args, {k: str(v) for k, v in env.items() if k.startswith(_LAUNCH_PREFIXES)}


@contextmanager
def _launch_environ(env: dict[str, str]):
    """This process's environment as a rank of that launch would see it, restored afterwards."""
    saved = dict(os.environ)
    for k in [k for k in os.environ if k.startswith(_LAUNCH_PREFIXES)]:
        del os.environ[k]
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def check(recipe, config: str, recipe_path: str = "") -> Check:
    """Every launch-time check of (recipe, config); raises the UserError the launch would raise."""
    args, env = launch_env(config)
    with _launch_environ(env):
        resolved = distributed.resolve(recipe)
    t = resolved.training

    def flag(k: str) -> bool:
        return env.get(k, "false").strip().lower() in ("1", "true", "yes")

    fsdp, deepspeed = flag("ACCELERATE_USE_FSDP"), flag("ACCELERATE_USE_DEEPSPEED")
    version = int(env.get("FSDP_VERSION", "1"))
    procs, machines = int(args.num_processes or 1), int(args.num_machines or 1)
    out = Check(recipe_path, config)
    s = out.settings

    if fsdp:
        shard = {"FULL_SHARD": "full shard (ZeRO-3)", "SHARD_GRAD_OP": "shard gradients + optimizer (ZeRO-2)",
                 "NO_SHARD": "no sharding (DDP-like)", "HYBRID_SHARD": "hybrid: full shard in a node, replicas across"}
        strategy = env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD")
        if version == 2:
            strategy = "FULL_SHARD" if flag("FSDP_RESHARD_AFTER_FORWARD") else "SHARD_GRAD_OP"
        kind = f"FSDP{version} {shard.get(strategy, strategy)}"
        if flag("ACCELERATE_USE_PARALLELISM_CONFIG"):
            kind += ", parallelism_config (hybrid sharding across machines)"
    elif deepspeed:
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "?")
        kind = f"DeepSpeed ZeRO-{stage} (DeepSpeed's engine, not FSDP; not run by the CPU stand-in)"
    else:
        kind = "DDP (every process holds the whole model)" if procs > 1 else "one process"
    s["processes"] = f"{procs} over {machines} machine(s)"
    s["distribution"] = kind
    s["global batch"] = (f"{t.per_device_train_batch_size} x {t.gradient_accumulation_steps} accumulation x "
                         f"{procs} processes = {t.per_device_train_batch_size * t.gradient_accumulation_steps * procs}")
    s["precision"] = _precision(resolved, env.get("ACCELERATE_MIXED_PRECISION", "no"), fsdp)
    s["model weights"] = f"{resolved.model.dtype} (model.dtype)"
    if fsdp and flag("FSDP_ACTIVATION_CHECKPOINTING"):
        s["activation checkpointing"] = "FSDP, per wrapped layer (fsdp_activation_checkpointing); off in the trainer"
    elif t.activation_checkpointing:
        s["activation checkpointing"] = "the trainer (training.activation_checkpointing)"
    else:
        s["activation checkpointing"] = "off"
    if fsdp:
        s.update(_model_checks(resolved, env, version))
        s["CPU offload"] = "parameters, gradients, optimizer state in host RAM" if flag("FSDP_OFFLOAD_PARAMS") else "no"
        s["checkpoints"] = (f"{env.get('FSDP_STATE_DICT_TYPE', 'FULL_STATE_DICT')} per rank; the final artifact is "
                            "gathered to rank 0 (a normal model/adapter directory)")
    if deepspeed:
        try:
            import deepspeed
        except ImportError:
            s["needs"] = 'pip install -e ".[deepspeed]" on the GPU machine'
    return out


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


def _model_checks(recipe, env: dict[str, str], version: int) -> dict[str, str]:
    """The FSDP checks that need the architecture: a meta-device model from config.json."""
    m = recipe.model
    try:
        cfg, shape = _architecture(m.name_or_path, m.revision, m.trust_remote_code)
    except UserError as e:
        return {"wrap class": f"decided at launch (the model config is not readable here: {e.problem})"}
    named = [c.strip() for c in env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip()] or None
    arch = (getattr(cfg, "architectures", None) or [type(cfg).__name__])[0]
    classes = distributed.wrap_classes(named, shape.no_split, shape.module_classes, arch)
    _, trained = memory.trainable_params(shape, memory.setup_from_recipe(recipe))
    base_frozen = [n for n in shape.params if n not in set(trained)]
    distributed.check_fsdp1_orig_params(version, env.get("FSDP_USE_ORIG_PARAMS", "false").lower() == "true",
                                        base_frozen)
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
