"""``lightning-reg demo``: where each regularizer pays, on the bundled digits (no download).

Every model is trained on digits 0-7 (digits 8 and 9 are held out as the out-of-distribution set), plain and with
the regularizers a user would add (:func:`regularizers`), once on clean labels and once with 40 % of the training
labels flipped. It then measures, on the test split:

- **clean accuracy**, and the accuracy of the models trained on **noisy labels**;
- **covariate shift**: accuracy and ECE on digits-C (4 corruptions x 5 severities of the test images), plain,
  regularized, and with test-time BatchNorm adaptation (AdaBN: ``BNRecalibration(when="test_start",
  dataloader="test")`` re-estimates the statistics on the corrupted test batches) for models with BatchNorm;
- **calibration**: NLL and ECE before and after temperature scaling fitted on the validation split;
- **uncertainty**: Monte-Carlo dropout against the deterministic model, as the AUROC of telling the model's errors
  from its correct predictions (clean and severity-3 test images pooled) and of telling the held-out digits from the
  test digits (by predictive entropy; also by MC dropout's mutual information).

It prints one table, writes it as Markdown and CSV with one figure (accuracy against corruption severity for each
recipe) to the output folder. ``full=True`` (``lightning-reg demo --full``, or ``benchmarks/regimes.py``) runs every
zoo family over several seeds and reports mean and spread. Every number comes from the run; see the documentation
page ``docs/demo.md`` for what was measured and how to read it.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import logging
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "DEFAULT_MODELS",
    "FULL_MODELS",
    "DemoResult",
    "Measurement",
    "ModelName",
    "demo",
    "demo_cli",
    "regularizers",
    "trainer_flags",
]

ModelName = Literal["cnn_small", "cnn", "lstm", "gru", "transformer", "resnet18", "mlp"]
_MODELS: tuple[ModelName, ...] = get_args(ModelName)
DEFAULT_MODELS: tuple[ModelName, ...] = ("cnn_small", "lstm")
# One model per zoo family and size: the CNNs, both recurrent cells, the Transformer, a timm backbone and the MLP.
FULL_MODELS: tuple[ModelName, ...] = ("cnn_small", "cnn", "lstm", "gru", "transformer", "resnet18", "mlp")
FULL_SEEDS: tuple[int, ...] = (0, 1, 2)
Recipe = Literal["plain", "regularized", "plain + AdaBN", "regularized + AdaBN"]
_TRAINED: tuple[Recipe, ...] = ("plain", "regularized")
RECIPES: tuple[Recipe, ...] = get_args(Recipe)

IN_CLASSES: tuple[int, ...] = tuple(range(8))  # trained digits; 8 and 9 are the out-of-distribution set
LABEL_NOISE = 0.4
# Temperature scaling needs held-out errors: at 98-99 % accuracy the default 10 % split (147 images of digits 0-7)
# often holds none, and the NLL-optimal temperature then runs off to 0. 20 % (290 images) holds a few.
VAL_FRACTION = 0.2
MIDDLE_SEVERITY = 3
_BATCH_SIZE = 64
_MC_SAMPLES = 30
_N_BINS = 15
_MIN_TEMPERATURE = 1e-2  # fit_temperature's lower bound, passed explicitly so the report can tell who hit it


@dataclass(frozen=True)
class _ModelSetup:
    """How a zoo model sees the digits, how long it trains by default, and its extra constructor arguments."""

    as_sequence: bool  # rows as 8 time steps of 8 features (RNN, Transformer) instead of 1x8x8 images
    epochs: int
    kwargs: tuple[tuple[str, Any], ...] = ()


# Epochs chosen so that the default demo (cnn_small and lstm, 8 trainings) runs in under 3 minutes on 2 CPU cores
# (docs/demo.md has the measured wall time).
_SETUPS: dict[str, _ModelSetup] = {
    "cnn_small": _ModelSetup(as_sequence=False, epochs=30),
    "cnn": _ModelSetup(as_sequence=False, epochs=30),
    "lstm": _ModelSetup(as_sequence=True, epochs=40),
    "gru": _ModelSetup(as_sequence=True, epochs=40),
    "transformer": _ModelSetup(as_sequence=True, epochs=40),
    # grey 8x8 input; timm head dropout as in the zoo CNNs (0.3), so that MC dropout has something to sample.
    # 15 epochs: a training step of its 11 M parameters costs about 1 s on one CPU thread (the 512-channel weight
    # gradients), so 30 epochs made the 3-seed run about an hour on its own; at 5 epochs it reached 98.3 % clean.
    "resnet18": _ModelSetup(as_sequence=False, epochs=15, kwargs=(("in_channels", 1), ("drop_rate", 0.3))),
    # flattened 8x8 images; BatchNorm blocks with dropout after the last one
    "mlp": _ModelSetup(as_sequence=False, epochs=30),
}


@dataclass(frozen=True)
class Measurement:
    """One number the demo measured: ``value`` of ``metric`` for a model, a recipe and a seed.

    Metrics: ``clean_acc``, ``clean_nll``, ``clean_ece``, ``temperature``, ``ts_nll``, ``ts_ece`` (after
    temperature scaling), ``noise_acc`` (clean test accuracy after training on noisy labels),
    ``shift_acc/<corruption>/<severity>`` and ``shift_ece/...`` (digits-C), ``mc_acc``, ``misclass_auroc_det``,
    ``misclass_auroc_mc``, ``ood_auroc_det``, ``ood_auroc_mc``, ``ood_auroc_mi``, ``fit_seconds``,
    ``noise_fit_seconds``. Accuracies and ECEs are fractions in [0, 1].
    """

    model: str
    recipe: str
    seed: int
    metric: str
    value: float


# (column title, metric, how to show it); the summary averages shift metrics over the corruptions at one severity
_SUMMARY: tuple[tuple[str, str, str], ...] = (
    ("clean acc", "clean_acc", "pct"),
    (f"acc, {LABEL_NOISE:.0%} noisy labels", "noise_acc", "pct"),
    (f"shift acc (sev {MIDDLE_SEVERITY})", f"shift_acc/*/{MIDDLE_SEVERITY}", "pct"),
    (f"shift ECE (sev {MIDDLE_SEVERITY})", f"shift_ece/*/{MIDDLE_SEVERITY}", "num"),
    ("ECE", "clean_ece", "num"),
    ("ECE after TS", "ts_ece", "num"),
    ("NLL", "clean_nll", "num"),
    ("NLL after TS", "ts_nll", "num"),
    ("misclass AUROC det", "misclass_auroc_det", "num"),
    ("misclass AUROC MC", "misclass_auroc_mc", "num"),
    ("OOD AUROC det", "ood_auroc_det", "num"),
    ("OOD AUROC MC", "ood_auroc_mc", "num"),
)
SUMMARY_COLUMNS: tuple[str, ...] = ("model", "recipe", *(title for title, _, _ in _SUMMARY))


@dataclass
class DemoResult:
    """What :func:`demo` measured and wrote.

    Attributes:
        measurements: every number, per model, recipe and seed.
        recipes: model name -> the regularized recipe's callbacks, as text.
        seeds: the training seeds.
        out: the output folder.
        files: the files written (Markdown, CSV, figures).
        seconds: wall time of the whole run.

    Example:
        >>> m = [Measurement("lstm", "plain", 0, "clean_acc", 0.98), Measurement("lstm", "plain", 1, "clean_acc", 0.96)]
        >>> result = DemoResult(m, {}, (0, 1), Path("out"))
        >>> result.summary()[0][:3]
        ['lstm', 'plain', '97.0 ± 1.4 %']
    """

    measurements: list[Measurement]
    recipes: dict[str, str]
    seeds: tuple[int, ...]
    out: Path
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    def models(self) -> list[str]:
        """The models measured, in order."""
        return list(dict.fromkeys(m.model for m in self.measurements))

    def values(self, model: str, recipe: str, metric: str) -> list[float]:
        """Per seed, ``metric`` (``*`` in a shift metric averages over the corruptions); NaNs are kept."""
        by_seed: dict[int, list[float]] = {}
        prefix, _, rest = metric.partition("/*/")
        for m in self.measurements:
            if m.model != model or m.recipe != recipe:
                continue
            if rest:
                parts = m.metric.split("/")
                if len(parts) != 3 or parts[0] != prefix or parts[2] != rest:
                    continue
            elif m.metric != metric:
                continue
            by_seed.setdefault(m.seed, []).append(m.value)
        return [sum(v) / len(v) for v in by_seed.values()]

    def cell(self, model: str, recipe: str, metric: str, style: str = "num") -> str:
        """``mean`` or ``mean ± sample std`` over seeds, as text; ``-`` where not measured or undefined."""
        values = [v for v in self.values(model, recipe, metric) if not math.isnan(v)]
        if not values:
            return "-"
        scale, digits, unit = (100.0, 1, " %") if style == "pct" else (1.0, 3, "")
        mean = scale * statistics.fmean(values)
        if len(values) == 1:
            return f"{mean:.{digits}f}{unit}"
        return f"{mean:.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}{unit}"

    def summary(self) -> list[list[str]]:
        """One row per model and recipe measured: the cells of :data:`SUMMARY_COLUMNS`."""
        rows = []
        for model in self.models():
            for recipe in RECIPES:
                if not any(m.model == model and m.recipe == recipe for m in self.measurements):
                    continue
                rows.append(
                    [model, recipe, *(self.cell(model, recipe, metric, style) for _, metric, style in _SUMMARY)]
                )
        return rows

    def to_markdown(self) -> str:
        """The summary table as GitHub Markdown."""
        lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
        lines += ["| " + " | ".join(row) + " |" for row in self.summary()]
        return "\n".join(lines)

    def shift_markdown(self) -> str:
        """Accuracy per corruption and severity (severity 0 is the clean test), one row per model and recipe."""
        from zoo.data import CORRUPTIONS, SEVERITIES

        header = ["model", "recipe", "corruption", "clean", *(f"sev {s}" for s in SEVERITIES)]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for model in self.models():
            for recipe in RECIPES:
                if not self.values(model, recipe, f"shift_acc/*/{SEVERITIES[0]}"):
                    continue
                clean = "plain" if recipe.startswith("plain") else "regularized"
                for corruption in CORRUPTIONS:
                    cells = [self.cell(model, clean, "clean_acc", "pct")]
                    cells += [self.cell(model, recipe, f"shift_acc/{corruption}/{s}", "pct") for s in SEVERITIES]
                    lines.append("| " + " | ".join([model, recipe, corruption, *cells]) + " |")
        return "\n".join(lines)

    def to_csv(self) -> str:
        """Every measurement as CSV (model, recipe, seed, metric, value) at full precision."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(Measurement.__dataclass_fields__), lineterminator="\n")
        writer.writeheader()
        for m in self.measurements:
            writer.writerow(asdict(m))
        return buffer.getvalue()

    def legend(self) -> list[str]:
        """One line per model: its epochs and what "regularized" means for it."""
        return [f"{name}: regularized = {text}" for name, text in self.recipes.items()]

    def temperatures_at_bound(self) -> dict[tuple[str, str], list[int]]:
        """The seeds, per model and recipe, whose fitted temperature is the lower bound of the search.

        That happens when the validation split holds no error: the NLL then falls all the way to ``T -> 0``, so the
        temperature is not identifiable from the split, and the scaled model is overconfident on every test error.
        """
        hits: dict[tuple[str, str], list[int]] = {}
        for m in self.measurements:
            if m.metric == "temperature" and m.value <= _MIN_TEMPERATURE:
                hits.setdefault((m.model, m.recipe), []).append(m.seed)
        return hits

    def to_rich(self) -> Any:
        """The summary table as a ``rich.table.Table``."""
        from rich.table import Table

        seeds = ", ".join(map(str, self.seeds))
        table = Table(title=f"lightning-reg demo: digits 0-7, test split, seed(s) {seeds}")
        for name in SUMMARY_COLUMNS:
            table.add_column(name, justify="left" if name in ("model", "recipe") else "right")
        rows = self.summary()
        for i, row in enumerate(rows):
            last_of_model = i + 1 < len(rows) and rows[i + 1][0] != row[0]
            table.add_row(*row, end_section=last_of_model)
        return table


