"""`lightning-reg demo`: the regimes' table, the files, determinism, the GPU flags, the options, DDP (tiny runs)."""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_calibration_error

import lightning_reg.demo
import zoo
from lightning_reg.cli import main
from lightning_reg.demo import (
    FULL_MODELS,
    FULL_SEEDS,
    RECIPES,
    SUMMARY_COLUMNS,
    DemoResult,
    Measurement,
    _adabn_logits,
    _auroc,
    _check_models,
    _check_seeds,
    _data,
    _logits,
    _Options,
    demo,
    trainer_flags,
)
from tests.helpers.bn import norm_input_statistics
from tests.helpers.ddp import DDP_ENV_VARS, scrubbed_ddp_env, skip_on_windows
from zoo.data import CORRUPTIONS, SEVERITIES

TRAINED_METRICS = {
    "clean_acc",
    "clean_nll",
    "clean_ece",
    "temperature",
    "ts_nll",
    "ts_ece",
    "noise_acc",
    "mc_acc",
    "misclass_auroc_det",
    "misclass_auroc_mc",
    "ood_auroc_det",
    "ood_auroc_mc",
    "ood_auroc_mi",
    "fit_seconds",
    "noise_fit_seconds",
}
SHIFT_METRICS = {f"shift_{k}/{c}/{s}" for k in ("acc", "ece") for c in CORRUPTIONS for s in SEVERITIES}


Trained = dict[tuple[str, str, bool], L.LightningModule]


@contextlib.contextmanager
def _keeping_the_trained_models() -> Iterator[Trained]:
    """Record every model the demo trains, keyed by (model, recipe, noisy labels), to check its numbers against."""
    trained: Trained = {}
    real_fit = lightning_reg.demo._fit

    def recording_fit(name, recipe, data, seed, options):
        model, text, seconds = real_fit(name, recipe, data, seed, options)
        trained[(name, recipe, bool(data.label_noise))] = model
        return model, text, seconds

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lightning_reg.demo, "_fit", recording_fit)
        yield trained


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoResult, Trained]:
    """The default models (a BN CNN and an LSTM), 1 epoch of 1 batch each: every regime in a few seconds."""
    with _keeping_the_trained_models() as trained:
        result = demo(epochs=1, out=tmp_path_factory.mktemp("demo"), limit_batches=1, verbose=False)
    return result, trained


@pytest.fixture(scope="module")
def tiny(tiny_run: tuple[DemoResult, Trained]) -> DemoResult:
    return tiny_run[0]


def metrics_of(result: DemoResult, model: str, recipe: str) -> set[str]:
    return {m.metric for m in result.measurements if m.model == model and m.recipe == recipe}


def test_demo_measures_every_regime_for_both_models_and_adabn_only_where_there_is_batchnorm(tiny: DemoResult) -> None:
    assert tiny.models() == ["cnn_small", "lstm"]
    for model in ("cnn_small", "lstm"):
        for recipe in ("plain", "regularized"):
            assert metrics_of(tiny, model, recipe) == TRAINED_METRICS | SHIFT_METRICS
    for recipe in ("plain + AdaBN", "regularized + AdaBN"):
        assert metrics_of(tiny, "cnn_small", recipe) == SHIFT_METRICS
        assert metrics_of(tiny, "lstm", recipe) == set()  # LayerNorm: nothing to adapt
    assert tiny.recipes == {
        "cnn_small": "MixUpCutMix + LabelSmoothing + BNRecalibration",
        "lstm": "MixUp + LabelSmoothing",
    }


def _eval_logits(model: L.LightningModule, dataset: TensorDataset) -> tuple[Tensor, Tensor]:
    x, y = dataset.tensors
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(x).double()
    model.train(was_training)
    return logits, y


