"""4. FSDP sharding on 2 CPU ranks: per-rank param+grad+optimizer bytes ÷ (single-process bytes / 2).

torchrun --nproc_per_node 2 (gloo) runs fsdp_worker.py: torch's FSDP2 `fully_shard` per decoder
layer then the root (accelerate does not do FSDP on CPU, see NOTES.md). Goal <= 1.1.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import common


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    out_file = Path(tempfile.mkdtemp(prefix="llr-fsdp-")) / "fsdp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(Path(__file__).with_name("fsdp_worker.py")), str(out_file)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(cmd, check=True, env=env, cwd=common.ROOT)
    res = json.loads(out_file.read_text())
    mb = lambda b: round(b / 2**20, 2)  # noqa: E731
    out = {"ratio": res["ratio"], "per_rank_mb": [mb(r["total"]) for r in res["per_rank"]],
           "single_mb": mb(res["single"]["total"]), "detail": res}
    return common.save("fsdp", out)


if __name__ == "__main__":
    main()
