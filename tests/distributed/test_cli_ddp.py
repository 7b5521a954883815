"""`lightning-reg fit` under real `strategy="ddp"` (2 CPU processes, gloo), in a subprocess.

`strategy="ddp"` inside a pytest session hangs (rank 1 re-runs pytest's argv; shared/testing.md), so
the CLI runs as its own process, exactly as a user types it.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

import zoo
from lightning_reg import MCDropoutEvaluation, TemperatureScaling
from tests.helpers import fast_trainer
from tests.helpers.ddp import DDP_ENV_VARS, free_port

ROOT = Path(__file__).parents[2]
CLI = Path(sys.executable).with_name("lightning-reg")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="DDP subprocess launch on POSIX")


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("ddp_spawn", marks=pytest.mark.slow)])
def test_cli_fit_under_ddp_with_all_callbacks_saves_a_checkpoint_that_reproduces_the_logged_metrics(tmp_path, strategy):
    env = {k: v for k, v in os.environ.items() if k not in DDP_ENV_VARS}
    env["MASTER_PORT"] = str(free_port())
    cmd = [
        str(CLI),
        "fit",
        "--config",
        str(ROOT / "examples/configs/cnn_digits_regularized.yaml"),
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        f"--trainer.strategy={strategy}",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    result = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]

    (metrics_file,) = tmp_path.rglob("metrics.csv")
    rows = [r for r in csv.DictReader(metrics_file.open()) if r.get("val_acc")]
    logged = rows[-1]
    mc_rows = [r for r in csv.DictReader(metrics_file.open()) if r.get("mc/val/acc")]
    assert mc_rows, "MCDropoutEvaluation logged nothing at validation"
    mc_logged = mc_rows[-1]

    (checkpoint,) = tmp_path.rglob("*.ckpt")
    model = zoo.CNNClassifier.load_from_checkpoint(checkpoint)
    # the config calibrates (TemperatureScaling): its temperature comes back from the checkpoint's callback state.
    # One process validating the checkpoint reproduces what the 2 ranks logged: the model's own metrics, and the
    # deterministic pass of MCDropoutEvaluation, whose metrics were reduced over the ranks' shards.
    mc = MCDropoutEvaluation(n_samples=10, plot=False)
    (metrics,) = fast_trainer(tmp_path, callbacks=[TemperatureScaling(), mc]).validate(
        model, datamodule=zoo.data.DigitsDataModule(), ckpt_path=checkpoint, verbose=False
    )
    assert metrics["val_acc"] == pytest.approx(float(logged["val_acc"]), abs=1e-6)
    assert metrics["val_loss"] == pytest.approx(float(logged["val_loss"]), abs=1e-5)
    for name in ("acc", "nll", "brier", "ece", "entropy"):
        assert metrics[f"mc/val/det_{name}"] == pytest.approx(float(mc_logged[f"mc/val/det_{name}"]), abs=1e-5), name
    assert metrics["mc/val/det_acc"] == pytest.approx(metrics["val_acc"], abs=1e-6)
    # The MC pass draws other masks on other shards: the same model, so close, not equal.
    assert float(mc_logged["mc/val/acc"]) == pytest.approx(metrics["mc/val/acc"], abs=0.05)
    assert float(mc_logged["mc/val/mutual_info"]) >= 0.0