def _assert_measured_as_recomputed(result: DemoResult, trained: Trained, seed: int = 0) -> None:
    """Each trained model's numbers, recomputed here from its own forward pass with torch and torchmetrics."""
    for (name, recipe, noisy), model in trained.items():
        data = _data(name, seed, noisy=noisy)

        def measured(metric: str, name: str = name, recipe: str = recipe) -> float:
            return result.values(name, recipe, metric)[0]

        logits, y = _eval_logits(model, data.test_set)
        accuracy = float(multiclass_accuracy(logits, y, num_classes=logits.shape[1], average="micro"))
        if noisy:  # trained on noisy labels, tested on the clean ones
            assert measured("noise_acc") == pytest.approx(accuracy, abs=1e-6), (name, recipe)
            continue
        assert measured("clean_acc") == pytest.approx(accuracy, abs=1e-6), (name, recipe)
        assert measured("clean_nll") == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-4)
        probs = logits.softmax(1).float()
        ece = multiclass_calibration_error(probs, y, num_classes=probs.shape[1], n_bins=15, norm="l1")
        assert measured("clean_ece") == pytest.approx(float(ece), abs=1e-4)
        # The temperature minimises the validation NLL; the TS numbers are the test set's at that temperature.
        t = measured("temperature")
        val_logits, val_y = _eval_logits(model, data.val_set)
        nll_at = {f: float(F.cross_entropy(val_logits / (t * f), val_y)) for f in (1 / 1.05, 1.0, 1.05)}
        assert nll_at[1.0] <= min(nll_at[1 / 1.05], nll_at[1.05]) + 1e-6, (name, recipe, t, nll_at)
        assert measured("ts_nll") == pytest.approx(float(F.cross_entropy(logits / t, y)), rel=1e-4)
        # Covariate shift as trained (no AdaBN): one corrupted set ties the rows to the model.
        shift_logits, shift_y = _eval_logits(model, data.corrupted_test_set("contrast", 3, seed=seed))
        shift_acc = float((shift_logits.argmax(1) == shift_y).double().mean())
        assert measured("shift_acc/contrast/3") == pytest.approx(shift_acc, abs=1e-6), (name, recipe)


def test_demo_numbers_are_those_recomputed_from_the_trained_models(tiny_run: tuple[DemoResult, Trained]) -> None:
    result, trained = tiny_run
    expected = [
        (m, r, noisy) for m in ("cnn_small", "lstm") for r in ("plain", "regularized") for noisy in (False, True)
    ]
    assert sorted(trained) == sorted(expected)
    _assert_measured_as_recomputed(result, trained)
    assert {m.seed for m in result.measurements} == {0}


def test_demo_summary_table_has_a_row_per_model_and_recipe_with_dashes_where_not_measured(tiny: DemoResult) -> None:
    rows = tiny.summary()
    assert [tuple(r[:2]) for r in rows] == [("cnn_small", recipe) for recipe in RECIPES] + [
        ("lstm", "plain"),
        ("lstm", "regularized"),
    ]
    assert all(len(r) == len(SUMMARY_COLUMNS) for r in rows)
    shift = [SUMMARY_COLUMNS.index(c) for c in SUMMARY_COLUMNS if c.startswith("shift")]
    for row in rows:
        measured = [i for i, cell in enumerate(row) if cell != "-"]
        if "AdaBN" in row[1]:
            assert measured == [0, 1, *shift]
        else:
            assert "-" not in row[2:8]
    clean = rows[0][SUMMARY_COLUMNS.index("clean acc")]
    assert clean == f"{100 * tiny.values('cnn_small', 'plain', 'clean_acc')[0]:.1f} %"
    mean_shift = statistics.fmean(
        m.value
        for m in tiny.measurements
        if m.recipe == "plain + AdaBN" and m.metric.startswith("shift_acc/") and m.metric.endswith("/3")
    )
    assert rows[2][SUMMARY_COLUMNS.index("shift acc (sev 3)")] == f"{100 * mean_shift:.1f} %"


