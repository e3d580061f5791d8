"""All distributed glue in one place: launch-config checks, FSDP details, the final FSDP save.

accelerate and torch.distributed do the distributing. The launch (`accelerate launch
--config_file accelerate_configs/X.yaml`) hands its settings to every rank through the
environment (ACCELERATE_*, FSDP_*); this module reads them to

- refuse or resolve recipe/config conflicts before anything is loaded (`setup`):
  activation checkpointing and mixed precision each come from exactly one place, and FSDP1
  with frozen parameters needs `use_orig_params`;
- finish the FSDP plugin once the trainer exists (`prepare_trainer`): the layer class to wrap
  comes from the model when the config does not name one, bf16 reduces in fp32;
- write the final artifact from a sharded model without gathering it on every rank
  (`save_sharded_model`).

The CPU stand-in (`_cpu_stand_in`, with the FSDP shim) runs a GPU launch line on CPU processes
(laptops, CI, tests); everything it changes is below its marker line.
"""
import json
import os
from contextlib import contextmanager
from pathlib import Path

from llama_recipes.errors import UserError
from llama_recipes.log import get_logger, is_main_process, world_size
from llama_recipes.runtime import collectives, launchplan
from llama_recipes.runtime.hardware import has_accelerator, recipe_bf16
from llama_recipes.runtime.launchplan import LaunchPlan

log = get_logger(__name__)

# Diagnostic: when set, every rank writes {path}.rank{N}.json with what it holds (sharded or
# not, local parameter and optimizer-state bytes, per-step losses) -- see docs/distributed.md.
REPORT_ENV = "LLAMA_RECIPES_SHARDING_REPORT"


def plan() -> LaunchPlan:
    """This rank's launch plan (runtime/launchplan.py): the one reader of the launch environment."""
    return launchplan.current()


def fsdp_requested() -> bool:
    """True when the launch config asked for FSDP."""
    return plan().fsdp


def deepspeed_requested() -> bool:
    """True when the launch config asked for DeepSpeed."""
    return plan().deepspeed


def fsdp_version() -> int:
    return plan().fsdp_version


def launch_precision() -> str:
    """The accelerate config's `mixed_precision` ("no" when not launched by accelerate)."""
    return plan().mixed_precision


# ---------------------------------------------------------------------------------------------
# Before loading: recipe vs launch config
# ---------------------------------------------------------------------------------------------

def setup(recipe):
    """Check the recipe against the launch config; return the recipe with conflicts resolved.

    Raises UserError for a conflict that has no safe resolution. Installs the CPU FSDP or
    DeepSpeed shim only when one was asked for, several processes run and no accelerator exists.
    Under DeepSpeed ZeRO-3 with zero3_init_flag, puts the DeepSpeed config in force before the
    model loads, so that it loads partitioned (no rank holds the whole model).
    """
    # Order matters: conflicts are judged against the launch config as written (the same error
    # on a laptop as on the GPU node), and only then does the CPU stand-in replace what a CPU
    # cannot run; `auto` decides last, only what nobody else decided.
    recipe = resolve(recipe)
    if not has_accelerator():
        recipe = _cpu_stand_in(recipe)
    recipe = _resolve_auto_bf16(recipe)
    p = plan()
    if world_size() > 1:
        log.info("distributed: %s, mixed_precision=%s", p.describe(), p.mixed_precision)
    if p.deepspeed:
        _deepspeed_before_load(p)
    return recipe


def resolve(recipe, launch: LaunchPlan | None = None):
    """The recipe-by-config decisions every rank makes, read from the launch plan only.

    Shared by the launch (`setup`, this rank's plan) and `--validate --config` (launchcheck.py,
    the plan accelerate builds from the config), so a pair that validates is a pair that launches.
    """
    p = launch or plan()
    recipe = _resolve_activation_checkpointing(recipe, p)
    recipe = _resolve_mixed_precision(recipe, p)
    recipe = _resolve_qlora_storage(recipe, p)
    return recipe