def regularizers(model: L.LightningModule, *, as_sequence: bool, num_classes: int) -> list[Callback]:
    """The regularized recipe's callbacks for a model: mixing, label smoothing, BN recalibration if it has BN.

    Images get :class:`~lightning_reg.MixUpCutMix` (CutMix pastes a box, MixUp blends); sequences of rows get
    :class:`~lightning_reg.MixUp`. :class:`~lightning_reg.LabelSmoothing` (0.1) follows the mixing, and
    :class:`~lightning_reg.BNRecalibration` re-estimates BatchNorm statistics on clean training batches at the
    end of fit when the model keeps running statistics.

    Args:
        model: the LightningModule to be trained.
        as_sequence: inputs are sequences ``(N, T, D)`` rather than images ``(N, C, H, W)``.
        num_classes: number of classes.

    Returns:
        The callbacks, in the order to give the Trainer.

    Example:
        >>> import zoo
        >>> [type(c).__name__ for c in regularizers(zoo.create("cnn_small"), as_sequence=False, num_classes=10)]
        ['MixUpCutMix', 'LabelSmoothing', 'BNRecalibration']
        >>> [type(c).__name__ for c in regularizers(zoo.create("lstm"), as_sequence=True, num_classes=10)]
        ['MixUp', 'LabelSmoothing']
    """
    from lightning_reg import BNRecalibration, LabelSmoothing, MixUp, MixUpCutMix
    from lightning_reg.functional.bn_recalibration import tracking_norm_layers

    callbacks: list[Callback] = []
    if as_sequence:
        callbacks.append(MixUp(alpha=0.2, num_classes=num_classes))
    else:
        callbacks.append(MixUpCutMix(mixup_alpha=0.2, cutmix_alpha=1.0, switch_prob=0.5, num_classes=num_classes))
    callbacks.append(LabelSmoothing(0.1, num_classes=num_classes))
    if tracking_norm_layers(model):
        callbacks.append(BNRecalibration(num_batches=None))  # every clean training batch
    return callbacks


