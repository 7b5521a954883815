"""`lightning-reg demo`: the table, the files, determinism, the options, DDP (fast forms; the full demo is slow)."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from lightning_reg.cli import main
from lightning_reg.demo import DemoResult, DemoRow, demo
from tests.helpers.ddp import DDP_ENV_VARS, scrubbed_ddp_env, skip_on_windows

COLUMNS = ["model", "recipe", "eval", "accuracy", "NLL", "ECE", "Brier", "mean MI", "train s"]
EVALS = ["deterministic", "MC dropout"]


@pytest.fixture(scope="module")
def fast_result(tmp_path_factory: pytest.TempPathFactory) -> DemoResult:
    """All three models, 1 epoch of 2 batches, tested on 2 batches: the whole pipeline in a few seconds."""
    out = tmp_path_factory.mktemp("demo")
    return demo(epochs=1, out=out, limit_batches=2, verbose=False)


def check_row_values(row: DemoRow) -> None:
    assert 0.0 <= row.accuracy <= 1.0
    assert 0.0 <= row.ece <= 1.0
    assert 0.0 <= row.brier <= 2.0
    assert 0.0 <= row.nll < math.inf
    assert row.train_seconds > 0.0
    if row.eval == "MC dropout":
        assert row.mutual_info is not None
        assert 0.0 <= row.mutual_info <= math.log(10)
    else:
        assert row.mutual_info is None


def test_demo_has_a_row_per_model_recipe_and_eval(fast_result: DemoResult) -> None:
    keys = [(r.model, r.recipe, r.eval) for r in fast_result.rows]
    assert keys == [
        (model, recipe, ev)
        for model in ("cnn_small", "lstm", "transformer")
        for recipe in ("plain", "regularized")
        for ev in EVALS
    ]


def test_demo_values_are_in_range(fast_result: DemoResult) -> None:
    for row in fast_result.rows:
        check_row_values(row)
    # both rows of one training share its time
    assert fast_result.rows[0].train_seconds == fast_result.rows[1].train_seconds


def test_demo_regularized_recipes_use_mixing_smoothing_and_bn_recalibration_where_there_is_bn(
    fast_result: DemoResult,
) -> None:
    assert fast_result.recipes == {
        "cnn_small": "MixUpCutMix + LabelSmoothing + BNRecalibration",
        "lstm": "MixUp + LabelSmoothing",
        "transformer": "MixUp + LabelSmoothing",
    }


def test_demo_writes_markdown_csv_and_a_reliability_diagram_per_training(fast_result: DemoResult) -> None:
    out = fast_result.out
    names = sorted(p.name for p in out.iterdir())
    expected_pngs = [
        f"reliability_{m}_{r}.png" for m in ("cnn_small", "lstm", "transformer") for r in ("plain", "regularized")
    ]
    assert names == sorted(["demo.csv", "demo.md", *expected_pngs])
    assert sorted(p.name for p in fast_result.files) == names
    for png in expected_pngs:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "demo.md").read_text()
    assert "| " + " | ".join(COLUMNS) + " |" in markdown
    assert markdown.count("| transformer | regularized |") == 2


def test_demo_csv_holds_the_rows_at_full_precision(fast_result: DemoResult) -> None:
    with open(fast_result.out / "demo.csv", newline="") as f:
        records = list(csv.DictReader(f))
    assert len(records) == len(fast_result.rows) == 12
    for record, row in zip(records, fast_result.rows, strict=True):
        assert (record["model"], record["recipe"], record["eval"]) == (row.model, row.recipe, row.eval)
        assert float(record["accuracy"]) == row.accuracy
        assert float(record["nll"]) == row.nll
        assert record["mutual_info"] == ("" if row.mutual_info is None else repr(row.mutual_info))


def test_demo_is_deterministic_given_the_seed(tmp_path: Path) -> None:
    first = demo(["lstm"], epochs=1, out=tmp_path / "a", seed=3, limit_batches=2, verbose=False)
    second = demo(["lstm"], epochs=1, out=tmp_path / "b", seed=3, limit_batches=2, verbose=False)
    other = demo(["lstm"], epochs=1, out=tmp_path / "c", seed=4, limit_batches=2, verbose=False)

    def untimed(result: DemoResult) -> list[DemoRow]:
        return [replace(row, train_seconds=0.0) for row in result.rows]

    assert untimed(first) == untimed(second)
    assert untimed(first) != untimed(other)


def test_demo_leaves_torch_threads_and_determinism_flag_as_they_were(tmp_path: Path) -> None:
    import torch

    threads = torch.get_num_threads()
    demo(["lstm"], epochs=1, out=tmp_path, limit_batches=1, verbose=False)
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"models": ["resnet18"]},
            r"Expected `models` to be a non-empty list of \('cnn_small', 'lstm', 'transformer'\)",
        ),
        ({"models": []}, "non-empty list"),
        ({"epochs": 0}, "Expected `epochs` to be a positive int or None"),
        ({"limit_batches": 0}, "Expected `limit_batches` to be a positive int or None"),
    ],
)
def test_demo_rejects_bad_arguments_with_a_clear_error(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        demo(out=tmp_path, verbose=False, **kwargs)


def test_cli_help_lists_the_demo_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--models", "--epochs", "--out", "--seed", "--accelerator", "--devices"):
        assert option in help_text
    assert "--limit_batches" not in help_text  # a test knob of `demo()`, not a CLI option


def test_cli_rejects_an_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--models", "[resnet18]"])
    assert exit_info.value.code != 0
    assert "resnet18" in capsys.readouterr().err


def test_cli_trains_prints_the_table_and_says_where_it_wrote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["demo", "--models", "lstm", "--epochs", "1", "--seed", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    for column in ("accuracy", "NLL", "ECE", "Brier", "mean MI"):
        assert column in out
    assert out.count("lstm") >= 4
    assert "MC dropout" in out
    assert "deterministic" in out
    assert str(tmp_path) in out
    assert (tmp_path / "demo.md").exists()
    assert (tmp_path / "demo.csv").exists()
    assert "GPU available" not in out  # Lightning's banners stay quiet


@skip_on_windows
def test_demo_on_two_cpu_processes_reduces_the_metrics_and_writes_once(tmp_path: Path) -> None:
    # In-process DDP (fork): `strategy="ddp"`, the CLI's default for 2 devices, re-runs the command, which
    # inside pytest would re-run pytest; it is exercised as a subprocess in the slow test below.
    with scrubbed_ddp_env():
        result = demo(["lstm"], epochs=1, out=tmp_path, devices=2, strategy="ddp_fork", limit_batches=2, verbose=False)
    assert [(r.recipe, r.eval) for r in result.rows] == [(rec, ev) for rec in ("plain", "regularized") for ev in EVALS]
    for row in result.rows:
        check_row_values(row)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "demo.csv",
        "demo.md",
        "reliability_lstm_plain.png",
        "reliability_lstm_regularized.png",
    ]


@pytest.mark.slow
@skip_on_windows
def test_cli_demo_with_two_devices_runs_lightnings_ddp_launcher(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in DDP_ENV_VARS}
    command = [sys.executable, "-m", "lightning_reg.cli", "demo", "--models", "[lstm]", "--epochs", "2"]
    command += ["--devices", "2", "--out", str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Wrote the table") == 1  # rank 1 prints nothing
    with open(tmp_path / "demo.csv", newline="") as f:
        records = list(csv.DictReader(f))
    assert [r["eval"] for r in records] == EVALS * 2
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in records)


@pytest.mark.slow
def test_full_default_demo_reaches_good_accuracy(tmp_path: Path) -> None:
    result = demo(out=tmp_path, verbose=False)
    assert len(result.rows) == 12
    for row in result.rows:
        check_row_values(row)
        assert row.accuracy >= 0.95, row
    assert len(list(tmp_path.glob("reliability_*.png"))) == 6
    print(f"full default demo: {result.seconds:.0f} s")
