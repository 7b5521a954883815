"""The base of the zoo's DataModules: three splits set by ``setup``, and their DataLoaders."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset

__all__ = ["SplitDataModule"]


class SplitDataModule(L.LightningDataModule):
    """A LightningDataModule whose ``setup`` fills ``train_set``, ``val_set`` and ``test_set``.

    It gives the four DataLoaders: shuffled training batches, the other splits in a fixed order, and the test
    split for ``trainer.predict``. Workers persist between epochs when there are any.

    Args:
        batch_size: samples per batch.
        num_workers: DataLoader workers.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> class Tiny(SplitDataModule):
        ...     def setup(self, stage=None):
        ...         self.train_set = self.val_set = self.test_set = TensorDataset(torch.arange(10.0))
        >>> dm = Tiny(batch_size=4)
        >>> dm.setup()
        >>> [len(batch) for (batch,) in dm.val_dataloader()]
        [4, 4, 2]
    """

    def __init__(self, batch_size: int, num_workers: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"Expected `batch_size` >= 1, but got {batch_size!r}.")
        if num_workers < 0:
            raise ValueError(f"Expected `num_workers` >= 0, but got {num_workers!r}.")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
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