def trainer_flags(accelerator: str, devices: int, strategy: str = "auto") -> dict[str, Any]:
    """The Trainer arguments every training and test of the demo uses (plus epochs, callbacks and a folder).

    ``deterministic=True`` on CPU, where every op the zoo uses has a deterministic kernel, so that the demo's
    numbers repeat exactly. On other accelerators ``"warn"``: CUDA has no deterministic backward for
    ``AdaptiveAvgPool2d`` (the CNNs' global pooling), so ``True`` would make torch raise in the first training step;
    ``"warn"`` keeps the deterministic kernels where they exist and warns where one is missing.

    Example:
        >>> trainer_flags("cpu", 1)["deterministic"], trainer_flags("gpu", 1)["deterministic"]
        (True, 'warn')
    """
    return {
        "accelerator": accelerator,
        "devices": devices,
        "strategy": strategy,
        "deterministic": True if accelerator == "cpu" else "warn",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,  # nothing to select on: temperature scaling reads the validation split itself
        "log_every_n_steps": 1,
    }


def _describe(callbacks: Sequence[Callback]) -> str:
    return " + ".join(type(c).__name__ for c in callbacks)


class _EpochProgress(Callback):
    """Advances a rich progress task once per training epoch (rank 0 only)."""

    def __init__(self, progress: Any, task: Any) -> None:
        self.progress = progress
        self.task = task

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.progress.advance(self.task)


