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
from llama_recipes.runtime.hardware import has_accelerator, recipe_bf16

log = get_logger(__name__)

# Diagnostic: when set, every rank writes {path}.rank{N}.json with what it holds (sharded or
# not, local parameter and optimizer-state bytes, per-step losses) -- see docs/distributed.md.
REPORT_ENV = "LLAMA_RECIPES_SHARDING_REPORT"


def _env_flag(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes")


def fsdp_requested() -> bool:
    """True when the launch config asked for FSDP (accelerate sets ACCELERATE_USE_FSDP)."""
    return _env_flag("ACCELERATE_USE_FSDP")


def fsdp_version() -> int:
    return int(os.environ.get("FSDP_VERSION", "1"))


def launch_precision() -> str:
    """The accelerate config's `mixed_precision` ("no" when not launched by accelerate)."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()


# ---------------------------------------------------------------------------------------------
# Before loading: recipe vs launch config
# ---------------------------------------------------------------------------------------------

def setup(recipe):
    """Check the recipe against the launch config; return the recipe with conflicts resolved.

    Raises UserError for a conflict that has no safe resolution. Installs the CPU FSDP shim
    only when FSDP was asked for, several processes run and no accelerator device exists.
    """
    # Order matters: conflicts are judged against the launch config as written (the same error
    # on a laptop as on the GPU node), and only then does the CPU stand-in replace what a CPU
    # cannot run; `auto` decides last, only what nobody else decided.
    recipe = resolve(recipe)
    if not has_accelerator():
        recipe = _cpu_stand_in(recipe)
    recipe = _resolve_auto_bf16(recipe)
    if world_size() > 1:
        kind = f"FSDP{fsdp_version()}" if fsdp_requested() else (
            "DeepSpeed" if _env_flag("ACCELERATE_USE_DEEPSPEED") else "DDP")
        log.info("distributed: %s over %d processes, mixed_precision=%s", kind, world_size(), launch_precision())
    return recipe


def resolve(recipe):
    """The recipe-by-config decisions every rank makes, read from the launch environment only.

    Shared by the launch (`setup`) and `--validate --config` (launchcheck.py), so a pair that
    validates is a pair that launches.
    """
    recipe = _resolve_activation_checkpointing(recipe)
    recipe = _resolve_mixed_precision(recipe)
    _check_qlora_under_fsdp(recipe)
    return recipe


def _check_qlora_under_fsdp(recipe) -> None:
    """FSDP shards floating tensors of one dtype: a 4-bit base must be stored in the model's dtype."""
    m = recipe.method
    if not fsdp_requested() or m.name != "qlora":
        return
    if m.bits == 8:
        raise UserError("method.bits: 8 (LLM.int8) cannot be sharded by FSDP",
                        "use method.bits: 4 with method.quant_storage_dtype: bfloat16, or a DDP/single-GPU config")
    want = recipe.model.dtype if recipe.model.dtype in ("bfloat16", "float16", "float32") else "bfloat16"
    if m.quant_storage_dtype != want:
        raise UserError(
            f"QLoRA under FSDP needs the 4-bit weights stored in the other parameters' dtype ({want}), and "
            f"method.quant_storage_dtype is {m.quant_storage_dtype or 'unset (uint8)'}",
            f"set method.quant_storage_dtype: {want} (accelerate_configs/fsdp_qlora.yaml explains why)")


def _set_training(recipe, **values):
    """A copy of the recipe with training fields set (recorded as set, so TRL receives them)."""
    training = recipe.training.model_copy(update=values)
    training.__pydantic_fields_set__.update(values)
    return recipe.model_copy(update={"training": training})


def _resolve_activation_checkpointing(recipe):
    """One place does activation checkpointing: FSDP (per wrapped layer) when its config asks.

    transformers raises if the trainer also checkpoints, so under a config with
    fsdp_activation_checkpointing the trainer's switch goes off. A recipe that asks for
    checkpointing (or says nothing: on by default) gets it once, from FSDP, with one log line.
    Only a real contradiction, the recipe saying false while the config says true, is an error.
    """
    if not (fsdp_requested() and _env_flag("FSDP_ACTIVATION_CHECKPOINTING")):
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


def _resolve_mixed_precision(recipe):
    """Mixed precision comes from one source: the recipe's training.bf16/fp16 or the config.

    A config with `mixed_precision: no` defers to the recipe. A config that names bf16/fp16
    decides for a recipe that is silent; a recipe that says otherwise is an error naming both.
    """
    launch = launch_precision()
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
# CPU STAND-IN: a GPU launch config run on a machine without GPUs (laptops, CI, tests)
# ---------------------------------------------------------------------------------------------
# Everything that differs from the GPU launch lives below this line; the recipe-by-config logic
# above runs unchanged, so a user's exact launch line (`accelerate launch --config_file
# accelerate_configs/fsdp_4gpu.yaml --num_processes 2 run_recipe.py RECIPE --dry-run ...`) is a
# smoke test of what the GPU node will do.

def gpu_launch() -> bool:
    """True under `accelerate launch` with a config meant for GPUs (use_cpu: false)."""
    return "ACCELERATE_MIXED_PRECISION" in os.environ and not _env_flag("ACCELERATE_USE_CPU")


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
            if _env_flag("FSDP_OFFLOAD_PARAMS"):
                log.info("CPU stand-in: fsdp_offload_params off (the shards already live in host memory, and "
                         "torch's CPU offload policy needs an accelerator)")
                os.environ["FSDP_OFFLOAD_PARAMS"] = "false"
            _install_cpu_fsdp_shim()
    return recipe


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
    if os.environ.get(REPORT_ENV):
        trainer.add_callback(_sharding_report_callback(os.environ[REPORT_ENV]))


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


def memory_report(model, optimizer) -> dict:
    """What this rank holds: parameters (local shards) and optimizer state, in bytes."""
    import torch
    from torch.distributed.tensor import DTensor

    params = list(dict.fromkeys(model.parameters()))
    report = {
        "rank": int(os.environ.get("RANK", "0")),
        "world_size": world_size(),
        **_accelerate_view(),
        "sharded": is_sharded(model),
        "dtensor_params": sum(isinstance(p, DTensor) for p in params),
        "params": len(params),
        "param_bytes_full": sum(p.numel() * p.element_size() for p in params),
        "param_bytes_local": sum(_local_bytes(p) for p in params),
        "optim_bytes_full": 0,
        "optim_bytes_local": 0,
    }
    if optimizer is not None:
        for state in optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    report["optim_bytes_full"] += v.numel() * v.element_size()
                    report["optim_bytes_local"] += _local_bytes(v)
    return report


def _accelerate_view() -> dict:
    from accelerate.state import PartialState

    state = PartialState()
    return {"processes_seen": state.num_processes, "distributed_type": str(state.distributed_type).split(".")[-1]}


def _sharding_report_callback(path: str):
    from transformers import TrainerCallback

    class ShardingReport(TrainerCallback):
        """Writes {path}.rank{N}.json after the first optimizer step and at the end of training."""

        def __init__(self):
            self.data = {}

        def _write(self):
            out = Path(f"{path}.rank{os.environ.get('RANK', '0')}.json")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(self.data, indent=1))

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
            if state.global_step == 1:
                self.data["memory"] = memory_report(model, optimizer)
                self._write()

        def on_train_end(self, args, state, control, model=None, **kw):
            import torch

            # Logits of the trained (still sharded) model on fixed ids: every rank takes part
            # in the forward; compared in a single process against the saved artifact.
            was_training = model.training
            model.eval()
            with torch.no_grad():
                ids = torch.arange(1, 17).unsqueeze(0).to(args.device)
                self.data["probe_logits"] = model(input_ids=ids).logits[0, :, :32].float().cpu().tolist()
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
