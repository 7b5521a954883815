"""CutMix on the bundled digits: `python examples/cutmix.py --epochs 10` (or `--fast` for a smoke run)."""

from __future__ import annotations

import argparse

import lightning as L

import zoo
from lightning_reg import CutMix


def main(epochs: int = 10, fast: bool = False) -> dict[str, float]:
    L.seed_everything(0)
    model = zoo.create("cnn_small", num_classes=10)
    # Mix every batch; stop mixing for the last epoch (the "clean finish" recipe).
    cutmix = CutMix(alpha=1.0, per_sample=True, last_epoch=max(epochs - 1, 1))
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[cutmix],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not fast,
        limit_train_batches=2 if fast else None,
        limit_val_batches=1 if fast else None,
    )
    trainer.fit(model, datamodule=zoo.data.DigitsDataModule(batch_size=64))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--fast", action="store_true", help="2 batches per epoch, for a smoke test")
    args = parser.parse_args()
    print(main(args.epochs, args.fast))
