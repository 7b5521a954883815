"""``lightning-reg demo``: plain vs regularized zoo models on the bundled digits, with MC-dropout uncertainty.

Trains the zoo CNN (``cnn_small``), RNN (``lstm``) and Transformer (``transformer``) twice each on
scikit-learn's bundled digits (no network): once plain, once with the regularizer callbacks a user would add
(:class:`~lightning_reg.MixUpCutMix` or :class:`~lightning_reg.MixUp`, :class:`~lightning_reg.LabelSmoothing`,
and :class:`~lightning_reg.BNRecalibration` where the model has BatchNorm). Each model is tested with
:class:`~lightning_reg.MCDropoutEvaluation`, which reports the deterministic prediction and the Monte-Carlo
dropout mean side by side. The table is printed with rich and written as Markdown and CSV, with one
reliability diagram per trained model, to the output folder.

Every number comes from the run. Each training is seeded on its own with ``seed``, so the rows of a model do
not depend on which other models run.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import shutil
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

__all__ = ["DemoResult", "DemoRow", "ModelName", "demo", "demo_cli", "regularizers"]

ModelName = Literal["cnn_small", "lstm", "transformer"]
Recipe = Literal["plain", "regularized"]
_MODELS: tuple[ModelName, ...] = get_args(ModelName)
_RECIPES: tuple[Recipe, ...] = get_args(Recipe)


@dataclass(frozen=True)
class _ModelSetup:
    """How a zoo model sees the digits and how long it trains by default."""

    as_sequence: bool  # rows as 8 time steps of 8 features (RNN, Transformer) instead of 1x8x8 images
    epochs: int


# Epochs chosen so that the whole default demo runs in under 3 minutes on 2 CPU cores (see
# benchmarks/results/demo.md); benchmarks/results/zoo_digits.md has the plain models' accuracy at more epochs.
_SETUPS: dict[str, _ModelSetup] = {
    "cnn_small": _ModelSetup(as_sequence=False, epochs=30),
    "lstm": _ModelSetup(as_sequence=True, epochs=40),
    "transformer": _ModelSetup(as_sequence=True, epochs=40),
}
_BATCH_SIZE = 64
_MC_SAMPLES = 30


@dataclass(frozen=True)
class DemoRow:
    """One line of the demo table: a trained model evaluated deterministically or with MC dropout.

    Attributes:
        model: zoo model name.
        recipe: ``"plain"`` or ``"regularized"``.
        eval: ``"deterministic"`` or ``"MC dropout"``.
        accuracy: test accuracy in [0, 1].
        nll: mean test negative log-likelihood (nats).
        ece: expected calibration error (15 bins).
        brier: mean multi-class Brier score.
        mutual_info: mean mutual information (nats) of the MC samples; ``None`` for the deterministic pass.
        train_seconds: wall time of ``trainer.fit``.
        epochs: training epochs.
    """

    model: str
    recipe: str
    eval: str
    accuracy: float
    nll: float
    ece: float
    brier: float
    mutual_info: float | None
    train_seconds: float
    epochs: int


_COLUMNS = ("model", "recipe", "eval", "accuracy", "NLL", "ECE", "Brier", "mean MI", "train s")


def _cells(row: DemoRow) -> list[str]:
    mi = "-" if row.mutual_info is None else f"{row.mutual_info:.4f}"
    return [
        row.model,
        row.recipe,
        row.eval,
        f"{100 * row.accuracy:.1f} %",
        f"{row.nll:.3f}",
        f"{row.ece:.3f}",
        f"{row.brier:.3f}",
        mi,
        f"{row.train_seconds:.1f}",
    ]


@dataclass
class DemoResult:
    """What :func:`demo` measured and wrote.

    Attributes:
        rows: two rows (deterministic, MC dropout) per trained model, in training order.
        recipes: model name -> the regularized recipe's callbacks, as text (e.g. ``"MixUp + LabelSmoothing"``).
        out: the output folder.
        files: the files written (Markdown table, CSV table, reliability diagrams).
        seconds: wall time of the whole demo.

    Example:
        >>> row = DemoRow("lstm", "plain", "deterministic", 0.98, 0.07, 0.01, 0.03, None, 4.2, 30)
        >>> print(DemoResult([row], {}, Path("out")).to_markdown())
        | model | recipe | eval | accuracy | NLL | ECE | Brier | mean MI | train s |
        |---|---|---|---|---|---|---|---|---|
        | lstm | plain | deterministic | 98.0 % | 0.070 | 0.010 | 0.030 | - | 4.2 |
    """

    rows: list[DemoRow]
    recipes: dict[str, str]
    out: Path
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    def to_markdown(self) -> str:
        """The table as GitHub Markdown."""
        lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
        lines += ["| " + " | ".join(_cells(row)) + " |" for row in self.rows]
        return "\n".join(lines)

    def to_csv(self) -> str:
        """The table as CSV with full-precision numbers (an empty ``mutual_info`` for deterministic rows)."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(DemoRow.__dataclass_fields__), lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: "" if v is None else v for k, v in asdict(row).items()})
        return buffer.getvalue()

    def legend(self) -> list[str]:
        """One line per model: its epochs and what "regularized" means for it."""
        epochs = {row.model: row.epochs for row in self.rows}
        return [f"{name}: {epochs[name]} epochs; regularized = {text}" for name, text in self.recipes.items()]

    def to_rich(self) -> Any:
        """The table as a ``rich.table.Table``."""
        from rich.table import Table

        table = Table(title="lightning-reg demo: zoo models on the bundled digits (test split)")
        for name in _COLUMNS:
            table.add_column(name, justify="left" if name in ("model", "recipe", "eval") else "right")
        for i, row in enumerate(self.rows):
            table.add_row(*_cells(row), end_section=i % 2 == 1 and i < len(self.rows) - 1)
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
        callbacks.append(BNRecalibration(num_batches=None))  # every clean training batch: 20 at batch size 64
    return callbacks


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