class _TestLogits(Callback):
    """Collects the logits and targets of every test batch (gathered over ranks), as the module sees them."""

    def __init__(self) -> None:
        self.logits: Tensor | None = None
        self.targets: Tensor | None = None
        self._parts: list[tuple[Tensor, Tensor]] = []

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._parts = []

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        from lightning_reg.forward import batch_logits

        with torch.no_grad():
            self._parts.append((batch_logits(pl_module, batch).float(), batch[1]))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logits = torch.cat([p[0] for p in self._parts])
        targets = torch.cat([p[1] for p in self._parts])
        if trainer.world_size > 1:  # DistributedSampler gives every rank the same count: gather and flatten
            gathered = pl_module.all_gather((logits, targets))  # each (world_size, N, ...)
            logits, targets = gathered[0].flatten(0, 1), gathered[1].flatten(0, 1)
        self.logits, self.targets = logits.cpu(), targets.cpu()


@contextlib.contextmanager
def _torch_settings(devices: int) -> Iterator[None]:
    """One torch thread for a single-process run unless ``OMP_NUM_THREADS`` says otherwise; restore flags after.

    These models are tiny (batches of 64 8x8 digits): measured on a 2-core machine, 2 threads were no faster
    than 1 when idle and several times slower when other jobs shared the cores. With several processes
    Lightning's DDP launcher sets the threads itself (cores / processes), so it is left alone then.
    """
    previous = torch.get_num_threads()
    # `Trainer(deterministic=...)` sets these for good
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if devices == 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence Lightning's info banners and its advice warnings for tiny in-memory datasets."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
            # Under DDP: the zoo's epoch metrics are already reduced by torchmetrics, and the test split's
            # DistributedSampler repeats images to even out the ranks.
            warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
            warnings.filterwarnings("ignore", message=".*Using `DistributedSampler` with the dataloaders.*")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@dataclass
class _Options:
    epochs: int | None
    accelerator: str
    devices: int
    strategy: str
    limit_batches: int | None
    progress: Any


def _data(name: str, seed: int, *, noisy: bool) -> Any:
    import zoo

    data = zoo.data.DigitsDataModule(
        batch_size=_BATCH_SIZE,
        as_sequence=_SETUPS[name].as_sequence,
        classes=IN_CLASSES,
        val_fraction=VAL_FRACTION,
        label_noise=LABEL_NOISE if noisy else 0.0,
        label_noise_seed=seed,
    )
    data.setup("fit")  # load the digits before the clock starts: the fit time is training alone
    return data


def _fit(name: str, recipe: str, data: Any, seed: int, options: _Options) -> tuple[L.LightningModule, str, float]:
    import zoo
    from lightning_reg import RegularizationCheck

    setup = _SETUPS[name]
    epochs = options.epochs if options.epochs is not None else setup.epochs
    L.seed_everything(seed, verbose=False)
    model = zoo.create(name, num_classes=data.num_classes, **dict(setup.kwargs))
    extra = (
        regularizers(model, as_sequence=setup.as_sequence, num_classes=data.num_classes) if recipe != "plain" else []
    )
    callbacks: list[Callback] = [*extra, RegularizationCheck()]
    if options.progress is not None:
        noisy = " noisy" if data.label_noise else ""
        task = options.progress.add_task(f"{name} {recipe}{noisy} s{seed}", total=epochs)
        callbacks.append(_EpochProgress(options.progress, task))
    with tempfile.TemporaryDirectory(prefix="lightning-reg-demo-") as root:
        trainer = L.Trainer(
            **trainer_flags(options.accelerator, options.devices, options.strategy),
            max_epochs=epochs,
            callbacks=callbacks,
            default_root_dir=root,
            limit_train_batches=options.limit_batches,
        )
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        seconds = time.perf_counter() - start
    return model, _describe(extra), seconds


