"""Spawning gloo process groups from a test: a free port, the ranks started with a deadline (no hang),
and the first failing rank's error (each rank records its exception with ``record_error``)."""
from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(fn, args: tuple, world: int, timeout_s: float, what: str) -> None:
    """``fn(rank, *args)`` on ``world`` spawned processes; a rank's exception is re-raised here, and the test
    fails (the processes killed) if they are not done within ``timeout_s``."""
    ctx = mp.start_processes(fn, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{what}: the {world} ranks did not finish within {timeout_s} s")


def record_error(out_dir, rank: int, exc: BaseException) -> None:
    """Write this rank's exception with its time (which rank failed first is the job's root cause)."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / f"rank{rank}.error").write_text(f"{time.time()!r}\n{exc!r}")


def first_error(out_dir) -> str:
    """The exception recorded first by any rank ('' if none)."""
    errors = sorted((float(when), what) for when, what in (f.read_text().split("\n", 1)
                                                            for f in Path(out_dir).glob("rank*.error")))
    return errors[0][1] if errors else ""
