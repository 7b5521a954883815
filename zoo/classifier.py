"""The shared LightningModule base of every zoo classifier."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any, Literal, get_args

import lightning as L
import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_reg import hard_targets
from lightning_reg.forward import batch_inputs

__all__ = ["ClassifierModule", "Scheduler"]

Scheduler = Literal["cosine", "none"]
_SCHEDULERS: tuple[str, ...] = get_args(Scheduler)


def _decay_split(
    module: nn.Module, no_weight_decay: Collection[str] = ()
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Trainable parameters of ``module`` with and without weight decay, by timm's ``param_groups_weight_decay``.

    timm's rule: no decay for ``ndim <= 1`` (biases, norm gains), names ending in ``.bias`` and names matching
    ``no_weight_decay`` (fnmatch patterns); frozen parameters are left out. A nonzero rate is passed so that the
    split is made even when the module's own rate is 0 (timm then returns a single group).
    """
    groups = param_groups_weight_decay(module, weight_decay=1.0, no_weight_decay_list=no_weight_decay)
    decay = [p for g in groups if g["weight_decay"] for p in g["params"]]
    no_decay = [p for g in groups if not g["weight_decay"] for p in g["params"]]
    return decay, no_decay


def _warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LRScheduler:
    """Linear warmup from ``lr / warmup_steps`` to ``lr`` over ``warmup_steps``, then cosine to 0 at ``total_steps``.

    The factor at step ``s`` is ``(s + 1) / warmup_steps`` in warmup, then ``(1 + cos(pi * (s - warmup_steps) /
    (total_steps - warmup_steps))) / 2`` (tests/zoo/test_classifier.py checks it step by step).
    """
    cosine = CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup_steps, 1))
    if warmup_steps == 0:
        return cosine
    warmup = LinearLR(optimizer, start_factor=1 / warmup_steps, end_factor=1.0, total_iters=warmup_steps - 1)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


