"""Label noise for training sets: symmetric and class-dependent flips of an exact fraction of the labels, seeded."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, get_args

import torch
from torch import Tensor

__all__ = ["DIGIT_FLIPS", "LabelNoiseKind", "flip_labels"]

LabelNoiseKind = Literal["symmetric", "class_dependent"]
_KINDS: tuple[str, ...] = get_args(LabelNoiseKind)

# Class-dependent noise between look-alike digits, the map Patrini et al. (CVPR 2017, https://arxiv.org/abs/1609.03683)
# used for MNIST: 2 -> 7, 3 -> 8, 5 <-> 6, 7 -> 1. Other classes keep their labels.
DIGIT_FLIPS: dict[int, int] = {2: 7, 3: 8, 5: 6, 6: 5, 7: 1}


def flip_labels(
    labels: Tensor,
    rate: float,
    num_classes: int,
    *,
    kind: LabelNoiseKind = "symmetric",
    flips: Mapping[int, int] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Corrupt an exact fraction ``rate`` of class-index labels; returns new labels, the input is unchanged.

    - ``"symmetric"``: ``round(rate * N)`` labels, chosen uniformly, are each replaced by one of the *other*
      ``num_classes - 1`` classes, uniformly, so exactly that fraction is wrong. (Some papers draw the new label
      among all ``K`` classes, which leaves ``1/K`` of the chosen labels right: their rate ``r`` is ``r (K-1)/K`` here.)
    - ``"class_dependent"``: within each source class ``c`` of ``flips`` (default :data:`DIGIT_FLIPS`),
      ``round(rate * N_c)`` labels, chosen uniformly, become ``flips[c]``; other classes are untouched.

    Args:
        labels: class indices ``(N,)``.
        rate: fraction to flip, in [0, 1) (of all labels, or of each source class's).
        num_classes: number of classes; labels must lie in ``[0, num_classes)``.
        kind: ``"symmetric"`` or ``"class_dependent"``.
        flips: source class -> noisy class, for ``"class_dependent"`` (default :data:`DIGIT_FLIPS`).
        generator: the random stream (seeded for a repeatable corruption); the global RNG when None.

    Example:
        >>> labels = torch.arange(10).repeat(10)
        >>> noisy = flip_labels(labels, 0.4, 10, generator=torch.Generator().manual_seed(0))
        >>> int((noisy != labels).sum())  # 40 % of 100
        40
        >>> noisy = flip_labels(labels, 0.5, 10, kind="class_dependent", generator=torch.Generator().manual_seed(0))
        >>> int(((labels == 3) & (noisy == 8)).sum()), int((noisy != labels).sum())
        (5, 25)
    """
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.dtype.is_floating_point:
        raise ValueError(f"Expected `labels` to be a 1-d tensor of class indices, but got {labels!r}.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"Expected `num_classes` to be an int >= 2, but got {num_classes!r}.")
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate < 1.0:
        raise ValueError(f"Expected `rate` to be a float in [0, 1), but got {rate!r}.")
    if kind not in _KINDS:
        raise ValueError(f"Expected `kind` to be one of {_KINDS}, but got {kind!r}.")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"Expected `labels` in [0, {num_classes}), but got values from {int(labels.min())} to {int(labels.max())}."
        )
    noisy = labels.clone()
    if kind == "symmetric":
        n_flip = round(rate * len(labels))
        chosen = torch.randperm(len(labels), generator=generator)[:n_flip]
        # an offset in 1..K-1 added modulo K: uniform over the other classes
        offset = torch.randint(1, num_classes, (n_flip,), generator=generator)
        noisy[chosen] = (labels[chosen] + offset) % num_classes
        return noisy
    mapping = DIGIT_FLIPS if flips is None else dict(flips)
    for source, target in mapping.items():
        valid = isinstance(source, int) and isinstance(target, int) and source != target
        if not valid or not (0 <= source < num_classes and 0 <= target < num_classes):
            raise ValueError(
                f"Expected `flips` to map a class in [0, {num_classes}) to another such class, but got "
                f"{source!r} -> {target!r}."
            )
    for source, target in sorted(mapping.items()):
        members = torch.nonzero(labels == source).squeeze(1)
        n_flip = round(rate * len(members))
        chosen = members[torch.randperm(len(members), generator=generator)[:n_flip]]
        noisy[chosen] = target
    return noisy
