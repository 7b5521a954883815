"""Running test code in 2 DDP processes on CPU (gloo), as measured in shared/testing.md.

- ``ddp_fork_trainer``: an in-process 2-rank Trainer (``strategy="ddp_fork"``). Only the weights come
  back to the parent: ranks write what a test checks to files under ``tmp_path``.
- ``run_in_2_processes``: runs a module-level function in both workers of a session-wide spawn pool
  whose workers joined one gloo process group; for unit tests of collectives (about 15 s once, then
  ~0.02 s a call).
- ``strategy="ddp"`` hangs inside pytest (rank 1 re-runs pytest's argv): run it in a subprocess.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.trainer import fast_trainer

DDP_ENV_VARS = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "GROUP_RANK")

skip_on_windows = pytest.mark.skipif(sys.platform == "win32", reason="fork-based DDP needs a POSIX system")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def scrubbed_ddp_env() -> Iterator[None]:
    """Remove the DDP variables before the block and restore the environment as it was after it."""
    saved = os.environ.copy()
    for key in DDP_ENV_VARS:
        os.environ.pop(key, None)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def ddp_fork_trainer(tmp_path: Path | str, **overrides: Any) -> Any:
    """A 2-process CPU Trainer with ``strategy="ddp_fork"``; use it inside ``scrubbed_ddp_env()``."""
    kwargs: dict[str, Any] = {"strategy": "ddp_fork", "devices": 2, "accelerator": "cpu"}
    kwargs.update(overrides)
    return fast_trainer(tmp_path, **kwargs)


# --- a session-wide spawn pool whose 2 workers form one gloo process group -------------------------


def _init_worker(rank_queue: Any, port: int) -> None:
    import torch.distributed as dist

    rank = rank_queue.get()
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)


def _run_task(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[int, Any]:
    import torch.distributed as dist

    # Both tasks wait here for each other, so the two tasks always land on the two different workers.
    dist.barrier()
    rank = dist.get_rank()
    return rank, fn(rank, 2, *args)


class ProcessGroupPool:
    """Two spawned workers in one gloo process group, reused across tests."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        ranks = ctx.Queue()
        for r in range(2):
            ranks.put(r)
        self._pool = ctx.Pool(2, initializer=_init_worker, initargs=(ranks, free_port()))

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 120.0) -> list[Any]:
        """Run ``fn(rank, world_size, *args)`` on both ranks; results ordered by rank."""
        pending = [self._pool.apply_async(_run_task, (fn, args)) for _ in range(2)]
        try:
            results = dict(p.get(timeout=timeout) for p in pending)
        except Exception:
            self.close()  # a failed collective may leave the other rank waiting forever
            raise
        return [results[0], results[1]]

    def close(self) -> None:
        self._pool.terminate()
        self._pool.join()


_POOL: ProcessGroupPool | None = None


def run_in_2_processes(fn: Callable[..., Any], *args: Any) -> list[Any]:
    """Run the module-level ``fn(rank, world_size, *args)`` in 2 gloo processes; returns ``[rank0, rank1]``.

    Prefer the ``process_group_pool`` fixture (tests/conftest.py), which also closes the pool.
    """
    global _POOL
    start_pool()
    assert _POOL is not None
    try:
        return _POOL.run(fn, *args)
    except Exception:
        _POOL = None
        raise


def start_pool() -> None:
    global _POOL
    if _POOL is None:
        _POOL = ProcessGroupPool()


def close_pool() -> None:
    global _POOL
    if _POOL is not None:
        _POOL.close()
        _POOL = None
