"""Keras layers and their PyTorch equivalents, each checked: `python examples/keras_layers.py`.

Sections between the `--8<--` markers are shown on the docs page "Coming from Keras".
"""

from __future__ import annotations

import torch
from torch import nn

import zoo


def main() -> dict[str, float]:
    torch.manual_seed(0)
    checks: dict[str, float] = {}

    # --8<-- [start:dropout]
    # Keras: layers.Dropout(0.5)
    drop = nn.Dropout(0.5)  # the same inverted dropout: kept units are scaled by 1 / (1 - p) in training
    x = torch.ones(1000, 10)
    y = drop(x)
    assert set(y.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(drop.eval()(x), x)  # off in eval mode (Keras: training=False)
    # --8<-- [end:dropout]
    checks["dropout_kept_fraction"] = float((y > 0).float().mean())

    # --8<-- [start:spatial_dropout]
    # Keras: layers.SpatialDropout2D(0.3) on channels-last (N, H, W, C) maps
    spatial = nn.Dropout2d(0.3)  # PyTorch is channels-first: (N, C, H, W); whole channels are dropped
    maps = torch.ones(8, 16, 5, 5)
    out = spatial(maps)
    per_channel = out.flatten(2)  # (N, C, H * W)
    assert bool((per_channel.amax(-1) == per_channel.amin(-1)).all())  # each channel all kept or all zero
    # --8<-- [end:spatial_dropout]
    checks["spatial_dropout_dropped_channels"] = float((per_channel.amax(-1) == 0).float().mean())

    # --8<-- [start:batch_norm]
    # Keras: layers.BatchNormalization(momentum=0.99, epsilon=1e-3)
    bn = nn.BatchNorm2d(16, momentum=0.01, eps=1e-3)  # PyTorch's momentum is Keras's 1 - momentum
    batch = torch.randn(32, 16, 4, 4) + 3.0
    bn(batch)  # one training step
    # Keras's update: moving = moving * 0.99 + batch_mean * (1 - 0.99), from moving = 0
    keras_moving_mean = 0.0 * 0.99 + batch.mean(dim=(0, 2, 3)) * (1 - 0.99)
    torch.testing.assert_close(bn.running_mean, keras_moving_mean)
    # --8<-- [end:batch_norm]
    checks["bn_running_mean"] = float(bn.running_mean.mean())

    # --8<-- [start:layer_norm]
    # Keras: layers.LayerNormalization(epsilon=1e-3) over the last axis
    ln = nn.LayerNorm(64, eps=1e-3)  # normalizes over the trailing dimension(s) given; no running statistics
    features = torch.randn(4, 10, 64) * 5 + 2
    normed = ln(features)
    torch.testing.assert_close(normed.mean(-1), torch.zeros(4, 10), atol=1e-5, rtol=0)
    # --8<-- [end:layer_norm]

    # --8<-- [start:instance_norm]
    # Keras (keras_contrib / TensorFlow Addons): InstanceNormalization() on channels-last maps
    inorm = nn.InstanceNorm2d(16, affine=True)  # affine=True: the learned scale and shift Keras has by default
    images = torch.randn(2, 16, 8, 8) * 3 + 1
    per_map = inorm(images).flatten(2)  # each (sample, channel) map normalized on its own
    torch.testing.assert_close(per_map.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)
    # --8<-- [end:instance_norm]

    # --8<-- [start:mlp]
    # Keras: Sequential([Dense(256), BatchNormalization(), Activation("relu"), Dropout(0.2),
    #                    Dense(128), BatchNormalization(), Activation("relu"), Dropout(0.2), Dense(10)])
    mlp = nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 256), nn.BatchNorm1d(256, momentum=0.01, eps=1e-3), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(256, 128), nn.BatchNorm1d(128, momentum=0.01, eps=1e-3), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(128, 10),
    )  # fmt: skip
    # or the zoo's LightningModule with the same blocks (Linear-BN-ReLU-Dropout; `norm="layer"` for LayerNorm)
    model = zoo.create("mlp", num_classes=10, widths=(256, 128), dropout=0.2)
    digits = torch.randn(5, 1, 8, 8)
    assert mlp(digits).shape == model(digits).shape == (5, 10)
    # --8<-- [end:mlp]
    return checks


if __name__ == "__main__":
    print(main())
