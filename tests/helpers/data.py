"""Tiny deterministic datasets that yield list (or dict) batches."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision import datasets


def make_classification(n: int = 64, features: int = 8, num_classes: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Gaussian blobs: a learnable problem with ``num_classes`` class means in ``features`` dimensions."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.arange(n) % num_classes
    means = 2.0 * torch.randn(num_classes, features, generator=g)
    inputs = means[targets] + torch.randn(n, features, generator=g)
    return inputs, targets


def coded_images(n: int, dtype: torch.dtype = torch.float32, layout: str = "NCHW") -> Tensor:
    """``n`` images of one channel, 8 x 8, image ``i`` the constant ``i + 1``: every pixel tells which sample it
    came from (``layout="NHWC"`` puts the channel last)."""
    x = torch.arange(1, n + 1, dtype=dtype).view(n, 1, 1, 1).expand(n, 1, 8, 8).contiguous()
    return x if layout == "NCHW" else x.permute(0, 2, 3, 1).contiguous()


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


def write_fake_cifar10(root: Path, monkeypatch: pytest.MonkeyPatch, per_batch: int = 4, n_test: int = 6) -> Path:
    """Write a tiny CIFAR-10 in torchvision's on-disk format under ``root`` and make torchvision accept it.

    ``root/cifar-10-batches-py/`` gets the five training batches (``per_batch`` images each), the test batch and
    ``batches.meta``: pickled dicts with uint8 rows of 3072 values (R, G, B planes), labels ``i % 10``.
    torchvision checks each file's md5 against the real dataset's (also with ``download=True``, which then
    finds the files "already downloaded and verified"), so the check is pointed at these files' sums through
    ``monkeypatch`` (undone after the test). Returns ``root``.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)]
    for name, n in [(name, per_batch) for name in names] + [("test_batch", n_test)]:
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [i % 10 for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))

    def md5(path: Path) -> str:
        return hashlib.md5(path.read_bytes()).hexdigest()

    monkeypatch.setattr(datasets.CIFAR10, "train_list", [[n, md5(folder / n)] for n in names])
    monkeypatch.setattr(datasets.CIFAR10, "test_list", [["test_batch", md5(folder / "test_batch")]])
    monkeypatch.setattr(datasets.CIFAR10, "meta", {**datasets.CIFAR10.meta, "md5": md5(folder / "batches.meta")})
    return root
