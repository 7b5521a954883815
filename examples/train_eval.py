"""What dropout and BatchNorm do in train and eval mode, and what forgetting `model.eval()` costs.

    python examples/train_eval.py [--epochs 10]

Trains the zoo MLP (Linear-BatchNorm-ReLU-Dropout) on the bundled digits, then predicts the test split three ways:
in eval mode (right), in train mode (`model.eval()` forgotten), and in train mode one image at a time.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch

import zoo


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():  # no_grad stops gradients; it does NOT switch dropout or BatchNorm to eval behaviour
        return float((model(x).argmax(-1) == y).float().mean())


def main(epochs: int = 10) -> dict[str, float]:
    L.seed_everything(0, verbose=False)
    data = zoo.data.DigitsDataModule(batch_size=64)
    model = zoo.create("mlp", num_classes=10, widths=(128, 64), dropout=0.5)
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)  # Lightning calls model.train() / model.eval() around its loops itself
    data.setup("test")
    x, y = (torch.cat(t) for t in zip(*data.test_dataloader(), strict=True))  # the 359 test images
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d))
    results: dict[str, float] = {}

    # --8<-- [start:modes]
    model.eval()  # dropout off, BatchNorm uses its running statistics: deterministic, one row never sees another
    results["eval_accuracy"] = accuracy(model, x, y)
    with torch.no_grad():
        results["eval_repeat_max_diff"] = float((model(x) - model(x)).abs().max())  # 0.0

    model.train()  # forgot model.eval(): dropout samples, BatchNorm normalizes with this batch's statistics
    before = bn.running_mean.clone()
    results["train_mode_accuracy"] = accuracy(model, x, y)
    with torch.no_grad():
        results["train_repeat_max_diff"] = float((model(x) - model(x)).abs().max())  # > 0: random predictions
    # ... and each train-mode forward pass moved BatchNorm's running statistics towards the test batch, even
    # under no_grad: the model is changed by "evaluating" it.
    results["running_mean_shift"] = float((bn.running_mean - before).abs().max())
    # One image at a time in train mode: BatchNorm cannot take statistics over one value per channel.
    try:
        model(x[:1])
        results["single_image_in_train_mode_fails"] = 0.0
    except ValueError:  # "Expected more than 1 value per channel when training"
        results["single_image_in_train_mode_fails"] = 1.0
    model.eval()
    # --8<-- [end:modes]
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    for name, value in main(parser.parse_args().epochs).items():
        print(f"{name:34s} {value:.4f}")
