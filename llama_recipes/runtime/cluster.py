"""Where a cluster schedules the job: the per-node launch line, for SLURM or any scheduler.

Every node runs one launcher; the launchers meet at node 0's address and start the ranks.
This module writes that one line per node from the launch plan, for two launchers:

- `accelerate`: `accelerate launch --config_file CONFIG --num_machines N --machine_rank R
  --main_process_ip HEAD --main_process_port PORT --num_processes N*K run_recipe.py ...`
  (accelerate builds the ranks' environment from the config itself);
- `torchrun`: `torchrun --nnodes N --nproc_per_node K --rdzv-backend c10d --rdzv-endpoint
  HEAD:PORT --rdzv-id JOB run_recipe.py ...`, with the environment accelerate would have handed
  the ranks (the launch plan's, from runtime/launchplan.py) exported in front, so FSDP or
  DeepSpeed is what runs, not plain DDP. c10d rendezvous assigns the node ranks itself.

Under SLURM, `scripts/slurm/llama_recipes.sbatch` runs one task per node:

    srun python -m llama_recipes.runtime.cluster --launcher accelerate --config CONFIG -- run_recipe.py RECIPE

which reads SLURM_NNODES, SLURM_NODEID, SLURM_JOB_ID and the head node (MASTER_ADDR, else the
first host of SLURM_JOB_NODELIST through `scontrol show hostnames`), prints its line and runs it.
The same entry point with the SLURM variables set by hand is how tests/test_multinode.py starts
its two localhost "nodes".
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass

from llama_recipes.errors import UserError
from llama_recipes.runtime import launchplan


@dataclass
class Node:
    """One node's place in the job."""

    rank: int
    nodes: int
    head: str  # node 0's address, where the launchers meet
    port: int
    procs_per_node: int
    job_id: str = "llama-recipes"


def accelerate_line(config: str, node: Node, script: list[str]) -> tuple[dict[str, str], list[str]]:
    """(extra environment, argv) of `accelerate launch` on this node."""
    return {}, [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
                "--num_machines", str(node.nodes), "--machine_rank", str(node.rank),
                "--main_process_ip", node.head, "--main_process_port", str(node.port),
                "--num_processes", str(node.nodes * node.procs_per_node), *script]


def torchrun_line(config: str, node: Node, script: list[str]) -> tuple[dict[str, str], list[str]]:
    """(the ranks' environment from the launch plan, argv) of torchrun with c10d rendezvous on this node."""
    plan = launchplan.from_config(config, "--num_machines", str(node.nodes), "--machine_rank", str(node.rank),
                                  "--num_processes", str(node.nodes * node.procs_per_node),
                                  "--main_process_ip", node.head, "--main_process_port", str(node.port))
    return dict(plan.env), [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(node.nodes),
                            "--nproc_per_node", str(node.procs_per_node), "--rdzv-backend", "c10d",
                            "--rdzv-endpoint", f"{node.head}:{node.port}", "--rdzv-id", node.job_id, *script]


LAUNCHERS = {"accelerate": accelerate_line, "torchrun": torchrun_line}


def node_from_slurm(environ=None, procs_per_node: int | None = None) -> Node:
    """This node's place, from the variables SLURM sets in each task (MASTER_ADDR/PORT may override)."""
    e = os.environ if environ is None else environ
    missing = [k for k in ("SLURM_NNODES", "SLURM_NODEID") if k not in e]
    if missing:
        raise UserError(f"not inside a SLURM job step: {', '.join(missing)} unset",
                        "run this through srun (scripts/slurm/llama_recipes.sbatch), or set them by hand")
    head = e.get("MASTER_ADDR")
    if not head:
        hosts = subprocess.run(["scontrol", "show", "hostnames", e["SLURM_JOB_NODELIST"]], capture_output=True,
                               text=True, check=True).stdout.split()
        head = hosts[0]
    k = procs_per_node or int(e.get("SLURM_GPUS_ON_NODE") or e.get("SLURM_NTASKS_PER_NODE_GPUS") or 1)
    return Node(rank=int(e["SLURM_NODEID"]), nodes=int(e["SLURM_NNODES"]), head=head,
                port=int(e.get("MASTER_PORT", "29500")), procs_per_node=k, job_id=e.get("SLURM_JOB_ID", "llama-recipes"))


def render(env: dict[str, str], argv: list[str]) -> str:
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    return (exports + " " if exports else "") + shlex.join(argv)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama_recipes.runtime.cluster",
                                description="Start this node's launcher of a multi-node job (SLURM task).")
    p.add_argument("--launcher", choices=sorted(LAUNCHERS), default="accelerate")
    p.add_argument("--config", required=True, help="accelerate config (accelerate_configs/NAME.yaml)")
    p.add_argument("--procs-per-node", type=int, help="processes (GPUs) per node; default SLURM_GPUS_ON_NODE")
    p.add_argument("--print-only", action="store_true", help="print this node's line, do not run it")
    p.add_argument("script", nargs=argparse.REMAINDER, help="-- run_recipe.py RECIPE [overrides]")
    a = p.parse_args(argv)
    script = a.script[1:] if a.script[:1] == ["--"] else a.script
    try:
        node = node_from_slurm(procs_per_node=a.procs_per_node)
        env, line = LAUNCHERS[a.launcher](a.config, node, script)
    except UserError as e:
        print(f"error: {e.problem}\n  fix: {e.fix}", file=sys.stderr)
        return 2
    print(f"node {node.rank}/{node.nodes}: {render(env, line)}", flush=True)
    if a.print_only:
        return 0
    os.environ.update(env)
    os.execv(line[0], line)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
