"""Temperature scaling and RegMixup: speed, and calibration of the zoo on the bundled digits (CPU).

    python benchmarks/calibration.py --part speed     # fit T on cached logits vs one eval pass; RegMixup vs MixUp step
    python benchmarks/calibration.py --part digits    # each zoo model, plain and regularized, 3 seeds
    python benchmarks/calibration.py --part digits --epochs 20 --seeds 0 1 2 --out /tmp/digits.md

Digits: each of ``cnn_small``, ``lstm``, ``transformer`` is trained plain and with the demo's regularized recipe
(``lightning_reg.demo.regularizers``: MixUpCutMix or MixUp, LabelSmoothing 0.1, BNRecalibration where there is
BatchNorm) plus ``TemperatureScaling()``, which fits T on the validation split at the end of fit. ECE (15 bins) and
NLL are measured on the test split before and after dividing by that T.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_calibration_error

import zoo
from lightning_reg import TemperatureScaling
from lightning_reg.demo import regularizers
from lightning_reg.forward import batch_logits
from lightning_reg.functional.calibration import fit_temperature

MODELS = {"cnn_small": False, "lstm": True, "transformer": True}  # name -> rows as a sequence


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def _environment() -> str:
    return (
        f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} torch thread(s), "
        f"{os.cpu_count()} CPU cores"
    )


def _trainer(epochs: int, callbacks: list[L.Callback], root: str) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        callbacks=callbacks,
        default_root_dir=root,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        num_sanity_val_steps=0,
    )


def digits_run(name: str, recipe: str, seed: int, epochs: int, root: str) -> dict[str, float]:
    """Train one model on the digits, fit T on the validation split, measure the test split before/after."""
    as_sequence = MODELS[name]
    L.seed_everything(seed, verbose=False)
    data = zoo.data.DigitsDataModule(batch_size=64, as_sequence=as_sequence)
    model = zoo.create(name, num_classes=data.num_classes)
    extra = regularizers(model, as_sequence=as_sequence, num_classes=data.num_classes) if recipe != "plain" else []
    scaling = TemperatureScaling()
    trainer = _trainer(epochs, [*extra, scaling], root)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    wrapper = scaling.calibrated(model)  # a plain module; `wrapper.model` is the unscaled LightningModule
    wrapper.eval()
    data.setup("test")
    logits, targets = [], []
    with torch.no_grad():
        for batch in data.test_dataloader():
            logits.append(batch_logits(wrapper.model, batch).double())
            targets.append(batch[1])
    z, y = torch.cat(logits), torch.cat(targets)
    t = float(scaling.temperature)  # type: ignore[arg-type]

    def ece(values: torch.Tensor) -> float:
        return float(multiclass_calibration_error(values.softmax(1), y, data.num_classes, n_bins=15, norm="l1"))

    return {
        "T": t,
        "acc": float((z.argmax(1) == y).double().mean()),
        "ece_before": ece(z),
        "ece_after": ece(z / t),
        "nll_before": float(F.cross_entropy(z, y)),
        "nll_after": float(F.cross_entropy(z / t, y)),
        "seconds": seconds,
    }


def _mean_sd(values: Sequence[float], digits: int = 3) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def digits(epochs: int, seeds: Sequence[int], models: Sequence[str]) -> str:
    import tempfile

    rows = []
    start_load = _load()
    start = time.perf_counter()
    for name in models:
        for recipe in ("plain", "regularized"):
            runs = []
            for seed in seeds:
                with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    runs.append(digits_run(name, recipe, seed, epochs, root))
                print(name, recipe, seed, {k: round(v, 4) for k, v in runs[-1].items()}, flush=True)
            rows.append((name, recipe, runs))
    lines = [
        f"Digits: {epochs} epochs per model (the demo uses 30/40/40; fewer here to keep the measurement cheap), "
        f"batch size 64, seeds {list(seeds)}; T fitted by `TemperatureScaling()` on the 180 validation images, "
        "ECE (15 bins, l1) and NLL on the 359 test images. Mean ± standard deviation over the seeds. "
        "Regularized = the demo's recipe (`lightning_reg.demo.regularizers`: MixUpCutMix for the CNN, MixUp for "
        "the sequence models, LabelSmoothing 0.1, BNRecalibration where the model has BatchNorm).",
        "",
        f"{_environment()}; 1-minute load {start_load} at the start, {_load()} at the end; "
        f"{time.perf_counter() - start:.0f} s in all.",
        "",
        "| model | recipe | test acc | T | ECE before | ECE after | NLL before | NLL after | ECE after <= 0.03 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, recipe, runs in rows:

        def col(key: str, runs: list[dict[str, float]] = runs) -> list[float]:
            return [r[key] for r in runs]

        met = all(v <= 0.03 for v in col("ece_after"))
        lines.append(
            f"| `{name}` | {recipe} | {_mean_sd(col('acc'))} | {_mean_sd(col('T'), 2)} | {_mean_sd(col('ece_before'))} "
            f"| {_mean_sd(col('ece_after'))} | {_mean_sd(col('nll_before'))} | {_mean_sd(col('nll_after'))} "
            f"| {'yes' if met else 'no'} (max {max(col('ece_after')):.3f}) |"
        )
    return "\n".join(lines) + "\n"


# --- speed ----------------------------------------------------------------------------------------


def _best_of(fn: Callable[[], Any], repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


class _StepTimer(L.Callback):
    """Wall time of each training step, from the first ``on_train_batch_start`` to ``on_train_batch_end``."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.times.append(time.perf_counter() - self._start)


