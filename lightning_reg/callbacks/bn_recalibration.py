"""Precise BatchNorm as a callback: recalibrate running statistics before the final validation and checkpoint."""

from __future__ import annotations

import contextlib
import itertools
import math
import random
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal, get_args

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, WeightAveraging
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from typing_extensions import override

from lightning_reg._batch import BatchKey, validate_key
from lightning_reg._random import global_rng_forked
from lightning_reg.callbacks._strategy import refuse_sharding_strategy
from lightning_reg.forward import ForwardFn, validate_forward_fn
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

    Args:
        num_batches: batches per recalibration (per rank under DDP); ``None`` takes the whole loader.
        dataloader: ``"train"`` (the training loader, as it comes), ``"val"``, ``"test"``, or any iterable of batches
            (forwarded as it is on every rank: shard it yourself under DDP).
        when: ``"fit_end"`` (after the last training batch, before the final validation and checkpoint),
            ``"test_start"`` (with ``dataloader="test"``: AdaBN) or ``None`` (only ``every_n_epochs``).
        every_n_epochs: also recalibrate at the end of every N-th training epoch, before its validation.
        input_key: where the inputs are in a batch, for modules without ``forward_inputs``.
        forward_fn: ``forward_fn(module, batch)`` runs the module on one batch (on the module's device); the output
            is ignored.

    Example:
        >>> from lightning_reg import BNRecalibration
        >>> BNRecalibration(num_batches=50, every_n_epochs=1)
        BNRecalibration(num_batches=50, dataloader='train', when='fit_end', every_n_epochs=1)

    Notes:
        Calls :func:`lightning_reg.functional.recalibrate_bn` with the current weights, dropout off; with a
        ``WeightAveraging`` callback the averaged weights are recalibrated. The pass changes no random stream
        training draws from, and under DDP the statistics of the union of the ranks' shards are all-reduced. Logs
        ``bn_recalibration/mean_abs_change_mean`` and ``.../mean_abs_change_var``; ``last_report`` keeps the last
        report. When it runs, early stops, EMA and DDP: docs/bn_recalibration.md.
    """

    def __init__(
        self,
        num_batches: int | None = 100,
        *,
        dataloader: LoaderName | Iterable[Any] = "train",
        when: When | None = "fit_end",
        every_n_epochs: int | None = None,
        input_key: BatchKey = 0,
        forward_fn: ForwardFn | None = None,
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
        validate_forward_fn(forward_fn)
        self.num_batches = num_batches
        self.dataloader = dataloader
        self.when = when
        self.every_n_epochs = every_n_epochs
        self.input_key = input_key
        self.forward_fn = forward_fn
        self.last_report: BNRecalibrationReport | None = None
        self.num_recalibrations = 0
        self._frozen: list[str] | None = None  # qualified names of frozen norm layers seen during training
        self._last_step: int | None = None
        # With weight averaging: from a recalibration point to the next training batch, the averaged weights are
        # recalibrated whenever they changed since (the `n_averaged` of each AveragedModel when last done).
        self._averaged_due = False
        self._averaged_versions: dict[int, int] = {}

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
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._averaged_due = False  # training moves the averaged weights on: the last recalibration point is past

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
            self._last_step = trainer.global_step
            if _weight_averagers(trainer):
                # A WeightAveraging callback after this one in the list has not yet taken this step into its
                # average: recalibrate the averaged weights at the next hook, before validation and checkpoint.
                self._open_averaged_window()
            else:
                self._recalibrate(trainer, pl_module, frozen=None)

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # runs before WeightAveraging swaps the averaged weights in (`on_validation_epoch_start`)
        if self._averaged_due:
            self._recalibrate_averaged(trainer)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._averaged_due:
            self._recalibrate_averaged(trainer)

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if not self._averaged_due:
            return
        self._recalibrate_averaged(trainer)
        if "current_model_state" in checkpoint:  # WeightAveraging ran first: its averaged state is the state_dict
            for averaged in _averaged_models(trainer):
                checkpoint["state_dict"].update(_norm_buffers(averaged.module))

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.when == "fit_end" and self._last_step != trainer.global_step:
            rank_zero_warn(
                "`BNRecalibration`: fit stopped before its planned last batch (early stopping, `max_time`, ...), so "
                "the statistics are recalibrated now, in `on_train_end`, after the last validation and checkpoint: "
                "those still hold the old statistics. Use `BNRecalibration(every_n_epochs=1)` so that every "
                "validation and checkpoint sees recalibrated statistics."
            )
            self._last_step = trainer.global_step
            if _weight_averagers(trainer):
                self._open_averaged_window()
            else:
                self._recalibrate(trainer, pl_module, frozen=None)
        if not self._averaged_due:
            return
        self._recalibrate_averaged(trainer)
        # WeightAveraging copies the averaged weights into the module in its own `on_train_end`; if it ran first,
        # the module holds the averaged weights with the statistics from before: hand it the recalibrated ones.
        for averaged in _averaged_models(trainer):
            buffers = dict(pl_module.named_buffers())
            with torch.no_grad():
                for name, value in _norm_buffers(averaged.module).items():
                    if name in buffers:
                        buffers[name].copy_(value)
        # fit is over: a later save holds the averaged copy, whose statistics were recalibrated in place
        self._averaged_due = False

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

    def _open_averaged_window(self) -> None:
        self._averaged_due = True
        self._averaged_versions = {}

    def _recalibrate_averaged(self, trainer: L.Trainer) -> None:
        """Recalibrate each WeightAveraging callback's averaged weights if they changed since the last time."""
        for averaged in _averaged_models(trainer):
            version = int(averaged.n_averaged)
            if self._averaged_versions.get(id(averaged)) == version:
                continue
            # frozen layers as recorded on the training module (the averaged copy's train/eval flags are stale)
            modules = dict(averaged.module.named_modules())
            frozen = [modules[name] for name in (self._frozen or []) if name in modules]
            self._recalibrate(trainer, averaged.module, frozen=frozen)
            self._averaged_versions[id(averaged)] = version

    def _recalibrate(self, trainer: L.Trainer, model: nn.Module, frozen: list[Any] | None) -> None:
        loader = self._resolve_loader(trainer)
        precision = trainer.precision_plugin
        device = next(itertools.chain(model.parameters(), model.buffers())).device
        with _isolated_rng(loader, device), precision.forward_context():
            report = recalibrate_bn(
                model,
                _converted(loader, precision.convert_input),
                self._batch_limit(trainer),
                input_key=self.input_key,
                forward_fn=self.forward_fn,
                frozen=frozen,
                device=device,
            )
        self.last_report = report
        self.num_recalibrations += 1
        metrics = {
            "bn_recalibration/mean_abs_change_mean": report.mean_abs_change_mean,
            "bn_recalibration/mean_abs_change_var": report.mean_abs_change_var,
        }
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def _batch_limit(self, trainer: L.Trainer) -> int | None:
        """``num_batches``, capped by the batches the trainer itself runs of that loader (limits, fast_dev_run)."""
        caps: list[float] = [] if self.num_batches is None else [self.num_batches]
        fast_dev_run = getattr(trainer, "fast_dev_run", False)
        if fast_dev_run:
            caps.append(int(fast_dev_run))  # True runs 1 batch
        if self.dataloader == "train":
            caps.append(trainer.num_training_batches)
        elif self.dataloader == "val" and trainer.val_dataloaders is not None:
            caps.extend(trainer.num_val_batches[:1])  # limit_val_batches=0 turns validation off, not this loader
        elif self.dataloader == "test" and trainer.test_dataloaders is not None:
            caps.extend(trainer.num_test_batches[:1])
        finite = [int(c) for c in caps if c > 0 and not math.isinf(c)]
        return min(finite) if finite else None

    def _resolve_loader(self, trainer: L.Trainer) -> Iterable[Any]:
        if not isinstance(self.dataloader, str):
            return _fresh(self.dataloader)
        name = self.dataloader
        loaders: Any = {"train": trainer.train_dataloader, "val": trainer.val_dataloaders}.get(name)
        if name == "test":
            loaders = trainer.test_dataloaders
        sharded = True  # the trainer's loaders carry Lightning's DistributedSampler under DDP
        if loaders is None and name == "val":
            # `limit_val_batches=0` (or no `validation_step`) keeps Lightning from loading it: ask its source
            loaders, sharded = _val_source_loaders(trainer), False
        if loaders is None:
            raise RuntimeError(
                f"`BNRecalibration(dataloader={name!r})` found no {name} dataloader on the trainer, its datamodule or "
                f"its LightningModule. Pass the loader itself: `BNRecalibration(dataloader=my_loader)`."
            )
        if isinstance(loaders, list | tuple | Mapping):
            items = list(loaders.values() if isinstance(loaders, Mapping) else loaders)
            if len(items) != 1:
                raise ValueError(
                    f"`BNRecalibration(dataloader={name!r})` found {len(items)} {name} dataloaders and cannot tell "
                    "which to use. Pass one: `BNRecalibration(dataloader=my_loader)`."
                )
            loaders = items[0]
        loader = _fresh(loaders)
        if not sharded and trainer.world_size > 1 and not _distributed(loader):
            return _RankShard(loader, trainer.global_rank, trainer.world_size)
        return loader


# --- weight averaging ------------------------------------------------------------------------------


def _weight_averagers(trainer: L.Trainer) -> list[WeightAveraging]:
    return [cb for cb in trainer.callbacks if isinstance(cb, WeightAveraging)]  # type: ignore[attr-defined]


def _averaged_models(trainer: L.Trainer) -> list[AveragedModel]:
    """The ``AveragedModel`` of each ``WeightAveraging`` callback (created in its ``setup`` for fit).

    Lightning 2.6 exposes it only as the private ``_average_model``; this is the one place that reads it, and a
    test fails loudly if Lightning renames it.
    """
    models = []
    for callback in _weight_averagers(trainer):
        if not hasattr(callback, "_average_model"):
            raise RuntimeError(
                f"`BNRecalibration` cannot reach the averaged weights of {type(callback).__name__}: this Lightning "
                "version has no `WeightAveraging._average_model`. Recalibrate after fit instead: "
                "`lightning_reg.functional.recalibrate_bn(model, loader)`."
            )
        averaged = callback._average_model
        if isinstance(averaged, AveragedModel):
            models.append(averaged)
    return models


def _norm_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the running statistics (and batch counts) of every tracking norm layer, by state-dict name."""
    out = {}
    for name, layer in tracking_norm_layers(module):
        prefix = f"{name}." if name else ""
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            value = getattr(layer, key, None)
            if isinstance(value, torch.Tensor):
                out[prefix + key] = value.detach().clone()
    return out


# --- loaders ---------------------------------------------------------------------------------------


def _val_source_loaders(trainer: L.Trainer) -> Any:
    """The val dataloader(s) from where fit got them (passed to ``fit``, the datamodule or the module), or None.

    Lightning's loop keeps that source as the private ``_data_source``; this is the one place that reads it.
    """
    source = getattr(trainer.fit_loop.epoch_loop.val_loop, "_data_source", None)
    if source is not None and source.is_defined() and source.instance is not None:
        return source.dataloader()
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and is_overridden("val_dataloader", datamodule):
        return datamodule.val_dataloader()
    return None


def _distributed(loader: Iterable[Any]) -> bool:
    if not isinstance(loader, DataLoader):
        return False
    samplers = [loader.sampler, getattr(loader.batch_sampler, "sampler", None)]
    return any(isinstance(s, DistributedSampler) for s in samplers)


class _RankShard:
    """Batches ``rank, rank + world_size, ...`` of a loader no DistributedSampler shards: the ranks split it."""

    def __init__(self, loader: Iterable[Any], rank: int, world_size: int) -> None:
        self.loader, self.rank, self.world_size = loader, rank, world_size

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.loader), self.rank, None, self.world_size)


def _converted(loader: Iterable[Any], convert: Any) -> Iterator[Any]:
    """The loader's batches passed through the precision plugin's ``convert_input`` (float64, bf16, ...)."""
    for batch in loader:
        yield convert(batch)


def _fresh(loader: Iterable[Any]) -> Iterable[Any]:
    """The loader, or for persistent workers a worker-free twin: ``iter()`` would reset the loop's own iterator."""
    if isinstance(loader, DataLoader) and loader.persistent_workers and loader.batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn)
    return loader