def _logits(model: L.LightningModule, dataset: TensorDataset) -> tuple[Tensor, Tensor]:
    """Eval-mode logits and targets of a dataset, in this process (the trained weights are the same on every rank)."""
    from lightning_reg.forward import batch_logits

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    parts = []
    with torch.no_grad():
        for x, y in DataLoader(dataset, batch_size=256):
            parts.append((batch_logits(model, [x.to(device), y.to(device)]).float().cpu(), y))
    model.train(was_training)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _calibration(logits: Tensor, targets: Tensor) -> tuple[float, float, float]:
    """Accuracy, mean NLL and ECE (15 bins) of logits."""
    from lightning_reg.functional.uncertainty import (
        expected_calibration_error,
        negative_log_likelihood,
        reliability_bins,
    )

    probs = logits.double().softmax(dim=1).float()
    accuracy = float((probs.argmax(dim=1) == targets).float().mean())
    nll = float(negative_log_likelihood(probs, targets).mean())
    ece = float(expected_calibration_error(reliability_bins(probs, targets, _N_BINS)))
    return accuracy, nll, ece


def _auroc(scores: Tensor, positives: Tensor) -> float:
    """Area under the ROC curve of ``scores`` for telling ``positives`` apart; NaN when one class is empty."""
    from sklearn.metrics import roc_auc_score

    if positives.all() or not positives.any():
        return math.nan
    return float(roc_auc_score(positives.numpy(), scores.double().numpy()))


def _mc(model: L.LightningModule, dataset: TensorDataset, seed: int) -> Any:
    from lightning_reg.functional import mc_dropout_predict

    device = next(model.parameters()).device
    x, _ = dataset.tensors
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        return mc_dropout_predict(model, x.to(device), _MC_SAMPLES, generator=generator, deterministic=True)


def _adabn_logits(
    model: L.LightningModule, datasets: dict[tuple[str, int], TensorDataset], options: _Options
) -> dict[tuple[str, int], tuple[Tensor, Tensor]]:
    """AdaBN: per corrupted set, a copy of the model tested with ``BNRecalibration(when="test_start")`` on that set."""
    from lightning_reg import BNRecalibration

    collector = _TestLogits()
    # `limit_batches` (a smoke run) also caps the test batches here: these Trainer passes are most of its time
    adapt = BNRecalibration(num_batches=options.limit_batches, when="test_start", dataloader="test")
    out: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}
    with tempfile.TemporaryDirectory(prefix="lightning-reg-demo-") as root:
        trainer = L.Trainer(
            **trainer_flags(options.accelerator, options.devices, options.strategy),
            callbacks=[adapt, collector],
            default_root_dir=root,
            limit_test_batches=options.limit_batches,
        )
        for key, dataset in datasets.items():
            adapted = copy.deepcopy(model)  # the recalibration changes the statistics for good
            trainer.test(adapted, dataloaders=DataLoader(dataset, batch_size=_BATCH_SIZE), verbose=False)
            assert collector.logits is not None
            assert collector.targets is not None
            out[key] = (collector.logits, collector.targets)
    return out


