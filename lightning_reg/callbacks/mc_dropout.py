"""Monte-Carlo dropout evaluation (Gal & Ghahramani, 2016): uncertainty metrics at validate, test and predict."""

from __future__ import annotations

import warnings
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_reg._batch import BatchKey, get_entry, validate_key
from lightning_reg._random import base_seed, rank_generator
from lightning_reg.callbacks._strategy import data_parallel_rank, refuse_sharding_strategy
from lightning_reg.forward import ForwardFn, batch_inputs, batch_logits, validate_forward_fn
from lightning_reg.functional.mc_dropout import (
    Inputs,
    MCDropoutPrediction,
    check_running_statistics,
    find_mc_dropout_sites,
    mc_dropout_predict,
    running_statistics,
)
from lightning_reg.functional.mc_masks import Masks, resolve_masks
from lightning_reg.functional.selective import UncertaintyScore, uncertainty_score
from lightning_reg.metrics import UncertaintyMetrics
from lightning_reg.selective_metrics import MisclassificationDetection, OODDetection
from lightning_reg.targets import hard_targets

__all__ = ["MCDropoutEvaluation"]

Stage = Literal["validate", "test"]
_STAGES: tuple[str, ...] = get_args(Stage)
_LOG_NAME = {"validate": "val", "test": "test"}
# Salt of this callback's random streams (see `rank_generator`), so that they differ from other callbacks'.
_STREAM = 0x4D43_4452  # "MCDR"


