"""benchmarks/gpu_check.py: its CPU-runnable sections pass on CPU; sections are isolated; on a GPU, all of it."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

PATH = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("gpu_check", PATH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


def _failures(result: dict) -> list[str]:
    return [f"{c['name']}: {c['error'] or c['values']}" for c in result["checks"] if not c["ok"]]


def test_without_a_gpu_it_says_so_writes_nothing_and_exits_0(
    gpu_check: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--results", str(tmp_path / "gpu_check.md")]) == 0
    assert "No CUDA GPU found: nothing to check" in capsys.readouterr().out
    assert not (tmp_path / "gpu_check.md").exists()


def test_section_bounds_fit_in_ten_minutes(gpu_check: ModuleType) -> None:
    assert set(gpu_check.BOUNDS) == set(gpu_check.SECTION_FUNCTIONS)
    assert sum(gpu_check.BOUNDS.values()) <= 600


@pytest.mark.parametrize("section", ["parity", "recalibrate_bn", "mc_dropout", "trainer", "resume"])
def test_cpu_runnable_section_passes_on_cpu(gpu_check: ModuleType, section: str) -> None:
    result = gpu_check.run_section_here(section, "cpu", quick=True)
    assert result["status"] == "done"
    assert result["checks"], "a section must check something"
    assert not _failures(result), _failures(result)


def test_a_failing_check_is_recorded_and_the_section_goes_on(gpu_check: ModuleType) -> None:
    ctx = gpu_check.Context(device="cpu", quick=True)
    with ctx.check("raises") as values:
        values["before"] = 1.0
        raise ValueError("bad | thing")
    with ctx.check("false") as values:
        values["ok"] = False
    with ctx.check("true") as values:
        values["x"] = torch.tensor(2.0)
    assert [(c.name, c.ok) for c in ctx.checks] == [("raises", False), ("false", False), ("true", True)]
    assert ctx.checks[0].error == "ValueError: bad / thing"
    assert ctx.checks[0].values == {"before": 1.0}
    assert ctx.checks[2].values == {"x": 2.0}


def test_a_section_past_its_bound_is_reported_as_timeout(gpu_check: ModuleType) -> None:
    result = gpu_check.run_section("parity", "cpu", quick=True, bound=0.01)
    assert result["status"].startswith("timeout")


def test_speed_is_skipped_on_cpu_with_its_reason(gpu_check: ModuleType) -> None:
    result = gpu_check.run_section_here("speed", "cpu", quick=True)
    assert result["status"] == "skipped: host-sync counting needs a CUDA device"


def test_summary_lists_every_failed_check(gpu_check: ModuleType) -> None:
    results = [
        {
            "section": "parity",
            "status": "done",
            "seconds": 1.0,
            "checks": [
                {"name": "mixup/float16/batch", "ok": False, "values": {"max_abs_inputs": 0.5}, "error": None},
                {"name": "one_hot/smoothing", "ok": True, "values": {}, "error": None},
            ],
        },
        {"section": "demo", "status": "timeout after 120 s", "seconds": 120, "checks": []},
    ]
    text = gpu_check.summary("cpu", results)
    assert "| parity | done | 1 | 1 | 1.0 |" in text
    assert "| demo | timeout after 120 s | 0 | 0 | 120 |" in text
    assert '`mixup/float16/batch`: {"max_abs_inputs": 0.5}' in text


def test_a_failure_is_reported_by_its_exception_line(gpu_check: ModuleType) -> None:
    stderr = "Traceback (most recent call last):\n  File 'x.py'\nValueError: bad | thing\nsome warning after\n"
    assert gpu_check.error_line(stderr) == "ValueError: bad / thing"
    assert gpu_check.error_line("only a line\n") == "only a line"
    assert gpu_check.error_line("") == "no output"


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="spawned gloo processes on POSIX")
def test_two_processes_over_gloo_on_cpu(gpu_check: ModuleType, tmp_path: Path) -> None:
    code = gpu_check.main(
        ["--device", "cpu", "--sections", "ddp_gloo", "--bound-scale", "5", "--results", str(tmp_path / "g.md")]
    )
    result = json.loads((tmp_path / "g.json").read_text())["sections"][0]
    assert code == 0, result
    assert not _failures(result)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_every_section_passes_on_the_gpu(gpu_check: ModuleType, tmp_path: Path) -> None:
    code = gpu_check.main(["--results", str(tmp_path / "gpu_check.md")])
    results = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert code == 0, [(r["section"], r["status"], _failures(r)) for r in results]
