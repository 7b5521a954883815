"""Temperature scaling on the bundled digits: `python examples/calibration.py --epochs 20` (or `--fast`).

Trains the zoo CNN with MixUpCutMix and label smoothing (a recipe that leaves the model under-confident), and
with `TemperatureScaling`, which fits T on the validation split at the end of fit. The test metrics of the
calibrated model follow; then the same model without Lightning, through `callback.calibrated(model)`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

import zoo
from lightning_reg import LabelSmoothing, MixUpCutMix, TemperatureScaling


def main(epochs: int = 20, fast: bool = False, root: str | Path = "lightning_logs/calibration") -> dict[str, float]:
    L.seed_everything(0)
    model = zoo.create("cnn_small", num_classes=10)
    scaling = TemperatureScaling()  # dataloader="val", when="fit_end"
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[MixUpCutMix(mixup_alpha=0.2, cutmix_alpha=1.0), LabelSmoothing(0.1), scaling],
        accelerator="cpu",
        default_root_dir=str(root),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not fast,
        limit_train_batches=2 if fast else None,
        limit_test_batches=2 if fast else None,
    )
    data = zoo.data.DigitsDataModule(batch_size=64)
    trainer.fit(model, datamodule=data)
    report = scaling.report
    assert report is not None
    print(
        f"T = {report.temperature:.3f}; validation NLL {report.nll_before:.3f} -> {report.nll_after:.3f}, "
        f"ECE {report.ece_before:.3f} -> {report.ece_after:.3f}"
    )
    (results,) = trainer.test(model, datamodule=data, verbose=False)  # test_loss is the calibrated NLL

    # Without Lightning: a plain nn.Module that divides by T in every mode.
    calibrated = scaling.calibrated(model).eval()
    x, y = next(iter(data.test_dataloader()))
    with torch.no_grad():
        print(
            f"first test batch: NLL {F.cross_entropy(calibrated.model(x), y):.3f} (raw) -> "
            f"{F.cross_entropy(calibrated(x), y):.3f} (calibrated)"
        )
    return {"temperature": report.temperature, **{k: float(v) for k, v in results.items()}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--fast", action="store_true", help="2 batches per epoch, for a smoke test")
    args = parser.parse_args()
    print(main(args.epochs, args.fast))