# --- random streams --------------------------------------------------------------------------------


def _generators(root: Any) -> list[torch.Generator]:
    """Every ``torch.Generator`` a loader draws from: its own, its sampler's and batch sampler's, its dataset's.

    Walks the attributes of DataLoaders, samplers and datasets (Lightning's sampler wrappers included), a few
    levels deep.
    """
    found: list[torch.Generator] = []
    seen: set[int] = set()

    def walkable(obj: Any) -> bool:
        return isinstance(obj, DataLoader | Sampler | Dataset | _RankShard) or "sampler" in type(obj).__name__.lower()

    def visit(obj: Any, depth: int) -> None:
        if id(obj) in seen or depth > 5:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Generator):
            found.append(obj)
        elif isinstance(obj, list | tuple | Mapping):
            for item in obj.values() if isinstance(obj, Mapping) else obj:
                visit(item, depth + 1)
        elif walkable(obj):
            for item in _attributes(obj):
                if isinstance(item, torch.Generator | list | tuple | Mapping) or walkable(item):
                    visit(item, depth + 1)

    visit(root, 0)
    return found


def _attributes(obj: Any) -> list[Any]:
    """The values of ``obj``'s instance attributes: its ``__dict__`` and its classes' ``__slots__``."""
    values = list(getattr(obj, "__dict__", {}).values())
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name.startswith("__") and not name.endswith("__"):  # a private slot: its mangled name
                name = f"_{cls.__name__.lstrip('_')}{name}"
            if name not in ("__dict__", "__weakref__") and hasattr(obj, name):
                values.append(getattr(obj, name))
    return values


@contextlib.contextmanager
def _isolated_rng(loader: Iterable[Any], device: torch.device) -> Iterator[None]:
    """Run a pass over ``loader`` that leaves every random stream of training as it was.

    Iterating a loader draws its base seed and its shuffled order from the loader's (or sampler's) generator, or
    from the global RNG; a dataset's transforms may draw from the global torch, Python or NumPy RNGs. Their states
    are saved before and restored after, so training draws exactly what it would have drawn without the pass.
    """
    generators = _generators(loader)
    states = [g.get_state() for g in generators]
    python_state = random.getstate()
    try:
        import numpy as np

        numpy_state: Any = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy is optional for torch
        np, numpy_state = None, None  # type: ignore[assignment]
    with global_rng_forked(device):  # the CPU generator and the device's
        try:
            yield
        finally:
            for generator, state in zip(generators, states, strict=True):
                generator.set_state(state)
            random.setstate(python_state)
            if np is not None:
                np.random.set_state(numpy_state)
