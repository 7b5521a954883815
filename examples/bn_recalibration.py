"""Precise BN after MixUp on the digits: `python examples/bn_recalibration.py --epochs 10` (`--fast`: smoke run).

MixUp trains BatchNorm on mixed images; `BNRecalibration` recomputes the running statistics on clean training batches
with the final weights, after the last training batch and before the final validation and checkpoint.
`BNStatsMonitor` logs how far each batch is from the running statistics while training.
"""

from __future__ import annotations

import argparse

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

import zoo
from lightning_reg import BNRecalibration, BNStatsMonitor, MixUp


def main(epochs: int = 10, fast: bool = False) -> dict[str, float]:
    L.seed_everything(0)
    model = zoo.create("cnn_small", num_classes=10)
    recalibration = BNRecalibration(num_batches=100)  # the whole digits training set at batch size 64
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[
            MixUp(alpha=1.0),
            recalibration,
            BNStatsMonitor(log_every_n_steps=10),
            ModelCheckpoint(save_last=True),  # last.ckpt holds the recalibrated statistics
        ],
        accelerator="cpu",
        enable_progress_bar=not fast,
        enable_model_summary=not fast,
        limit_train_batches=2 if fast else None,
        limit_val_batches=1 if fast else None,
        limit_test_batches=1 if fast else None,
    )
    data = zoo.data.DigitsDataModule(batch_size=64)
    trainer.fit(model, datamodule=data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics.update({k: float(v) for k, v in trainer.test(model, datamodule=data, verbose=not fast)[0].items()})
    assert recalibration.last_report is not None
    metrics["bn_mean_abs_change_var"] = recalibration.last_report.mean_abs_change_var
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--fast", action="store_true", help="2 batches per epoch, for a smoke test")
    args = parser.parse_args()
    print(main(args.epochs, args.fast))
