"""Every accelerate config under accelerate_configs/ parses, passes accelerate's own launch
validation, and sets what its header promises (checked through the environment the launcher
would hand to each rank, and the FSDP plugin accelerate builds from it)."""
import os
from unittest import mock

import pytest
import yaml
from conftest import ROOT

CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))
GPU_FSDP = ["fsdp_4gpu", "fsdp_8gpu", "fsdp_offload", "fsdp_qlora", "multinode_2x8_fsdp", "hybrid_2x8_fsdp"]


def _launch(path):
    """(args, per-rank env) exactly as `accelerate launch --config_file PATH` computes them: the
    launch plan (llama_recipes/runtime/launchplan.py runs accelerate's own parser and env builders)."""
    from llama_recipes.runtime import launchplan

    return launchplan.launch_args(str(path)), launchplan.from_config(str(path)).env


def _plugin(env):
    from accelerate.utils import FullyShardedDataParallelPlugin

    fsdp_env = {k: v for k, v in env.items() if k.startswith("FSDP_")}
    if fsdp_env["FSDP_VERSION"] == "1":
        # FSDP1's sync_module_states (forced by cpu_ram_efficient_loading) needs a GPU to build
        fsdp_env.update(FSDP_SYNC_MODULE_STATES="false", FSDP_CPU_RAM_EFFICIENT_LOADING="false")
    with mock.patch.dict(os.environ, fsdp_env):
        return FullyShardedDataParallelPlugin()


def test_the_promised_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"single_gpu", "ddp_4gpu", "ddp_8gpu", "fsdp1", "deepspeed_zero3", "cpu_ddp_2proc", "cpu_fsdp_2proc",
            *GPU_FSDP} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_has_header(path):
    text = path.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert text.startswith("#") and len(header) >= 3, f"{path.name}: header comment (when, GPUs, memory, launch line)"
    assert f"--config_file accelerate_configs/{path.name}" in text, f"{path.name}: header needs its launch line"
    args, env = _launch(path)
    data = yaml.safe_load(text)
    assert args.num_processes == data["num_processes"]
    if data["distributed_type"] == "FSDP":
        plugin = _plugin(env)
        assert plugin.fsdp_version == data["fsdp_config"]["fsdp_version"]
        assert plugin.transformer_cls_names_to_wrap is None, "wrap class must come from the model (non-Llama recipes)"
        assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"


@pytest.mark.parametrize("name", GPU_FSDP)
def test_gpu_fsdp_configs(name):
    from torch.distributed.fsdp import CPUOffloadPolicy

    args, env = _launch(ROOT / "accelerate_configs" / f"{name}.yaml")
    plugin = _plugin(env)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True  # full shard
    assert plugin.activation_checkpointing is True
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"  # checkpoints; the final save is full (distributed.py)
    assert isinstance(plugin.cpu_offload, CPUOffloadPolicy) == (name == "fsdp_offload")
    assert (env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true") == (name == "fsdp_qlora")


def test_fsdp1_keeps_original_parameters():
    args, env = _launch(ROOT / "accelerate_configs" / "fsdp1.yaml")
    plugin = _plugin(env)
    assert plugin.fsdp_version == 1 and plugin.use_orig_params is True
    assert env["FSDP_SYNC_MODULE_STATES"] == "true" and env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"


def test_multi_node_configs():
    for name, replicate in [("multinode_2x8_fsdp", None), ("hybrid_2x8_fsdp", 2)]:
        args, env = _launch(ROOT / "accelerate_configs" / f"{name}.yaml")
        assert args.num_machines == 2 and args.num_processes == 16 and args.main_process_ip
        if replicate:
            shard = int(env["PARALLELISM_CONFIG_DP_SHARD_SIZE"])
            assert int(env["PARALLELISM_CONFIG_DP_REPLICATE_SIZE"]) == replicate and replicate * shard == 16


def test_deepspeed_zero3():
    args, _ = _launch(ROOT / "accelerate_configs" / "deepspeed_zero3.yaml")
    assert args.use_deepspeed and args.zero_stage == 3 and args.zero3_save_16bit_model in (True, "true")


@pytest.mark.parametrize("name,stage,offload,machines,mixed", [
    ("deepspeed_zero2", 2, "none", 1, "bf16"), ("deepspeed_zero3", 3, "none", 1, "bf16"),
    ("deepspeed_zero3_offload", 3, "cpu", 1, "bf16"), ("multinode_2x8_deepspeed", 3, "none", 2, "bf16"),
    ("cpu_deepspeed_2proc", 3, "none", 1, "no")])
def test_deepspeed_configs_as_each_rank_gets_them(name, stage, offload, machines, mixed):
    from llama_recipes.runtime import launchplan

    plan = launchplan.from_config(str(ROOT / "accelerate_configs" / f"{name}.yaml"))
    assert plan.backend == "deepspeed" and plan.zero_stage == stage and plan.offload_optimizer == offload
    assert plan.num_machines == machines and plan.mixed_precision == mixed
    assert plan.zero3_init == (stage == 3)  # the model loads partitioned (distributed.setup registers the config)
    # the plan is what accelerate launch hands a rank: the same object read back from that environment
    again = launchplan.current({**plan.env, "WORLD_SIZE": str(plan.num_processes),
                                "LOCAL_WORLD_SIZE": str(plan.processes_per_machine)})
    assert (again.backend, again.zero_stage, again.sharding, again.num_machines) == \
        (plan.backend, plan.zero_stage, plan.sharding, plan.num_machines)
    if machines > 1:  # torchrun on each node, no pdsh/ssh: the localhost two-node test runs it
        assert launchplan.launch_args(str(ROOT / "accelerate_configs" / f"{name}.yaml")).deepspeed_multinode_launcher \
            == "standard"


@pytest.mark.parametrize("name,kind", [("cpu_ddp_2proc", "multi_gpu"), ("cpu_fsdp_2proc", "use_fsdp"),
                                       ("cpu_deepspeed_2proc", "use_deepspeed")])
def test_cpu_configs_really_fan_out(name, kind):
    """MULTI_CPU / --cpu would run ONE process without mpirun; these must use the GPU launcher."""
    args, env = _launch(ROOT / "accelerate_configs" / f"{name}.yaml")
    assert getattr(args, kind) and not args.cpu and args.num_processes == 2
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"  # fp32 on CPU