def test_demo_writes_markdown_csv_and_one_figure(tiny: DemoResult) -> None:
    out = tiny.out
    assert sorted(p.name for p in out.iterdir()) == ["demo.csv", "demo.md", "shift.png"]
    assert sorted(p.name for p in tiny.files) == ["demo.csv", "demo.md", "shift.png"]
    assert (out / "shift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "demo.md").read_text()
    assert "| " + " | ".join(SUMMARY_COLUMNS) + " |" in markdown
    assert "| model | recipe | corruption | clean | sev 1 | sev 2 | sev 3 | sev 4 | sev 5 |" in markdown
    # per-corruption table: a row per corruption for each measured (model, recipe)
    assert markdown.count("| cnn_small | regularized + AdaBN |") == 1 + len(CORRUPTIONS)
    assert markdown.count("| lstm | plain |") == 1 + len(CORRUPTIONS)
    with open(out / "demo.csv", newline="") as f:
        records = list(csv.DictReader(f))
    assert len(records) == len(tiny.measurements)
    for record, m in zip(records, tiny.measurements, strict=True):
        assert (record["model"], record["recipe"], int(record["seed"]), record["metric"]) == (
            m.model,
            m.recipe,
            m.seed,
            m.metric,
        )
        assert float(record["value"]) == m.value or (math.isnan(m.value) and record["value"] == "nan")


def test_adabn_rows_come_from_bn_recalibration_on_each_corrupted_set(tmp_path: Path) -> None:
    # An independent reference: recalibrate a copy with the functional core on the same batches.
    L.seed_everything(0, verbose=False)
    model = zoo.create("cnn_small", num_classes=8)
    data = zoo.data.DigitsDataModule(classes=range(8))
    data.setup()
    sets = {
        ("contrast", 4): data.corrupted_test_set("contrast", 4),
        ("affine", 1): data.corrupted_test_set("affine", 1),
    }
    before = {k: v.clone() for k, v in model.state_dict().items()}
    options = _Options(None, "cpu", 1, "auto", None, None)
    adapted = _adabn_logits(model, sets, options)
    for key, dataset in sets.items():
        # The reference: every BN layer's running statistics set to those of its inputs on the whole corrupted set
        # (captured by hooks, pooled by torch.var_mean), then a plain eval-mode forward.
        reference = zoo.create("cnn_small", num_classes=8)
        reference.load_state_dict(before)
        statistics = norm_input_statistics(reference, [x for x, _ in DataLoader(dataset, batch_size=64)])
        layers = dict(reference.named_modules())
        assert len(statistics) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in reference.modules())
        for name, (mean, var) in statistics.items():
            layers[name].running_mean.copy_(mean)
            layers[name].running_var.copy_(var)
        expected, targets = _eval_logits(reference, dataset)
        torch.testing.assert_close(adapted[key][0].double(), expected, rtol=1e-4, atol=1e-4)
        assert torch.equal(adapted[key][1], targets)
        plain, _ = _logits(model, dataset)
        assert not torch.allclose(plain.double(), expected, atol=1e-3)  # the statistics did change
    for name, value in model.state_dict().items():  # the model itself was not adapted
        assert torch.equal(value, before[name]), name


def test_auroc_is_the_pairwise_ranking_probability() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (60,), generator=g).float()  # many ties
    positives = torch.rand(60, generator=g) < 0.4
    pos, neg = scores[positives], scores[~positives]
    pairs = (pos[:, None] > neg[None, :]).float() + 0.5 * (pos[:, None] == neg[None, :]).float()
    assert _auroc(scores, positives) == pytest.approx(float(pairs.mean()))
    assert math.isnan(_auroc(scores, torch.zeros(60, dtype=torch.bool)))  # no errors to find: undefined
    assert math.isnan(_auroc(scores, torch.ones(60, dtype=torch.bool)))


def test_cells_show_mean_and_sample_spread_over_seeds_and_average_corruptions() -> None:
    ms = [
        Measurement("cnn", "plain", 0, "clean_acc", 0.90),
        Measurement("cnn", "plain", 1, "clean_acc", 0.94),
        Measurement("cnn", "plain", 2, "clean_acc", math.nan),  # an undefined value is left out, not zero
        Measurement("cnn", "plain", 0, "shift_acc/contrast/3", 0.5),
        Measurement("cnn", "plain", 0, "shift_acc/affine/3", 0.7),
        Measurement("cnn", "plain", 0, "shift_acc/affine/2", 0.9),
    ]
    result = DemoResult(ms, {}, (0, 1, 2), Path("x"))
    assert result.values("cnn", "plain", "shift_acc/*/3") == [pytest.approx(0.6)]
    assert result.cell("cnn", "plain", "clean_acc", "pct") == f"92.0 ± {100 * statistics.stdev([0.90, 0.94]):.1f} %"
    assert result.cell("cnn", "plain", "shift_acc/*/3", "pct") == "60.0 %"
    assert result.cell("cnn", "plain", "ood_auroc_mc") == "-"
    assert result.cell("cnn", "regularized", "clean_acc") == "-"