def speed() -> str:
    from lightning_reg import MixUp, RegMixup

    torch.manual_seed(0)
    data = zoo.data.DigitsDataModule(batch_size=64)
    data.setup("fit")
    model = zoo.create("cnn_small", num_classes=10).eval()
    loader = data.val_dataloader()

    def eval_pass() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model(x) for x, _ in loader])

    logits = eval_pass()
    targets = torch.cat([y for _, y in loader])
    t_eval = _best_of(eval_pass)
    t_fit = _best_of(lambda: fit_temperature(logits, targets))
    g = torch.Generator().manual_seed(0)
    big = 3.0 * torch.randn(50_000, 100, generator=g)  # a calibrated model's logits, made over-confident below
    big_y = torch.multinomial(big.softmax(1), 1, generator=g).squeeze(1)
    t_fit_big = _best_of(lambda: fit_temperature(2 * big, big_y), repeats=2)

    # one training step of the zoo CNN (the mixing callback, forward, backward, AdamW), timed from the callbacks'
    # `on_train_batch_start` to `on_train_batch_end` inside a real fit: MixUp (N rows) vs RegMixup (2N rows)
    step_times = {}
    for name, make in (("MixUp", lambda: MixUp(alpha=0.2)), ("RegMixup", lambda: RegMixup(alpha=20.0))):
        timer = _StepTimer()
        L.seed_everything(0, verbose=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = _trainer(1, [timer, make()], "/tmp")  # the timer first: it starts before the mixing
            trainer.fit(zoo.create("cnn_small", num_classes=10), data.train_dataloader())
        step_times[name] = statistics.median(timer.times[2:])  # skip the warm-up steps
    lines = [
        f"{_environment()}; 1-minute load {_load()}. Fits and the eval pass: best of 5 after a warm-up; steps: "
        "the median over one epoch of the digits' training split (batch 64), the first two steps left out.",
        "",
        "| measurement | seconds | ratio |",
        "|---|---|---|",
        f"| one eval pass of `cnn_small` over the 180 validation images (batch 64) | {t_eval:.4f} | 1 |",
        f"| `fit_temperature` on those cached logits (180 x 10) | {t_fit:.4f} | {t_fit / t_eval:.2f}x (goal <= 1.2x) |",
        f"| `fit_temperature` on 50,000 x 100 logits (over-confident by 2x) | {t_fit_big:.4f} | - |",
        f"| one training step of `cnn_small`, batch 64, `MixUp` (64 rows) | {step_times['MixUp']:.4f} | 1 |",
        f"| the same with `RegMixup` (128 rows: clean + mixed) | {step_times['RegMixup']:.4f} | "
        f"{step_times['RegMixup'] / step_times['MixUp']:.2f}x |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("speed", "digits"), required=True)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    text = speed() if args.part == "speed" else digits(args.epochs, args.seeds, args.models)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
