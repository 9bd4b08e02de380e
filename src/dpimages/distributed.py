"""Process-group helpers (torchrun): who am I, where do collectives run, and keeping the ranks in step.

Without an initialised ``torch.distributed`` process group every helper is a
no-op that returns its input (one process is world size 1). Nothing here
reads private data or touches a ledger: the DP-SGD engine all-reduces clipped
sums itself (`dpimages.privacy.dpsgd`), and rank 0 alone draws noise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dpimages.errors import DPImagesError, InputError


def dist_world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) without an initialised process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def comm_device() -> torch.device:
    """Where tensors for collectives live: the current CUDA device under nccl, else the CPU (gloo)."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank0_values(*values: float) -> tuple[float, ...]:
    """Rank 0's `values` on every rank of a process group (float64, exact); `values` unchanged without one.

    For decisions every rank must take alike although each computes them (a time limit, a calibrated sigma).
    """
    if dist_world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    torch.distributed.broadcast(t, src=0)
    return tuple(float(v) for v in t.cpu().tolist())


def broadcast_module(module: torch.nn.Module) -> None:
    """Give every rank of a process group rank 0's parameters and buffers (in place); nothing without one.

    For state that rank 0 alone computed (DPDM's warm start: only rank 0 makes the stage's DP releases).
    """
    if dist_world()[1] == 1:
        return
    dev = comm_device()
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            buf = t.detach().to(dev).contiguous()
            torch.distributed.broadcast(buf, src=0)
            t.copy_(buf.to(t.device))


def rank0_first(fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 alone and broadcast its result; the other ranks wait for it.

    An exception on rank 0 is raised on every rank (a DPImagesError with its class and message), so all ranks
    stop together instead of waiting for a collective that never comes.
    """
    rank, world = dist_world()
    if world == 1:
        return fn()
    box: list[Any] = [None, None]
    error: Exception | None = None
    if rank == 0:
        try:
            box[0] = fn()
        except Exception as e:  # every rank must hear about it
            error = e
            box[1] = e if isinstance(e, DPImagesError) else DPImagesError(f"rank 0 failed: {type(e).__name__}: {e}")
    torch.distributed.broadcast_object_list(box, src=0, device=comm_device())
    if error is not None:
        raise error
    if box[1] is not None:
        raise box[1]
    return box[0]


def same_on_all_ranks(value: str, what: str) -> None:
    """InputError on every rank unless each rank's `value` equals rank 0's (no-op without a process group).

    For what each process reads on its own (the private data, the checkpoint): a rank with other images
    or an older checkpoint would train silently on something else than rank 0's ledger describes.
    """
    rank, world = dist_world()
    if world == 1:
        return
    box = [value if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0, device=comm_device())
    differs = torch.tensor([int(box[0] != value)], dtype=torch.int64, device=comm_device())
    torch.distributed.all_reduce(differs, op=torch.distributed.ReduceOp.SUM)
    if int(differs.item()):
        raise InputError(f"{what} differs between processes ({int(differs.item())} of {world} ranks differ from "
                         "rank 0): every process needs the same data and a shared run directory")