def _measure_model(name: str, seed: int, options: _Options) -> tuple[list[Measurement], str]:
    """Train ``name`` plain and regularized on clean and on noisy labels; measure every regime."""
    from lightning_reg.functional import fit_temperature, scale_logits
    from lightning_reg.functional.bn_recalibration import tracking_norm_layers
    from lightning_reg.functional.uncertainty import entropy
    from zoo.data import CORRUPTIONS, SEVERITIES

    records: list[Measurement] = []
    clean, noisy = _data(name, seed, noisy=False), _data(name, seed, noisy=True)
    shifted: dict[tuple[str, int], TensorDataset] = {
        (c, s): clean.corrupted_test_set(c, s, seed=seed) for c in CORRUPTIONS for s in SEVERITIES
    }
    described = ""

    def record(recipe: str, metric: str, value: float) -> None:
        records.append(Measurement(name, recipe, seed, metric, float(value)))

    for recipe in _TRAINED:
        model, text, seconds = _fit(name, recipe, clean, seed, options)
        described = text or described
        record(recipe, "fit_seconds", seconds)
        # clean test, and temperature scaling fitted on the validation split (every rank holds all the logits)
        test_logits, test_y = _logits(model, clean.test_set)
        accuracy, nll, ece = _calibration(test_logits, test_y)
        record(recipe, "clean_acc", accuracy)
        record(recipe, "clean_nll", nll)
        record(recipe, "clean_ece", ece)
        val_logits, val_y = _logits(model, clean.val_set)
        with warnings.catch_warnings():  # a temperature at its bound is reported in the table's notes instead
            warnings.simplefilter("ignore", UserWarning)
            temperature = fit_temperature(val_logits, val_y, min_temperature=_MIN_TEMPERATURE, distributed=False)
        _, ts_nll, ts_ece = _calibration(scale_logits(test_logits, temperature), test_y)
        record(recipe, "temperature", temperature)
        record(recipe, "ts_nll", ts_nll)
        record(recipe, "ts_ece", ts_ece)
        # covariate shift, as trained and with AdaBN where the model has BatchNorm
        shift_logits = {key: _logits(model, dataset) for key, dataset in shifted.items()}
        variants: dict[str, dict[tuple[str, int], tuple[Tensor, Tensor]]] = {recipe: shift_logits}
        if tracking_norm_layers(model):
            variants[f"{recipe} + AdaBN"] = _adabn_logits(model, shifted, options)
        for variant, per_set in variants.items():
            for (corruption, severity), (logits, y) in per_set.items():
                accuracy, _, ece = _calibration(logits, y)
                record(variant, f"shift_acc/{corruption}/{severity}", accuracy)
                record(variant, f"shift_ece/{corruption}/{severity}", ece)
        # MC dropout against the deterministic model: errors (clean + middle severity pooled) and held-out digits
        pooled = [clean.test_set, *(shifted[(c, MIDDLE_SEVERITY)] for c in CORRUPTIONS)]
        pooled_set = TensorDataset(*(torch.cat([d.tensors[i] for d in pooled]) for i in range(2)))
        on_pool = _mc(model, pooled_set, seed)
        y_pool = pooled_set.tensors[1]
        det_probs, mc_probs = on_pool.deterministic_probs.cpu(), on_pool.mean_probs.cpu()
        record(recipe, "mc_acc", float((on_pool.mean_probs[: len(test_y)].argmax(1).cpu() == test_y).float().mean()))
        record(recipe, "misclass_auroc_det", _auroc(entropy(det_probs), det_probs.argmax(1) != y_pool))
        record(recipe, "misclass_auroc_mc", _auroc(on_pool.predictive_entropy.cpu(), mc_probs.argmax(1) != y_pool))
        on_test = _mc(model, clean.test_set, seed)
        on_ood = _mc(model, clean.ood_set, seed + 1)
        is_ood = torch.cat(
            [torch.zeros(len(clean.test_set), dtype=torch.bool), torch.ones(len(clean.ood_set), dtype=torch.bool)]
        )
        det = torch.cat([entropy(on_test.deterministic_probs), entropy(on_ood.deterministic_probs)]).cpu()
        record(recipe, "ood_auroc_det", _auroc(det, is_ood))
        mc_entropy = torch.cat([on_test.predictive_entropy, on_ood.predictive_entropy]).cpu()
        record(recipe, "ood_auroc_mc", _auroc(mc_entropy, is_ood))
        mc_mi = torch.cat([on_test.mutual_information, on_ood.mutual_information]).cpu()
        record(recipe, "ood_auroc_mi", _auroc(mc_mi, is_ood))
        # label noise: the same recipe trained on noisy labels, tested on the clean test labels
        noisy_model, _, seconds = _fit(name, recipe, noisy, seed, options)
        record(recipe, "noise_fit_seconds", seconds)
        record(recipe, "noise_acc", _calibration(*_logits(noisy_model, noisy.test_set))[0])
    return records, described