class ClassifierModule(L.LightningModule):
    """Base of the zoo classifiers: cross-entropy on index or soft targets, accuracy, AdamW, warmup + cosine.

    A subclass builds its network and implements ``forward_features`` (the deterministic trunk) and
    ``forward_head`` (pooling-free classifier, where head dropout lives): the timm convention, which lets
    Monte-Carlo dropout run the trunk once. Targets may be class indices ``(N,)`` or probabilities
    ``(N, K)`` as the mixing callbacks produce them; ``F.cross_entropy`` takes both as they are.

    Args:
        num_classes: number of classes; callbacks read this attribute.
        lr: peak learning rate of AdamW.
        weight_decay: decoupled weight decay, applied to weight matrices and kernels only (never to biases, norm
            gains and the names in :meth:`no_weight_decay`).
        label_smoothing: built-in label smoothing passed to ``F.cross_entropy``. Leave it at 0 when you use
            the ``LabelSmoothing`` callback, or targets are smoothed twice.
        warmup_fraction: fraction of all optimizer steps spent in linear warmup before the cosine decay.
        scheduler: ``"cosine"`` (warmup then cosine to zero, stepped every batch) or ``"none"``.

    The zoo's subclasses take these five as ``**optim`` and pass them on (a subclass may state its own ``lr``
    default); ``LightningCLI`` resolves them from this signature, so a config sets ``model.init_args.lr``.

    Batches are lists ``[inputs, targets, *extra]``; ``extra`` (such as sequence lengths) is passed to
    ``forward`` after the inputs. :meth:`forward_inputs` says so, and the steps and every callback that runs the
    model outside a step (Monte-Carlo dropout, BN recalibration) use it, so they compute the same logits
    (see :mod:`lightning_reg.forward`). Override it for another batch layout.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class LinearClassifier(ClassifierModule):
        ...     def __init__(self, num_classes: int = 3, **optim: Any) -> None:
        ...         super().__init__(num_classes, **optim)
        ...         self.save_hyperparameters()
        ...         self.body, self.dropout, self.fc = nn.Flatten(), nn.Dropout(0.2), nn.Linear(4, num_classes)
        ...     def forward_features(self, x):
        ...         return self.body(x)
        ...     def forward_head(self, features):
        ...         return self.fc(self.dropout(features))
        >>> LinearClassifier()(torch.zeros(2, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        num_classes: int,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        label_smoothing: float = 0.0,
        warmup_fraction: float = 0.05,
        scheduler: Scheduler = "cosine",
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ValueError(f"Expected `num_classes` to be an int >= 2, but got {num_classes!r}.")
        if lr <= 0:
            raise ValueError(f"Expected `lr` to be a positive float, but got {lr!r}.")
        if weight_decay < 0:
            raise ValueError(f"Expected `weight_decay` to be >= 0, but got {weight_decay!r}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"Expected `label_smoothing` in [0, 1), but got {label_smoothing!r}.")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"Expected `warmup_fraction` in [0, 1), but got {warmup_fraction!r}.")
        if scheduler not in _SCHEDULERS:
            raise ValueError(f"Expected `scheduler` to be one of {_SCHEDULERS}, but got {scheduler!r}.")
        self.num_classes = num_classes
        self.lr = lr
        self.weight_decay = weight_decay
        self.label_smoothing = label_smoothing
        self.warmup_fraction = warmup_fraction
        self.scheduler = scheduler
        # Accuracy is the fraction of correct top-1 predictions (micro), as in lightning_reg.metrics.
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        # Evaluation losses as sample-weighted means reduced over DDP ranks: a plain `self.log` of the loss
        # would report rank 0's mean only.
        self.val_mean_loss = MeanMetric()
        self.test_mean_loss = MeanMetric()

    # --- the network -------------------------------------------------------------------------------
    def forward_features(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """The deterministic trunk: inputs (and extras such as lengths) to features. Subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__} must implement `forward_features`.")

    def forward_head(self, features: Tensor) -> Tensor:
        """The classifier head: features to logits ``(N, num_classes)``. Subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__} must implement `forward_head`.")

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Logits ``(N, num_classes)``: ``forward_head(forward_features(x, *args, **kwargs))``."""
        return self.forward_head(self.forward_features(x, *args, **kwargs))

    def forward_inputs(self, batch: Any) -> tuple[Any, ...] | dict[str, Any]:
        """The arguments of :meth:`forward` for a batch: ``(inputs, *extra)`` of ``[inputs, targets, *extra]``.

        A bare tensor is the inputs themselves. This is the batch-forward protocol of
        :func:`lightning_reg.forward.batch_inputs`: the steps below and the callbacks call the model with it.

        Example:
            >>> import torch
            >>> batch = [torch.zeros(2, 5, 8), torch.tensor([0, 1]), torch.tensor([5, 3])]
            >>> [tuple(t.shape) for t in ClassifierModule.forward_inputs(None, batch)]  # type: ignore[arg-type]
            [(2, 5, 8), (2,)]
        """
        if isinstance(batch, Tensor):
            return (batch,)
        if isinstance(batch, list | tuple) and len(batch) >= 1:
            return (batch[0], *batch[2:])
        raise TypeError(
            f"Expected a batch `[inputs, targets, *extra]` (a list or tuple) or a tensor of inputs, but got "
            f"{type(batch).__name__}. Override `forward_inputs(batch)` to return the arguments of `forward` for "
            "your batch layout."
        )

    def forward_batch(self, batch: Any) -> tuple[Tensor, Tensor]:
        """Split a batch into ``(logits, targets)``: the model on :meth:`forward_inputs`, and ``batch[1]``."""
        return batch_inputs(self, batch)(self), batch[1]

    # --- steps -------------------------------------------------------------------------------------
    def _step(self, batch: Any, stage: str) -> Tensor:
        logits, targets = self.forward_batch(batch)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        metric: MulticlassAccuracy = getattr(self, f"{stage}_acc")
        metric(logits.detach(), hard_targets(targets))
        if stage == "train":
            self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(targets))
        else:
            mean_loss: MeanMetric = getattr(self, f"{stage}_mean_loss")
            mean_loss.update(loss.detach(), weight=len(targets))
            self.log(f"{stage}_loss", mean_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{stage}_acc", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(targets))
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Cross-entropy on the (possibly mixed or smoothed) batch."""
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Validation loss and accuracy."""
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Test loss and accuracy."""
        return self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Class probabilities ``(N, num_classes)``."""
        return batch_inputs(self, batch)(self).softmax(dim=-1)

    # --- optimization ------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Names (fnmatch patterns) of parameters without weight decay besides biases and norm gains (timm's hook)."""
        return set()

    def parameter_groups(self) -> Iterable[dict[str, Any]]:
        """AdamW parameter groups: decayed weights, then undecayed biases, norm gains and :meth:`no_weight_decay`.

        Subclasses override this to give parts of the model their own learning rate (fine-tuning).
        """
        decay, no_decay = _decay_split(self, self.no_weight_decay())
        return [
            {"params": decay, "weight_decay": self.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self) -> Any:
        """AdamW over :meth:`parameter_groups`, with a per-step warmup + cosine schedule."""
        groups = [g for g in self.parameter_groups() if len(g["params"]) > 0]
        optimizer = torch.optim.AdamW(groups, lr=self.lr)
        if self.scheduler == "none":
            return optimizer
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = _warmup_cosine(optimizer, int(self.warmup_fraction * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
