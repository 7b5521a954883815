"""`lightning-reg search`: grid, resume, pruning, workers on one storage, and errors before any trial."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from lightning_reg.cli import cli
from lightning_reg.search import SearchSpaceError, search
from lightning_reg.search import study as study_module
from lightning_reg.search.study import INSTALL_HINT, _split_fit_args, search_cli

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "examples" / "configs" / "cnn_small_digits.yaml"
# Tiny and fast: a 4-8 channel CNN, two training batches and two validation batches per trial.
FAST = [
    "--model.widths=[4, 8]",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=2",
    "--trainer.enable_model_summary=false",
    "--trainer.logger=false",
    "--trainer.accelerator=cpu",
]
NO_CHECKPOINTS = [*FAST, "--trainer.enable_checkpointing=false"]


@pytest.fixture(autouse=True)
def command_line_without_pytest_arguments(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-reg"])


@pytest.fixture
def restore_sigint():
    """Lightning ignores SIGINT after a KeyboardInterrupt in fit ('graceful shutdown'); undo it for the next test."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


def run(tmp_path, space, **kwargs):
    kwargs.setdefault("fit_args", NO_CHECKPOINTS)
    kwargs.setdefault("progress", False)
    kwargs.setdefault("figures", False)
    return search(CONFIG, space, output_dir=tmp_path / "out", **kwargs)