def demo(
    models: Sequence[ModelName] | ModelName | None = None,
    epochs: int | None = None,
    out: str | Path = "lightning-reg-demo",
    seed: int | Sequence[int] = 0,
    accelerator: str = "cpu",
    devices: int = 1,
    *,
    full: bool = False,
    strategy: str = "auto",
    limit_batches: int | None = None,
    verbose: bool = True,
) -> DemoResult:
    """Train zoo models plain and regularized on the digits' regimes: clean, noisy labels, shift, OOD, calibration.

    For each model and seed: four trainings (plain and :func:`regularizers`, on clean and on 40 % noisy labels), then
    the measurements described in :mod:`lightning_reg.demo`. Writes ``demo.md`` (summary and per-corruption tables),
    ``demo.csv`` (every measurement) and ``shift.png`` (accuracy against corruption severity, per recipe) to
    ``out``, and prints the summary.

    Args:
        models: zoo models, any of ``"cnn_small"``, ``"cnn"``, ``"lstm"``, ``"gru"``, ``"transformer"``,
            ``"resnet18"``, ``"mlp"``; ``None``: ``cnn_small`` and ``lstm``, or every one with ``full=True``.
        epochs: training epochs of every model; ``None`` uses each model's default (30 for images, 15 for resnet18,
            40 for sequences).
        out: output folder (created if missing).
        seed: seed of every training (``lightning.seed_everything``), or several seeds: the tables then show the
            mean and the sample standard deviation over them. ``full=True`` uses seeds 0, 1, 2 unless several
            are given.
        accelerator: Lightning accelerator (``"cpu"``, ``"gpu"``, ``"auto"``).
        devices: devices (processes on CPU); more than one trains with Lightning's DDP strategy, which starts the
            other processes by running the same command again. The test split is padded to an even share per rank
            in the AdaBN tests (an image counted twice on 2 ranks).
        full: the benchmark: every zoo family over seeds 0, 1 and 2 (about 40 minutes on 2 CPU cores).
        strategy: Lightning strategy; ``"auto"`` is ``"ddp"`` for several devices (``"ddp_fork"`` in a notebook).
        limit_batches: at most this many training batches per epoch, and AdaBN test batches per corrupted set (a
            smoke run); all when None.
        verbose: print progress and the table (on global rank 0).

    Returns:
        The measurements, the recipes, the files written.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     result = demo(["lstm"], epochs=1, out=tmp, limit_batches=1, verbose=False)
        ...     sorted(p.name for p in result.files)
        ['demo.csv', 'demo.md', 'shift.png']
        >>> [row[:2] for row in result.summary()]
        [['lstm', 'plain'], ['lstm', 'regularized']]
    """
    names = _check_models(models, full)
    seeds = _check_seeds(seed, full)
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"Expected `epochs` to be a positive int or None (each model's default), but got {epochs!r}.")
    if limit_batches is not None and (isinstance(limit_batches, bool) or limit_batches < 1):
        raise ValueError(f"Expected `limit_batches` to be a positive int or None, but got {limit_batches!r}.")
    out = Path(out).resolve()
    start = time.perf_counter()
    main_process = _global_rank() == 0
    show = verbose and main_process
    console = _console() if show else None
    measurements: list[Measurement] = []
    recipes: dict[str, str] = {}
    with _quiet(), _torch_settings(devices), _progress(console) as progress:
        options = _Options(epochs, accelerator, devices, strategy, limit_batches, progress)
        for name in names:
            for s in seeds:
                records, described = _measure_model(name, s, options)
                measurements += records
                recipes[name] = described
    result = DemoResult(measurements, recipes, seeds, out, seconds=time.perf_counter() - start)
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "demo.md").write_text(_markdown_report(result))
        (out / "demo.csv").write_text(result.to_csv())
        from lightning_reg.plotting import save_figure

        result.files = [out / "demo.md", out / "demo.csv", save_figure(shift_figure(result), out / "shift.png")]
        if full:
            result.files.append(
                save_figure(shift_figure(result, per_corruption=True), out / "shift_per_corruption.png")
            )
    if console is not None:
        console.print(result.to_rich())
        for line in result.legend():
            console.print(f"  {line}")
        console.print(f"Wrote {', '.join(p.name for p in result.files)} to {out} in {result.seconds:.0f} s.")
    return result


def _check_models(models: Sequence[ModelName] | ModelName | None, full: bool) -> list[ModelName]:
    if models is None:
        return list(FULL_MODELS if full else DEFAULT_MODELS)
    names: list[ModelName] = list(dict.fromkeys([models] if isinstance(models, str) else models))
    unknown = [n for n in names if n not in _MODELS]
    if unknown or not names:
        raise ValueError(f"Expected `models` to be a non-empty list of {_MODELS}, but got {list(models)!r}.")
    return names


def _check_seeds(seed: int | Sequence[int], full: bool) -> tuple[int, ...]:
    if isinstance(seed, bool) or not isinstance(seed, int | Sequence) or isinstance(seed, str):
        raise ValueError(f"Expected `seed` to be an int or a list of distinct ints, but got {seed!r}.")
    seeds = (seed,) if isinstance(seed, int) else tuple(seed)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"Expected `seed` to be an int or a list of distinct ints, but got {seed!r}.")
    return FULL_SEEDS if full and len(seeds) == 1 else seeds


