"""Small opt-in LightningModule mixins.

:class:`SparseMixingMixin` keeps mixed targets sparse. With soft ``(N, K)`` targets ``F.cross_entropy`` is
slower than with class indices (pytorch issue 141177), which shows for large label spaces. A module that
inherits the mixin receives, from the mixing and smoothing callbacks, a :class:`MixedTargets`: the two index
targets, lambda and the smoothing, and computes the loss as
``lam * CE_s(logits, y_a) + (1 - lam) * CE_s(logits, y_b)`` with label smoothing applied analytically by
``F.cross_entropy(..., label_smoothing=s)``. That is the same value as cross-entropy on the dense targets,
because cross-entropy is linear in the target distribution.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_reg.functional.label_smoothing import one_hot

__all__ = ["MixedTargets", "SparseMixingMixin", "mixed_cross_entropy"]


class MixedTargets(NamedTuple):
    """Mixed targets kept sparse: ``smooth(lam * onehot(targets_a) + (1 - lam) * onehot(targets_b))``.

    Attributes:
        targets_a: class indices ``(N,)`` of the original samples.
        targets_b: class indices ``(N,)`` of their partners.
        lam: float ``(N,)``, the weight of ``targets_a``.
        smoothing: label smoothing in ``[0, 1)``, PyTorch's convention.
        num_classes: ``K``.

    Example:
        >>> import torch
        >>> t = MixedTargets(torch.tensor([0]), torch.tensor([1]), torch.tensor([0.75]), 0.0, 2)
        >>> t.lam
        tensor([0.7500])
    """

    targets_a: Tensor
    targets_b: Tensor
    lam: Tensor
    smoothing: float
    num_classes: int

    @classmethod
    def unmixed(cls, targets: Tensor, num_classes: int, smoothing: float = 0.0) -> MixedTargets:
        """Index targets that are not mixed (lambda 1), possibly smoothed."""
        lam = torch.ones(targets.shape[0], device=targets.device)
        return cls(targets, targets, lam, smoothing, num_classes)

    def to_dense(self) -> Tensor:
        """The probabilities ``(N, K)`` these targets stand for.

        Example:
            >>> t = MixedTargets(torch.tensor([0]), torch.tensor([1]), torch.tensor([0.75]), 0.0, 2)
            >>> t.to_dense()
            tensor([[0.7500, 0.2500]])
        """
        a = one_hot(self.targets_a, self.num_classes, self.smoothing)
        b = one_hot(self.targets_b, self.num_classes, self.smoothing)
        return b.lerp_(a, self.lam.to(a)[:, None])

    def hard(self) -> Tensor:
        """Class indices ``(N,)``: the class with the larger weight (for metrics)."""
        return torch.where(self.lam >= 0.5, self.targets_a, self.targets_b)


def mixed_cross_entropy(
    logits: Tensor,
    targets: Tensor | MixedTargets,
    label_smoothing: float = 0.0,
    weight: Tensor | None = None,
) -> Tensor:
    """Mean cross-entropy for index, probability or sparse mixed targets.

    With class weights, ``F.cross_entropy(logits, y, weight=w)`` divides by the weights of the targets' classes,
    ``sum_i w[y_i]``, but on probability targets by ``N``: the same one-hot targets as rows give another scale.
    Here probability and mixed targets are divided by their weighted mass ``sum_i sum_k w_k t_ik`` instead, so
    one-hot rows give exactly the loss of their indices, and a mixed row counts as the blend of its two classes.

    Args:
        logits: ``(N, K)``.
        targets: indices ``(N,)``, probabilities ``(N, K)``, or :class:`MixedTargets`.
        label_smoothing: smoothing for plain targets; :class:`MixedTargets` carry their own.
        weight: optional class weights ``(K,)``, as ``F.cross_entropy``'s ``weight``.

    Example:
        >>> logits = torch.tensor([[2.0, 0.0]])
        >>> sparse = MixedTargets(torch.tensor([0]), torch.tensor([1]), torch.tensor([0.75]), 0.1, 2)
        >>> dense = F.cross_entropy(logits, sparse.to_dense())
        >>> bool(torch.isclose(mixed_cross_entropy(logits, sparse), dense))
        True
    """
    if weight is not None:
        return _weighted_cross_entropy(logits, targets, label_smoothing, weight)
    if not isinstance(targets, MixedTargets):
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    s = targets.smoothing
    loss_a = F.cross_entropy(logits, targets.targets_a, reduction="none", label_smoothing=s)  # (N,)
    if targets.targets_b is targets.targets_a:
        return loss_a.mean()
    loss_b = F.cross_entropy(logits, targets.targets_b, reduction="none", label_smoothing=s)  # (N,)
    lam = targets.lam.to(loss_a)
    return torch.lerp(loss_b, loss_a, lam).mean()


def _weighted_cross_entropy(
    logits: Tensor, targets: Tensor | MixedTargets, label_smoothing: float, weight: Tensor
) -> Tensor:
    if isinstance(targets, Tensor) and targets.ndim == 1:
        return F.cross_entropy(logits, targets, weight=weight, label_smoothing=label_smoothing)
    dense = targets.to_dense() if isinstance(targets, MixedTargets) else targets
    if not isinstance(targets, MixedTargets) and label_smoothing > 0:
        dense = dense * (1.0 - label_smoothing) + label_smoothing / dense.shape[1]
    weighted = dense.to(logits.dtype) * weight.to(logits)  # (N, K): the weighted mass of every class
    return -(weighted * logits.log_softmax(dim=1)).sum() / weighted.sum()


class SparseMixingMixin:
    """Opt in to sparse mixed targets (the pair of index targets and lambda) for large label spaces.

    MixUp, CutMix, MixUpCutMix and LabelSmoothing then hand this module a :class:`MixedTargets` instead of
    dense ``(N, K)`` probabilities. Compute the loss with :meth:`mixed_cross_entropy` and metrics with
    :meth:`hard_targets`. Put the mixin before ``LightningModule`` in the bases.

    Example:
        >>> import lightning as L
        >>> class Model(SparseMixingMixin, L.LightningModule):
        ...     pass
        >>> Model().sparse_mixed_targets
        True
    """

    sparse_mixed_targets: bool = True

    def mixed_cross_entropy(
        self, logits: Tensor, targets: Tensor | MixedTargets, weight: Tensor | None = None
    ) -> Tensor:
        """Mean cross-entropy for index, probability or :class:`MixedTargets` targets (optional class weights)."""
        return mixed_cross_entropy(logits, targets, weight=weight)

    @staticmethod
    def hard_targets(targets: Tensor | MixedTargets) -> Tensor:
        """Class indices ``(N,)`` for metrics, from any kind of targets."""
        if isinstance(targets, MixedTargets):
            return targets.hard()
        return targets.argmax(dim=1) if targets.ndim == 2 else targets
