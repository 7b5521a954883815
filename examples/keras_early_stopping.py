"""Keras's EarlyStopping(patience, restore_best_weights=True) with Lightning: `python examples/keras_early_stopping.py`.

Lightning's `EarlyStopping` stops; it does not restore weights. `ModelCheckpoint` keeps the best ones, and
`ckpt_path="best"` (or `load_from_checkpoint(best_model_path)`) brings them back.
"""

from __future__ import annotations

import argparse
import tempfile

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

import zoo


def main(max_epochs: int = 30, root: str | None = None, patience: int = 3) -> dict[str, float]:
    root = root or tempfile.mkdtemp()
    L.seed_everything(0, verbose=False)
    model = zoo.create("mlp", num_classes=10, widths=(64,), lr=3e-2)
    data = zoo.data.DigitsDataModule(batch_size=64)

    # --8<-- [start:early_stopping]
    # Keras: callbacks=[EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True)]
    early = EarlyStopping(monitor="val_loss", mode="min", patience=patience)  # patience in validation checks (epochs)
    best = ModelCheckpoint(monitor="val_loss", mode="min", save_top_k=1)  # keeps the best weights
    trainer = L.Trainer(
        max_epochs=max_epochs,
        callbacks=[early, best],
        default_root_dir=root,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    # restore_best_weights=True: load the best checkpoint (the trainer's model holds the *last* weights)
    restored = type(model).load_from_checkpoint(best.best_model_path)
    (metrics,) = trainer.validate(restored, datamodule=data, verbose=False)  # or trainer.test(ckpt_path="best")
    # --8<-- [end:early_stopping]
    return {
        "stopped_epoch": float(early.stopped_epoch),
        "epochs_run": float(trainer.current_epoch),
        "best_val_loss": float(best.best_model_score),
        "restored_val_loss": float(metrics["val_loss"]),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=30)
    print(main(parser.parse_args().max_epochs))
