"""Monte-Carlo dropout on the bundled digits: `python examples/mc_dropout.py --epochs 10` (or `--fast`).

Trains the zoo CNN, then tests it with `MCDropoutEvaluation`: accuracy, NLL, Brier, ECE, entropy for the
deterministic pass and the MC mean (`mc/test/...`), a reliability diagram under the log dir, and per-sample
uncertainty (mean probabilities, predictive entropy, mutual information) from `trainer.predict`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L

import zoo
from lightning_reg import MCDropoutEvaluation


def main(epochs: int = 10, fast: bool = False, root: str | Path = "lightning_logs/mc_dropout") -> dict[str, float]:
    L.seed_everything(0)
    model = zoo.create("cnn_small", num_classes=10, dropout=0.3)
    mc = MCDropoutEvaluation(n_samples=10 if fast else 30)
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[mc],
        accelerator="cpu",
        default_root_dir=str(root),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not fast,
        limit_train_batches=2 if fast else None,
        limit_val_batches=1 if fast else None,
        limit_test_batches=2 if fast else None,
        limit_predict_batches=1 if fast else None,
    )
    data = zoo.data.DigitsDataModule(batch_size=64)
    trainer.fit(model, datamodule=data)
    (results,) = trainer.test(model, datamodule=data)
    data.setup("test")
    trainer.predict(model, dataloaders=data.test_dataloader())
    first = mc.predictions[0]
    print("most uncertain test digit: mutual information", float(first["mc_mutual_information"].max()))
    return {k: float(v) for k, v in results.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--fast", action="store_true", help="2 batches per epoch, for a smoke test")
    args = parser.parse_args()
    print(main(args.epochs, args.fast))
