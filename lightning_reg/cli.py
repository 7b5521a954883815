"""The ``lightning-reg`` command: a ``LightningCLI`` over the zoo, plus ``lightning-reg demo``."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import lightning as L

__all__ = ["demo", "main"]


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


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-reg`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["demo"]:
        from jsonargparse import auto_cli

        auto_cli(demo, args=argv[1:])
        return
    from lightning.pytorch.cli import LightningCLI

    import zoo

    LightningCLI(
        zoo.ClassifierModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
    )


if __name__ == "__main__":
    main()