def finished_params(study, key):
    return [t.params[key] for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


# --- a grid over the head dropout -----------------------------------------------------------------------


def test_a_3_point_grid_runs_3_trials_with_their_values_in_the_models_and_best_yaml_reproduces_the_best(tmp_path):
    study = run(tmp_path, {"model.dropout": [0.1, 0.3, 0.5]}, sampler="grid", fit_args=FAST, figures=True)

    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert [t.params["model.dropout"] for t in study.trials] == [0.1, 0.3, 0.5]
    for trial in study.trials:
        (checkpoint,) = Path(trial.user_attrs["dir"]).rglob("*.ckpt")
        hparams = torch.load(checkpoint, weights_only=True)["hyper_parameters"]
        assert hparams["dropout"] == trial.params["model.dropout"]
        assert hparams["widths"] == [4, 8]  # the fit arguments reached every trial
        assert len(trial.intermediate_values) == 1  # one validation, one report

    out = tmp_path / "out"
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["model"]["init_args"]["dropout"] == study.best_params["model.dropout"]
    assert best["trainer"]["default_root_dir"] is None  # the search's own settings stay out of best.yaml
    reproduced = cli(["fit", "--config", str(out / "best.yaml"), f"--trainer.default_root_dir={tmp_path / 'repro'}"])
    assert reproduced.trainer.callback_metrics["val_loss"].item() == pytest.approx(study.best_value, rel=1e-6)

    rows = (out / "trials.csv").read_text().splitlines()
    assert rows[0] == "trial,model.dropout,val_loss,val_acc,state,seconds"
    assert len(rows) == 4
    assert (out / "history.png").stat().st_size > 0
    assert (out / "params.png").stat().st_size > 0
    assert not (out / "importances.png").exists()  # one parameter: skipped, and said so
    assert "importances: skipped: importances need at least 2 searched parameters" in (out / "summary.md").read_text()


def test_importances_are_drawn_with_two_parameters_and_enough_trials(tmp_path):
    space = {"model.dropout": [0.1, 0.5], "model.weight_decay": [0.0, 0.1]}
    study = run(tmp_path, space, sampler="grid", figures=True)
    assert len(study.trials) == 4
    assert (tmp_path / "out" / "importances.png").stat().st_size > 0


def test_tpe_over_a_float_a_log_float_and_a_callback_argument_samples_inside_the_ranges(tmp_path):
    space = {
        "model.dropout": {"type": "float", "low": 0.1, "high": 0.5},
        "model.weight_decay": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
        "trainer.callbacks.MixUp.alpha": {"type": "float", "low": 0.1, "high": 0.4},
    }
    study = run(tmp_path, space, n_trials=2, seed=0, fit_args=[*NO_CHECKPOINTS, "--trainer.callbacks+=MixUp"])
    assert len(study.trials) == 2
    for trial in study.trials:
        assert trial.state == TrialState.COMPLETE
        assert 0.1 <= trial.params["model.dropout"] <= 0.5
        assert 1e-4 <= trial.params["model.weight_decay"] <= 1e-1
        assert 0.1 <= trial.params["trainer.callbacks.MixUp.alpha"] <= 0.4
        config = yaml.safe_load((Path(trial.user_attrs["dir"]) / "trial_config.yaml").read_text())
        (mixup,) = config["trainer"]["callbacks"]
        assert mixup["init_args"]["alpha"] == trial.params["trainer.callbacks.MixUp.alpha"]


def test_a_callback_switched_on_and_off_by_a_categorical_with_a_maximized_monitor(tmp_path):
    space = {"trainer.callbacks.LabelSmoothing": [True, False]}
    fit_args = [*NO_CHECKPOINTS, "--trainer.callbacks+=LabelSmoothing"]
    study = run(tmp_path, space, sampler="grid", monitor="val_acc", mode="max", pruner="none", fit_args=fit_args)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    accuracies = [t.user_attrs["metrics"]["val_acc"] for t in study.trials]
    assert [t.value for t in study.trials] == accuracies
    assert study.best_value == max(accuracies)
    callbacks = [
        yaml.safe_load((Path(t.user_attrs["dir"]) / "trial_config.yaml").read_text())["trainer"]["callbacks"]
        for t in study.trials
    ]
    assert [[c["class_path"] for c in cs] for cs in callbacks] == [["lightning_reg.LabelSmoothing"], []]


def test_lightnings_early_stopping_in_the_config_stops_a_trial_as_in_a_plain_fit(tmp_path):
    early_stopping = [
        "--trainer.callbacks+=EarlyStopping",
        "--trainer.callbacks.monitor=val_loss",
        "--trainer.callbacks.patience=0",
        "--trainer.callbacks.min_delta=10.0",  # no epoch improves by 10: stop after the second validation
    ]
    fit_args = [*NO_CHECKPOINTS, "--trainer.max_epochs=5", *early_stopping]
    study = run(tmp_path, {"model.dropout": [0.2]}, sampler="grid", pruner="none", fit_args=fit_args)
    (trial,) = study.trials
    assert trial.state == TrialState.COMPLETE
    assert sorted(trial.intermediate_values) == [2, 4]
    assert trial.value == trial.intermediate_values[4]


# --- resume ---------------------------------------------------------------------------------------------


class InterruptAtDropout(L.Callback):
    """Press Ctrl+C (raise KeyboardInterrupt) in the fit of the trial with this dropout, once."""

    def __init__(self, dropout: float, marker: str) -> None:
        self.dropout = dropout
        self.marker = Path(marker)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.hparams.dropout == self.dropout and not self.marker.exists():
            self.marker.touch()
            raise KeyboardInterrupt


def test_interrupted_after_2_trials_the_rerun_finishes_the_remaining_ones(tmp_path, restore_sigint):
    space = {"model.dropout": [0.1, 0.2, 0.3, 0.4]}
    interrupt = [
        f"--trainer.callbacks+={__name__}.InterruptAtDropout",
        "--trainer.callbacks.dropout=0.3",
        f"--trainer.callbacks.marker={tmp_path / 'interrupted'}",
    ]
    fit_args = [*NO_CHECKPOINTS, *interrupt]
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown after Ctrl+C exits
        run(tmp_path, space, sampler="grid", fit_args=fit_args)
    storage = f"sqlite:///{tmp_path / 'out' / 'study.db'}"
    first = optuna.load_study(study_name="cnn_small_digits-search", storage=storage)
    assert [t.state for t in first.trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL]

    study = run(tmp_path, space, sampler="grid", fit_args=fit_args)  # the same command again
    assert sorted(finished_params(study, "model.dropout")) == [0.1, 0.2, 0.3, 0.4]
    assert len(study.trials) == 5  # 2 + the interrupted one + the 2 missing, no point run twice
    assert [t.number for t in study.trials if t.state == TrialState.COMPLETE] == [0, 1, 3, 4]


def test_tpe_rerun_with_more_trials_runs_only_the_new_ones(tmp_path):
    space = {"model.dropout": {"type": "float", "low": 0.1, "high": 0.5}}
    run(tmp_path, space, n_trials=1, seed=0)
    study = run(tmp_path, space, n_trials=2, seed=1)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2


def test_the_trial_of_a_killed_worker_is_failed_by_its_stale_heartbeat_and_rerun(tmp_path, monkeypatch):
    monkeypatch.setattr(study_module, "HEARTBEAT_SECONDS", 1)  # grace period 3 s
    space = {"model.dropout": [0.1, 0.2]}
    storage = study_module.make_storage(None, tmp_path / "out")
    dead = optuna.create_study(study_name="cnn_small_digits-search", storage=storage)
    killed = dead.ask()  # a worker took trial 0 (grid point 0.1), beat once, then was killed
    killed.suggest_categorical("model.dropout", [0.1, 0.2])
    storage.record_heartbeat(killed._trial_id)
    time.sleep(4)
    study = run(tmp_path, space, sampler="grid")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert sorted(finished_params(study, "model.dropout")) == [0.1, 0.2]


def test_resuming_with_another_space_is_refused_before_any_trial(tmp_path, monkeypatch):
    run(tmp_path, {"model.dropout": [0.1]}, sampler="grid")
    monkeypatch.setattr(study_module, "_fit", fail_if_called)
    with pytest.raises(ValueError, match=r"was run with space=.*Pass a new `--study-name`"):
        run(tmp_path, {"model.dropout": [0.2]}, sampler="grid")


# --- pruning --------------------------------------------------------------------------------------------


def test_a_clearly_worse_trial_is_pruned_at_its_first_validation(tmp_path):
    # Same seed and data for both trials; the second learns nothing (lr 1e-7) and is worse than the first at the
    # first validation, where the median pruner compares it to the completed first trial.
    fit_args = [*NO_CHECKPOINTS, "--trainer.max_epochs=4", "--trainer.limit_train_batches=5", "--model.scheduler=none"]
    pruner = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    study = run(tmp_path, {"model.lr": [0.05, 1e-7]}, sampler="grid", pruner=pruner, fit_args=fit_args)

    good, bad = study.trials
    assert good.state == TrialState.COMPLETE
    assert sorted(good.intermediate_values) == [5, 10, 15, 20]  # reported at each validation, step = global_step
    assert bad.state == TrialState.PRUNED
    assert list(bad.intermediate_values) == [5]  # stopped right after the first report
    assert bad.intermediate_values[5] > good.intermediate_values[5]


def test_with_pruner_none_the_same_trial_runs_to_the_end(tmp_path):
    fit_args = [*NO_CHECKPOINTS, "--trainer.max_epochs=2", "--trainer.limit_train_batches=5", "--model.scheduler=none"]
    study = run(tmp_path, {"model.lr": [0.05, 1e-7]}, sampler="grid", pruner="none", fit_args=fit_args)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert sorted(study.trials[1].intermediate_values) == [5, 10]


# --- errors before any trial ----------------------------------------------------------------------------


def fail_if_called(*args, **kwargs):
    raise AssertionError("a trial ran although the space or config is wrong")


@pytest.mark.parametrize(
    ("space", "sampler", "match"),
    [
        ({"model.droput": [0.1]}, "tpe", r"'model.droput' is not in the config.*Did you mean 'model.dropout'"),
        ({"model.init_args.dropuot": [0.1]}, "tpe", r"Did you mean 'model.init_args.dropout'"),
        ({"trainer.max_epoch": [1]}, "tpe", r"Did you mean 'trainer.max_epochs'"),
        ({"trainer.callbacks.MixUp.alpha": [0.2]}, "tpe", r"'trainer.callbacks.MixUp.alpha' is not in the config"),
        ({"model.dropout": {"type": "float", "low": 0.5, "high": 0.1}}, "tpe", r"`low` <= `high`.*low=0.5 > high=0.1"),
        ({"model.dropout": {"type": "categorical", "choices": []}}, "tpe", r"`choices` of 'model.dropout'.*non-empty"),
        ({"model.dropout": []}, "tpe", r"'model.dropout' to list at least one value"),
        ({"model.dropout": {"type": "uniform", "low": 0.1, "high": 0.5}}, "tpe", r"one of \['categorical', 'float'"),
        ({"model.dropout": {"type": "float", "lo": 0.1, "high": 0.5}}, "tpe", r"Unknown key\(s\) \['lo'\]"),
        ({"model.weight_decay": {"type": "float", "low": 0, "high": 1, "log": True}}, "tpe", r"log-uniform.*low` > 0"),
        ({"model.dropout": {"type": "float", "low": 0.1, "high": 0.5}}, "grid", r"grid sampler needs finite values"),
        ({"model.dropout": ["high"]}, "tpe", r"(?s)do not fit the config.*Expected a <class 'float'>. Got value: high"),
        ({"model.depth": {"type": "float", "low": 0.5, "high": 2.5}}, "tpe", r"(?s)do not fit the config.*depth"),
        ({}, "tpe", r"at least one parameter"),
    ],
)
def test_bad_spaces_fail_before_any_trial_with_a_clear_error(tmp_path, monkeypatch, space, sampler, match):
    monkeypatch.setattr(study_module, "_fit", fail_if_called)
    with pytest.raises(SearchSpaceError, match=match):
        run(tmp_path, space, sampler=sampler)
    assert not (tmp_path / "out").exists()


def test_a_space_file_that_is_not_a_mapping_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(study_module, "_fit", fail_if_called)
    (tmp_path / "space.yaml").write_text("- model.dropout\n")
    with pytest.raises(SearchSpaceError, match="mapping of config paths to distributions"):
        run(tmp_path, tmp_path / "space.yaml")


def test_a_bad_config_override_fails_before_any_trial(tmp_path, monkeypatch):
    monkeypatch.setattr(study_module, "_fit", fail_if_called)
    with pytest.raises(study_module.ConfigError, match="does not parse"):
        run(tmp_path, {"model.dropout": [0.1]}, fit_args=["--model.no_such_argument=1"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sampler": "bayes"}, r"`sampler` to be one of \('tpe', 'grid', 'random'\)"),
        ({"pruner": "hyperband"}, r"`pruner` to be one of \('median', 'none'\)"),
        ({"mode": "maximize"}, r"`mode` to be one of \('min', 'max'\)"),
        ({"n_trials": 0}, r"`n_trials` >= 1"),
        ({"storage": "study.db"}, r"Optuna storage URL"),
    ],
)
def test_bad_options_fail_before_any_trial(tmp_path, monkeypatch, kwargs, match):
    monkeypatch.setattr(study_module, "_fit", fail_if_called)
    with pytest.raises(ValueError, match=match):
        run(tmp_path, {"model.dropout": [0.1]}, **kwargs)


def test_a_monitor_that_is_never_logged_fails_the_first_trial_and_stops(tmp_path):
    with pytest.raises(ValueError, match=r"'val_los' was not logged at validation.*'val_loss'"):
        run(tmp_path, {"model.dropout": [0.1, 0.2]}, sampler="grid", monitor="val_los")
    study = optuna.load_study(study_name="cnn_small_digits-search", storage=f"sqlite:///{tmp_path / 'out/study.db'}")
    assert [t.state for t in study.trials] == [TrialState.FAIL]


def test_spawned_ddp_ranks_are_refused_with_the_strategy_that_works(tmp_path):
    fit_args = [*NO_CHECKPOINTS, "--trainer.strategy=ddp_spawn", "--trainer.devices=2"]
    with pytest.raises(ValueError, match=r"Use `--trainer\.strategy ddp`"):
        run(tmp_path, {"model.dropout": [0.1]}, fit_args=fit_args)


def test_ranks_started_by_torchrun_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="one search process per worker"):
        run(tmp_path, {"model.dropout": [0.1]})