@contextlib.contextmanager
def _torch_settings(devices: int) -> Iterator[None]:
    """One torch thread for a single-process run unless ``OMP_NUM_THREADS`` says otherwise; restore flags after.

    These models are tiny (batches of 64 8x8 digits): measured on a 2-core machine, 2 threads were no faster
    than 1 when idle and several times slower when other jobs shared the cores. With several processes
    Lightning's DDP launcher sets the threads itself (cores / processes), so it is left alone then.
    """
    previous = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()  # `Trainer(deterministic=True)` sets it for good
    if devices == 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
        torch.use_deterministic_algorithms(deterministic)


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
            # Under DDP: the zoo's and MCDropoutEvaluation's epoch metrics are already reduced by torchmetrics, and
            # the test split's DistributedSampler repeats one image to even out the ranks (360 for 359).
            warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
            warnings.filterwarnings("ignore", message=".*Using `DistributedSampler` with the dataloaders.*")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _train_and_test(
    name: ModelName,
    recipe: Recipe,
    *,
    epochs: int,
    seed: int,
    accelerator: str,
    devices: int,
    strategy: str,
    limit_batches: int | None,
    progress: Any,
    plot_to: Path,
) -> tuple[list[DemoRow], str, Path | None]:
    import zoo
    from lightning_reg import MCDropoutEvaluation, RegularizationCheck

    setup = _SETUPS[name]
    L.seed_everything(seed, verbose=False)
    data = zoo.data.DigitsDataModule(batch_size=_BATCH_SIZE, as_sequence=setup.as_sequence)
    model = zoo.create(name, num_classes=data.num_classes)
    extra = (
        regularizers(model, as_sequence=setup.as_sequence, num_classes=data.num_classes) if recipe != "plain" else []
    )
    mc = MCDropoutEvaluation(n_samples=_MC_SAMPLES, stages=("test",), plot=True)
    task = progress.add_task(f"{name} {recipe}", total=epochs) if progress is not None else None
    callbacks: list[Callback] = [*extra, mc, RegularizationCheck()]
    if progress is not None:
        callbacks.append(_EpochProgress(progress, task))
    with tempfile.TemporaryDirectory(prefix="lightning-reg-demo-") as root:
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            max_epochs=epochs,
            callbacks=callbacks,
            default_root_dir=root,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            deterministic=True,
            num_sanity_val_steps=0,
            limit_val_batches=0,  # nothing to select on: the demo reports the test split only
            limit_train_batches=limit_batches,
            limit_test_batches=limit_batches,
            log_every_n_steps=1,
        )
        data.setup("fit")  # load the digits before the clock starts: the fit time is training alone
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        seconds = time.perf_counter() - start
        trainer.test(model, datamodule=data, verbose=False)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("mc/test/")}
        plot = None
        if trainer.is_global_zero:
            written = sorted(Path(root, "mc_dropout").glob("reliability_test_*.png"))
            if written:
                plot = plot_to / f"reliability_{name}_{recipe}.png"
                plot.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(written[-1]), plot)
    rows = [
        DemoRow(
            name,
            recipe,
            label,
            accuracy=metrics[f"mc/test/{prefix}acc"],
            nll=metrics[f"mc/test/{prefix}nll"],
            ece=metrics[f"mc/test/{prefix}ece"],
            brier=metrics[f"mc/test/{prefix}brier"],
            mutual_info=metrics["mc/test/mutual_info"] if prefix == "" else None,
            train_seconds=seconds,
            epochs=epochs,
        )
        for label, prefix in (("deterministic", "det_"), ("MC dropout", ""))
    ]
    return rows, _describe(extra), plot


