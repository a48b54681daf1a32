"""Several evaluation processes: launcher arguments, the process group, sharding, gathering.

The DeepSpeed launcher passes ``--local_rank=N`` (Hydra rejects it) and torchrun sets
``LOCAL_RANK``; both set ``RANK`` and ``WORLD_SIZE`` in the environment, which is what we read.
Image groups are sharded deterministically (group i -> rank i % world_size); per-sample records
are gathered on rank 0, which computes the metrics in a fixed order, so any number of processes
gives the metrics of a single-process run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

#: Environment variable that carries rank 0's run stamp to every rank (one Hydra run directory).
RUN_STAMP_ENV = "LVLM_CSP_RUN_STAMP"


def strip_launcher_args(argv: Sequence[str]) -> list[str]:
    """Remove ``--local_rank=N`` / ``--local_rank N`` (and ``--local-rank``) that launchers append."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--local_rank", "--local-rank"):
            skip = True
            continue
        if arg.startswith(("--local_rank=", "--local-rank=")):
            continue
        out.append(arg)
    return out


@dataclass(frozen=True)
class DistContext:
    """This process's place among the evaluation processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def context_from_env() -> DistContext:
    """RANK / WORLD_SIZE / LOCAL_RANK as set by torchrun and the DeepSpeed launcher (default: single)."""
    env = os.environ
    return DistContext(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def init_distributed(ctx: DistContext | None = None) -> DistContext:
    """Join the process group when WORLD_SIZE > 1 (nccl with CUDA, gloo otherwise); idempotent."""
    ctx = ctx or context_from_env()
    if ctx.distributed and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(ctx.local_rank)
            dist.init_process_group("nccl", rank=ctx.rank, world_size=ctx.world_size)
        else:
            dist.init_process_group("gloo", rank=ctx.rank, world_size=ctx.world_size)
    return ctx


def single_process_env() -> None:
    """The launcher's variables for one process (rank 0 of 1, a free local port), where none are set: what
    ``deepspeed.initialize`` needs outside a launcher (it otherwise looks for MPI)."""
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)


def share_run_stamp(ctx: DistContext) -> str:
    """Rank 0's timestamp on every rank (exported as ``LVLM_CSP_RUN_STAMP`` for the run directory)."""
    stamp = os.environ.get(RUN_STAMP_ENV) or datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    if ctx.distributed:
        stamp = broadcast_object(stamp, ctx)
    os.environ[RUN_STAMP_ENV] = stamp
    return stamp


def run_stamp() -> str:
    """The shared run stamp, or the current time (the ``${run_stamp:}`` config resolver)."""
    return os.environ.get(RUN_STAMP_ENV) or datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def shard(items: Sequence[T], ctx: DistContext) -> list[T]:
    """Items i with i % world_size == rank, in order."""
    return [item for i, item in enumerate(items) if i % ctx.world_size == ctx.rank]


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_to_main(obj: Any, ctx: DistContext) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (in rank order); None elsewhere."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def launch(main: Callable[[], None], script: str) -> None:
    """Run a Hydra ``main`` as eval_ds.py / train_ds.py do, under any launcher (plain, torchrun,
    DeepSpeed): launcher arguments stripped (DeepSpeed appends ``--local_rank=N``, which Hydra
    rejects), one run directory shared by the ranks (rank 0's stamp), one ``.hydra/`` and one log
    file per rank (``<script>.rank<r>.log``), and all ranks leave together (gloo can abort at exit
    otherwise)."""
    sys.argv = strip_launcher_args(sys.argv)
    ctx = init_distributed(context_from_env())
    share_run_stamp(ctx)
    if ctx.rank > 0:
        sys.argv += ["hydra.output_subdir=null",
                     f"hydra.job_logging.handlers.file.filename=${{hydra.runtime.output_dir}}/{script}.rank{ctx.rank}.log"]
    main()
    barrier(ctx)
    shutdown(ctx)
