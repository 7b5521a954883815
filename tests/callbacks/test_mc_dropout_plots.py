"""MCDropoutEvaluation's plots: where they go, their names, titles and legends, and the no-log-dir warning."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger

from lightning_reg import MCDropoutEvaluation, plotting
from tests.helpers import ThreeClassEvaluator, fast_trainer, make_classification, make_loader


def _loader(seed: int, n: int = 48) -> Any:
    x, y = make_classification(n, num_classes=3, seed=seed)
    return make_loader(x + 0.8 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)), y, batch_size=16)


class _SavedFigures:
    """Every figure the callback saves: its path below the log directory, title and legend texts."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.saved: dict[str, tuple[str, list[str]]] = {}
        save = plotting.save_figure

        def record(figure: Any, path: Path) -> Path:
            axes = figure.axes[0]
            self.saved[Path(path).name] = (axes.get_title(), [t.get_text() for t in axes.get_legend().get_texts()])
            return save(figure, path)

        monkeypatch.setattr(plotting, "save_figure", record)


def test_each_dataloader_and_epoch_gets_its_own_named_and_titled_plots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import matplotlib.image as plt_image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    figures = _SavedFigures(monkeypatch)
    logger = TensorBoardLogger(tmp_path, name="tb")
    logged: dict[tuple[int, str], float] = {}

    class _Logged(MCDropoutEvaluation):
        def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            super().on_validation_epoch_end(trainer, pl_module)
            logged.update({(trainer.current_epoch, k): float(v) for k, v in trainer.callback_metrics.items()})

    trainer = fast_trainer(tmp_path, logger=logger, max_epochs=2, limit_train_batches=2, callbacks=[_Logged(4)])
    trainer.fit(ThreeClassEvaluator(), _loader(0), [_loader(1), _loader(2)])
    logger.finalize("success")

    expected = {}
    for epoch in (0, 1):
        for index in (0, 1):

            def value(name: str, e: int = epoch, i: int = index) -> float:
                return logged[(e, f"mc/val/{name}/dataloader_idx_{i}")]

            where = f"val, dataloader {index}, epoch {epoch}"
            expected[f"reliability_validate_epoch{epoch}_dataloader_idx_{index}.png"] = (
                f"{where}: ECE {value('ece'):.3f} (MC dropout), ECE {value('det_ece'):.3f} (deterministic)",
                ["perfect calibration", "MC dropout", "deterministic"],
            )
            expected[f"risk_coverage_validate_epoch{epoch}_dataloader_idx_{index}.png"] = (
                where,
                [f"MC dropout (AURC {value('aurc'):.4f})", f"deterministic (AURC {value('det_aurc'):.4f})"],
            )
    assert figures.saved == expected
    folder = Path(logger.log_dir) / "mc_dropout"
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    images = set(events.Tags()["images"])
    assert images == {"mc/val/reliability/dataloader_idx_0", "mc/val/reliability/dataloader_idx_1"}
    # one image per epoch, at the global step of that epoch's end (2 training batches an epoch), of the saved figure
    sent = events.Images("mc/val/reliability/dataloader_idx_1")
    assert [e.step for e in sent] == [2, 4]
    height, width = plt_image.imread(folder / "reliability_validate_epoch1_dataloader_idx_1.png").shape[:2]
    assert (sent[1].height, sent[1].width) == (height, width)


def test_one_dataloader_plots_carry_no_dataloader_suffix_and_mutual_information_has_no_deterministic_curve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figures = _SavedFigures(monkeypatch)
    callback = MCDropoutEvaluation(4, stages=("test",), uncertainty_score="mutual_information")
    trainer = fast_trainer(tmp_path, callbacks=[callback])
    trainer.test(ThreeClassEvaluator(), _loader(1), verbose=False)
    title, legend = figures.saved["risk_coverage_test_epoch0.png"]
    aurc = float(trainer.callback_metrics["mc/test/aurc"])
    assert (title, legend) == ("test, epoch 0", [f"MC dropout (AURC {aurc:.4f})"])
    assert sorted(figures.saved) == ["reliability_test_epoch0.png", "risk_coverage_test_epoch0.png"]
    assert figures.saved["reliability_test_epoch0.png"][0].startswith("test, epoch 0: ECE ")


def test_plot_without_a_log_directory_warns_once_with_the_whole_remedy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    callback = MCDropoutEvaluation(4, stages=("test",))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # two test runs, two plots each: still one warning
            fast_trainer(None, callbacks=[callback]).test(
                ThreeClassEvaluator(), [_loader(1), _loader(2)], verbose=False
            )
    ours = [str(w.message) for w in caught if "MCDropoutEvaluation" in str(w.message)]
    assert ours == [
        "`MCDropoutEvaluation(plot=True)` writes reliability diagrams where the logger writes, but the Trainer has no "
        "logger and `default_root_dir` is the working directory: none is written. Add a logger (e.g. `CSVLogger`), "
        "set `default_root_dir`, or pass `plot=False`."
    ]
    assert list(tmp_path.iterdir()) == []


def test_fast_dev_run_writes_no_plot_even_with_a_root_directory(tmp_path: Path) -> None:
    trainer = fast_trainer(tmp_path, fast_dev_run=True, callbacks=[MCDropoutEvaluation(4, stages=("test",))])
    trainer.test(ThreeClassEvaluator(), _loader(1), verbose=False)
    assert not list(tmp_path.rglob("*.png"))


class _NoDirectoryLogger(Logger):
    """A logger that writes nowhere on disk (a remote tracker, say): no `save_dir`, no `log_dir`."""

    name, version, save_dir = "remote", 0, None

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass


def test_a_logger_without_a_directory_gets_no_plot_and_no_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    trainer = fast_trainer(None, logger=_NoDirectoryLogger(), callbacks=[MCDropoutEvaluation(4, stages=("test",))])
    assert trainer.log_dir is None
    trainer.test(ThreeClassEvaluator(), _loader(1), verbose=False)
    assert not list(tmp_path.rglob("*.png"))