def demo(
    models: Sequence[ModelName] | ModelName = _MODELS,
    epochs: int | None = None,
    out: str | Path = "lightning-reg-demo",
    seed: int = 0,
    accelerator: str = "cpu",
    devices: int = 1,
    *,
    strategy: str = "auto",
    limit_batches: int | None = None,
    verbose: bool = True,
) -> DemoResult:
    """Train zoo models plain and regularized on the bundled digits and compare them with and without MC dropout.

    For each model: two trainings from the same seed, plain and with :func:`regularizers`; each is tested with
    :class:`~lightning_reg.MCDropoutEvaluation` (30 samples), which gives a deterministic row and an MC-dropout
    row: accuracy, NLL, ECE, Brier and, for MC dropout, the mean mutual information. Writes ``demo.md``,
    ``demo.csv`` and ``reliability_<model>_<recipe>.png`` (deterministic and MC dropout in one diagram) to
    ``out``, and prints the table.

    Args:
        models: zoo models to train, any of ``"cnn_small"``, ``"lstm"``, ``"transformer"`` (or one name).
        epochs: training epochs of every model; ``None`` uses each model's default (30, 40, 40).
        out: output folder (created if missing).
        seed: seed of every training (``lightning.seed_everything``), so the run is repeatable.
        accelerator: Lightning accelerator (``"cpu"``, ``"gpu"``, ``"auto"``).
        devices: devices (processes on CPU); more than one trains with Lightning's DDP strategy, which starts the
            other processes by running the same command again. The first training's seconds then include that
            start, and the test split is padded to an even share per rank (one image counted twice on 2 ranks).
        strategy: Lightning strategy; ``"auto"`` is ``"ddp"`` for several devices (``"ddp_fork"`` in a notebook).
        limit_batches: at most this many training and test batches per epoch (a smoke run), all when None.
        verbose: print progress and the table (on global rank 0).

    Returns:
        The rows, the recipes, the files written.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     result = demo(["lstm"], epochs=1, out=tmp, limit_batches=2, verbose=False)
        ...     sorted(p.name for p in result.files)
        ['demo.csv', 'demo.md', 'reliability_lstm_plain.png', 'reliability_lstm_regularized.png']
        >>> [(row.recipe, row.eval) for row in result.rows[:2]]
        [('plain', 'deterministic'), ('plain', 'MC dropout')]
    """
    names: list[ModelName] = list(dict.fromkeys([models] if isinstance(models, str) else models))
    unknown = [n for n in names if n not in _MODELS]
    if unknown or not names:
        raise ValueError(f"Expected `models` to be a non-empty list of {_MODELS}, but got {list(models)!r}.")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"Expected `epochs` to be a positive int or None (each model's default), but got {epochs!r}.")
    if limit_batches is not None and (isinstance(limit_batches, bool) or limit_batches < 1):
        raise ValueError(f"Expected `limit_batches` to be a positive int or None, but got {limit_batches!r}.")
    out = Path(out).resolve()
    start = time.perf_counter()
    main_process = _global_rank() == 0
    show = verbose and main_process
    console = _console() if show else None
    rows: list[DemoRow] = []
    recipes: dict[str, str] = {}
    plots: list[Path] = []
    with _quiet(), _torch_settings(devices), _progress(console) as progress:
        for name in names:
            n_epochs = epochs if epochs is not None else _SETUPS[name].epochs
            for recipe in _RECIPES:
                new_rows, described, plot = _train_and_test(
                    name,
                    recipe,
                    epochs=n_epochs,
                    seed=seed,
                    accelerator=accelerator,
                    devices=devices,
                    strategy=strategy,
                    limit_batches=limit_batches,
                    progress=progress,
                    plot_to=out,
                )
                rows += new_rows
                if recipe != "plain":
                    recipes[name] = described
                if plot is not None:
                    plots.append(plot)
    result = DemoResult(rows, recipes, out, seconds=time.perf_counter() - start)
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "demo.md").write_text(_markdown_report(result, seed))
        (out / "demo.csv").write_text(result.to_csv())
        result.files = [out / "demo.md", out / "demo.csv", *plots]
    if console is not None:
        console.print(result.to_rich())
        for line in result.legend():
            console.print(f"  {line}")
        console.print(
            f"Wrote the table (demo.md, demo.csv) and {len(plots)} reliability diagrams to {out} "
            f"in {result.seconds:.0f} s."
        )
    return result


