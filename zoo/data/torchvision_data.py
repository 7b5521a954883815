"""CIFAR-10, MNIST and Fashion-MNIST through torchvision's dataset classes, with the standard augmentation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch.utils.data import Dataset, Subset
from torchvision import datasets
from torchvision.transforms import v2

from zoo.data.base import SplitDataModule

__all__ = ["TorchvisionDataModule", "TorchvisionName", "rows_as_steps"]

TorchvisionName = Literal["cifar10", "mnist", "fashion_mnist"]
_NAMES: tuple[str, ...] = get_args(TorchvisionName)

# (dataset class, image side, channels, per-channel mean and std of the training set, horizontal flips make sense)
_SPECS: dict[str, tuple[type[Any], int, int, tuple[float, ...], tuple[float, ...], bool]] = {
    "cifar10": (datasets.CIFAR10, 32, 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
    "mnist": (datasets.MNIST, 28, 1, (0.1307,), (0.3081,), False),
    "fashion_mnist": (datasets.FashionMNIST, 28, 1, (0.2860,), (0.3530,), True),
}


def rows_as_steps(image: torch.Tensor) -> torch.Tensor:
    """An image ``(C, H, W)`` as the sequence of its rows ``(H, C * W)``: step ``h`` holds row ``h`` of every channel.

    A module-level function (not a lambda) so that the transform pickles into DataLoader worker processes.

    Example:
        >>> rows_as_steps(torch.arange(12.0).reshape(3, 2, 2))
        tensor([[ 0.,  1.,  4.,  5.,  8.,  9.],
                [ 2.,  3.,  6.,  7., 10., 11.]])
    """
    channels, height, width = image.shape
    # (C, H, W) -> (H, C, W) -> (H, C * W); a plain tensor, not a tv_tensors.Image (it is no longer an image).
    return image.as_subclass(torch.Tensor).permute(1, 0, 2).reshape(height, channels * width)


class TorchvisionDataModule(SplitDataModule):
    """CIFAR-10, MNIST or Fashion-MNIST as a LightningDataModule, read by torchvision's own dataset classes.

    Files are where torchvision keeps them under ``root`` (``cifar-10-batches-py/``, ``MNIST/raw/``,
    ``FashionMNIST/raw/``); ``download=True`` fetches them once (on rank 0, in ``prepare_data``). Training uses
    the standard augmentation: a random crop after zero padding (4 pixels for CIFAR-10, 2 for the 28x28 sets)
    and, except for digits, horizontal flips. A fixed ``val_fraction`` of the training set is held out,
    without augmentation; the test split is the dataset's own. Batches are lists ``[images, targets]`` with
    normalized float images ``(N, C, H, W)``, or with ``as_sequence=True`` the image rows as time steps
    ``(N, H, C * W)`` for sequence models (CIFAR-10: 32 steps of 96 features, each step a row's R, G and B values).

    Args:
        name: ``"cifar10"``, ``"mnist"`` or ``"fashion_mnist"``.
        root: folder that holds (or will hold) the files.
        download: download missing files (needs a network).
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        val_fraction: share of the training set held out for validation.
        augment: apply the training augmentation.
        as_sequence: give each image as the sequence of its rows ``(H, C * W)`` (after augmentation and
            normalization) instead of ``(C, H, W)``, for the zoo's RNN and Transformer.
        seed: seed of the validation split.

    Example:
        >>> dm = TorchvisionDataModule("cifar10", root="data")
        >>> dm.num_classes, dm.input_shape
        (10, (3, 32, 32))
        >>> TorchvisionDataModule("cifar10", as_sequence=True).input_shape
        (32, 96)
    """

    num_classes = 10

    def __init__(
        self,
        name: TorchvisionName = "cifar10",
        root: str | Path = "data",
        *,
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        augment: bool = True,
        as_sequence: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        if name not in _NAMES:
            raise ValueError(f"Expected `name` to be one of {_NAMES}, but got {name!r}.")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"Expected `val_fraction` in (0, 1), but got {val_fraction!r}.")
        self.save_hyperparameters()
        self.dataset: TorchvisionName = name
        self.root = Path(root)
        self.download = download
        self.val_fraction = val_fraction
        self.augment = augment
        self.as_sequence = as_sequence
        self.seed = seed

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample: ``(C, H, W)`` as images, ``(H, C * W)`` as sequences."""
        _, side, channels, *_ = _SPECS[self.dataset]
        return (side, channels * side) if self.as_sequence else (channels, side, side)

    def transform(self, train: bool) -> v2.Compose:
        """The image transform: augmentation (training only), float conversion, normalization, [rows as steps]."""
        _, side, _, mean, std, flip = _SPECS[self.dataset]
        steps: list[Any] = [v2.ToImage()]
        if train and self.augment:
            steps.append(v2.RandomCrop(side, padding=4 if side == 32 else 2))
            if flip:
                steps.append(v2.RandomHorizontalFlip())
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
        if self.as_sequence:
            steps.append(v2.Lambda(rows_as_steps))
        return v2.Compose(steps)

    def _dataset(self, train: bool, transform: v2.Compose, download: bool = False) -> Dataset:
        cls = _SPECS[self.dataset][0]
        try:
            dataset: Dataset = cls(str(self.root), train=train, transform=transform, download=download)
            return dataset
        except RuntimeError as err:
            raise RuntimeError(
                f"Could not read {self.dataset} under {str(self.root)!r} ({err}). Put torchvision's files there or "
                "pass `download=True` (needs a network)."
            ) from err

    def prepare_data(self) -> None:
        """Download the files when ``download=True`` (Lightning calls this once per node)."""
        if self.download:
            for train in (True, False):
                self._dataset(train, self.transform(False), download=True)

    def setup(self, stage: str | None = None) -> None:
        """Open the splits; the validation split is the same on every rank and every call."""
        if self.train_set is not None:
            return
        train_full = self._dataset(True, self.transform(True))
        n = len(train_full)  # type: ignore[arg-type]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        n_val = round(self.val_fraction * n)
        self.train_set = Subset(train_full, order[n_val:])
        self.val_set = Subset(self._dataset(True, self.transform(False)), order[:n_val])
        self.test_set = self._dataset(False, self.transform(False))
