"""scikit-learn's bundled handwritten digits as a LightningDataModule: the embedded default, no download."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from zoo.data.base import SplitDataModule
from zoo.data.digits_c import Corruption, corrupt_digits
from zoo.data.label_noise import DIGIT_FLIPS, LabelNoiseKind, flip_labels

__all__ = ["DigitsDataModule", "DigitsCDataModule"]


class DigitsDataModule(SplitDataModule):
    """The 1,797 8x8 digit images that ship inside scikit-learn, split with a fixed seed.

    Pixels (0..16) are standardized with the training split's mean and standard deviation. Batches are
    lists ``[inputs, targets]``: images ``(N, 1, 8, 8)``, or with ``as_sequence=True`` rows as time steps
    ``(N, 8, 8)`` for sequence models.

    Regimes beyond the clean task (see the demo's documentation page):

    - **Label noise**: ``label_noise=0.4`` flips exactly that fraction of the *training* labels (symmetric, or
      between look-alike digits with ``label_noise_kind="class_dependent"``; see
      :func:`~zoo.data.label_noise.flip_labels`), seeded by ``label_noise_seed``; validation and test labels stay
      clean. ``train_clean_targets`` keeps the true training labels.
    - **Covariate shift**: :meth:`corrupted_test_set` gives digits-C, a corrupted copy of the test split
      (:func:`~zoo.data.digits_c.corrupt_digits`), standardized like the clean one; :class:`DigitsCDataModule`
      tests on it.
    - **Out of distribution**: ``classes=range(8)`` keeps digits 0-7 in every split (labels renumbered in the
      order given); the held-out digits of all three splits, never trained on, are :attr:`ood_set`
      (:meth:`ood_dataloader`). Near-OOD: same writers, scanner and preprocessing, only the class is new.

    Args:
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        as_sequence: give ``(N, 8, 8)`` sequences (8 steps of 8 features) instead of images.
        val_fraction: share of all samples held out for validation.
        test_fraction: share of all samples held out for testing.
        seed: seed of the split (independent of the training seed).
        label_noise: fraction of training labels to corrupt, in [0, 1).
        label_noise_kind: ``"symmetric"`` (to any other class) or ``"class_dependent"`` (2->7, 3->8, 5<->6, 7->1).
        label_noise_flips: source -> noisy class for ``"class_dependent"`` (digit values, before renumbering).
        label_noise_seed: seed of the corruption (independent of the split and of training).
        classes: the digits to keep, in label order; ``None`` keeps all ten.

    Example:
        >>> dm = DigitsDataModule(batch_size=16)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), y.dtype
        ((16, 1, 8, 8), torch.int64)
        >>> noisy = DigitsDataModule(label_noise=0.4, classes=range(8))
        >>> noisy.setup("fit")
        >>> noisy.num_classes, round(float((noisy.train_set.tensors[1] != noisy.train_clean_targets).float().mean()), 2)
        (8, 0.4)
        >>> len(noisy.ood_set), len(noisy.corrupted_test_set("gaussian_blur", 3))  # digits 8 and 9; digits 0-7
        (354, 289)
    """

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        *,
        as_sequence: bool = False,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        label_noise: float = 0.0,
        label_noise_kind: LabelNoiseKind = "symmetric",
        label_noise_flips: Mapping[int, int] | None = None,
        label_noise_seed: int = 0,
        classes: Sequence[int] | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers)
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                "Expected `val_fraction` and `test_fraction` in (0, 1) with a sum below 1, "
                f"but got {val_fraction!r} and {test_fraction!r}."
            )
        if isinstance(label_noise, bool) or not isinstance(label_noise, int | float) or not 0 <= label_noise < 1:
            raise ValueError(f"Expected `label_noise` to be a fraction in [0, 1), but got {label_noise!r}.")
        if label_noise_kind not in ("symmetric", "class_dependent"):
            raise ValueError(
                "Expected `label_noise_kind` to be one of ('symmetric', 'class_dependent'), "
                f"but got {label_noise_kind!r}."
            )
        if label_noise_flips is not None:
            if label_noise_kind != "class_dependent":
                raise ValueError(
                    "`label_noise_flips` is used by `label_noise_kind='class_dependent'` only, but got "
                    f"label_noise_kind={label_noise_kind!r}."
                )
            pairs = list(dict(label_noise_flips).items())
            if not pairs or any(not (0 <= s <= 9 and 0 <= t <= 9) or s == t for s, t in pairs):
                raise ValueError(
                    f"Expected `label_noise_flips` to map digits 0-9 to other digits, but got {label_noise_flips!r}."
                )
        kept = None if classes is None else [int(c) for c in classes]
        if kept is not None and (len(kept) < 2 or len(set(kept)) != len(kept) or not set(kept) <= set(range(10))):
            raise ValueError(
                "Expected `classes` to be at least two distinct digits from 0-9 (or None for all), "
                f"but got {classes!r}."
            )
        self.save_hyperparameters()
        self.as_sequence = as_sequence
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.label_noise = float(label_noise)
        self.label_noise_kind: LabelNoiseKind = label_noise_kind
        self.label_noise_flips = None if label_noise_flips is None else dict(label_noise_flips)
        self.label_noise_seed = label_noise_seed
        self.classes: tuple[int, ...] = tuple(range(10)) if kept is None else tuple(kept)
        self.num_classes = len(self.classes)
        self.ood_set: TensorDataset | None = None
        self.train_clean_targets: Tensor | None = None
        self._raw_test: Tensor | None = None  # (N, 8, 8) raw pixels of the test split, for digits-C
        self._raw_test_labels: Tensor | None = None
        self._mean = self._std = 0.0

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
        raw = torch.as_tensor(digits.images, dtype=torch.float32)  # (N, 8, 8), values 0..16
        digit = torch.as_tensor(digits.target, dtype=torch.long)
        n = len(digit)
        # The split is drawn over all ten digits, so that a split with `classes` is a subset of the full one.
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        n_test = round(self.test_fraction * n)
        n_val = round(self.val_fraction * n)
        splits = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
        known = torch.isin(digit, torch.tensor(self.classes))
        label_of = torch.full((10,), -1, dtype=torch.long)
        label_of[torch.tensor(self.classes)] = torch.arange(self.num_classes)
        labels = label_of[digit]  # renumbered; -1 for held-out digits
        kept = {name: idx[known[idx]] for name, idx in splits.items()}
        train_idx = kept["train"]
        self._mean, self._std = float(raw[train_idx].mean()), float(raw[train_idx].std())
        images = self._standardize(raw)
        train_labels = labels[train_idx]
        self.train_clean_targets = train_labels
        if self.label_noise > 0:
            train_labels = flip_labels(
                train_labels,
                self.label_noise,
                self.num_classes,
                kind=self.label_noise_kind,
                flips=self._label_flips(label_of) if self.label_noise_kind == "class_dependent" else None,
                generator=torch.Generator().manual_seed(self.label_noise_seed),
            )
        self.train_set = TensorDataset(images[train_idx], train_labels)
        self.val_set = TensorDataset(images[kept["val"]], labels[kept["val"]])
        self.test_set = TensorDataset(images[kept["test"]], labels[kept["test"]])
        self._raw_test, self._raw_test_labels = raw[kept["test"]], labels[kept["test"]]
        held_out = order[~known[order]]  # every split's held-out digits, in split order
        self.ood_set = TensorDataset(images[held_out], digit[held_out])

    def _label_flips(self, label_of: Tensor) -> dict[int, int]:
        """The class-dependent flips in renumbered labels; pairs that involve a held-out digit are dropped."""
        digit_flips = DIGIT_FLIPS if self.label_noise_flips is None else self.label_noise_flips
        kept = {s: t for s, t in digit_flips.items() if label_of[s] >= 0 and label_of[t] >= 0}
        flips = {int(label_of[s]): int(label_of[t]) for s, t in kept.items()}
        if not flips:
            raise ValueError(
                f"None of the flips {digit_flips} is between kept digits {self.classes}: the class-dependent noise "
                "would change nothing. Pass `label_noise_flips` between kept digits."
            )
        return flips

    def _standardize(self, raw: Tensor) -> Tensor:
        """Raw pixels ``(N, 8, 8)`` -> standardized inputs ``(N, 1, 8, 8)``, or ``(N, 8, 8)`` as sequences."""
        images = (raw - self._mean) / self._std
        return images if self.as_sequence else images.unsqueeze(1)

    def corrupted_test_set(self, corruption: Corruption, severity: int, seed: int = 0) -> TensorDataset:
        """Digits-C: the test split under ``corruption`` at ``severity`` (1-5), standardized like the clean split.

        Deterministic: a function of the split, ``corruption``, ``severity`` and ``seed`` (see
        :func:`~zoo.data.digits_c.corrupt_digits`). Labels are the clean test labels.
        """
        if self._raw_test is None or self._raw_test_labels is None:
            raise RuntimeError("Call `setup()` before asking for a corrupted test set.")
        images = corrupt_digits(self._raw_test, corruption, severity, seed=seed)
        return TensorDataset(self._standardize(images), self._raw_test_labels)

    def corrupted_test_dataloader(self, corruption: Corruption, severity: int, seed: int = 0) -> DataLoader:
        """Batches of :meth:`corrupted_test_set`, in a fixed order."""
        return self._loader(self.corrupted_test_set(corruption, severity, seed), shuffle=False)

    def ood_dataloader(self) -> DataLoader:
        """Batches of :attr:`ood_set` (the held-out digits; targets are their digit values), in a fixed order."""
        if self.ood_set is not None and len(self.ood_set) == 0:
            raise RuntimeError("There is no out-of-distribution set: pass `classes=` to hold some digits out.")
        return self._loader(self.ood_set, shuffle=False)


class DigitsCDataModule(DigitsDataModule):
    """The digits whose test (and predict) split is digits-C: ``corruption`` at ``severity``, seeded.

    Training and validation are the clean splits of :class:`DigitsDataModule`, so a model trained on it can be
    tested under covariate shift from the CLI: ``lightning-reg test --data DigitsCDataModule
    --data.corruption gaussian_blur --data.severity 3``.

    Args:
        corruption: ``"gaussian_noise"``, ``"gaussian_blur"``, ``"contrast"`` or ``"affine"``.
        severity: 1 (mild) to 5 (strong).
        corruption_seed: seed of the corruption's random draws.
        **kwargs: :class:`DigitsDataModule`'s arguments.

    Example:
        >>> dm = DigitsCDataModule("contrast", 3)
        >>> dm.setup("test")
        >>> clean = DigitsDataModule()
        >>> clean.setup("test")
        >>> torch.equal(dm.test_set.tensors[0], clean.corrupted_test_set("contrast", 3).tensors[0])
        True
    """

    def __init__(self, corruption: Corruption, severity: int, corruption_seed: int = 0, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        corrupt_digits(torch.zeros(1, 8, 8), corruption, severity)  # validates both now, not at setup
        self.corruption: Corruption = corruption
        self.severity = severity
        self.corruption_seed = corruption_seed

    def setup(self, stage: str | None = None) -> None:
        """Load the clean splits and replace the test split by its corrupted copy."""
        if self.train_set is not None:
            return
        super().setup(stage)
        self.test_set = self.corrupted_test_set(self.corruption, self.severity, self.corruption_seed)