def _global_rank() -> int:
    # Lightning reads the rank from the launcher's environment (RANK, LOCAL_RANK, ...) at import: a process that
    # DDP started for rank 1 knows it before its first Trainer exists.
    return int(getattr(rank_zero_only, "rank", 0))


def _markdown_report(result: DemoResult, seed: int) -> str:
    legend = "\n".join(f"- {line}" for line in result.legend())
    return (
        "# lightning-reg demo\n\n"
        f"Bundled digits, test split (359 images), seed {seed}, MC dropout with {_MC_SAMPLES} samples. "
        "Mean MI: mean mutual information of the MC samples (nats).\n\n"
        f"{result.to_markdown()}\n\n{legend}\n"
    )


def _console() -> Any:
    from rich.console import Console

    console = Console()
    # Rich assumes 80 columns when the output is not a terminal (a pipe, a log file): the table needs about 100.
    return console if console.is_terminal else Console(width=120)


@contextlib.contextmanager
def _progress(console: Any) -> Iterator[Any]:
    if console is None:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        yield progress


def demo_cli(args: Sequence[str]) -> None:
    """Parse ``lightning-reg demo`` options with jsonargparse (LightningCLI's parser) and run :func:`demo`."""
    from jsonargparse import auto_cli

    auto_cli(_demo_command, args=list(args), prog="lightning-reg demo")


def _demo_command(
    models: list[ModelName] | ModelName = list(_MODELS),  # noqa: B006  (jsonargparse shows it; never mutated)
    epochs: int | None = None,
    out: str = "lightning-reg-demo",
    seed: int = 0,
    accelerator: str = "cpu",
    devices: int = 1,
) -> None:
    """Train the zoo CNN, RNN and Transformer on the bundled digits, plain and regularized, and compare them.

    Prints one table (accuracy, NLL, ECE, Brier, mean mutual information; deterministic and MC dropout) and
    writes it as Markdown and CSV with reliability diagrams to the output folder.

    Args:
        models: zoo models to train: one name (``--models lstm``) or a list (``--models [lstm,transformer]``).
        epochs: training epochs of every model (default: 30 for cnn_small, 40 for lstm, 40 for transformer).
        out: output folder.
        seed: seed of every training.
        accelerator: Lightning accelerator (cpu, gpu, auto).
        devices: devices; more than one trains with Lightning's DDP strategy.
    """
    demo(models, epochs=epochs, out=out, seed=seed, accelerator=accelerator, devices=devices)
