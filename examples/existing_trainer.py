"""The main use: add lightning-reg callbacks to a LightningModule and Trainer you already have.

Your module keeps its plain `F.cross_entropy`: the mixing and smoothing callbacks hand it soft targets
(N, K) in training, which `F.cross_entropy` takes as they are; validation and test batches stay untouched.

    python examples/existing_trainer.py --epochs 10
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_reg import BNRecalibration, LabelSmoothing, MCDropoutEvaluation, MixUp, TemperatureScaling, hard_targets
from zoo.data import DigitsDataModule


class MyClassifier(L.LightningModule):
    """A user's own module: nothing in it knows about lightning-reg."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.num_classes = num_classes  # the callbacks read this
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.3),
            nn.Linear(64, num_classes),
        )
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)  # y: soft targets (N, K) while MixUp / LabelSmoothing are on
        self.train_acc(logits, hard_targets(y))  # metrics want class indices
        self.log_dict({"train_loss": loss, "train_acc": self.train_acc}, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch  # class indices: evaluation batches are never mixed
        logits = self(x)
        self.val_acc(logits, y)
        self.log_dict({"val_loss": F.cross_entropy(logits, y), "val_acc": self.val_acc})

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        # Decay the weight matrices and kernels only: biases and BatchNorm gains are left undecayed.
        decay = [p for p in self.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=3e-3)


def main(epochs: int = 10, limit_batches: int | float = 1.0) -> dict[str, float]:
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="auto",
        logger=False,
        enable_checkpointing=False,
        limit_train_batches=limit_batches,
        limit_val_batches=limit_batches,
        callbacks=[  # the one line each
            MixUp(alpha=0.2),
            LabelSmoothing(0.1),
            BNRecalibration(num_batches=20),
            TemperatureScaling(),  # the mixed and smoothed model is under-confident: calibrate on the val split
            MCDropoutEvaluation(n_samples=20, plot=False),
        ],
    )
    datamodule = DigitsDataModule()
    model = MyClassifier()
    trainer.fit(model, datamodule=datamodule)
    (metrics,) = trainer.test(model, datamodule=datamodule, verbose=False)
    print({k: round(float(v), 4) for k, v in metrics.items()})
    return {k: float(v) for k, v in metrics.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    main(parser.parse_args().epochs)