class MCDropoutEvaluation(Callback):
    """Monte-Carlo dropout (`Gal & Ghahramani, 2016 <https://arxiv.org/abs/1506.02142>`_) at evaluation time.

    Each validation/test batch is also predicted with ``n_samples`` samples of only the dropout (BatchNorm stays in
    eval mode) and once deterministically, by :func:`~lightning_reg.functional.mc_dropout_predict`; the metrics
    (``mc/val/acc``, ``nll``, ``brier``, ``ece``, ``entropy``, ``mutual_info``, the same prefixed ``det_``, and the
    detection metrics) are logged per dataloader at the epoch's end, reduced over DDP ranks. ``trainer.predict``
    always samples: see :attr:`predictions`.

    Args:
        n_samples: Monte-Carlo samples per input.
        stages: where to evaluate and log: ``"validate"`` (validation in ``fit`` and ``trainer.validate``) and/or
            ``"test"``.
        plot: write reliability diagrams and risk-coverage plots under the logger's directory.
        include_drop_path: also sample timm's ``DropPath``/``DropBlock2d`` and torchvision's ``StochasticDepth``.
        chunk_size: the most rows per forward pass when inputs are repeated along the batch (memory cap).
        n_bins: confidence bins of the ECE and the reliability diagram.
        input_key: where the inputs are in a batch (position in a list batch, or key of a dict batch), for modules
            without ``forward_inputs``.
        target_key: where the targets (class indices or probabilities) are.
        forward_fn: ``forward_fn(module, batch) -> logits``, to compute the logits of a batch yourself.
        uncertainty_score: the score of the detection metrics: ``"entropy"``, ``"mutual_information"`` (MC only)
            or ``"max_prob"``.
        ood_dataloader_idx: the index of a validation/test dataloader of out-of-distribution data: its batches feed
            only ``ood_auroc``/``ood_fpr95``.
        masks: the dropout masks while sampling: ``"auto"`` (32-bit threshold masks on the CPU, torch's
            elsewhere), ``"threshold"`` or ``"torch"``; see :func:`~lightning_reg.functional.mc_dropout_predict`.

    Attributes:
        predictions: per predict batch, ``{"mc_mean_probs": (N, K), "mc_predictive_entropy": (N,),
            "mc_mutual_information": (N,)}``, reset at each ``trainer.predict``.

    Example:
        >>> import lightning as L
        >>> callback = MCDropoutEvaluation(n_samples=10, plot=False)
        >>> trainer = L.Trainer(callbacks=[callback], logger=False, enable_progress_bar=False)
        >>> callback.n_samples, callback.stages, callback.masks
        (10, ('validate', 'test'), 'auto')

    Notes:
        The model is called through :mod:`lightning_reg.forward` (``forward_fn``, else ``forward_inputs(batch)``,
        else ``batch[input_key]``); training is unchanged (the callback draws from its own per-rank generator); the
        strategies that shard parameters (FSDP, ZeRO-3) are refused at setup. What is sampled, the paths, the
        logged names and plots, and the measured speed: docs/mc_dropout.md.
    """

    def __init__(
        self,
        n_samples: int = 30,
        *,
        stages: Sequence[Stage] = ("validate", "test"),
        plot: bool = True,
        include_drop_path: bool = False,
        chunk_size: int | None = None,
        n_bins: int = 15,
        input_key: BatchKey = 0,
        target_key: BatchKey = 1,
        forward_fn: ForwardFn | None = None,
        uncertainty_score: UncertaintyScore = "entropy",
        ood_dataloader_idx: int | None = None,
        masks: Masks = "auto",
    ) -> None:
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"Expected `n_samples` to be an int >= 1, but got {n_samples!r}.")
        if isinstance(stages, str):
            stages = (stages,)  # type: ignore[assignment]
        unknown = [s for s in stages if s not in _STAGES]
        if unknown:
            raise ValueError(
                f"Expected `stages` to contain only {_STAGES}, but got {unknown!r}. "
                "Predict is always sampled; it needs no entry."
            )
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"Expected `chunk_size` to be None or an int >= 1, but got {chunk_size!r}.")
        if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"Expected `n_bins` to be a positive int, but got {n_bins!r}.")
        validate_key(input_key, "input_key")
        validate_key(target_key, "target_key")
        validate_forward_fn(forward_fn)
        _check_detection_args(uncertainty_score, ood_dataloader_idx)
        resolve_masks(masks, torch.device("cpu"))  # validates
        self.masks: Masks = masks
        self.uncertainty_score: UncertaintyScore = uncertainty_score
        self.ood_dataloader_idx = ood_dataloader_idx
        # detection metrics: (stage, dataloader index) -> (mc, det); stage -> (mc, det) for OOD
        self._detection: dict[tuple[str, int], tuple[MisclassificationDetection, MisclassificationDetection]] = {}
        self._ood: dict[str, tuple[OODDetection, OODDetection]] = {}
        self.n_samples = n_samples
        self.stages: tuple[Stage, ...] = tuple(dict.fromkeys(stages))
        self.plot = plot
        self.include_drop_path = include_drop_path
        self.chunk_size = chunk_size
        self.n_bins = n_bins
        self.input_key = input_key
        self.target_key = target_key
        self.forward_fn = forward_fn
        self.predictions: list[dict[str, Tensor]] = []
        self._generator: torch.Generator | None = None
        # (stage, dataloader index) -> (mc, det)
        self._metrics: dict[tuple[str, int], tuple[UncertaintyMetrics, UncertaintyMetrics]] = {}
        self._statistics: dict[str, Tensor] | None = None  # running statistics before the first sampled batch
        self._statistics_checked = False  # the first sampled batch of this evaluation has been checked
        self._warned_no_log_dir = False

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse strategies that shard the parameters where this run would sample (predict always samples)."""
        sampled = {"fit": "validate", "validate": "validate", "test": "test"}.get(stage)
        if sampled is not None and sampled not in self.stages:
            return
        refuse_sharding_strategy(
            trainer,
            "MCDropoutEvaluation",
            "it runs extra forward passes of the LightningModule outside the evaluation step",
            "Train with this strategy without the callback, then evaluate the checkpoint with `MCDropoutEvaluation` "
            "under `strategy='ddp'` or in one process (or call `lightning_reg.functional.mc_dropout_predict`).",
        )

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Check, before the first epoch, that the model has dropout to sample (not after a whole epoch)."""
        if "validate" in self.stages:
            find_mc_dropout_sites(pl_module, include_drop_path=self.include_drop_path)

    # --- validate ----------------------------------------------------------------------------------
    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start a validation run: a fresh generator and fresh metrics (not during the sanity check)."""
        if self._active(trainer, "validate"):
            self._begin(trainer, pl_module, "validate")

    @override
    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Predict the batch deterministically and with MC dropout; update the metrics."""
        if self._active(trainer, "validate"):
            self._evaluate_batch("validate", pl_module, batch, dataloader_idx)

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the metrics reduced over ranks, and plot."""
        if self._active(trainer, "validate"):
            self._finish(trainer, pl_module, "validate")

    # --- test --------------------------------------------------------------------------------------
    @override
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start a test run: a fresh generator and fresh metrics."""
        if self._active(trainer, "test"):
            self._begin(trainer, pl_module, "test")

    @override
    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Predict the batch deterministically and with MC dropout; update the metrics."""
        if self._active(trainer, "test"):
            self._evaluate_batch("test", pl_module, batch, dataloader_idx)

    @override
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the metrics reduced over ranks, and plot."""
        if self._active(trainer, "test"):
            self._finish(trainer, pl_module, "test")

    # --- predict -----------------------------------------------------------------------------------
    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start a predict run: a fresh generator, no stored predictions."""
        find_mc_dropout_sites(pl_module, include_drop_path=self.include_drop_path)
        self.predictions = []
        self._generator = self._make_generator(trainer, "predict")
        self._statistics, self._statistics_checked = None, False

    @override
    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Add MC mean probabilities, predictive entropy and mutual information to the batch's prediction."""
        prediction = self._checked_predict(pl_module, batch, "predict")
        result = {
            "mc_mean_probs": prediction.mean_probs,
            "mc_predictive_entropy": prediction.predictive_entropy,
            "mc_mutual_information": prediction.mutual_information,
        }
        if isinstance(outputs, MutableMapping):
            outputs.update(result)
        self.predictions.append({key: value.cpu() for key, value in result.items()})

    # --- helpers -----------------------------------------------------------------------------------
    def _active(self, trainer: L.Trainer, stage: Stage) -> bool:
        return stage in self.stages and not trainer.sanity_checking

    def _make_generator(self, trainer: L.Trainer, stage: str) -> torch.Generator:
        # Counter-based: a fixed function of (seed, rank, stage, step), so runs are reproducible under
        # `seed_everything`, ranks draw independent masks, and a resumed run needs no stored state.
        stage_index = ("validate", "test", "predict").index(stage)
        stream = (_STREAM * 4 + stage_index) * (1 << 32) + trainer.global_step
        return rank_generator(base_seed(), data_parallel_rank(trainer), stream)

    def _begin(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: Stage) -> None:
        find_mc_dropout_sites(pl_module, include_drop_path=self.include_drop_path)
        self._generator = self._make_generator(trainer, stage)
        for key in [key for key in self._metrics if key[0] == stage]:
            del self._metrics[key]
        self._reset_detection(stage)
        self._statistics, self._statistics_checked = None, False

    def _checked_predict(
        self, pl_module: L.LightningModule, batch: Any, stage: str, deterministic: bool = False
    ) -> MCDropoutPrediction:
        """:meth:`_predict`, checking around the evaluation's first sampled batch that no running statistic changed.

        Once per evaluation, not around every batch: every batch is sampled the same way, so the first shows whether
        sampling touches the statistics (one host sync instead of several per normalization layer and batch). Around
        our own pass only: other code may change the buffers legitimately between batches (DDP's buffer broadcast
        in the evaluation step, weight averaging swapping its averaged buffers in and out at the epoch's ends).
        """
        first = not self._statistics_checked
        if first:
            self._statistics = running_statistics(pl_module)
        prediction = self._predict(pl_module, batch, deterministic=deterministic)
        if first and self._statistics is not None:
            before, self._statistics = self._statistics, None
            self._statistics_checked = True
            check_running_statistics(pl_module, before, during=f"{stage} with Monte-Carlo dropout")
        return prediction

    def _inputs(self, pl_module: L.LightningModule, batch: Any) -> Inputs:
        """What to sample: the module's forward arguments for the batch, or ``forward_fn`` as a function of it."""
        forward_fn = self.forward_fn
        if forward_fn is not None:
            return lambda module: batch_logits(module, batch, forward_fn=forward_fn)
        return batch_inputs(pl_module, batch, self.input_key)

    def _predict(self, pl_module: L.LightningModule, batch: Any, deterministic: bool = False) -> MCDropoutPrediction:
        # the hooks run outside the step's precision context (autocast, default dtype): enter it as the step does
        try:
            with pl_module.trainer.precision_plugin.forward_context():
                return mc_dropout_predict(
                    pl_module,
                    self._inputs(pl_module, batch),
                    self.n_samples,
                    generator=self._generator,
                    chunk_size=self.chunk_size,
                    include_drop_path=self.include_drop_path,
                    deterministic=deterministic,
                    check_statistics=False,
                    masks=self.masks,
                )
        except TypeError as error:
            if self.forward_fn is not None or hasattr(pl_module, "forward_inputs"):
                raise
            raise TypeError(
                f"{error}. MCDropoutEvaluation called `{type(pl_module).__name__}(batch[{self.input_key!r}])`: when "
                "`forward` needs more of the batch (lengths, an attention mask), define "
                "`forward_inputs(batch)` on the module (returning the arguments of `forward`) or pass "
                "`forward_fn=lambda module, batch: ...`."
            ) from error

    def _new_metrics(self, num_classes: int, device: torch.device) -> tuple[UncertaintyMetrics, UncertaintyMetrics]:
        return (
            UncertaintyMetrics(num_classes, self.n_bins, mutual_information=True).to(device),
            UncertaintyMetrics(num_classes, self.n_bins, mutual_information=False).to(device),
        )

    def _evaluate_batch(self, stage: Stage, pl_module: L.LightningModule, batch: Any, dataloader_idx: int) -> None:
        if dataloader_idx == self.ood_dataloader_idx:
            prediction = self._checked_predict(pl_module, batch, stage, deterministic=True)
            self._update_detection(stage, dataloader_idx, prediction, None)
            return
        targets = hard_targets(get_entry(batch, self.target_key, "target_key"))
        prediction = self._checked_predict(pl_module, batch, stage, deterministic=True)
        key = (stage, dataloader_idx)
        if key not in self._metrics:
            self._metrics[key] = self._new_metrics(prediction.probs.shape[-1], prediction.probs.device)
        self._update(key, prediction, targets)
        self._update_detection(stage, dataloader_idx, prediction, targets)

    def _update(self, key: tuple[str, int], prediction: MCDropoutPrediction, targets: Tensor) -> None:
        mc, det = self._metrics[key]
        assert prediction.deterministic_probs is not None  # asked for with deterministic=True
        mc.update(prediction.mean_probs, targets, prediction.mutual_information)
        det.update(prediction.deterministic_probs, targets)

    @staticmethod
    def _num_dataloaders(trainer: L.Trainer, stage: Stage) -> int:
        batches = trainer.num_val_batches if stage == "validate" else trainer.num_test_batches
        return max(len(batches), 1)

    def _agreed_num_classes(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: Stage) -> list[int]:
        """Per dataloader, the number of classes seen on any rank (0: no rank saw a batch). A collective.

        A rank that saw no batch of a dataloader (an uneven iterable dataset, say) has no metrics for it; it learns
        their size here and takes part in the metrics' collectives like every other rank, instead of leaving them
        waiting.
        """
        count = self._num_dataloaders(trainer, stage)
        local = torch.zeros(count, dtype=torch.long, device=pl_module.device)
        for (name, index), (mc, _) in self._metrics.items():
            if name == stage and index < count:
                local[index] = mc.num_classes
        if trainer.world_size == 1:
            return local.tolist()
        gathered = trainer.strategy.all_gather(local).reshape(-1, count)  # (world, loaders)
        agreed = gathered.amax(dim=0)
        disagree = ((gathered != agreed) & (gathered != 0)).any(dim=0)
        if bool(disagree.any()):
            raise RuntimeError(
                f"Expected every rank to see the same number of classes in the {stage} logits, but got "
                f"{gathered.tolist()} (rank x dataloader)."
            )
        return agreed.tolist()

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: Stage) -> None:
        num_classes = self._agreed_num_classes(trainer, pl_module, stage)
        several = len(num_classes) > 1
        for index, classes in enumerate(num_classes):
            if index == self.ood_dataloader_idx:
                continue  # out-of-distribution data: only the OOD metrics, logged below
            if classes == 0:
                continue  # no rank saw a batch of this dataloader: nothing to log, on any rank
            key = (stage, index)
            seen = key in self._metrics
            if not seen:
                self._metrics[key] = self._new_metrics(classes, pl_module.device)
            mc, det = self._metrics[key]
            suffix = f"/dataloader_idx_{index}" if several else ""
            prefix = f"mc/{_LOG_NAME[stage]}/"
            with warnings.catch_warnings():
                if not seen:  # this rank saw no batch: its empty states join the others' in the collectives
                    warnings.filterwarnings("ignore", message=".*was called before the ``update`` method")
                values = {f"{prefix}{name}{suffix}": value for name, value in mc.compute().items()}
                values.update({f"{prefix}det_{name}{suffix}": value for name, value in det.compute().items()})
            for name, value in values.items():
                # Already reduced over ranks by the torchmetrics states: every rank logs the same number.
                pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=False, add_dataloader_idx=False)
            if self.plot:
                bins = {"MC dropout": mc.reliability(), "deterministic": det.reliability()}
                log_dir = self._log_dir(trainer)  # a collective under DDP: every rank asks
                if log_dir is not None and trainer.is_global_zero:
                    self._plot(trainer, stage, bins, log_dir, suffix.replace("/", "_"))
            mc.reset()
            det.reset()
            self._log_detection(trainer, pl_module, stage, index, suffix)
        self._log_ood(pl_module, stage)

    # --- detection metrics (misclassification, selective prediction, OOD) ----------------------------
    def _reset_detection(self, stage: str) -> None:
        for key in [key for key in self._detection if key[0] == stage]:
            del self._detection[key]
        self._ood.pop(stage, None)

    def _scores(self, prediction: MCDropoutPrediction) -> tuple[Tensor, Tensor | None]:
        """The uncertainty of the MC mean and of the deterministic pass (``None``: no MI without samples)."""
        assert prediction.deterministic_probs is not None  # asked for with deterministic=True
        mc = uncertainty_score(prediction.mean_probs, self.uncertainty_score, prediction.mutual_information)
        if self.uncertainty_score == "mutual_information":
            return mc, None
        return mc, uncertainty_score(prediction.deterministic_probs, self.uncertainty_score)

    def _update_detection(
        self, stage: Stage, index: int, prediction: MCDropoutPrediction, targets: Tensor | None
    ) -> None:
        mc_score, det_score = self._scores(prediction)
        device = mc_score.device
        if self.ood_dataloader_idx is not None:
            ood = self._ood.setdefault(stage, (OODDetection().to(device), OODDetection().to(device)))
            is_ood = torch.full_like(mc_score, index == self.ood_dataloader_idx, dtype=torch.bool)
            ood[0].update(mc_score, is_ood)
            if det_score is not None:
                ood[1].update(det_score, is_ood)
        if targets is None:
            return
        key = (stage, index)
        if key not in self._detection:
            self._detection[key] = (MisclassificationDetection().to(device), MisclassificationDetection().to(device))
        mc, det = self._detection[key]
        assert prediction.deterministic_probs is not None
        mc.update(mc_score, prediction.mean_probs.argmax(-1) == targets)
        if det_score is not None:
            det.update(det_score, prediction.deterministic_probs.argmax(-1) == targets)

    def _log_detection(
        self, trainer: L.Trainer, pl_module: L.LightningModule, stage: Stage, index: int, suffix: str
    ) -> None:
        """Misclassification AUROC/AUPR and AURC of one dataloader (every rank: the gathers are collectives)."""
        key = (stage, index)
        if key not in self._detection:  # this rank saw no batch of it: join the gathers with empty states
            self._detection[key] = (
                MisclassificationDetection().to(pl_module.device),
                MisclassificationDetection().to(pl_module.device),
            )
        prefix = f"mc/{_LOG_NAME[stage]}/"
        passes = [("", self._detection[key][0])]
        if self.uncertainty_score != "mutual_information":
            passes.append(("det_", self._detection[key][1]))
        curves = {}
        for tag, metric in passes:
            _log_detection(pl_module, metric, f"{prefix}{tag}", suffix)
            if self.plot:
                with metric.sync_context():  # the union of all ranks' samples; a collective
                    curves["MC dropout" if tag == "" else "deterministic"] = metric.curve()
            metric.reset()
        if self.plot:
            log_dir = self._log_dir(trainer)
            if log_dir is not None and trainer.is_global_zero:
                from lightning_reg.plotting import save_figure
                from lightning_reg.selective_metrics import risk_coverage_figure

                where = suffix.replace("/dataloader_idx_", ", dataloader ")
                title = f"{_LOG_NAME[stage]}{where}, epoch {trainer.current_epoch}"
                name = f"risk_coverage_{stage}_epoch{trainer.current_epoch}{suffix.replace('/', '_')}.png"
                save_figure(risk_coverage_figure(curves, title=title), log_dir / "mc_dropout" / name)

    def _log_ood(self, pl_module: L.LightningModule, stage: Stage) -> None:
        """OOD AUROC and FPR at 95 % TPR over every dataloader (every rank: the gathers are collectives)."""
        if self.ood_dataloader_idx is None:
            return
        ood = self._ood.setdefault(stage, (OODDetection().to(pl_module.device), OODDetection().to(pl_module.device)))
        prefix = f"mc/{_LOG_NAME[stage]}/"
        passes = [("", ood[0])] + ([("det_", ood[1])] if self.uncertainty_score != "mutual_information" else [])
        for tag, metric in passes:
            _log_detection(pl_module, metric, f"{prefix}{tag}")
            metric.reset()

    def _log_dir(self, trainer: L.Trainer) -> Path | None:
        """Where plots go: the first logger's directory, else an explicit ``default_root_dir``; never the cwd.

        ``None`` under ``fast_dev_run``, and without a logger when ``default_root_dir`` is the working directory
        (Lightning's default). A collective under DDP when there is a logger (``trainer.log_dir`` broadcasts).
        """
        if getattr(trainer, "fast_dev_run", False):  # set by the Trainer from its flag
            return None
        if trainer.loggers:
            log_dir = trainer.log_dir
            return None if log_dir is None else Path(log_dir)
        root = Path(trainer.default_root_dir)
        if root.resolve() != Path.cwd().resolve():
            return root
        if not self._warned_no_log_dir:
            rank_zero_warn(
                "`MCDropoutEvaluation(plot=True)` writes reliability diagrams where the logger writes, but the Trainer "
                "has no logger and `default_root_dir` is the working directory: none is written. Add a logger (e.g. "
                "`CSVLogger`), set `default_root_dir`, or pass `plot=False`."
            )
            self._warned_no_log_dir = True
        return None

    def _plot(self, trainer: L.Trainer, stage: Stage, bins: dict[str, Tensor], log_dir: Path, suffix: str) -> None:
        from lightning_reg.plotting import reliability_figure, render_rgb, save_figure

        title = (
            f"{_LOG_NAME[stage]}{suffix.replace('_dataloader_idx_', ', dataloader ')}, epoch {trainer.current_epoch}"
        )
        figure = reliability_figure(bins, title=title)
        name = f"reliability_{stage}_epoch{trainer.current_epoch}{suffix}.png"
        save_figure(figure, log_dir / "mc_dropout" / name)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(
                    f"mc/{_LOG_NAME[stage]}/reliability{suffix.replace('_dataloader_idx_', '/dataloader_idx_')}",
                    render_rgb(figure),
                    trainer.global_step,
                    dataformats="HWC",
                )


