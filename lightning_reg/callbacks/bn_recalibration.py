"""Precise BatchNorm as a callback: recalibrate running statistics before the final validation and checkpoint."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal, get_args

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_reg._batch import BatchKey, validate_key
from lightning_reg.callbacks._strategy import refuse_sharding_strategy
from lightning_reg.functional.bn_recalibration import (
    BNRecalibrationReport,
    is_frozen_norm,
    recalibrate_bn,
    tracking_norm_layers,
)

__all__ = ["BNRecalibration"]

When = Literal["fit_end", "test_start"]
LoaderName = Literal["train", "val", "test"]


class BNRecalibration(Callback):
    """Precise BatchNorm (Wu & Johnson, https://arxiv.org/abs/2105.07576): exact running statistics on clean data.

    Calls :func:`lightning_reg.functional.recalibrate_bn` on the LightningModule: the running statistics of every
    BatchNorm-like layer become the exact mean and unbiased variance of its inputs over ``num_batches`` batches,
    computed with the current weights, dropout off. Statistics from the moving average of training were
    collected while the weights changed, often on augmented or mixed inputs; after weight averaging, pruning or
    fine-tuning they are stale.

    When it runs:

    - ``when="fit_end"`` (default): after the optimizer step of the last training batch of ``fit`` (last epoch of
      ``max_epochs``, or ``max_steps`` reached), so *before* the final validation and before ``ModelCheckpoint``
      saves: the checkpoint written at the end of fit holds the recalibrated statistics. (Lightning's
      ``on_fit_end`` runs after the last save.) If fit stops earlier than planned (``EarlyStopping``,
      ``max_time``), it recalibrates in ``on_train_end`` with a warning: the last checkpoint then predates it; use
      ``every_n_epochs=1`` to make every validation and checkpoint see recalibrated statistics.
    - ``every_n_epochs=N``: also after the last batch of every N-th epoch, before that epoch's validation.
    - ``when="test_start"`` with ``dataloader="test"``: re-estimate the statistics on the test data before testing
      (test-time adaptation, AdaBN, Li et al., https://arxiv.org/abs/1603.04779). This changes the model's
      statistics for good; checkpoint first if you want the training statistics back.

    Strategies: ``ddp`` (and ``ddp_spawn``, ``ddp_fork``), one device, and DeepSpeed ZeRO stages 1-2, where every
    rank holds whole parameters. With ``sync_batchnorm=True`` the ``SyncBatchNorm`` layers run as local BatchNorm
    during the pass (their own forward would all-reduce every call) and the exact pooling across ranks happens
    once at the end, so nothing is counted twice. Strategies that shard the parameters (FSDP, ``ModelParallel``,
    DeepSpeed ZeRO-3) are refused at setup with an error that names the alternative. Batches go through the
    precision plugin (``convert_input`` and its forward context), so ``"64-true"``/``"bf16-true"`` work.

    The batches come straight from the dataloader, moved to the module's device with no transfer hooks: never
    mixed by the mixing callbacks, which act in ``on_train_batch_start``. The global torch RNG is forked around
    the pass, so drawing a shuffled loader's order does not change training. Under DDP each rank forwards its
    shard of the training loader and the statistics are all-reduced: every rank gets those of the union.

    Frozen layers keep their statistics: layers with ``track_running_stats=False`` (Lightning's
    ``BaseFinetuning.freeze``) and layers in eval mode while the module trains (the frozen-BN idiom). At
    ``test_start`` the loop has put every layer in eval mode, so the callback uses the frozen layers it recorded
    during training (saved in its ``state_dict``).

    Logs ``bn_recalibration/mean_abs_change_mean`` and ``bn_recalibration/mean_abs_change_var`` (mean absolute change
    of the running statistics over all channels) to the trainer's loggers; the last report is ``last_report``.

    Args:
        num_batches: batches per recalibration (per rank under DDP); ``None`` takes the whole loader.
        dataloader: ``"train"`` (the training loader, as it comes), ``"val"``, ``"test"``, or any iterable of batches.
        when: ``"fit_end"``, ``"test_start"`` or ``None`` (only ``every_n_epochs``).
        every_n_epochs: also recalibrate at the end of every N-th training epoch, before its validation.
        input_key: where the inputs are in a batch: a position (list/tuple batch) or key (dict batch).

    Example:
        >>> from lightning_reg import BNRecalibration
        >>> BNRecalibration(num_batches=50, every_n_epochs=1)
        BNRecalibration(num_batches=50, dataloader='train', when='fit_end', every_n_epochs=1)
    """

    def __init__(
        self,
        num_batches: int | None = 100,
        *,
        dataloader: LoaderName | Iterable[Any] = "train",
        when: When | None = "fit_end",
        every_n_epochs: int | None = None,
        input_key: BatchKey = 0,
    ) -> None:
        if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)):
            raise ValueError(f"Expected `num_batches` to be a positive int or None, but got {num_batches!r}.")
        if num_batches is not None and num_batches < 1:
            raise ValueError(f"Expected `num_batches` to be a positive int or None, but got {num_batches!r}.")
        if isinstance(dataloader, str):
            if dataloader not in get_args(LoaderName):
                raise ValueError(
                    f"Expected `dataloader` to be one of {get_args(LoaderName)} or an iterable of batches, "
                    f"but got {dataloader!r}."
                )
        elif not isinstance(dataloader, Iterable):
            raise TypeError(
                f"Expected `dataloader` to be one of {get_args(LoaderName)} or an iterable of batches (a DataLoader), "
                f"but got {type(dataloader).__name__}."
            )
        if when is not None and when not in get_args(When):
            raise ValueError(f"Expected `when` to be one of {get_args(When)} or None, but got {when!r}.")
        if every_n_epochs is not None and (
            isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1
        ):
            raise ValueError(f"Expected `every_n_epochs` to be a positive int or None, but got {every_n_epochs!r}.")
        if when is None and every_n_epochs is None:
            raise ValueError(
                "`BNRecalibration` would never run: `when=None` and `every_n_epochs=None`. "
                "Pass `when='fit_end'` (default), `when='test_start'` or `every_n_epochs=N`."
            )
        if dataloader == "test" and (when != "test_start" or every_n_epochs is not None):
            raise ValueError(
                "`dataloader='test'` is only available at test time: use it with `when='test_start'` and "
                f"`every_n_epochs=None`, but got when={when!r}, every_n_epochs={every_n_epochs!r}."
            )
        validate_key(input_key, "input_key")
        self.num_batches = num_batches
        self.dataloader = dataloader
        self.when = when
        self.every_n_epochs = every_n_epochs
        self.input_key = input_key
        self.last_report: BNRecalibrationReport | None = None
        self.num_recalibrations = 0
        self._frozen: list[str] | None = None  # qualified names of frozen norm layers seen during training
        self._last_step: int | None = None

    def __repr__(self) -> str:
        loader = self.dataloader if isinstance(self.dataloader, str) else type(self.dataloader).__name__
        return (
            f"{type(self).__name__}(num_batches={self.num_batches}, dataloader={loader!r}, when={self.when!r}, "
            f"every_n_epochs={self.every_n_epochs})"
        )

    # --- hooks ---------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse strategies that shard the parameters: the pass forwards the module outside a training step."""
        if stage != "fit" and not (stage == "test" and self.when == "test_start"):
            return
        refuse_sharding_strategy(
            trainer,
            "BNRecalibration",
            "it forwards batches through the LightningModule outside the training step",
            "Use `strategy='ddp'` (the statistics are all-reduced across ranks; `sync_batchnorm=True` works too), or "
            "recalibrate after training in one process: load the checkpoint and call "
            "`lightning_reg.functional.recalibrate_bn(model, loader)`.",
        )

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == 0:
            self._frozen = [name for name, m in tracking_norm_layers(pl_module) if is_frozen_norm(m, pl_module)]
        end_of_epoch = trainer.is_last_batch or batch_idx + 1 >= trainer.num_training_batches
        periodic = (
            self.every_n_epochs is not None and end_of_epoch and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        )
        if periodic or (self.when == "fit_end" and self._is_last_batch_of_fit(trainer, end_of_epoch)):
            self._recalibrate(trainer, pl_module, frozen=None)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.when != "fit_end" or self._last_step == trainer.global_step:
            return
        rank_zero_warn(
            "`BNRecalibration`: fit stopped before its planned last batch (early stopping, `max_time`, ...), so the "
            "statistics are recalibrated now, in `on_train_end`, after the last validation and checkpoint: those "
            "still hold the old statistics. Use `BNRecalibration(every_n_epochs=1)` so that every validation and "
            "checkpoint sees recalibrated statistics."
        )
        self._recalibrate(trainer, pl_module, frozen=None)

    @override
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.when != "test_start":
            return
        modules = dict(pl_module.named_modules())
        frozen = [modules[name] for name in (self._frozen or []) if name in modules]
        self._recalibrate(trainer, pl_module, frozen=frozen)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"frozen": list(self._frozen or []), "num_recalibrations": self.num_recalibrations}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._frozen = list(state_dict.get("frozen", [])) or None
        self.num_recalibrations = int(state_dict.get("num_recalibrations", 0))

    # --- helpers -------------------------------------------------------------------------------------
    @staticmethod
    def _is_last_batch_of_fit(trainer: L.Trainer, end_of_epoch: bool) -> bool:
        max_steps = trainer.max_steps
        if max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps:
            return True
        max_epochs = trainer.max_epochs
        return end_of_epoch and max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs

    def _recalibrate(self, trainer: L.Trainer, pl_module: L.LightningModule, frozen: list[Any] | None) -> None:
        loader = self._resolve_loader(trainer)
        precision = trainer.precision_plugin
        # a shuffled loader draws its order from the global CPU RNG: fork it so that training is unchanged
        with torch.random.fork_rng(devices=[]), precision.forward_context():
            report = recalibrate_bn(
                pl_module,
                _converted(loader, precision.convert_input),
                self.num_batches,
                input_key=self.input_key,
                frozen=frozen,
                device=pl_module.device,
            )
        self.last_report = report
        self.num_recalibrations += 1
        self._last_step = trainer.global_step
        metrics = {
            "bn_recalibration/mean_abs_change_mean": report.mean_abs_change_mean,
            "bn_recalibration/mean_abs_change_var": report.mean_abs_change_var,
        }
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def _resolve_loader(self, trainer: L.Trainer) -> Iterable[Any]:
        if not isinstance(self.dataloader, str):
            return _fresh(self.dataloader)
        name = self.dataloader
        loaders: Any = {"train": trainer.train_dataloader, "val": trainer.val_dataloaders}.get(name)
        if name == "test":
            loaders = trainer.test_dataloaders
        if loaders is None and trainer.datamodule is not None:  # type: ignore[attr-defined]
            loaders = getattr(trainer.datamodule, f"{name}_dataloader")()  # type: ignore[attr-defined]
        if loaders is None:
            raise RuntimeError(
                f"`BNRecalibration(dataloader={name!r})` found no {name} dataloader on the trainer or its datamodule. "
                "Pass the loader itself: `BNRecalibration(dataloader=my_loader)`."
            )
        if isinstance(loaders, list | tuple | Mapping):
            items = list(loaders.values() if isinstance(loaders, Mapping) else loaders)
            if len(items) != 1:
                raise ValueError(
                    f"`BNRecalibration(dataloader={name!r})` found {len(items)} {name} dataloaders and cannot tell "
                    "which to use. Pass one: `BNRecalibration(dataloader=my_loader)`."
                )
            loaders = items[0]
        return _fresh(loaders)


def _converted(loader: Iterable[Any], convert: Any) -> Iterator[Any]:
    """The loader's batches passed through the precision plugin's ``convert_input`` (float64, bf16, ...)."""
    for batch in loader:
        yield convert(batch)


def _fresh(loader: Iterable[Any]) -> Iterable[Any]:
    """The loader, or for persistent workers a worker-free twin: ``iter()`` would reset the loop's own iterator."""
    if isinstance(loader, DataLoader) and loader.persistent_workers and loader.batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn)
    return loader
