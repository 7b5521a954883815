"""Tiny models, with and without BatchNorm and Dropout, and a plain user LightningModule."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TinyMLP(nn.Module):
    """Linear -> [BatchNorm1d] -> ReLU -> [Dropout] -> Linear."""

    def __init__(
        self,
        in_features: int = 8,
        num_classes: int = 3,
        hidden: int = 16,
        *,
        batch_norm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.BatchNorm1d(hidden) if batch_norm else nn.Identity(),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.body(x)))


class TinyCNN(nn.Module):
    """Conv -> [BatchNorm2d] -> ReLU -> global pool -> [Dropout] -> Linear, for ``(N, C, 8, 8)`` inputs."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 3,
        width: int = 8,
        *,
        batch_norm: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width) if batch_norm else nn.Identity(),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.body(x)))


class UserClassifier(L.LightningModule):
    """What a user writes: a network, plain ``F.cross_entropy`` (index or soft targets), SGD.

    ``seen_targets`` records, per stage, the targets of the batches that reached the step, so tests can
    check what callbacks did to them.
    """

    def __init__(self, net: nn.Module | None = None, num_classes: int = 3, lr: float = 0.1) -> None:
        super().__init__()
        self.net = net if net is not None else TinyMLP(num_classes=num_classes)
        self.num_classes = num_classes
        self.lr = lr
        self.seen_targets: dict[str, list[Tensor]] = {"train": [], "val": [], "test": [], "predict": []}
        self.train_losses: list[float] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    @staticmethod
    def _unpack(batch: Any) -> tuple[Tensor, Tensor]:
        if isinstance(batch, dict):
            return batch["inputs"], batch["targets"]
        return batch[0], batch[1]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = self._unpack(batch)
        self.seen_targets["train"].append(y.detach().clone())
        loss = F.cross_entropy(self(x), y)
        self.train_losses.append(float(loss.detach()))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = self._unpack(batch)
        self.seen_targets["val"].append(y.detach().clone())
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = self._unpack(batch)
        self.seen_targets["test"].append(y.detach().clone())
        self.log("test_loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        x, y = self._unpack(batch)
        self.seen_targets["predict"].append(y.detach().clone())
        return self(x).softmax(-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ThreeClassEvaluator(UserClassifier):
    """A seeded 3-class MLP with dropout whose evaluation steps take any number of loaders and only run forward
    (what a callback evaluating on its own needs; an OOD loader's targets are never read)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(TinyMLP(num_classes=3, dropout=0.3), num_classes=3)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self(batch[0])

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self(batch[0])


class ReseedEachEpoch(L.Callback):
    """Seeds the global RNG from the epoch number before each training epoch's first batch.

    Lightning saves neither the global RNG nor the data order, so a model's own dropout draws differ
    between an uninterrupted run and a resumed one (shared/testing.md). With the global stream a
    function of the epoch, a crash-and-resume test isolates what the callbacks under test restore.
    The seed is set at the first batch, not at ``on_train_epoch_start``: a resumed fit creates the
    DataLoader iterator (which draws from the global RNG) before that hook, an uninterrupted one after.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == 0:
            torch.manual_seed(self.seed + trainer.current_epoch)
