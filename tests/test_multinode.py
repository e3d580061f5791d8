"""Two "nodes" on localhost: the shipped multi-node configs, started as a cluster starts them.

Each node is one launcher process, started through `python -m llama_recipes.runtime.cluster`
with the variables SLURM sets in each task (SLURM_NNODES, SLURM_NODEID, the head's address),
i.e. the per-node command lines of scripts/slurm/llama_recipes.sbatch: `accelerate launch
--num_machines 2 --machine_rank R --main_process_ip 127.0.0.1 ...` or `torchrun --rdzv-backend
c10d`. One process per node, gloo, the CPU stand-in (fp32 in place of the configs' bf16).

- FSDP (multinode_2x8_fsdp.yaml) and DeepSpeed (multinode_2x8_deepspeed.yaml): per-step losses
  equal one process with the same global batch; the ranks really sharded.
- Killing one node makes the other exit non-zero within a bounded time (no hang), and the same
  two commands afterwards resume from the last checkpoint to the uninterrupted run's losses.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DEMO_RECIPE, ROOT, TINY, free_port, run_cli

from llama_recipes.runtime import resilience
from llama_recipes.runtime.distributed import REPORT_ENV

pytestmark = pytest.mark.slow

THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# The multi-node configs checkpoint activations (FSDP) and compute in bf16: the recipe asks for
# checkpointing too (same intent) and leaves precision to the config (the stand-in runs fp32).
COMMON = [
    f"model.name_or_path={TINY}",
    "training.logging_steps=1",
    "training.warmup_steps=0",
    "training.learning_rate=5e-3",
    "training.report_to=none",
    "training.activation_checkpointing=true",
    "data.max_samples=64",
    "eval.before_after=false",
]
REL_TOL = (8 + 1) * 2 * 4 * 352 ** 0.5 * 2.0 ** -24  # as tests/test_distributed.py derives it, for up to 8 steps


def losses(out: Path) -> dict[int, float]:
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def assert_close(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b), (a, b)
    scale = max(abs(v) for v in [*a.values(), *b.values()])
    assert all(abs(a[k] - b[k]) <= REL_TOL * scale for k in a), (a, b)


def one_process(out: Path, *overrides: str) -> dict[int, float]:
    r = run_cli(str(DEMO_RECIPE), f"output_dir={out}", *COMMON, "training.bf16=false", *overrides, env=THREADS)
    assert r.returncode == 0, r.stderr[-3000:]
    return losses(out)


def start_nodes(launcher: str, config: str, out: Path, *overrides: str, port: int | None = None,
                logs: Path | None = None) -> list[subprocess.Popen]:
    """Two launchers, as srun starts them: same command, SLURM_NODEID 0 and 1."""
    port = port or free_port()
    logs = logs or out.parent
    procs = []
    for node in (0, 1):
        env = {**os.environ, **THREADS, "SLURM_NNODES": "2", "SLURM_NODEID": str(node), "SLURM_JOB_ID": f"j{port}",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), REPORT_ENV: str(out.parent / "rep")}
        cmd = [sys.executable, "-m", "llama_recipes.runtime.cluster", "--launcher", launcher,
               "--config", f"accelerate_configs/{config}.yaml", "--procs-per-node", "1", "--",
               "run_recipe.py", str(DEMO_RECIPE), f"output_dir={out}", *COMMON, *overrides]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(logs / f"node{node}.out", "w"),
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    return procs


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL a node: its launcher and every process under it (torch's workers may sit in their
    own process group, so the launcher's group alone would leave them running)."""
    import psutil

    tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_all(procs, logs: Path, timeout=900) -> list[str]:
    for p in procs:
        p.wait(timeout=timeout)
    return [(logs / f"node{n}.out").read_text() for n in (0, 1)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, batch 4: the global batch of 2 nodes x 1 process x batch 2."""
    out = tmp_path_factory.mktemp("one") / "out"
    return one_process(out, "training.max_steps=4", "training.per_device_train_batch_size=4")


@pytest.mark.parametrize("launcher,config,kind", [
    ("accelerate", "multinode_2x8_fsdp", "FSDP"),
    ("accelerate", "multinode_2x8_deepspeed", "DEEPSPEED"),
    ("torchrun", "multinode_2x8_fsdp", "FSDP"),
])
def test_two_nodes_match_one_process(reference, tmp_path, launcher, config, kind):
    out = tmp_path / "out"
    procs = start_nodes(launcher, config, out, "training.max_steps=4", "training.per_device_train_batch_size=2")
    logs = wait_all(procs, tmp_path)
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    # the generated per-node lines: same command, only the machine rank differs (c10d assigns it itself)
    lines = [log.splitlines()[0] for log in logs]
    assert lines[0].startswith("node 0/2: ") and lines[1].startswith("node 1/2: ")
    if launcher == "accelerate":
        assert "--machine_rank 0" in lines[0] and "--machine_rank 1" in lines[1]
        assert lines[0].split("--machine_rank 0")[1] == lines[1].split("--machine_rank 1")[1]
    else:
        assert "--rdzv-backend c10d --rdzv-endpoint 127.0.0.1:" in lines[0] and "ACCELERATE_USE_FSDP=true" in lines[0]
    reports = [json.loads(p.read_text())["memory"] for p in sorted(tmp_path.glob("rep.rank*.json"))]
    assert [r["rank"] for r in reports] == [0, 1]
    for r in reports:
        assert r["world_size"] == 2 and r["processes_seen"] == 2 and r["distributed_type"] == kind
        assert r["param_bytes_local"] <= 0.55 * r["param_bytes_full"], r  # sharded across the two nodes
    assert_close(losses(out), reference)


def test_killing_one_node_fails_the_other_then_resume_works(tmp_path):
    """SIGKILL node 1 mid-run: node 0 exits non-zero within a bounded time, then the same two
    commands resume from the newest checkpoint and finish with the uninterrupted run's losses."""
    steps = ("training.max_steps=6", "training.per_device_train_batch_size=2", "training.save_strategy=steps",
             "training.save_steps=2")
    ref = one_process(tmp_path / "one", "training.max_steps=6", "training.per_device_train_batch_size=4")
    out = tmp_path / "out"
    procs = start_nodes("accelerate", "multinode_2x8_fsdp", out, *steps, "training.ddp_timeout=60")
    try:
        deadline = time.time() + 600
        while not resilience.is_complete(out / "checkpoint-2"):
            assert all(p.poll() is None for p in procs), "a node ended before checkpoint-2"
            assert time.time() < deadline, "no checkpoint-2"
            time.sleep(0.2)
        kill_node(procs[1])
        killed_at = time.time()
        procs[0].wait(timeout=180)
        waited = time.time() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                kill_node(p)
                p.wait()
    assert procs[0].returncode != 0, "the surviving node must fail, not report success"
    # the checkpoint holds the adapter (FSDP's activation-checkpoint wrappers once made it empty)
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(out / "checkpoint-2" / "pytorch_model_fsdp_0")).read_metadata().state_dict_metadata
    assert len([k for k in saved if "lora_" in k]) == 56, list(saved)[:5]
    assert waited < 180, waited
    assert not (out / "metrics.json").exists()
    # the same two commands again: resume from the newest complete checkpoint
    procs = start_nodes("accelerate", "multinode_2x8_fsdp", out, *steps, "training.ddp_timeout=60")
    logs = wait_all(procs, tmp_path)
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:]
    assert "resum" in logs[0].lower()
    assert_close(losses(out), ref)