def _resolve_qlora_storage(recipe, p: LaunchPlan):
    """FSDP shards floating tensors of one dtype: a 4-bit base is stored in the model's dtype.

    The launch config makes the value certain: a QLoRA recipe that does not name
    method.quant_storage_dtype gets it (one log line). A recipe that names another one, or
    8-bit (LLM.int8, not shardable), is a real contradiction.
    """
    m = recipe.method
    if not p.fsdp or m.name != "qlora":
        return recipe
    if m.bits == 8:
        raise UserError("method.bits: 8 (LLM.int8) cannot be sharded by FSDP",
                        "use method.bits: 4 (quant_storage_dtype follows the model dtype), or a DDP/single-GPU config")
    want = recipe.model.dtype if recipe.model.dtype in ("bfloat16", "float16", "float32") else "bfloat16"
    if m.quant_storage_dtype == want:
        return recipe
    if m.quant_storage_dtype is not None:
        raise UserError(
            f"QLoRA under FSDP needs the 4-bit weights stored in the other parameters' dtype ({want}), and "
            f"method.quant_storage_dtype is {m.quant_storage_dtype}",
            f"set method.quant_storage_dtype: {want}, or remove it (the FSDP config then sets it)")
    log.info("QLoRA under FSDP: method.quant_storage_dtype: %s (the 4-bit weights are stored in the model's dtype, "
             "so that FSDP can shard them with the rest; accelerate config)", want)
    method = m.model_copy(update={"quant_storage_dtype": want})
    method.__pydantic_fields_set__.add("quant_storage_dtype")
    return recipe.model_copy(update={"method": method})


def _set_training(recipe, **values):
    """A copy of the recipe with training fields set (recorded as set, so TRL receives them)."""
    training = recipe.training.model_copy(update=values)
    training.__pydantic_fields_set__.update(values)
    return recipe.model_copy(update={"training": training})


def _resolve_activation_checkpointing(recipe, p: LaunchPlan):
    """One place does activation checkpointing: FSDP (per wrapped layer) when its config asks.

    transformers raises if the trainer also checkpoints, so under a config with
    fsdp_activation_checkpointing the trainer's switch goes off. A recipe that asks for
    checkpointing (or says nothing: on by default) gets it once, from FSDP, with one log line.
    Only a real contradiction, the recipe saying false while the config says true, is an error.
    """
    if not p.fsdp_activation_checkpointing:
        return recipe
    t = recipe.training
    if recipe.method.name == "prefix":
        raise UserError(
            "method prefix cannot run with activation checkpointing (the prefix is passed as a KV cache), and the "
            "accelerate config checkpoints every layer (fsdp_activation_checkpointing: true)",
            "launch with a copy of the config that sets fsdp_activation_checkpointing: false, or with a DDP config")
    if "activation_checkpointing" in t.model_fields_set and not t.activation_checkpointing:
        raise UserError(
            "activation checkpointing is set twice and disagrees: training.activation_checkpointing: false in the "
            "recipe, fsdp_activation_checkpointing: true in the accelerate config",
            "remove training.activation_checkpointing from the recipe (FSDP checkpoints each wrapped layer), "
            "or set fsdp_activation_checkpointing: false in the accelerate config")
    log.info("activation checkpointing: done once, by FSDP per wrapped layer (accelerate config); off in the trainer")
    return _set_training(recipe, activation_checkpointing=False)


def _resolve_auto_bf16(recipe):
    """`training.bf16: auto` (the default) becomes true or false for this machine, in one log line.

    A launch config that names a precision has already decided (above); auto only decides
    what nobody else did.
    """
    t = recipe.training
    if t.bf16 != "auto":
        return recipe
    use, why = recipe_bf16(recipe)
    log.info("precision: %s (training.bf16: auto; %s)", "bf16 autocast" if use else "fp32", why)
    return _set_training(recipe, bf16=use)