def shift_figure(result: DemoResult, *, per_corruption: bool = False) -> Any:
    """Accuracy against corruption severity (0 = clean test), one line per recipe, one panel per model.

    With ``per_corruption=True`` one row of panels per model, one column per corruption; otherwise each point is the
    mean over the four corruptions. With several seeds the band is the mean plus and minus one standard deviation.
    """
    from matplotlib.figure import Figure

    from zoo.data import CORRUPTIONS, SEVERITIES

    models = result.models()
    columns = list(CORRUPTIONS) if per_corruption else ["*"]
    rows, cols = (len(models), len(columns)) if per_corruption else (1, len(models))
    fig = Figure(figsize=(3.4 * cols, 3.0 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    colors = {
        "plain": "#888888",
        "regularized": "#1f77b4",
        "plain + AdaBN": "#e6a23c",
        "regularized + AdaBN": "#d62728",
    }
    styles = {"plain": "--", "regularized": "-", "plain + AdaBN": "--", "regularized + AdaBN": "-"}
    x = [0, *SEVERITIES]
    for i, model in enumerate(models):
        for j, corruption in enumerate(columns):
            ax = axes[i, j] if per_corruption else axes[0, i]
            for recipe in RECIPES:
                clean_recipe = "plain" if recipe.startswith("plain") else "regularized"
                points = [result.values(model, clean_recipe, "clean_acc")]
                points += [result.values(model, recipe, f"shift_acc/{corruption}/{s}") for s in SEVERITIES]
                if not all(points):
                    continue
                mean = [100 * statistics.fmean(p) for p in points]
                ax.plot(x, mean, styles[recipe], marker="o", ms=3, color=colors[recipe], label=recipe)
                if min(len(p) for p in points) > 1:
                    spread = [100 * statistics.stdev(p) for p in points]
                    low, high = (
                        [m - s for m, s in zip(mean, spread, strict=True)],
                        [m + s for m, s in zip(mean, spread, strict=True)],
                    )
                    ax.fill_between(x, low, high, color=colors[recipe], alpha=0.15, lw=0)
            title = model if corruption == "*" else f"{model}: {corruption}"
            ax.set_title(title, fontsize=10)
            ax.set_xticks(x, ["clean", *map(str, SEVERITIES)])
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
            if j == 0 or not per_corruption:
                ax.set_ylabel("test accuracy (%)")
            ax.set_xlabel("corruption severity")
            if not result.values(model, "plain + AdaBN", f"shift_acc/{corruption}/1"):
                ax.text(0.03, 0.05, "no BatchNorm: AdaBN does not apply", transform=ax.transAxes, fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=9, frameon=False)
    seeds = ", ".join(map(str, result.seeds))
    what = "" if per_corruption else ", mean of 4 corruptions"
    fig.suptitle(f"Digits-C: accuracy under covariate shift (digits 0-7{what}; seed {seeds})", fontsize=11)
    return fig


def _global_rank() -> int:
    # Lightning reads the rank from the launcher's environment (RANK, LOCAL_RANK, ...) at import: a process that
    # DDP started for rank 1 knows it before its first Trainer exists.
    return int(getattr(rank_zero_only, "rank", 0))


def _markdown_report(result: DemoResult) -> str:
    legend = "\n".join(f"- {line}" for line in result.legend())
    at_bound = result.temperatures_at_bound()
    if at_bound:
        runs = "; ".join(
            f"{model} {recipe}: seed(s) {', '.join(map(str, seeds))}" for (model, recipe), seeds in at_bound.items()
        )
        legend += (
            f"\n- Temperature at its lower bound {_MIN_TEMPERATURE} (the validation split held no error, so the NLL "
            f"keeps falling as T -> 0 and every test error then costs a large NLL): {runs}."
        )
    seeds = ", ".join(map(str, result.seeds))
    spread = " Cells are mean ± sample standard deviation over the seeds." if len(result.seeds) > 1 else ""
    return (
        "# lightning-reg demo\n\n"
        f"Digits 0-7 of the bundled digits (test split: 289 images; OOD: the 354 images of digits 8 and 9), "
        f"seed(s) {seeds}, MC dropout with {_MC_SAMPLES} samples, ECE with {_N_BINS} bins, temperature scaling "
        f"fitted on the validation split. Label noise: {LABEL_NOISE:.0%} of the training labels flipped to another "
        f"class. Shift: digits-C, the mean of 4 corruptions at severity {MIDDLE_SEVERITY}.{spread}\n\n"
        f"{result.to_markdown()}\n\n{legend}\n\n"
        "## Accuracy per corruption and severity\n\n"
        f"{result.shift_markdown()}\n\n"
        f"Wall time: {result.seconds:.0f} s.\n"
    )


def _console() -> Any:
    from rich.console import Console

    console = Console()
    # Rich assumes 80 columns when the output is not a terminal (a pipe, a log file): the table needs about 180.
    return console if console.is_terminal else Console(width=200)


@contextlib.contextmanager
def _progress(console: Any) -> Iterator[Any]:
    if console is None:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description:<36}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        yield progress


def demo_cli(args: Sequence[str]) -> None:
    """Parse ``lightning-reg demo`` options with jsonargparse (LightningCLI's parser) and run :func:`demo`."""
    from jsonargparse import auto_cli

    auto_cli(_demo_command, args=list(args), prog="lightning-reg demo")


def _demo_command(
    models: list[ModelName] | ModelName | None = None,
    epochs: int | None = None,
    out: str = "lightning-reg-demo",
    seed: list[int] | int = 0,
    accelerator: str = "cpu",
    devices: int = 1,
    full: bool = False,
) -> None:
    """Train zoo models on the digits plain and regularized, and measure where the regularizers pay.

    Regimes: clean, 40 % noisy labels, covariate shift (digits-C, with and without AdaBN), calibration after
    temperature scaling, and MC dropout against the deterministic model for errors and held-out digits. Prints one
    table and writes it as Markdown and CSV with a figure (accuracy against corruption severity) to the output folder.

    Args:
        models: zoo models: one name (``--models lstm``) or a list (``--models [lstm,gru]``); default cnn_small and
            lstm (every family with --full).
        epochs: training epochs of every model (default: 30 for the image models, 40 for the sequence models).
        out: output folder.
        seed: seed of every training, or a list of seeds (mean and spread).
        accelerator: Lightning accelerator (cpu, gpu, auto).
        devices: devices; more than one trains with Lightning's DDP strategy.
        full: the benchmark: every zoo family over seeds 0, 1, 2 (about 40 minutes on 2 CPU cores).
    """
    demo(models, epochs=epochs, out=out, seed=seed, accelerator=accelerator, devices=devices, full=full)
