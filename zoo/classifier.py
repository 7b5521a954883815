"""The shared LightningModule base of every zoo classifier."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_reg import hard_targets
from lightning_reg.forward import batch_inputs

__all__ = ["ClassifierModule", "split_decay_parameters"]


def split_decay_parameters(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split trainable parameters into those that get weight decay and those that do not.

    Matrices and convolution kernels (``ndim >= 2``) are decayed; biases and the gains of norm layers
    (``ndim < 2``) are not: decaying them only shrinks the scale that normalization restores
    (the nanoGPT / timm convention).

    Example:
        >>> decay, no_decay = split_decay_parameters(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)))
        >>> [tuple(p.shape) for p in decay], [tuple(p.shape) for p in no_decay]
        ([(4, 3)], [(4,), (4,), (4,)])
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in module.parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    return decay, no_decay


class _WarmupCosine:
    """Learning-rate factor: linear warmup over ``warmup_steps``, then cosine decay to 0 at ``total_steps``.

    A class rather than a lambda so that the scheduler's ``state_dict`` pickles.
    """

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = max(total_steps, 1)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


class ClassifierModule(L.LightningModule):
    """Base of the zoo classifiers: cross-entropy on index or soft targets, accuracy, AdamW, warmup + cosine.

    A subclass builds its network and implements ``forward_features`` (the deterministic trunk) and
    ``forward_head`` (pooling-free classifier, where head dropout lives): the timm convention, which lets
    Monte-Carlo dropout run the trunk once. Targets may be class indices ``(N,)`` or probabilities
    ``(N, K)`` as the mixing callbacks produce them; ``F.cross_entropy`` takes both as they are.

    Args:
        num_classes: number of classes; callbacks read this attribute.
        lr: peak learning rate of AdamW.
        weight_decay: decoupled weight decay, applied to weight matrices and kernels only (never to biases
            and norm gains).
        label_smoothing: built-in label smoothing passed to ``F.cross_entropy``. Leave it at 0 when you use
            the ``LabelSmoothing`` callback, or targets are smoothed twice.
        warmup_fraction: fraction of all optimizer steps spent in linear warmup before the cosine decay.
        scheduler: ``"cosine"`` (warmup then cosine to zero, stepped every batch) or ``"none"``.

    Batches are lists ``[inputs, targets, *extra]``; ``extra`` (such as sequence lengths) is passed to
    ``forward`` after the inputs. :meth:`forward_inputs` says so, and the steps and every callback that runs the
    model outside a step (Monte-Carlo dropout, BN recalibration) use it, so they compute the same logits
    (see :mod:`lightning_reg.forward`). Override it for another batch layout.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class LinearClassifier(ClassifierModule):
        ...     def __init__(self, num_classes: int = 3) -> None:
        ...         super().__init__(num_classes)
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
        scheduler: str = "cosine",
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
        if scheduler not in ("cosine", "none"):
            raise ValueError(f"Expected `scheduler` to be one of ('cosine', 'none'), but got {scheduler!r}.")
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
    def parameter_groups(self) -> Iterable[dict[str, Any]]:
        """AdamW parameter groups: decayed weights and undecayed biases/norm gains.

        Subclasses override this to give parts of the model their own learning rate (fine-tuning).
        """
        decay, no_decay = split_decay_parameters(self)
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
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(self.warmup_fraction * total)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _WarmupCosine(warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
