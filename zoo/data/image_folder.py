"""A user's own images in class folders (``root/<class>/<image>``) as a LightningDataModule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset
from torchvision import datasets
from torchvision.transforms import v2

from zoo.data.base import SplitDataModule

__all__ = ["ImageFolderDataModule"]

# The ImageNet statistics that timm's pretrained models expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFolderDataModule(SplitDataModule):
    """Images sorted into one folder per class, read by torchvision's ``ImageFolder``, split with a fixed seed.

    ``root`` holds one sub-folder per class (its name is the class name, classes are sorted as ``ImageFolder``
    sorts them). Training images get a random resized crop to ``image_size`` and horizontal flips; validation
    and test images are resized and center-cropped. Images are converted to RGB (or grayscale with
    ``channels=1``) and normalized with ``mean``/``std`` (ImageNet's by default, which pretrained timm models
    expect). Batches are lists ``[images, targets]``.

    Args:
        root: the folder of class folders.
        image_size: side of the square images the model sees.
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        val_fraction: share of the images held out for validation.
        test_fraction: share of the images held out for testing (0 uses the validation split for testing).
        channels: 3 (RGB) or 1 (grayscale).
        augment: apply the training augmentation.
        mean: per-channel normalization mean (a single value for grayscale).
        std: per-channel normalization standard deviation.
        seed: seed of the split.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> with tempfile.TemporaryDirectory() as root:
        ...     for label in ("cat", "dog"):
        ...         Path(root, label).mkdir()
        ...         for i in range(5):
        ...             Image.new("RGB", (20, 16), color=(40 * i, 0, 0)).save(Path(root, label, f"{i}.png"))
        ...     dm = ImageFolderDataModule(root, image_size=12, batch_size=4)
        ...     dm.setup()
        ...     images, targets = next(iter(dm.train_dataloader()))
        >>> dm.classes, tuple(images.shape)
        (['cat', 'dog'], (4, 3, 12, 12))
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int = 224,
        *,
        batch_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        channels: int = 3,
        augment: bool = True,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        if image_size < 1:
            raise ValueError(f"Expected `image_size` >= 1, but got {image_size!r}.")
        if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                "Expected `val_fraction` in (0, 1) and `test_fraction` in [0, 1) with a sum below 1, "
                f"but got {val_fraction!r} and {test_fraction!r}."
            )
        if channels not in (1, 3):
            raise ValueError(f"Expected `channels` to be 1 (grayscale) or 3 (RGB), but got {channels!r}.")
        self.save_hyperparameters()
        self.root = Path(root)
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.channels = channels
        self.augment = augment
        default_mean, default_std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))
        self.mean = tuple(mean) if mean is not None else default_mean
        self.std = tuple(std) if std is not None else default_std
        self.seed = seed
        self.classes: list[str] = []

    @property
    def num_classes(self) -> int:
        """Number of class folders (known after ``setup``)."""
        if not self.classes:
            raise RuntimeError("The classes are read in `setup()`; call it before asking for `num_classes`.")
        return len(self.classes)

    def transform(self, train: bool) -> v2.Compose:
        """Augmentation (training only), resizing, float conversion and normalization."""
        steps: list[Any] = [v2.ToImage()]
        if self.channels == 1:
            steps.append(v2.Grayscale())
        if train and self.augment:
            steps += [
                v2.RandomResizedCrop(self.image_size, scale=(0.5, 1.0), antialias=True),
                v2.RandomHorizontalFlip(),
            ]
        else:
            steps += [v2.Resize(round(self.image_size * 8 / 7), antialias=True), v2.CenterCrop(self.image_size)]
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(self.mean), list(self.std))]
        return v2.Compose(steps)

    def setup(self, stage: str | None = None) -> None:
        """Scan ``root`` and split the images (the same split on every rank and every call)."""
        if self.train_set is not None:
            return
        if not self.root.is_dir():
            raise FileNotFoundError(f"Expected `root` to be a folder of class folders, but {str(self.root)!r} is not.")
        train_view = datasets.ImageFolder(str(self.root), transform=self.transform(True))
        eval_view = datasets.ImageFolder(str(self.root), transform=self.transform(False))
        self.classes = list(train_view.classes)
        n = len(train_view)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        n_val = max(1, round(self.val_fraction * n))
        n_test = round(self.test_fraction * n)
        self.val_set = Subset(eval_view, order[:n_val])
        self.test_set = Subset(eval_view, order[n_val : n_val + n_test]) if n_test else self.val_set
        self.train_set = Subset(train_view, order[n_val + n_test :])
