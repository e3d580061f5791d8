"""The per-node launch lines a cluster runs (llama_recipes/runtime/cluster.py, scripts/slurm/llama_recipes.sbatch),
checked as text here; tests/test_multinode.py (slow) runs the same lines as two localhost nodes."""
import os
import subprocess
import sys

from conftest import ROOT

from llama_recipes.runtime import cluster


def lines(launcher: str, config: str, node: int, extra_env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SLURM_NNODES": "2", "SLURM_NODEID": str(node), "SLURM_JOB_ID": "77",
           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29555", **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "llama_recipes.runtime.cluster", "--launcher", launcher, "--config",
                           f"accelerate_configs/{config}.yaml", "--procs-per-node", "8", "--print-only", "--",
                           "run_recipe.py", "recipes/full_alpaca.yaml"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_accelerate_lines_differ_only_in_the_machine_rank():
    a, b = (lines("accelerate", "multinode_2x8_fsdp", n) for n in (0, 1))
    assert a.returncode == b.returncode == 0, a.stderr
    la, lb = a.stdout.strip(), b.stdout.strip()
    assert la.startswith("node 0/2: ") and lb.startswith("node 1/2: ")
    for want in ("--num_machines 2", "--main_process_ip 10.0.0.1", "--main_process_port 29555", "--num_processes 16",
                 "run_recipe.py recipes/full_alpaca.yaml"):
        assert want in la
    assert la.split("--machine_rank 0")[1] == lb.split("--machine_rank 1")[1]


def test_torchrun_lines_carry_the_launch_plan():
    """torchrun alone would run DDP: the line exports what accelerate hands a DeepSpeed rank."""
    r = lines("torchrun", "multinode_2x8_deepspeed", 1)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    for want in ("ACCELERATE_USE_DEEPSPEED=true", "ACCELERATE_DEEPSPEED_ZERO_STAGE=3", "ACCELERATE_DEEPSPEED_ZERO3_INIT=true",
                 "torch.distributed.run --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d",
                 "--rdzv-endpoint 10.0.0.1:29555 --rdzv-id 77"):
        assert want in line, line


def test_outside_slurm_is_a_clear_error():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run([sys.executable, "-m", "llama_recipes.runtime.cluster", "--config",
                        "accelerate_configs/multinode_2x8_fsdp.yaml", "--", "run_recipe.py", "x.yaml"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not inside a SLURM job step: SLURM_NNODES, SLURM_NODEID unset" in r.stderr


def test_the_sbatch_template_runs_the_cluster_entry_once_per_node():
    text = (ROOT / "scripts/slurm/llama_recipes.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1" in text
    assert "srun --kill-on-bad-exit=1 python -m llama_recipes.runtime.cluster" in text
    assert set(cluster.LAUNCHERS) == {"accelerate", "torchrun"}
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts/slurm/llama_recipes.sbatch")]).returncode == 0