def _resolve_mixed_precision(recipe, p: LaunchPlan):
    """Mixed precision comes from one source: the recipe's training.bf16/fp16 or the config.

    A config with `mixed_precision: no` defers to the recipe. A config that names bf16/fp16
    decides for a recipe that is silent; a recipe that says otherwise is an error naming both.
    """
    launch = p.mixed_precision
    if launch in ("no", ""):
        return recipe
    t = recipe.training
    set_ = t.model_fields_set
    recipe_says = None
    if "fp16" in set_ and t.fp16:
        recipe_says = "fp16"
    elif "bf16" in set_ and t.bf16 is True:
        recipe_says = "bf16"
    elif ("bf16" in set_ and t.bf16 is False) and ("fp16" not in set_ or not t.fp16):
        recipe_says = "no (fp32)"
    if recipe_says is None:
        if launch == "fp16":
            return _set_training(recipe, fp16=True, bf16=False)
        if launch == "bf16":
            return _set_training(recipe, bf16=True, fp16=False)
        return recipe
    if recipe_says != launch:
        key = "fp16" if recipe_says == "fp16" else "bf16"
        raise UserError(
            f"mixed precision is set twice and disagrees: training.{key} in the recipe means "
            f"{recipe_says}, the accelerate config says mixed_precision: {launch}",
            "remove training.bf16/fp16 from the recipe (the config decides), or launch with a config "
            "whose mixed_precision is 'no' (the recipe decides)")
    return recipe


# ---------------------------------------------------------------------------------------------
# DeepSpeed: the config in force before the model loads, plain weights for readers
# ---------------------------------------------------------------------------------------------
# Kept alive for the run: transformers holds only a weak reference to the DeepSpeed config.
_DS_PLUGIN: list = []