@pytest.fixture(scope="module")
def lstm_again(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoResult, dict]:
    """The tiny run's lstm once more (seed 0), started with the warn-only deterministic flags of a GPU run set."""
    flags = {**trainer_flags("gpu", 1), "accelerator": "cpu"}  # what the demo gives Lightning on a GPU
    threads = torch.get_num_threads()
    try:
        L.Trainer(**flags)
        before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
        # The demo sets deterministic=True (not warn-only) on CPU while it trains, and one thread.
        result = demo(["lstm"], epochs=1, out=tmp_path_factory.mktemp("again"), limit_batches=1, verbose=False)
        after = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    finally:
        torch.use_deterministic_algorithms(False)
    return result, {"before": before, "after": after, "threads": (threads, torch.get_num_threads())}


@pytest.fixture(scope="module")
def cli_lstm_seed_1(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """`lightning-reg demo --models lstm --epochs 1 --seed [1]`, cut to one batch like the tiny run; its output."""
    out = tmp_path_factory.mktemp("cli")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(lightning_reg.demo, "demo", functools.partial(lightning_reg.demo.demo, limit_batches=1))
        main(["demo", "--models", "lstm", "--epochs", "1", "--seed", "[1]", "--out", str(out)])
    return printed.getvalue(), out


def _untimed(measurements: list[Measurement]) -> list[Measurement]:
    return [replace(m, value=0.0) if "seconds" in m.metric else m for m in measurements]


def test_demo_is_deterministic_given_the_seed(
    tiny: DemoResult, lstm_again: tuple[DemoResult, dict], cli_lstm_seed_1: tuple[str, Path]
) -> None:
    lstm = [m for m in tiny.measurements if m.model == "lstm"]  # seed 0, trained after cnn_small in the same process
    assert _untimed(lstm_again[0].measurements) == _untimed(lstm)
    with open(cli_lstm_seed_1[1] / "demo.csv", newline="") as f:
        seed_1 = {(r["recipe"], r["metric"]): r["value"] for r in csv.DictReader(f) if "seconds" not in r["metric"]}
    seed_0 = {(m.recipe, m.metric): str(m.value) for m in lstm if "seconds" not in m.metric}
    assert seed_1.keys() == seed_0.keys()
    assert seed_1 != seed_0


def test_demo_builds_warn_only_deterministic_trainers_on_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # No GPU needed: record what the demo asks of Lightning, and stop at the first Trainer.
    built: list[dict] = []

    class StopError(Exception):
        pass

    def recorder(**kwargs: object) -> None:
        built.append(kwargs)
        raise StopError

    monkeypatch.setattr("lightning_reg.demo.L.Trainer", recorder)
    with pytest.raises(StopError):
        demo(["cnn_small"], epochs=1, out=tmp_path, accelerator="gpu", verbose=False)
    assert built[0]["accelerator"] == "gpu"
    assert built[0]["deterministic"] == "warn"  # AdaptiveAvgPool2d's CUDA backward has no deterministic kernel
    assert trainer_flags("cpu", 1)["deterministic"] is True
    assert trainer_flags("auto", 1)["deterministic"] == "warn"


def test_warn_only_flag_reaches_torch_and_the_demo_restores_flags_and_threads(
    lstm_again: tuple[DemoResult, dict],
) -> None:
    state = lstm_again[1]
    assert state["before"] == (True, True)  # Lightning set the warn-only flag the demo asks for on a GPU
    assert state["after"] == (True, True)  # both flags as they were before the demo
    assert state["threads"][1] == state["threads"][0]  # the demo trains on one thread and gives the count back


def test_full_runs_every_family_over_three_seeds_unless_told_otherwise() -> None:
    assert _check_models(None, full=True) == list(FULL_MODELS)
    assert {type(zoo.create(n, num_classes=8)).__name__ for n in FULL_MODELS} == {
        "CNNClassifier",
        "RNNClassifier",
        "TransformerClassifier",
        "ImageClassifier",
        "MLPClassifier",
    }
    assert _check_seeds(0, full=True) == FULL_SEEDS == (0, 1, 2)
    assert _check_seeds([4, 5], full=True) == (4, 5)
    assert _check_models(None, full=False) == ["cnn_small", "lstm"]
    assert _check_seeds(7, full=False) == (7,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"models": ["resnet50"]}, r"Expected `models` to be a non-empty list of \('cnn_small', 'cnn', 'lstm'"),
        ({"models": []}, "non-empty list"),
        ({"epochs": 0}, "Expected `epochs` to be a positive int or None"),
        ({"limit_batches": 0}, "Expected `limit_batches` to be a positive int or None"),
        ({"seed": [1, 1]}, "Expected `seed` to be an int or a list of distinct ints"),
        ({"seed": True}, "Expected `seed` to be an int or a list of distinct ints"),
        ({"seed": []}, "Expected `seed` to be an int or a list of distinct ints"),
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
    for option in ("--models", "--epochs", "--out", "--seed", "--accelerator", "--devices", "--full"):
        assert option in help_text
    assert "--limit_batches" not in help_text  # a test knob of `demo()`, not a CLI option


