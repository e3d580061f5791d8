"""Rank, world size, barrier, all-reduce and gather over torch.distributed.

Every function is a no-op in one process (no process group, or a group of one), so callers use
them unconditionally. torch is imported inside the functions: importing this module is free.
"""
from __future__ import annotations

from llama_recipes.errors import UserError


def is_distributed() -> bool:
    """True when a torch.distributed process group is initialised (accelerate, the Trainer, init_for_eval)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialised process group, else (0, 1)."""
    if not is_distributed():
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    """Wait for every rank.

    torch's own barrier: accelerate's wait_for_everyone is a no-op when accelerate did not set up
    the process group itself (torchrun on CPU), and then rank 0 could act under rank 1's writes.
    """
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


def _to_backend(t):
    import torch.distributed as dist

    return t.cuda() if dist.get_backend() == "nccl" else t  # nccl reduces CUDA tensors only


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks, in float64 (token counts stay exact); `values` itself in one process."""
    if rank_world()[1] == 1:
        return values
    import torch
    import torch.distributed as dist

    t = _to_backend(torch.tensor(values, dtype=torch.float64))
    dist.all_reduce(t)
    return t.cpu().tolist()


def all_gather_object(obj) -> list:
    """Every rank's (picklable) `obj`, in rank order; [obj] in one process."""
    if rank_world()[1] == 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True if `flag` is true on any rank: ranks must agree on when to stop, or the next collective hangs."""
    if rank_world()[1] == 1:
        return bool(flag)
    import torch
    import torch.distributed as dist

    t = _to_backend(torch.tensor([1.0 if flag else 0.0]))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def init_for_eval():
    """Join the process group torchrun / accelerate launch set up the environment for; return this rank's device.

    Training gets its group from the Trainer; `eval` runs without one, so it forms the group here
    (nccl on GPUs, gloo on CPU) when the launcher started more than one process.
    """
    import os

    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return torch.device(f"cuda:{local}" if cuda else "cpu")


def destroy() -> None:
    """Leave the process group (end of --eval-only); a no-op without one."""
    if is_distributed():
        import torch.distributed as dist

        dist.destroy_process_group()


def on_rank0(fn, what: str, timeout_s: float = 7 * 24 * 3600.0):
    """`fn()` on rank 0 only; every rank returns its (picklable) result. In one process: `fn()`.

    The other ranks wait on a gloo group of their own whose timeout is `timeout_s` (a week), not
    the launcher's process-group timeout (30 min by default, the Trainer's ddp_timeout), so a long
    rank-0 job (a benchmark on a big model) does not kill the waiting ranks. If `fn` raises on
    rank 0, the others raise the same UserError (a clear error on every rank) or a RuntimeError
    naming `what` (rank 0 re-raises the original), so no rank hangs in the next collective.
    """
    rank, world = rank_world()
    if world == 1:
        return fn()
    import datetime

    import torch.distributed as dist

    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    payload: list = [None]
    error = None
    if rank == 0:
        try:
            payload = [("ok", fn())]
        except BaseException as e:  # noqa: BLE001 - told to the other ranks, then re-raised here
            error = e
            payload = [("user", (e.problem, e.fix, e.where)) if isinstance(e, UserError)
                       else ("error", f"{type(e).__name__}: {e}")]
    try:
        dist.broadcast_object_list(payload, src=0, group=group)
    finally:
        dist.destroy_process_group(group)
    if error is not None:
        raise error
    status, value = payload[0]
    if status == "user":  # the same clear error on every rank (rank 0 prints it, all exit with its code)
        raise UserError(*value)
    if status == "error":
        raise RuntimeError(f"{what} failed on rank 0: {value}")
    return value