def _deepspeed_before_load(p: LaunchPlan) -> None:
    """Under ZeRO-3: the final artifact is gathered to rank 0, and zero3_init_flag takes effect.

    - The Trainer writes the final model through accelerate's get_state_dict, which under ZeRO-3
      gathers the partitions to rank 0 only when stage3_gather_16bit_weights_on_model_save is on
      (the config's zero3_save_16bit_model); otherwise it raises, or writes a DeepSpeed checkpoint
      that is not a model directory. So it is on, in one log line when the config left it off.
    - transformers loads a model partitioned (deepspeed.zero.Init) only while a ZeRO-3 config is
      registered, and the Trainer registers it when its arguments are built, after the model has
      loaded: every rank would materialise the whole model first. With zero3_init_flag the
      launch's DeepSpeed config is registered here, before anything loads.
    """
    if p.zero_stage != 3:
        return
    if not p.zero3_save_16bit:
        os.environ["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] = "true"
        log.info("DeepSpeed ZeRO-3: the final artifact is gathered to rank 0 (zero3_save_16bit_model on): a normal "
                 "model or adapter directory, not a DeepSpeed checkpoint")
    if not p.zero3_init or _DS_PLUGIN:
        return
    from accelerate.utils import DeepSpeedPlugin

    if not has_accelerator() and world_size() > 1:
        from deepspeed import comm

        if not comm.is_initialized():  # zero.Init needs the process group; the stand-in's is gloo
            comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision(plan().mixed_precision)
    plugin.set_deepspeed_weakref()
    _DS_PLUGIN.append(plugin)
    log.info("DeepSpeed ZeRO-3 zero3_init_flag: the model loads partitioned over %d processes (deepspeed.zero.Init); "
             "no rank holds it whole", world_size())


@contextmanager
def evaluable(trainer):
    """The trainer's model, ready for a forward outside training (the before/after eval).

    Under ZeRO-3 with zero3_init_flag the model is partitioned from the moment it loads, but
    DeepSpeed installs the hooks that gather a layer for its forward only when its engine is
    built, inside trainer.train(). Before that, the parameters are gathered for the duration
    (every rank holds the whole model while it evaluates: for a model that does not fit one
    device, set eval.before_after: false). After training the engine's hooks do it layer by layer.
    """
    model = trainer.model
    engine_built = trainer.model_wrapped is not model
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_tensor")]
    if not partitioned or engine_built:
        yield model
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield model


# ---------------------------------------------------------------------------------------------
# CPU STAND-IN: a GPU launch config run on a machine without GPUs (laptops, CI, tests)
# ---------------------------------------------------------------------------------------------
# Everything that differs from the GPU launch lives below this line; the recipe-by-config logic
# above runs unchanged, so a user's exact launch line (`accelerate launch --config_file
# accelerate_configs/fsdp_4gpu.yaml --num_processes 2 run_recipe.py RECIPE --dry-run ...`) is a
# smoke test of what the GPU node will do.

def gpu_launch() -> bool:
    """True under `accelerate launch` with a config meant for GPUs (use_cpu: false)."""
    return plan().gpu_launch


def _cpu_stand_in(recipe):
    """Make a GPU launch runnable on CPU processes over gloo, saying in one line what changed.

    - precision (only under a GPU launch config): bf16/fp16, from the config or the recipe's
      training and model.dtype, runs as fp32. torch's FSDP2 bf16 policy fails on CPU, fp16 has
      no CPU autocast, and a bf16 trained model cannot be compared with its reload to fp32
      tolerance; fp32 answers the stand-in's question: does this pair train, save and reload.
    - several processes: accelerate would give each rank its own single-process run
      (distributed_type NO) and they would silently train side by side, so it is told to use
      the CPU; FSDP goes through the shim below, FSDP1 without sync_module_states/RAM-efficient
      loading (they broadcast from a GPU; here every rank loads the same checkpoint).
    """
    if gpu_launch():
        t, changed = recipe.training, []
        if launch_precision() in ("bf16", "fp16"):  # the recipe agrees or is silent (resolve checked)
            changed.append(f"mixed_precision: {launch_precision()} (launch config)")
            os.environ["ACCELERATE_MIXED_PRECISION"] = "no"
        else:
            changed += [f"training.{k}: true" for k in ("bf16", "fp16") if getattr(t, k) is True]
        if recipe.model.dtype in ("bfloat16", "float16"):
            changed.append(f"model.dtype: {recipe.model.dtype}")
            recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"dtype": "float32"})})
        if changed:
            log.info("CPU stand-in: no GPU here, so fp32 in place of %s", ", ".join(changed))
            recipe = _set_training(recipe, bf16=False, fp16=False)
    elif getattr(recipe.training, "fp16", False) is True:  # CPU torch has no fp16 autocast: fp32, recorded as fp16
        raise UserError("training.fp16: true without a GPU: the CPU has no fp16 mixed precision, so the run would train "
                        "in fp32 (bit for bit) and be recorded as fp16",
                        "remove training.fp16 (training.bf16: auto uses bf16 where this CPU has it natively)")
    if world_size() > 1:
        os.environ["ACCELERATE_USE_CPU"] = "true"
        if fsdp_requested():
            if fsdp_version() == 1:
                os.environ["FSDP_SYNC_MODULE_STATES"] = "false"
                os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
            if plan().fsdp_offload:
                log.info("CPU stand-in: fsdp_offload_params off (the shards already live in host memory, and "
                         "torch's CPU offload policy needs an accelerator)")
                os.environ["FSDP_OFFLOAD_PARAMS"] = "false"
            _install_cpu_fsdp_shim()
        if deepspeed_requested():
            p = plan()
            if p.offload_optimizer != "none" or p.offload_param != "none":
                log.info("CPU stand-in: DeepSpeed offload (optimizer %s, parameters %s) off: the state already lives "
                         "in host memory, and ZeRO-Offload's CPU Adam is a compiled op this stand-in does not build",
                         p.offload_optimizer, p.offload_param)
                os.environ["ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"] = "none"
                os.environ["ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"] = "none"
            _install_cpu_deepspeed_shim()
    return recipe