def _check_detection_args(score: object, ood_dataloader_idx: object) -> None:
    scores = get_args(UncertaintyScore)
    if score not in scores:
        raise ValueError(f"Expected `uncertainty_score` to be one of {scores}, but got {score!r}.")
    if ood_dataloader_idx is not None and (
        isinstance(ood_dataloader_idx, bool) or not isinstance(ood_dataloader_idx, int) or ood_dataloader_idx < 0
    ):
        raise ValueError(f"Expected `ood_dataloader_idx` to be None or an int >= 0, but got {ood_dataloader_idx!r}.")


def _log_detection(
    pl_module: L.LightningModule, metric: MisclassificationDetection | OODDetection, prefix: str, suffix: str = ""
) -> None:
    """Log every value of ``metric.compute()`` as ``{prefix}{name}{suffix}`` (a collective: every rank calls it).

    An empty update first, so that a rank that saw no sample still holds a tensor to gather (no rank waits). The
    values are already reduced over ranks by the metric's gathers: every rank logs the same number.
    """
    device = pl_module.device
    metric.update(torch.zeros(0, device=device), torch.zeros(0, dtype=torch.bool, device=device))
    for name, value in metric.compute().items():
        pl_module.log(
            f"{prefix}{name}{suffix}", value, on_step=False, on_epoch=True, sync_dist=False, add_dataloader_idx=False
        )
