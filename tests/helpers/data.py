"""Tiny deterministic datasets that yield list (or dict) batches."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset


def make_classification(n: int = 64, features: int = 8, num_classes: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Gaussian blobs: a learnable problem with ``num_classes`` class means in ``features`` dimensions."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.arange(n) % num_classes
    means = 2.0 * torch.randn(num_classes, features, generator=g)
    inputs = means[targets] + torch.randn(n, features, generator=g)
    return inputs, targets


def make_images(
    n: int = 32, channels: int = 1, size: int = 8, num_classes: int = 3, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Images ``(n, channels, size, size)`` whose brightness pattern depends on the class."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.arange(n) % num_classes
    patterns = torch.randn(num_classes, channels, size, size, generator=g)
    inputs = patterns[targets] + 0.5 * torch.randn(n, channels, size, size, generator=g)
    return inputs, targets


class DictDataset(Dataset):
    """Samples as dicts ``{"inputs": x, "targets": y}``, so batches are dicts."""

    def __init__(self, inputs: Tensor, targets: Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"inputs": self.inputs[i], "targets": self.targets[i]}


def make_loader(
    inputs: Tensor, targets: Tensor, batch_size: int = 16, *, shuffle: bool = False, as_dict: bool = False
) -> DataLoader:
    """A DataLoader of list batches ``[x, y]`` (or dict batches with ``as_dict``)."""
    dataset: Dataset = DictDataset(inputs, targets) if as_dict else TensorDataset(inputs, targets)
    generator = torch.Generator().manual_seed(0) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)
