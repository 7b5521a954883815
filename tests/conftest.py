"""Hygiene for every test: no leaked process group, DDP environment variables or threads."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.helpers import ddp

# Variables that mean "you are inside a distributed job": a test that leaves one set poisons the next.
_WATCHED_ENV = (*ddp.DDP_ENV_VARS, "PL_TRAINER_GPUS", "SLURM_JOB_ID", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID")
# Set by `seed_everything` and `deterministic=True`: global by design, restored but allowed.
_RESTORED_ONLY = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "CUBLAS_WORKSPACE_CONFIG")


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("PYTHONHASHSEED", "0")
    # One intra-op thread: the tests use tiny tensors, where a thread pool only adds contention (measured
    # 20-50x slower with the default on a loaded 2-core machine). Subprocesses inherit it through the env.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def process_group_pool() -> Iterator[Callable[..., list[Any]]]:
    """``run(fn, *args)`` runs the module-level ``fn(rank, world_size, *args)`` in 2 gloo processes.

    The pool (and its handler threads) is made here, at session scope, before any test's thread check.
    """
    ddp.start_pool()
    yield ddp.run_in_2_processes
    ddp.close_pool()


@pytest.fixture(autouse=True)
def no_leaked_environment() -> Iterator[None]:
    before = os.environ.copy()
    yield
    leaked = {k for k in _WATCHED_ENV if os.environ.get(k) != before.get(k)}
    os.environ.clear()
    os.environ.update(before)
    assert not leaked, f"test leaked environment variable(s) {sorted(leaked)}; wrap DDP runs in scrubbed_ddp_env()"


@pytest.fixture(autouse=True)
def no_leaked_process_group() -> Iterator[None]:
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        pytest.fail("test left a torch.distributed process group initialized")


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    leaked = []
    for thread in set(threading.enumerate()) - before:
        thread.join(timeout=5)  # threads that are finishing (loader workers' feeders, event writers)
        if thread.is_alive():
            leaked.append(thread)
    assert not leaked, f"test left thread(s) running: {leaked}"


@pytest.fixture(autouse=True)
def restore_signal_handlers() -> Iterator[None]:
    """Preemption tests install SIGTERM/SIGUSR1 handlers; the next test starts with the old ones."""
    signums = [signal.SIGTERM] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])
    handlers = {signum: signal.getsignal(signum) for signum in signums}
    yield
    for signum, handler in handlers.items():
        if handler is not None:
            signal.signal(signum, handler)


@pytest.fixture(autouse=True)
def restore_global_state() -> Iterator[None]:
    """Restore torch's determinism flag, RNG and Lightning's rank-zero marker after each test."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    rank = getattr(rank_zero_only, "rank", None)
    rng = torch.get_rng_state()
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_rng_state(rng)
    if rank is not None:
        rank_zero_only.rank = rank
