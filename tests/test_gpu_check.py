"""benchmarks/gpu_check.py: imports and explains itself without a GPU; on GPUs every callback works under ddp."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

PATH = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", PATH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_it_says_so_writes_nothing_and_exits_0(
    gpu_check: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path / "gpu_check.md")
    assert gpu_check.main([]) == 0
    assert "No CUDA GPU found: nothing to check" in capsys.readouterr().out
    assert not (tmp_path / "gpu_check.md").exists()


def test_every_callback_has_a_canonical_setup(gpu_check: ModuleType) -> None:
    import lightning_reg

    for name in gpu_check.CALLBACKS:
        assert isinstance(gpu_check.make_callback(name), getattr(lightning_reg, name))


def test_a_failure_is_reported_by_its_exception_line(gpu_check: ModuleType) -> None:
    stderr = "Traceback (most recent call last):\n  File 'x.py'\nValueError: bad | thing\nsome warning after\n"
    assert gpu_check.error_line(stderr) == "ValueError: bad / thing"
    assert gpu_check.error_line("only a line\n") == "only a line"
    assert gpu_check.error_line("") == "no output"


@pytest.mark.gpu
@pytest.mark.skipif(sys.platform == "win32", reason="DDP subprocess launch on POSIX")
def test_every_callback_works_under_ddp_and_fsdp_or_is_refused_by_design(gpu_check: ModuleType) -> None:
    devices = torch.cuda.device_count()
    refused_under_fsdp = {"BNRecalibration", "MCDropoutEvaluation"}
    for callback in gpu_check.CALLBACKS:
        status, rate = gpu_check.run(callback, "ddp", devices, steps=12, batch_size=32)
        assert status == "works", f"{callback} under ddp: {status}"
        assert rate > 0
        status, rate = gpu_check.run(callback, "fsdp", devices, steps=12, batch_size=32)
        expected = "refused" if callback in refused_under_fsdp else "works"
        assert status.startswith(expected), f"{callback} under fsdp: {status}"
