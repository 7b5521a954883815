"""scikit-learn's bundled handwritten digits as a LightningDataModule: the embedded default, no download."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DigitsDataModule"]


class DigitsDataModule(L.LightningDataModule):
    """The 1,797 8x8 digit images that ship inside scikit-learn, split with a fixed seed.

    Pixels (0..16) are standardized with the training split's mean and standard deviation. Batches are
    lists ``[inputs, targets]``: images ``(N, 1, 8, 8)``, or with ``as_sequence=True`` rows as time steps
    ``(N, 8, 8)`` for sequence models.

    Args:
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        as_sequence: give ``(N, 8, 8)`` sequences (8 steps of 8 features) instead of images.
        val_fraction: share of all samples held out for validation.
        test_fraction: share of all samples held out for testing.
        seed: seed of the split (independent of the training seed).

    Example:
        >>> dm = DigitsDataModule(batch_size=16)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), y.dtype
        ((16, 1, 8, 8), torch.int64)
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        *,
        as_sequence: bool = False,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"Expected `batch_size` >= 1, but got {batch_size!r}.")
        if num_workers < 0:
            raise ValueError(f"Expected `num_workers` >= 0, but got {num_workers!r}.")
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                "Expected `val_fraction` and `test_fraction` in (0, 1) with a sum below 1, "
                f"but got {val_fraction!r} and {test_fraction!r}."
            )
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.as_sequence = as_sequence
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample: ``(1, 8, 8)`` as images, ``(8, 8)`` as sequences."""
        return (8, 8) if self.as_sequence else (1, 8, 8)

    def setup(self, stage: str | None = None) -> None:
        """Load the bundled digits and split them (the same split on every rank and every call)."""
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32)  # (N, 8, 8), values 0..16
        labels = torch.as_tensor(digits.target, dtype=torch.long)
        n = len(labels)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        n_test = round(self.test_fraction * n)
        n_val = round(self.val_fraction * n)
        test_idx, val_idx, train_idx = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
        mean, std = images[train_idx].mean(), images[train_idx].std()
        images = (images - mean) / std
        if not self.as_sequence:
            images = images.unsqueeze(1)  # (N, 1, 8, 8)
        self.train_set = TensorDataset(images[train_idx], labels[train_idx])
        self.val_set = TensorDataset(images[val_idx], labels[val_idx])
        self.test_set = TensorDataset(images[test_idx], labels[test_idx])

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("Call `setup()` before asking for a dataloader (the Trainer does this for you).")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order."""
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test split, for ``trainer.predict``."""
        return self._loader(self.test_set, shuffle=False)