def test_cli_rejects_an_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--models", "[resnet50]"])
    assert exit_info.value.code != 0
    assert "resnet50" in capsys.readouterr().err


def test_cli_trains_prints_the_table_and_says_where_it_wrote(cli_lstm_seed_1: tuple[str, Path]) -> None:
    out, folder = cli_lstm_seed_1
    for column in ("clean acc", "noisy", "TS", "AUROC"):  # rich wraps the long titles over two lines
        assert column in out
    assert out.count("lstm") >= 2
    assert str(folder) in out
    assert (folder / "demo.md").exists()
    assert "seed(s) 1," in (folder / "demo.md").read_text()
    assert "GPU available" not in out  # Lightning's banners stay quiet


@skip_on_windows
def test_demo_on_two_cpu_processes_writes_once_and_measures_what_one_process_measures(tmp_path: Path) -> None:
    # In-process DDP (fork): `strategy="ddp"`, the CLI's default for 2 devices, re-runs the command, which
    # inside pytest would re-run pytest; it is exercised as a subprocess in the slow test below.
    with scrubbed_ddp_env(), _keeping_the_trained_models() as trained:
        result = demo(["lstm"], epochs=1, out=tmp_path, devices=2, strategy="ddp_fork", limit_batches=2, verbose=False)
    for recipe in ("plain", "regularized"):
        assert metrics_of(result, "lstm", recipe) == TRAINED_METRICS | SHIFT_METRICS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.csv", "demo.md", "shift.png"]
    # The weights trained by the 2 ranks came back, and every number is what one process computes from them.
    assert len(trained) == 4
    _assert_measured_as_recomputed(result, trained)


@pytest.mark.slow
@skip_on_windows
def test_cli_demo_with_two_devices_runs_lightnings_ddp_launcher(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in DDP_ENV_VARS}
    command = [sys.executable, "-m", "lightning_reg.cli", "demo", "--models", "[cnn_small]", "--epochs", "2"]
    command += ["--devices", "2", "--out", str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Wrote demo.md") == 1  # rank 1 prints nothing
    with open(tmp_path / "demo.csv", newline="") as f:
        records = list(csv.DictReader(f))
    assert {r["recipe"] for r in records} == set(RECIPES)  # AdaBN ran under DDP too
    assert all(0.0 <= float(r["value"]) <= 1.0 for r in records if r["metric"].startswith("shift_acc"))


@pytest.mark.slow
def test_full_default_demo_reaches_good_clean_accuracy(tmp_path: Path) -> None:
    result = demo(out=tmp_path, verbose=False)
    for model in ("cnn_small", "lstm"):
        for recipe in ("plain", "regularized"):
            assert result.values(model, recipe, "clean_acc")[0] >= 0.95
            assert result.values(model, recipe, "noise_acc")[0] >= 0.80
    print(f"full default demo: {result.seconds:.0f} s")
