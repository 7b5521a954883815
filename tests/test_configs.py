"""examples/configs/: one config per zoo model on digits and on CIFAR-10, plain and regularized; each parses,
prints with ``--print_config`` and fits one batch (CIFAR-10 on tiny files in the real format, no download)."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

import zoo
from lightning_reg.cli import cli, main
from tests.helpers.data import write_fake_cifar10

CONFIGS = Path(__file__).parent.parent / "examples" / "configs"
DATASETS = ("digits", "cifar10")
ALL = sorted(p.name for p in CONFIGS.glob("*.yaml"))
DIGITS = [name for name in ALL if "_digits" in name]
CIFAR10 = [name for name in ALL if "_cifar10" in name]
# Registry arguments a config may change to fit its data: image channels and size, patch size for 8x8 digits.
INPUT_ADAPTATIONS = {"in_channels", "image_size", "patch_size"}
QUIET = ["--trainer.logger=false", "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu"]


@pytest.fixture(autouse=True)
def command_line_without_pytest_arguments(monkeypatch):
    """LightningCLI warns when ``args`` and ``sys.argv`` (here pytest's) both hold arguments."""
    monkeypatch.setattr(sys, "argv", ["lightning-reg"])


def load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def test_every_zoo_model_has_a_plain_and_a_regularized_config_on_each_dataset():
    expected = {
        f"{model}_{data}{suffix}.yaml"
        for model in zoo.list_models()
        for data in DATASETS
        for suffix in ("", "_regularized")
    }
    assert expected <= set(ALL)
    assert set(DIGITS) | set(CIFAR10) == set(ALL)


def test_readme_lists_every_config():
    readme = (CONFIGS / "README.md").read_text()
    assert [name for name in ALL if f"`{name}`" not in readme] == []


@pytest.mark.parametrize("name", ALL)
def test_config_builds_the_registry_model_of_its_name(name):
    model_name = name.split(f"_{'digits' if name in DIGITS else 'cifar10'}")[0]
    registry = zoo.MODELS[model_name]
    model = load(name)["model"]
    registry_class = getattr(registry, "func", registry)
    assert model["class_path"] == f"zoo.{registry_class.__name__}"
    # The registry's own arguments (widths, cell, backbone, ViT-Tiny's sizes) are spelled out in the config.
    keywords = getattr(registry, "keywords", {})
    expected = {k: list(v) if isinstance(v, tuple) else v for k, v in keywords.items() if k not in INPUT_ADAPTATIONS}
    assert {k: model["init_args"].get(k) for k in expected} == expected


@pytest.mark.parametrize("name", ALL)
def test_print_config_prints_the_config(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / name), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    written = load(name)
    assert printed["model"]["class_path"] == written["model"]["class_path"]
    assert printed["model"]["init_args"] | written["model"]["init_args"] == printed["model"]["init_args"]
    assert printed["data"]["init_args"] | written["data"]["init_args"] == printed["data"]["init_args"]
    callbacks = printed["trainer"]["callbacks"] or []
    assert [c["class_path"].rsplit(".", 1)[-1] for c in callbacks] == [
        c["class_path"].rsplit(".", 1)[-1] for c in written["trainer"].get("callbacks", [])
    ]
    assert printed["trainer"]["max_epochs"] == written["trainer"]["max_epochs"]


def fit_one_batch(name: str, tmp_path: Path, *extra: str):
    return cli(
        [
            "fit",
            "--config",
            str(CONFIGS / name),
            "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
            *extra,
        ]
    )


def check_fitted(result, name: str) -> None:
    written = load(name)
    assert result.trainer.state.finished
    assert result.trainer.global_step == 1
    assert f"zoo.{type(result.model).__name__}" == written["model"]["class_path"]
    assert {"train_loss", "val_loss", "val_acc"} <= set(result.trainer.callback_metrics)
    ours = [type(c).__name__ for c in result.trainer.callbacks if type(c).__module__.startswith("lightning_reg")]
    assert ours.count("RegularizationCheck") == 1  # the guard rails the CLI adds by default
    ours.remove("RegularizationCheck")
    assert ours == [c["class_path"].rsplit(".", 1)[-1] for c in written["trainer"].get("callbacks", [])]


@pytest.mark.parametrize("name", DIGITS)
def test_digits_config_fits(name, tmp_path):
    result = fit_one_batch(name, tmp_path)
    check_fitted(result, name)
    if any("MCDropoutEvaluation" in c["class_path"] for c in load(name)["trainer"].get("callbacks", [])):
        assert "mc/val/nll" in result.trainer.callback_metrics


@pytest.mark.parametrize("name", CIFAR10)
def test_cifar10_config_fits_on_files_in_the_real_format(name, tmp_path, monkeypatch):
    # The config as written (download: true) finds the files "already downloaded and verified": no network.
    root = write_fake_cifar10(tmp_path / "data", monkeypatch)
    result = fit_one_batch(name, tmp_path, f"--data.root={root}", "--data.num_workers=0")
    check_fitted(result, name)
    batch = next(iter(result.datamodule.train_dataloader()))
    assert tuple(batch[0].shape[1:]) == result.datamodule.input_shape


SCRIPTS = Path(__file__).parent.parent / "examples" / "slurm"
# What the scripts' shell variables hold in a run (a 1-node torchrun, a SLURM job with 8 CPUs a task).
SHELL_VALUES = {"NNODES": "1", "GPUS_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "8", "SLURM_JOB_NAME": "job"}


def fit_arguments(script: Path) -> list[str]:
    """The arguments after ``lightning-reg fit`` in a shell script, with its variables filled in."""
    (command,) = [
        line
        for line in script.read_text().replace("\\\n", " ").splitlines()
        if "lightning-reg" in line and " fit " in line and not line.lstrip().startswith("#")
    ]
    tokens = shlex.split(command)
    args = tokens[tokens.index("fit") + 1 :]
    return [re.sub(r"\$\{?(\w+)\}?", lambda m: SHELL_VALUES[m.group(1)], a) for a in args]


@pytest.mark.parametrize("script", ["train.sbatch", "torchrun.sh"])
def test_multi_gpu_scripts_pass_arguments_that_the_cli_accepts(script, capsys):
    args = fit_arguments(SCRIPTS / script)
    assert args[:2] == ["--config", "examples/configs/cnn_cifar10.yaml"]
    args[1] = str(CONFIGS / "cnn_cifar10.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])  # parses and validates every argument; builds no Trainer
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["trainer"]["accelerator"], printed["trainer"]["strategy"]) == ("gpu", "ddp")
    assert printed["data"]["init_args"]["download"] is False
