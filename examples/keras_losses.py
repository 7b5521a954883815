"""Keras's label_smoothing, l2 kernel_regularizer and mixup/cutmix in PyTorch: `python examples/keras_losses.py`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_reg import functional as LF


def main() -> dict[str, float]:
    torch.manual_seed(0)
    logits = torch.randn(6, 4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])

    # --8<-- [start:label_smoothing]
    # Keras: losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1) on one-hot labels
    s, k = 0.1, 4
    keras_targets = F.one_hot(labels, k).float() * (1 - s) + s / k  # Keras's formula: y * (1 - s) + s / K
    keras_loss = -(keras_targets * logits.log_softmax(-1)).sum(-1).mean()
    torch_loss = F.cross_entropy(logits, labels, label_smoothing=s)  # PyTorch's: the same formula
    ours = F.cross_entropy(logits, LF.one_hot(labels, k, smoothing=s))  # what the LabelSmoothing callback feeds
    torch.testing.assert_close(torch_loss, keras_loss)
    torch.testing.assert_close(ours, keras_loss)
    # --8<-- [end:label_smoothing]

    # --8<-- [start:l2]
    # Keras: layers.Dense(4, kernel_regularizer=regularizers.l2(c)) adds c * sum(w**2) to the loss
    c, lr = 1e-2, 0.1
    x, y = torch.randn(8, 3), torch.randn(8, 4)
    a, b = nn.Linear(3, 4), nn.Linear(3, 4)
    b.load_state_dict(a.state_dict())
    # (1) the loss term, as Keras: its gradient is 2 * c * w
    loss = F.mse_loss(a(x), y) + c * a.weight.square().sum()
    loss.backward()
    torch.optim.SGD(a.parameters(), lr=lr).step()
    # (2) SGD's weight_decay adds wd * w to the gradient: wd = 2 * c gives the same step (bias decayed too
    #     unless it sits in a parameter group with weight_decay=0, as here)
    F.mse_loss(b(x), y).backward()
    torch.optim.SGD(
        [{"params": [b.weight], "weight_decay": 2 * c}, {"params": [b.bias], "weight_decay": 0.0}], lr=lr
    ).step()
    torch.testing.assert_close(a.weight, b.weight)
    # (3) AdamW's weight_decay is decoupled: w -= lr * wd * w outside the adaptive step, not an L2 loss term;
    #     Adam(weight_decay=) is the L2 gradient, rescaled by Adam's per-parameter step sizes.
    # --8<-- [end:l2]

    # --8<-- [start:mixing]
    # Keras tutorials' mix_up(ds_one, ds_two, alpha) / cutmix(...) functions, on one batch:
    images = torch.rand(8, 3, 32, 32)
    targets = LF.one_hot(torch.arange(8) % 4, 4)
    params = LF.sample_mixup(8, alpha=0.2, generator=torch.Generator().manual_seed(0))  # lam ~ Beta, a pairing
    mixed, mixed_targets = LF.mixup(images, targets, params.lam, params.index)
    box = LF.sample_box(0.7, (32, 32), generator=torch.Generator().manual_seed(0))  # a box of about 30 %
    boxed, boxed_targets, kept = LF.cutmix(images, targets, box, params.index)  # kept: the area really kept
    # In a Trainer, one line each: callbacks=[MixUp(alpha=0.2)], [CutMix(alpha=1.0)] or [MixUpCutMix(...)]
    # --8<-- [end:mixing]
    torch.testing.assert_close(mixed_targets.sum(-1), torch.ones(8))
    assert mixed.shape == boxed.shape == images.shape
    torch.testing.assert_close(boxed_targets.sum(-1), torch.ones(8))
    return {"smoothed_loss": float(torch_loss), "cutmix_kept": float(kept[0])}


if __name__ == "__main__":
    print(main())
