from pathlib import Path

from lightning_reg.cli import cli, main

CONFIGS = Path(__file__).parent.parent / "examples" / "configs"


def test_demo_trains_and_prints_test_accuracy(capsys):
    main(["demo", "--epochs", "1"])
    out = capsys.readouterr().out
    assert "cnn_small on digits: test accuracy" in out


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
