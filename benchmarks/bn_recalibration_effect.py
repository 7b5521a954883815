"""The real effect of BN recalibration: a CNN trained with MixUp on the bundled digits, then recalibrated.

    .venv/bin/python benchmarks/bn_recalibration_effect.py [--epochs 15] [--seeds 0 1 2] [--alpha 1.0]

MixUp trains BatchNorm on mixed images, whose per-channel variance is smaller than that of clean images (a mix of
two images has variance (lam^2 + (1 - lam)^2) times theirs, plus their covariance), so the running statistics that
eval mode uses do not fit clean test images. Recalibrating on clean training batches with the final weights fixes
that. For each seed: test accuracy and NLL before and after `recalibrate_bn` on the clean training loader (the same
pass `BNRecalibration` runs at the end of fit).
"""

from __future__ import annotations

import argparse
import copy
import statistics

import lightning as L
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn

import zoo
from lightning_reg import MixUp
from lightning_reg import functional as LF


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: torch.utils.data.DataLoader) -> tuple[float, float]:
    """(accuracy, mean negative log-likelihood) in eval mode."""
    model.eval()
    correct, nll, n = 0, 0.0, 0
    for x, y in loader:
        logits = model(x)
        nll += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        n += len(y)
    return correct / n, nll / n


def run(seed: int, epochs: int, alpha: float) -> dict[str, float]:
    L.seed_everything(seed, verbose=False)
    data = zoo.data.DigitsDataModule(batch_size=64, seed=0)
    model = zoo.create("cnn_small", num_classes=10, lr=3e-3)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        callbacks=[MixUp(alpha=alpha, num_classes=10)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=data)
    data.setup("test")
    acc0, nll0 = evaluate(model, data.test_dataloader())
    swa = copy.deepcopy(model).train()
    update_bn(data.train_dataloader(), swa)  # torch's cumulative average, for comparison
    acc2, nll2 = evaluate(swa, data.test_dataloader())
    model.train()
    report = LF.recalibrate_bn(model, data.train_dataloader())
    acc1, nll1 = evaluate(model, data.test_dataloader())
    return {
        "acc_before": acc0,
        "nll_before": nll0,
        "acc_after": acc1,
        "nll_after": nll1,
        "acc_update_bn": acc2,
        "nll_update_bn": nll2,
        "change_var": report.mean_abs_change_var,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--alpha", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for seed in args.seeds:
        row = run(seed, args.epochs, args.alpha)
        print({"seed": seed, **{k: round(v, 4) for k, v in row.items()}}, flush=True)
        rows.append(row)
    print(f"\nzoo cnn_small, digits, MixUp(alpha={args.alpha}), {args.epochs} epochs, seeds {args.seeds}\n")
    print(
        "| seed | test acc before | after | after update_bn | test NLL before | after | after update_bn "
        "| abs change of var |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for seed, r in zip(args.seeds, rows, strict=True):
        print(
            f"| {seed} | {r['acc_before']:.4f} | {r['acc_after']:.4f} | {r['acc_update_bn']:.4f} "
            f"| {r['nll_before']:.4f} | {r['nll_after']:.4f} | {r['nll_update_bn']:.4f} | {r['change_var']:.3f} |"
        )
    mean = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
    print(
        f"| mean | {mean['acc_before']:.4f} | {mean['acc_after']:.4f} | {mean['acc_update_bn']:.4f} | "
        f"{mean['nll_before']:.4f} | {mean['nll_after']:.4f} | {mean['nll_update_bn']:.4f} | {mean['change_var']:.3f} |"
    )


if __name__ == "__main__":
    main()