def _install_cpu_deepspeed_shim() -> None:
    """TEST/LAPTOP SUPPORT ONLY: let accelerate's real DeepSpeed preparation run on CPU over gloo.

    accelerate 1.15/1.16 switches AcceleratorState to DEEPSPEED only when the CPU was not asked
    for (`not cpu`), and without a GPU it must be asked for, or it forms no process group: the
    state stays MULTI_CPU and a DeepSpeed launch silently trains as DDP. DeepSpeed itself runs on
    CPU (its CPU accelerator, gloo). After accelerate builds its MULTI_CPU state (gloo group
    formed), this hands the group to deepspeed.comm and makes the state DEEPSPEED with the
    launch's DeepSpeedPlugin, as accelerate does on a GPU; from there on it is the real code
    (the Trainer's deepspeed.initialize, ZeRO partitioning, the engine's step).
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_llama_recipes_cpu_deepspeed", False):
        return

    def __init__(self, *args, deepspeed_plugin=None, **kwargs):
        original(self, *args, deepspeed_plugin=deepspeed_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU:
            from deepspeed import comm

            if not comm.is_initialized():
                comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
            plugin = deepspeed_plugin if deepspeed_plugin is not None else DeepSpeedPlugin()
            plugin.set_mixed_precision(self._mixed_precision)
            plugin.select(_from_accelerator_state=True)
            self.deepspeed_plugins = plugin
            self.distributed_type = DistributedType.DEEPSPEED
            PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
            self._mixed_precision = "no"  # DeepSpeed's config holds the precision

    __init__._llama_recipes_cpu_deepspeed = True
    AcceleratorState.__init__ = __init__
    log.warning("CPU DeepSpeed shim installed (test/debug support): accelerate's DeepSpeed runs on gloo")


def _install_cpu_fsdp_shim() -> None:
    """TEST/LAPTOP SUPPORT ONLY: let accelerate's real FSDP preparation run on CPU over gloo.

    accelerate 1.15 switches AcceleratorState to FSDP only for GPU-like devices; on CPU it
    stays MULTI_CPU and FSDP2 silently becomes DDP (FSDP1 raises). torch's FSDP itself works
    on CPU/gloo. After accelerate builds its state, this turns MULTI_CPU into FSDP and
    attaches the FullyShardedDataParallelPlugin built from the launch's FSDP_* environment,
    so everything downstream (Trainer, accelerate's fully_shard path) is the real code.
    Installed only when FSDP was asked for, WORLD_SIZE > 1 and no accelerator exists.
    """
    import torch
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    original = AcceleratorState.__init__
    if getattr(original, "_llama_recipes_cpu_fsdp", False):
        return

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU:
            plugin = fsdp_plugin if fsdp_plugin is not None else FullyShardedDataParallelPlugin()
            if self._mixed_precision != "no":
                plugin.set_mixed_precision(self._mixed_precision)
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            # MULTI_CPU names the device cpu:0; FSDP1 checks its device_id against the current
            # device, which is plain "cpu".
            self.device = PartialState._shared_state["device"] = torch.device("cpu")

    __init__._llama_recipes_cpu_fsdp = True
    AcceleratorState.__init__ = __init__
    log.warning("CPU FSDP shim installed (test/debug support): accelerate's FSDP runs on gloo")


# ---------------------------------------------------------------------------------------------
# After the trainer exists: finish the FSDP plugin, attach the sharding report
# ---------------------------------------------------------------------------------------------

def prepare_trainer(trainer) -> None:
    """Complete the FSDP plugin for this model before the trainer wraps it; add the report."""
    seen = trainer.accelerator.num_processes
    if seen != world_size():
        raise UserError(f"the launcher started {world_size()} processes but the trainer sees {seen}",
                        "launch with a MULTI_GPU or FSDP accelerate config (see accelerate_configs/), not --cpu/MULTI_CPU")
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is not None:
        finish_fsdp_plugin(plugin, trainer.model)
        _plain_names_in_checkpoints(trainer)
    if os.environ.get(REPORT_ENV) or (world_size() > 1 and plan().backend in ("fsdp", "deepspeed")):
        trainer.add_callback(_sharding_report_callback(os.environ.get(REPORT_ENV)))


def _plain_names_in_checkpoints(trainer) -> None:
    """Intermediate FSDP checkpoints are written and read with the plain module names.

    With fsdp_activation_checkpointing, torch's CheckpointWrapper renames every layer
    (`layers.0._checkpoint_wrapped_module...`), and PEFT picks the adapter's entries by module
    name: the Trainer's sharded checkpoint then held NO model tensor (0 keys) and a resume
    silently restarted the adapter from its initialisation (loss 6.3 -> 11.0 at the first resumed
    step of tests/test_multinode.py). Saving and loading inside `_plain_module_names`, as the
    final save does, keeps them (checkpoint-N/pytorch_model_fsdp_0 has every adapter tensor).
    """
    save, load = trainer._save_checkpoint, trainer._load_from_checkpoint

    def _save_checkpoint(model, trial=None):
        with _plain_module_names(trainer.accelerator.unwrap_model(trainer.model)):
            return save(model, trial)

    def _load_from_checkpoint(resume_from_checkpoint, model=None):
        with _plain_module_names(trainer.accelerator.unwrap_model(trainer.model)):
            return load(resume_from_checkpoint, model)

    trainer._save_checkpoint = _save_checkpoint
    trainer._load_from_checkpoint = _load_from_checkpoint


def finish_fsdp_plugin(plugin, model) -> None:
    """Check and complete accelerate's FSDP plugin for this model (before it is wrapped)."""
    _check_fsdp1_orig_params(plugin, model)
    _set_wrap_classes(plugin, model)
    _reduce_in_fp32(plugin)


def _check_fsdp1_orig_params(plugin, model) -> None:
    check_fsdp1_orig_params(plugin.fsdp_version, plugin.use_orig_params,
                            [n for n, p in model.named_parameters() if not p.requires_grad])


def check_fsdp1_orig_params(version: int, use_orig_params: bool, frozen: list[str]) -> None:
    """FSDP1 flattens parameters: mixed requires_grad (adapters, freezing, heads) needs use_orig_params."""
    if version != 1 or use_orig_params or not frozen:
        return
    raise UserError(
        f"FSDP1 with frozen parameters ({len(frozen)}, e.g. {frozen[0]}) needs use_orig_params, "
        "and the accelerate config sets fsdp_use_orig_params: false",
        "set fsdp_use_orig_params: true in the accelerate config (accelerate_configs/fsdp1.yaml does), "
        "or use FSDP2 (fsdp_version: 2), which handles mixed requires_grad")


def wrap_class_names(model) -> list[str]:
    """The decoder-layer classes to shard one by one: the model's `_no_split_modules`."""
    names = getattr(model, "_no_split_modules", None)
    if not names:  # a PEFT wrapper or a task head around the transformer: ask the transformer
        names = next((m._no_split_modules for m in model.modules() if getattr(m, "_no_split_modules", None)), None)
    return list(names or [])


def _set_wrap_classes(plugin, model) -> None:
    """Transformer-based wrapping on the model's own layer class unless the config names one."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    if plugin.auto_wrap_policy is not transformer_auto_wrap_policy:
        return
    named = plugin.transformer_cls_names_to_wrap
    classes = wrap_classes(named, wrap_class_names(model), {type(m).__name__ for m in model.modules()},
                           type(model).__name__)
    if not named:
        plugin.transformer_cls_names_to_wrap = classes
        log.info("FSDP wraps %s (from the model's _no_split_modules)", ", ".join(classes))


def wrap_classes(named: list[str] | None, derived: list[str], present: set[str], model_name: str) -> list[str]:
    """The layer classes FSDP wraps: the config's, else the model's `_no_split_modules`.

    A config that names a class this model lacks (LlamaDecoderLayer on Qwen2) is an error
    that says which classes the model has, instead of accelerate's bare ValueError.
    """
    if not named:
        if not derived:
            raise UserError(f"cannot derive the FSDP wrap class: {model_name} has no _no_split_modules",
                            "set fsdp_transformer_layer_cls_to_wrap (the decoder layer class) in the accelerate config")
        return list(derived)
    missing = [n for n in named if n not in present]
    if missing:
        raise UserError(
            f"the accelerate config wraps {', '.join(missing)}, which {model_name} does not contain",
            f"remove fsdp_transformer_layer_cls_to_wrap from the config (derived from the model: "
            f"{', '.join(derived) or 'none'}) or name this model's decoder layer class")
    return list(named)


def _reduce_in_fp32(plugin) -> None:
    """bf16 FSDP2: compute in bf16, reduce-scatter gradients in fp32 (accelerate reduces in bf16)."""
    import torch

    policy = plugin.mixed_precision_policy
    if plugin.fsdp_version != 2 or policy is None or policy.param_dtype != torch.bfloat16:
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin.mixed_precision_policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=policy.output_dtype,
        cast_forward_inputs=policy.cast_forward_inputs)


@contextmanager
def full_params_for_generate(model):
    """`model.generate` on an FSDP1 model: the whole parameters, gathered for the duration.

    FSDP1 gathers a unit's parameters in its wrapper's forward, but `generate` is reached
    through the wrapper's attribute forwarding and calls the inner model directly, which then
    sees flattened shards ("'weight' must be 2-D"). FSDP2 hooks the modules themselves, and an
    unsharded model needs nothing: both pass through.
    """
    if type(model).__name__ != "FullyShardedDataParallel":
        yield model
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(model, writeback=False):
        yield model


def is_sharded(model) -> bool:
    """True for an FSDP2 model (DTensor parameters) or an FSDP1 wrapper."""
    from torch.distributed.tensor import DTensor

    if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        return True
    return any(isinstance(p, DTensor) for p in model.parameters())


def _local_bytes(t) -> int:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def _param_bytes(p) -> tuple[int, int]:
    """(whole, held by this rank) bytes of a parameter: FSDP2 DTensor, ZeRO-3 partition, or plain."""
    part = getattr(p, "ds_tensor", None)  # DeepSpeed ZeRO-3: p itself is an empty placeholder
    if part is not None:
        return p.ds_numel * part.element_size(), part.numel() * part.element_size()
    return p.numel() * p.element_size(), _local_bytes(p)


def _inner_optimizer(optimizer):
    """torch's optimizer inside accelerate's wrapper and DeepSpeed's ZeRO optimizer."""
    seen = set()
    while hasattr(optimizer, "optimizer") and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    return optimizer


def memory_report(model, optimizer) -> dict:
    """What this rank holds: parameters (local shards) and optimizer state, in bytes.

    Collective under DeepSpeed (every rank calls it): ZeRO keeps the optimizer state as flat
    partitions, so the whole is the sum over ranks. `master_bytes_local` is ZeRO's fp32 copy of
    this rank's partition of the trained parameters (what its optimizer steps on).
    """
    import resource

    import torch
    from torch.distributed.tensor import DTensor

    params = list(dict.fromkeys(model.parameters()))
    sizes = [_param_bytes(p) for p in params]
    p = plan()
    report = {
        "rank": int(os.environ.get("RANK", "0")),
        "world_size": world_size(),
        **_accelerate_view(),
        "zero_stage": p.zero_stage,
        "sharded": is_sharded(model),
        "dtensor_params": sum(isinstance(p, DTensor) for p in params),
        "zero3_params": sum(hasattr(p, "ds_tensor") for p in params),
        "params": len(params),
        "param_bytes_full": sum(full for full, _ in sizes),
        "param_bytes_local": sum(local for _, local in sizes),
        "optim_bytes_full": 0,
        "optim_bytes_local": 0,
        "master_bytes_local": 0,
        # this process's peak resident memory so far (the model load included): Linux reports KiB
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if optimizer is not None:
        inner = _inner_optimizer(optimizer)
        for state in inner.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    report["optim_bytes_full"] += v.numel() * v.element_size()
                    report["optim_bytes_local"] += _local_bytes(v)
        if p.deepspeed:
            # the keys of the optimizer state: ZeRO-3 empties param_groups between steps
            report["master_bytes_local"] = sum(q.numel() * q.element_size() for q in inner.state
                                               if isinstance(q, torch.Tensor))
            report["optim_bytes_full"] = int(collectives.all_sum([float(report["optim_bytes_local"])])[0])
    return report


def sharding_line(reports: list[dict]) -> str:
    """One log line: what each rank holds of the parameters and the optimizer state."""
    mib = 2 ** 20
    held = "; ".join(f"rank {r['rank']} {r['param_bytes_local'] / mib:.2f} of {r['param_bytes_full'] / mib:.2f} MiB "
                     f"parameters, {r['optim_bytes_local'] / mib:.2f} of {r['optim_bytes_full'] / mib:.2f} MiB optimizer "
                     "state" for r in reports)
    return f"sharding ({reports[0]['distributed_type']}{'' if reports[0]['zero_stage'] is None else ' ZeRO-' + str(reports[0]['zero_stage'])}): {held}"


def _accelerate_view() -> dict:
    from accelerate.state import PartialState

    state = PartialState()
    return {"processes_seen": state.num_processes, "distributed_type": str(state.distributed_type).split(".")[-1]}


def _sharding_report_callback(path: str | None):
    from transformers import TrainerCallback

    class ShardingReport(TrainerCallback):
        """Logs what each rank holds after the first optimizer step; with a path, writes
        {path}.rank{N}.json then and at the end of training."""

        def __init__(self):
            self.data = {}

        def _write(self):
            if not path:
                return
            out = Path(f"{path}.rank{os.environ.get('RANK', '0')}.json")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(self.data, indent=1))

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
            if state.global_step == 1:
                self.data["memory"] = memory_report(model, optimizer)
                every = collectives.all_gather_object(self.data["memory"])
                log.info("%s", sharding_line(every))
                self._write()

        def on_train_end(self, args, state, control, model=None, **kw):
            import torch

            if not path:
                return
            # Logits of the trained (still sharded) model on fixed ids: every rank takes part
            # in the forward; compared in a single process against the saved artifact.
            was_training = model.training
            model.eval()
            with torch.no_grad():
                ids = torch.arange(1, 17).unsqueeze(0).to(args.device)
                logits = model(input_ids=ids).logits  # (1, seq, vocab); a sequence classifier's (1, labels)
                self.data["probe_logits"] = (logits[0, :, :32] if logits.dim() == 3 else logits).float().cpu().tolist()
            model.train(was_training)
            self._write()

    return ShardingReport()


# ---------------------------------------------------------------------------------------------
# Final save from a sharded model
# ---------------------------------------------------------------------------------------------

def save_sharded_model(trainer, out: Path) -> None:
    """Write a normal adapter/model directory from an FSDP model; the main process writes.

    All ranks take part in gathering; with full_state_dict + cpu_offload, torch hands the full
    tensors to rank 0 only (on CPU), the other ranks get an empty dict: no rank but the writer
    holds a full copy. (trainer.save_model fails here under FSDP2 on CPU and writes a sharded
    checkpoint, not a loadable model, with SHARDED_STATE_DICT on GPU.)
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    model = trainer.model
    # Without an accelerator the tensors already live in host memory, and FSDP1's CPU-offload
    # gather segfaults there (torch 2.13): every rank gathers the (small, stand-in) model instead.
    offload = has_accelerator()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=offload))
    if is_main_process():
        unwrapped = trainer.accelerator.unwrap_model(model)
        with _plain_module_names(unwrapped):
            unwrapped.save_pretrained(str(out), state_dict=state)
    trainer.accelerator.wait_for_everyone()


@contextmanager
def _plain_module_names(model):
    """While an artifact is written: the modules named as in the plain model.

    FSDP puts wrappers around layers: FSDP1's FullyShardedDataParallel (`_fsdp_wrapped_module`)
    and, with activation checkpointing, torch's CheckpointWrapper (`_checkpoint_wrapped_module`),
    so module names read `layers.0._checkpoint_wrapped_module.self_attn...`. The gathered state
    dict already uses the plain names (torch strips the wrappers), but PEFT picks the adapter's
    entries by the model's module names: with the wrappers in place it matches none and writes an
    empty adapter. The wrappers are put back afterwards; no tensor is touched.
    """
    inner = {"CheckpointWrapper": "_checkpoint_wrapped_module", "FullyShardedDataParallel": "_fsdp_wrapped_module"}

    def wrapped(module):
        return next((getattr(module, attr) for cls in type(module).__mro__
                     if (attr := inner.get(cls.__name__)) and hasattr(module, attr)), None)

    swapped = []
    changed = True
    while changed:  # wrappers can nest (FSDP1 around a CheckpointWrapper)
        changed = False
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                plain = wrapped(child)
                if plain is not None:
                    parent._modules[name] = plain
                    swapped.append((parent, name, child))
                    changed = True
    try:
        yield model
    finally:
        for parent, name, child in reversed(swapped):
            parent._modules[name] = child
