"""``lightning-reg demo``: the main job on the bundled digits, no network needed."""

from __future__ import annotations

import time
from collections.abc import Sequence

import lightning as L

__all__ = ["demo", "demo_cli"]


def demo(epochs: int = 10, seed: int = 0, accelerator: str = "cpu", devices: int = 1) -> dict[str, float]:
    """Train the zoo CNN on the bundled digits and report its test accuracy.

    Args:
        epochs: training epochs.
        seed: seed of ``lightning.seed_everything``.
        accelerator: Lightning accelerator (``"cpu"``, ``"gpu"``, ``"auto"``).
        devices: number of devices.

    Returns:
        The test metrics, e.g. ``{"test_acc": 0.98, "test_loss": 0.07}``.
    """
    import zoo

    L.seed_everything(seed, verbose=False)
    datamodule = zoo.data.DigitsDataModule()
    model = zoo.create("cnn_small", num_classes=datamodule.num_classes)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator=accelerator,
        devices=devices,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        deterministic=True,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    (metrics,) = trainer.test(model, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in metrics.items()}
    if trainer.is_global_zero:
        print(
            f"cnn_small on digits: test accuracy {metrics['test_acc']:.4f}, test loss {metrics['test_loss']:.4f} "
            f"({epochs} epochs, {time.perf_counter() - start:.1f} s)"
        )
    return metrics


def demo_cli(args: Sequence[str]) -> None:
    """Parse ``lightning-reg demo`` options with jsonargparse (LightningCLI's parser) and run :func:`demo`."""
    from jsonargparse import auto_cli

    auto_cli(demo, args=list(args))
