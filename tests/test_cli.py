"""The ``lightning-reg`` CLI: demo dispatch, YAML configs, class names, callbacks and the rich progress bar."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

import lightning_reg
import lightning_reg.callbacks
import lightning_reg.cli
import zoo
from lightning_reg.cli import cli, main

CONFIGS = Path(__file__).parent.parent / "examples" / "configs"
QUIET = ["--trainer.logger=false", "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu"]
DIGITS_CNN = [
    "--model=CNNClassifier",
    "--model.widths=[4, 8]",
    "--data=DigitsDataModule",
    "--seed_everything=0",
    *QUIET,
]


@pytest.fixture(autouse=True)
def command_line_without_pytest_arguments(monkeypatch):
    """LightningCLI warns when ``args`` and ``sys.argv`` (here pytest's) both hold arguments."""
    monkeypatch.setattr(sys, "argv", ["lightning-reg"])


def progress_bars(result) -> list[ProgressBar]:
    return [c for c in result.trainer.callbacks if isinstance(c, ProgressBar)]


def test_demo_subcommand_is_dispatched_to_the_demo_with_its_arguments(monkeypatch):
    import lightning_reg.demo

    calls = []
    monkeypatch.setattr(lightning_reg.demo, "demo_cli", calls.append)
    main(["demo", "--epochs", "1", "--models", "cnn"])
    assert calls == [["--epochs", "1", "--models", "cnn"]]


def start_a_process_group(*_args, **_kwargs) -> None:
    """What a DDP strategy does on each rank: here one rank of gloo, over an in-memory store."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


@pytest.mark.parametrize("command", [["fit"], ["demo"], ["search"]])
def test_a_command_that_succeeded_destroys_the_process_group_its_strategy_started(monkeypatch, command):
    # Left to interpreter shutdown, gloo's threads aborted `lightning-reg fit` under DDP after training (exit -6).
    import lightning_reg.demo
    import lightning_reg.search

    monkeypatch.setattr(lightning_reg.cli, "cli", start_a_process_group)
    monkeypatch.setattr(lightning_reg.demo, "demo_cli", start_a_process_group)
    monkeypatch.setattr(lightning_reg.search, "search_cli", start_a_process_group)
    main(command)
    assert not dist.is_initialized()


def test_a_command_that_raised_leaves_the_process_group_to_the_exception(monkeypatch):
    # Destroying it while other ranks may still be inside a collective could hang them.
    def fail(*_args, **_kwargs) -> None:
        start_a_process_group()
        raise RuntimeError("rank failed")

    monkeypatch.setattr(lightning_reg.cli, "cli", fail)
    try:
        with pytest.raises(RuntimeError, match="rank failed"):
            main(["fit"])
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_console_script_reads_sys_argv_without_warnings(monkeypatch, capsys, recwarn):
    config = str(CONFIGS / "cnn_digits.yaml")
    monkeypatch.setattr(sys, "argv", ["lightning-reg", "fit", "--config", config, "--print_config"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code in (0, None)
    assert "class_path: zoo.CNNClassifier" in capsys.readouterr().out
    assert not [w for w in recwarn if "args parameter" in str(w.message)]


def test_fit_from_yaml_config_trains_the_configured_model(tmp_path):
    result = cli(
        [
            "fit",
            "--config",
            str(CONFIGS / "cnn_digits.yaml"),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert result.trainer.global_step == 2
    assert type(result.model).__name__ == "CNNClassifier"
    assert "val_acc" in result.trainer.callback_metrics
    assert (tmp_path / "lightning_logs" / "version_0" / "config.yaml").is_file()  # saved for reproduction


# --- the rich progress bar ------------------------------------------------------------------------------


def test_progress_shows_with_the_rich_progress_bar_by_default():
    result = cli(DIGITS_CNN, run=False)
    assert [type(c) for c in progress_bars(result)] == [RichProgressBar]
    assert result.trainer.progress_bar_callback is progress_bars(result)[0]


def test_rich_progress_bar_is_added_beside_the_callbacks_of_a_config():
    result = cli(["--config", str(CONFIGS / "cnn_digits_regularized.yaml"), *QUIET], run=False)
    names = [type(c).__name__ for c in result.trainer.callbacks]
    expected = ["MixUpCutMix", "LabelSmoothing", "BNRecalibration", "TemperatureScaling", "MCDropoutEvaluation"]
    assert names[:6] == [*expected, "RichProgressBar"]


def test_rich_progress_bar_is_added_beside_callbacks_appended_on_the_command_line():
    result = cli([*DIGITS_CNN, "--trainer.callbacks+=MixUp", "--trainer.callbacks+=LabelSmoothing"], run=False)
    assert [type(c).__name__ for c in result.trainer.callbacks][:3] == ["MixUp", "LabelSmoothing", "RichProgressBar"]


def test_a_progress_bar_chosen_by_the_user_replaces_the_rich_one():
    result = cli(
        [*DIGITS_CNN, "--trainer.callbacks+=TQDMProgressBar", "--trainer.callbacks.refresh_rate=50"], run=False
    )
    (bar,) = progress_bars(result)
    assert type(bar) is TQDMProgressBar
    assert bar.refresh_rate == 50


@pytest.mark.parametrize("config", [[], ["--config", str(CONFIGS / "cnn_digits_regularized.yaml")]])
def test_disabling_the_progress_bar_adds_none(config):
    result = cli([*DIGITS_CNN, *config, "--trainer.enable_progress_bar=false"], run=False)
    assert progress_bars(result) == []
    assert result.trainer.progress_bar_callback is None


def test_fit_draws_the_rich_progress_bar(tmp_path, capsys):
    cli(["fit", *DIGITS_CNN, "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert "Epoch 0/0" in out
    assert "━" in out  # rich's bar glyph (TQDM draws blocks)


# --- short class names ----------------------------------------------------------------------------------


def test_callback_short_name_with_its_arguments():
    result = cli(
        [
            *DIGITS_CNN,
            "--trainer.callbacks+=MixUp",
            "--trainer.callbacks.alpha=0.4",
            "--trainer.callbacks+=LabelSmoothing",
            "--trainer.callbacks.smoothing=0.2",
        ],
        run=False,
    )
    mixup, smoothing = result.trainer.callbacks[:2]
    assert isinstance(mixup, lightning_reg.MixUp)
    assert mixup.alpha == 0.4
    assert isinstance(smoothing, lightning_reg.LabelSmoothing)
    assert smoothing.smoothing == 0.2


@pytest.mark.parametrize("name", lightning_reg.callbacks.__all__)
def test_every_callback_of_ours_resolves_by_short_name_and_by_class_path(name):
    for spelling in (name, f"lightning_reg.{name}"):
        result = cli([*DIGITS_CNN, f"--trainer.callbacks+={spelling}"], run=False)
        assert type(result.trainer.callbacks[0]) is getattr(lightning_reg, name)


@pytest.mark.parametrize(
    ("args", "model_class"),
    [
        (["--model=CNNClassifier"], zoo.CNNClassifier),
        (["--model=zoo.CNNClassifier"], zoo.CNNClassifier),
        (["--model=zoo.cnn.CNNClassifier"], zoo.CNNClassifier),
        (["--model=RNNClassifier", "--model.cell=gru", "--data.as_sequence=true"], zoo.RNNClassifier),
        (["--model=TransformerClassifier", "--data.as_sequence=true"], zoo.TransformerClassifier),
        (["--model=ImageClassifier", "--model.backbone=test_resnet", "--model.in_channels=1"], zoo.ImageClassifier),
    ],
)
def test_model_by_short_name_or_class_path(args, model_class):
    result = cli(["--data=DigitsDataModule", *args, *QUIET], run=False)
    assert type(result.model) is model_class
    assert type(result.datamodule) is zoo.data.DigitsDataModule


def test_model_arguments_follow_the_model_name():
    result = cli(
        [
            "--model=CNNClassifier",
            "--model.widths=[8, 16, 32]",
            "--model.dropout=0.1",
            "--data=DigitsDataModule",
            *QUIET,
        ],
        run=False,
    )
    assert result.model.hparams.widths == [8, 16, 32]
    assert result.model.hparams.dropout == 0.1


def test_data_by_short_name():
    result = cli([*DIGITS_CNN, "--data=TorchvisionDataModule", "--data.name=mnist", "--data.root=nowhere"], run=False)
    assert type(result.datamodule) is zoo.data.TorchvisionDataModule
    assert result.datamodule.dataset == "mnist"


def test_registry_names_are_not_class_names(capsys):
    # `--model cnn_small` is rejected: the registry's names live in the configs (cnn_small_digits.yaml, ...).
    with pytest.raises(SystemExit) as exit_info:
        cli(["--model=cnn_small", "--data=DigitsDataModule", *QUIET], run=False)
    assert exit_info.value.code == 2
    assert "cnn_small" in capsys.readouterr().err


# --- any LightningModule and DataModule by import path (issue 12, point 20) ------------------------------

USER_PACKAGE = '''
import lightning as L
import torch
import torch.nn.functional as F
from torch import nn


class MyModule(L.LightningModule):
    """A user's module that shares nothing with the zoo."""

    def __init__(self, hidden: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.num_classes = 10
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 10)
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
'''


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A package `my_pkg` on sys.path, as a user's own project would be."""
    package = tmp_path / "user_src" / "my_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(USER_PACKAGE)
    monkeypatch.syspath_prepend(str(package.parent))
    yield "my_pkg"
    sys.modules.pop("my_pkg", None)


def test_a_user_module_by_import_path_is_accepted_with_its_arguments(user_package):
    result = cli([f"--model={user_package}.MyModule", "--model.hidden=5", "--data=DigitsDataModule", *QUIET], run=False)
    assert type(result.model).__module__ == user_package
    assert type(result.model).__name__ == "MyModule"
    assert result.model.hparams.hidden == 5
    assert result.model.net[1].out_features == 5


def test_a_user_module_by_import_path_trains_with_our_callbacks_by_short_name(user_package, tmp_path):
    result = cli(
        [
            "fit",
            f"--model={user_package}.MyModule",
            "--data=DigitsDataModule",
            "--trainer.callbacks+=MixUp",
            "--trainer.callbacks+=LabelSmoothing",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
        ]
    )
    assert result.trainer.global_step == 2
    assert [type(c) for c in result.trainer.callbacks[:2]] == [lightning_reg.MixUp, lightning_reg.LabelSmoothing]
    assert "val_loss" in result.trainer.callback_metrics


def test_lightning_demo_boring_model_and_datamodule_by_import_path(tmp_path):
    from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

    result = cli(
        [
            "fit",
            "--model=lightning.pytorch.demos.boring_classes.BoringModel",
            "--data=lightning.pytorch.demos.boring_classes.BoringDataModule",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
        ]
    )
    assert type(result.model) is BoringModel
    assert type(result.datamodule) is BoringDataModule
    assert result.trainer.global_step == 3


def test_a_class_that_is_not_a_lightning_module_is_rejected_with_its_path(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["--model=torch.nn.Linear", "--data=DigitsDataModule", *QUIET], run=False)
    assert exit_info.value.code == 2
    assert "torch.nn.Linear" in capsys.readouterr().err
