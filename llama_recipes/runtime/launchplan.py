"""The launch plan: one accelerate config, parsed once by accelerate's own code, as one object.

`accelerate launch --config_file CONFIG` turns CONFIG into the environment every rank gets
(ACCELERATE_*, FSDP_*, and for DeepSpeed ACCELERATE_DEEPSPEED_*). A `LaunchPlan` is that
environment plus the process layout, read the same way wherever it comes from:

- at launch, on a rank: `current()` reads this process's environment (what accelerate handed over);
- before a launch (`--validate --config`, `--estimate-memory --config`, docs/distributed.md's
  table, the SLURM/torchrun command lines): `from_config(CONFIG)` runs accelerate's own launch
  parser and environment builders (`launch_command_parser`, `_validate_launch_command`,
  `prepare_multi_gpu_env` / `prepare_deepspeed_cmd_env`), so nothing here re-reads the YAML.

Every question about the launch (who shards, which ZeRO stage, who checkpoints activations,
what precision, how many processes on how many machines) is a property of this object; the
modules that ask (runtime/distributed.py, launchcheck.py, memory.py) never parse a config
or read a launch variable themselves.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from llama_recipes.errors import UserError

# The environment accelerate hands a rank (replaced as a whole while a config is checked).
LAUNCH_PREFIXES = ("ACCELERATE_", "FSDP_", "PARALLELISM_CONFIG_")


def _true(v: str | None) -> bool:
    return str(v).strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class LaunchPlan:
    """What one launch does, from the environment accelerate gives each rank."""

    env: dict[str, str] = field(default_factory=dict)
    num_processes: int = 1  # over all machines
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int | None = None
    source: str = "environment"  # the config path, or "environment" on a rank

    # -- raw access ------------------------------------------------------------------------------
    def flag(self, name: str, default: str = "false") -> bool:
        return _true(self.env.get(name, default))

    # -- what runs -------------------------------------------------------------------------------
    @property
    def fsdp(self) -> bool:
        return self.flag("ACCELERATE_USE_FSDP")

    @property
    def deepspeed(self) -> bool:
        return self.flag("ACCELERATE_USE_DEEPSPEED")

    @property
    def backend(self) -> str:
        """fsdp | deepspeed | ddp | none: who distributes the model."""
        if self.fsdp:
            return "fsdp"
        if self.deepspeed:
            return "deepspeed"
        return "ddp" if self.num_processes > 1 else "none"

    @property
    def launched(self) -> bool:
        """True under `accelerate launch` (it always hands over the precision)."""
        return "ACCELERATE_MIXED_PRECISION" in self.env

    @property
    def use_cpu(self) -> bool:
        return self.flag("ACCELERATE_USE_CPU")

    @property
    def gpu_launch(self) -> bool:
        """A config meant for GPUs (use_cpu: false) under accelerate launch."""
        return self.launched and not self.use_cpu

    @property
    def mixed_precision(self) -> str:
        """The config's `mixed_precision` ("no" when not launched by accelerate)."""
        return self.env.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower() or "no"

    # -- FSDP ------------------------------------------------------------------------------------
    @property
    def fsdp_version(self) -> int:
        return int(self.env.get("FSDP_VERSION", "1"))

    @property
    def fsdp_strategy(self) -> str:
        """FULL_SHARD | SHARD_GRAD_OP | NO_SHARD | HYBRID_SHARD (FSDP2: from reshard_after_forward)."""
        if self.fsdp_version == 2:
            return "FULL_SHARD" if self.flag("FSDP_RESHARD_AFTER_FORWARD", "true") else "SHARD_GRAD_OP"
        s = self.env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
        return {"1": "FULL_SHARD", "2": "SHARD_GRAD_OP", "3": "NO_SHARD", "4": "HYBRID_SHARD"}.get(s, s)

    @property
    def fsdp_activation_checkpointing(self) -> bool:
        return self.fsdp and self.flag("FSDP_ACTIVATION_CHECKPOINTING")

    @property
    def fsdp_offload(self) -> bool:
        return self.fsdp and self.flag("FSDP_OFFLOAD_PARAMS")

    @property
    def fsdp_use_orig_params(self) -> bool:
        return self.flag("FSDP_USE_ORIG_PARAMS")

    @property
    def fsdp_state_dict_type(self) -> str:
        return self.env.get("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT")

    @property
    def fsdp_wrap_classes(self) -> list[str] | None:
        """The decoder-layer classes the config names (None: derived from the model)."""
        return [c.strip() for c in self.env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip()] or None

    @property
    def parallelism(self) -> bool:
        return self.flag("ACCELERATE_USE_PARALLELISM_CONFIG")

    # -- DeepSpeed -------------------------------------------------------------------------------
    @property
    def zero_stage(self) -> int | None:
        if not self.deepspeed:
            return None
        return int(self.env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2") or 2)

    @property
    def offload_optimizer(self) -> str:
        return self.env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none").lower() if self.deepspeed else "none"

    @property
    def offload_param(self) -> str:
        return self.env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none").lower() if self.deepspeed else "none"

    @property
    def zero3_save_16bit(self) -> bool:
        """ZeRO-3 gathers the whole model to rank 0 on save (zero3_save_16bit_model)."""
        return self.flag("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL")

    @property
    def zero3_init(self) -> bool:
        return self.zero_stage == 3 and self.flag("ACCELERATE_DEEPSPEED_ZERO3_INIT")

    # -- the same questions, for every backend ---------------------------------------------------
    @property
    def sharding(self) -> str:
        """none | full_shard | shard_grad_op | no_shard: what each rank keeps of the persistent state."""
        if self.fsdp:
            return {"FULL_SHARD": "full_shard", "SHARD_GRAD_OP": "shard_grad_op", "NO_SHARD": "no_shard",
                    "HYBRID_SHARD": "full_shard"}.get(self.fsdp_strategy, "full_shard")
        if self.deepspeed:
            return {3: "full_shard", 2: "shard_grad_op", 1: "shard_grad_op"}.get(self.zero_stage, "none")
        return "none"

    @property
    def offload(self) -> bool:
        """Parameters (FSDP, ZeRO-3 offload_param) or optimizer state (ZeRO-Offload) in host RAM."""
        return self.fsdp_offload or self.offload_optimizer == "cpu" or self.offload_param == "cpu"

    @property
    def processes_per_machine(self) -> int:
        return max(1, self.num_processes // max(1, self.num_machines))

    def describe(self) -> str:
        """One line: what distributes the model, over how many processes."""
        if self.fsdp:
            kind = f"FSDP{self.fsdp_version} {self.fsdp_strategy.lower()}"
        elif self.deepspeed:
            kind = f"DeepSpeed ZeRO-{self.zero_stage}"
            if self.offload:
                kind += f" (offload: optimizer {self.offload_optimizer}, parameters {self.offload_param})"
        else:
            kind = "DDP" if self.num_processes > 1 else "one process"
        return f"{kind} over {self.num_processes} processes on {self.num_machines} machine(s)"


def current(environ=None) -> LaunchPlan:
    """This rank's launch plan, from the environment the launcher (accelerate, torchrun) set."""
    e = os.environ if environ is None else environ
    env = {k: str(v) for k, v in e.items() if k.startswith(LAUNCH_PREFIXES)}
    world = int(e.get("WORLD_SIZE", "1"))
    local = int(e.get("LOCAL_WORLD_SIZE", str(world)) or world)
    port = e.get("MASTER_PORT")
    return LaunchPlan(env, num_processes=world, num_machines=max(1, world // max(1, local)),
                      machine_rank=int(e.get("GROUP_RANK", e.get("NODE_RANK", "0")) or 0),
                      main_process_ip=e.get("MASTER_ADDR"), main_process_port=int(port) if port else None)


def launch_args(config: str, *launch_flags: str):
    """accelerate's parsed and validated launch arguments for `accelerate launch --config_file CONFIG FLAGS`."""
    path = Path(config)
    if not path.is_file():
        raise UserError(f"accelerate config not found: {config}",
                        "pass --config accelerate_configs/NAME.yaml (the shipped ones are listed in docs/distributed.md)")
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
    )

    try:
        args = launch_command_parser().parse_args(["--config_file", str(path), *launch_flags, "run_recipe.py"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            args, defaults, mp_from_config_flag = _validate_launch_command(args)
        if args.use_deepspeed and not args.cpu:  # as accelerate's launch_command does before its DeepSpeed launcher
            fields = list(defaults.deepspeed_config.keys()) if defaults else []
            if mp_from_config_flag:
                fields.append("mixed_precision")
            args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - accelerate raises ValueError/TypeError/KeyError or exits
        raise UserError(f"accelerate rejects {config}: {type(e).__name__}: {e}",
                        "compare it with the shipped configs in accelerate_configs/") from None
    return args


def from_config(config: str, *launch_flags: str) -> LaunchPlan:
    """The plan `accelerate launch --config_file CONFIG [FLAGS]` would hand its ranks, built by accelerate.

    `launch_flags` are accelerate launch flags that override the config (`--num_processes 2`,
    `--machine_rank 1`, ...), as on a launch line.
    """
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    args = launch_args(config, *launch_flags)
    saved = {k: os.environ.pop(k) for k in [k for k in os.environ if k.startswith(LAUNCH_PREFIXES)]}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "port in use": the port is checked by the real launch
            if args.use_deepspeed:
                env = prepare_deepspeed_cmd_env(args)[1]
            elif args.use_fsdp or args.multi_gpu:
                env = prepare_multi_gpu_env(args)
            else:
                env = prepare_simple_launcher_cmd_env(args)[1]
    except (Exception, SystemExit) as e:  # noqa: BLE001
        raise UserError(f"accelerate cannot build the launch of {config}: {type(e).__name__}: {e}",
                        "compare it with the shipped configs in accelerate_configs/") from None
    finally:
        os.environ.update(saved)
    env = {k: str(v) for k, v in env.items() if k.startswith(LAUNCH_PREFIXES)}
    port = args.main_process_port
    return LaunchPlan(env, num_processes=int(args.num_processes or 1), num_machines=int(args.num_machines or 1),
                      machine_rank=int(args.machine_rank or 0), main_process_ip=args.main_process_ip,
                      main_process_port=int(port) if port else None, source=str(config))