# --- the command ----------------------------------------------------------------------------------------


def test_the_command_splits_its_own_options_from_the_trials_fit_arguments():
    own, fit = _split_fit_args(
        ["--config", "c.yaml", "--trainer.devices", "2", "--n-trials=3", "--model.dropout=0.1", "--", "--foo"]
    )
    assert own == ["--config", "c.yaml", "--n-trials=3"]
    assert fit == ["--trainer.devices", "2", "--model.dropout=0.1", "--foo"]


def test_the_command_runs_a_grid_from_a_space_file_with_a_journal_storage(tmp_path, capsys):
    space = tmp_path / "dropout.yaml"
    space.write_text("model.dropout: [0.2, 0.4]\n")
    journal = tmp_path / "journal" / "study.log"
    search_cli(
        [
            f"--config={CONFIG}",
            f"--space={space}",
            "--sampler=grid",
            f"--storage=journal:{journal}",
            f"--output-dir={tmp_path / 'out'}",
            "--figures=false",
            *NO_CHECKPOINTS,
        ]
    )
    out = capsys.readouterr().out
    assert "study 'cnn_small_digits-dropout': 2 trials" in out
    assert "best trial" in out
    study = optuna.load_study(
        study_name="cnn_small_digits-dropout",
        storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal))),
    )
    assert sorted(finished_params(study, "model.dropout")) == [0.2, 0.4]


def test_without_optuna_the_command_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` now raises ImportError
    with pytest.raises(SystemExit, match=r'pip install "lightning-reg\[search\]"') as exit_info:
        search_cli([f"--config={CONFIG}", "--space=x.yaml"])
    assert str(exit_info.value) == f"error: {INSTALL_HINT}"
    with pytest.raises(ModuleNotFoundError, match=r"lightning-reg\[search\]"):
        search(CONFIG, {"model.dropout": [0.1]})


# --- two workers on one storage -------------------------------------------------------------------------

WORKER = """
import sys
from lightning_reg.search import search
search(sys.argv[1], {"model.dropout": [0.1, 0.2], "model.weight_decay": [0.0, 0.01, 0.1]}, sampler="grid",
       storage=sys.argv[2], study_name="shared", output_dir=sys.argv[3], progress=False, figures=False, pruner="none",
       fit_args=sys.argv[4:])
"""


# The journal file covers the behaviour in the default run; SQLite (same code path, another backend) is slow-only.
@pytest.mark.parametrize("storage", ["journal", pytest.param("sqlite", marks=pytest.mark.slow)])
def test_two_worker_processes_on_one_storage_finish_a_6_point_grid_without_repeats(tmp_path, storage):
    url = f"journal:{tmp_path / 'study.log'}" if storage == "journal" else f"sqlite:///{tmp_path / 'study.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(CONFIG), url, str(tmp_path / f"out{i}"), *NO_CHECKPOINTS],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs[0][-3000:] + logs[1][-3000:]

    storage_obj = study_module.make_storage(url, tmp_path)
    study = optuna.load_study(study_name="shared", storage=storage_obj)
    points = [(t.params["model.dropout"], t.params["model.weight_decay"]) for t in study.trials if t.params]
    assert sorted(points) == sorted((d, w) for d in (0.1, 0.2) for w in (0.0, 0.01, 0.1))  # each point once
    states = [(t.number, t.state.name, list(t.params.values()), t.user_attrs.get("skipped")) for t in study.trials]
    assert all(t.state == TrialState.COMPLETE for t in study.trials if t.params), states
