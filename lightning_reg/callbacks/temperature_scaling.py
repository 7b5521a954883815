"""Temperature scaling (Guo et al., 2017) as a callback: fit T on held-out logits at the end of fit, then divide."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_reg._batch import BatchKey, get_entry, validate_key
from lightning_reg.forward import ForwardFn, batch_logits, validate_forward_fn
from lightning_reg.functional.calibration import fit_temperature, scale_logits, temperature_nll
from lightning_reg.functional.uncertainty import expected_calibration_error, reliability_bins
from lightning_reg.nn.temperature_scaling import TemperatureScaled
from lightning_reg.targets import hard_targets

__all__ = ["TemperatureScaling", "TemperatureScalingReport"]

When = Literal["fit_end", "test_start"]
LoaderName = Literal["val", "test"]
# The attribute of a LightningModule that holds its installed scaler (one per module, whichever callback).
_SCALER_ATTR = "_lightning_reg_temperature_scaler"


@dataclass(frozen=True)
class TemperatureScalingReport:
    """What one fit of :class:`TemperatureScaling` measured, on the union of all ranks' held-out samples.

    Attributes:
        temperature: the fitted ``T`` (the geometric mean for per-class temperatures).
        nll_before: mean NLL of the unscaled logits.
        nll_after: mean NLL of the scaled logits.
        ece_before: expected calibration error (15 bins, torchmetrics' binning) before scaling.
        ece_after: the same after scaling.
        num_samples: held-out samples the fit saw (all ranks).
    """

    temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    num_samples: int


class _Scaler:
    """The temperature a module's outputs are divided by, shared by its patched ``forward``/``forward_head``.

    ``deepcopy`` (``AveragedModel`` copies the module) keeps the one scaler, so the copy follows later fits.
    """

    def __init__(self) -> None:
        self.temperature: Tensor | None = None
        self.enabled = True
        self.frames: list[bool] = []  # one per active `forward` call: whether its head already scaled

    def __deepcopy__(self, memo: dict[int, Any]) -> _Scaler:
        return self

    def active(self, module: nn.Module) -> bool:
        return self.enabled and self.temperature is not None and not module.training

    def scale(self, output: Any, name: str) -> Tensor:
        if not isinstance(output, Tensor):
            raise TypeError(
                f"`TemperatureScaling` divides the logits returned by the LightningModule's `{name}` by T, but it "
                f"returned {type(output).__name__}. Return the logits tensor from `{name}` (e.g. `.logits` of a "
                "model output), or leave the callback out and divide by `callback.temperature` yourself."
            )
        assert self.temperature is not None
        return scale_logits(output, self.temperature)


class _ScaledForward:
    """Instance-level ``module.forward``: the class's forward, scaled unless the head already was."""

    def __init__(self, module: nn.Module, scaler: _Scaler, previous: Any) -> None:
        self.module, self.scaler, self.previous = module, scaler, previous

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward = self.previous if self.previous is not None else type(self.module).forward.__get__(self.module)
        if not self.scaler.active(self.module):
            return forward(*args, **kwargs)
        self.scaler.frames.append(False)
        try:
            output = forward(*args, **kwargs)
        finally:
            head_scaled = self.scaler.frames.pop()
        return output if head_scaled else self.scaler.scale(output, "forward")


class _ScaledHead:
    """Instance-level ``module.forward_head``: MC dropout's trunk-once path calls it directly."""

    def __init__(self, module: nn.Module, scaler: _Scaler, previous: Any) -> None:
        self.module, self.scaler, self.previous = module, scaler, previous

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        head = self.previous if self.previous is not None else type(self.module).forward_head.__get__(self.module)  # type: ignore[attr-defined]
        output = head(*args, **kwargs)
        if not self.scaler.active(self.module):
            return output
        if self.scaler.frames:
            self.scaler.frames[-1] = True  # inside `forward`: it must not scale again
        return self.scaler.scale(output, "forward_head")


def _install(module: nn.Module) -> _Scaler:
    """The module's scaler, patching ``forward`` (and ``forward_head`` when the class has one) the first time."""
    scaler = module.__dict__.get(_SCALER_ATTR)
    if isinstance(scaler, _Scaler):
        return scaler
    scaler = _Scaler()
    previous_forward = module.__dict__.get("forward")
    object.__setattr__(module, "forward", _ScaledForward(module, scaler, previous_forward))
    if callable(getattr(type(module), "forward_head", None)):
        previous_head = module.__dict__.get("forward_head")
        object.__setattr__(module, "forward_head", _ScaledHead(module, scaler, previous_head))
    object.__setattr__(module, _SCALER_ATTR, scaler)
    return scaler


def _uninstall(module: nn.Module) -> None:
    if not isinstance(module.__dict__.get(_SCALER_ATTR), _Scaler):
        return
    for name in ("forward", "forward_head"):
        patched = module.__dict__.get(name)
        if isinstance(patched, _ScaledForward | _ScaledHead):
            if patched.previous is None:
                del module.__dict__[name]
            else:
                object.__setattr__(module, name, patched.previous)
    del module.__dict__[_SCALER_ATTR]


def _fingerprint(module: nn.Module) -> list[float]:
    """Cheap change detection of every parameter and buffer: per-tensor sums and sums of squares (float64)."""
    values: list[float] = []
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                t = tensor.detach().double()
                values += [float(t.sum()), float((t * t).sum())]
            else:
                values.append(float(tensor.sum()))
    return values


class TemperatureScaling(Callback):
    """Temperature scaling (`Guo et al., 2017 <https://arxiv.org/abs/1706.04599>`_): calibrated probabilities.

    Args:
        dataloader: the held-out data: ``"val"`` (default), ``"test"`` (only with ``when="test_start"``) or an
            iterable of batches; the training loader is refused unless passed explicitly as an iterable.
        when: ``"fit_end"`` (before the final validation and checkpoint) or ``"test_start"``.
        per_class: one temperature per class (can change predictions; see the calibration docs).
        num_batches: fit on at most this many batches per rank; ``None`` takes the whole loader.
        dataloader_idx: which of several validation/test loaders to fit on.
        forward_fn: ``forward_fn(module, batch) -> logits`` (see :mod:`lightning_reg.forward`).
        input_key: where the inputs are in a batch, for modules without ``forward_inputs``.
        target_key: where the targets (class indices or probabilities) are.
        max_iter: LBFGS iterations of the fit.

    Attributes:
        temperature: the fitted ``T`` (a float, or a ``(K,)`` tensor with ``per_class``), ``None`` before a fit.
        report: the :class:`TemperatureScalingReport` of the last fit.

    Example:
        >>> from lightning_reg import TemperatureScaling
        >>> TemperatureScaling()
        TemperatureScaling(dataloader='val', when='fit_end', per_class=False)

    Notes:
        Fits ``T`` with :func:`~lightning_reg.functional.fit_temperature` on the held-out logits of the final weights
        (after ``BNRecalibration`` and any ``WeightAveraging``; the union of all ranks under DDP), then divides the
        module's logits by ``T`` whenever it is in eval mode (never in training). ``T`` is in ``state_dict``;
        :meth:`calibrated` gives a plain ``nn.Module``. Logs ``calibration/temperature`` and the NLL and ECE before
        and after. When it fits and what it reaches: docs/calibration.md.
    """

    def __init__(
        self,
        dataloader: LoaderName | Iterable[Any] = "val",
        when: When = "fit_end",
        *,
        per_class: bool = False,
        num_batches: int | None = None,
        dataloader_idx: int | None = None,
        forward_fn: ForwardFn | None = None,
        input_key: BatchKey = 0,
        target_key: BatchKey = 1,
        max_iter: int = 100,
    ) -> None:
        if isinstance(dataloader, str):
            if dataloader == "train":
                raise ValueError(
                    "`TemperatureScaling(dataloader='train')` would fit T on the training batches, whose logits are "
                    "over-confident by construction (the model was fitted to them): T comes out too low. Use "
                    "`dataloader='val'`, or pass a held-out loader itself. If you really mean the training data, "
                    "pass its DataLoader explicitly."
                )
            if dataloader not in get_args(LoaderName):
                raise ValueError(
                    f"Expected `dataloader` to be one of {get_args(LoaderName)} or an iterable of batches, but got "
                    f"{dataloader!r}."
                )
        elif not isinstance(dataloader, Iterable):
            raise TypeError(
                f"Expected `dataloader` to be one of {get_args(LoaderName)} or an iterable of batches (a DataLoader), "
                f"but got {type(dataloader).__name__}."
            )
        if when not in get_args(When):
            raise ValueError(f"Expected `when` to be one of {get_args(When)}, but got {when!r}.")
        if dataloader == "test" and when != "test_start":
            raise ValueError("`dataloader='test'` exists only at test time: use it with `when='test_start'`.")
        for name, value in (("num_batches", num_batches), ("dataloader_idx", dataloader_idx)):
            low = 1 if name == "num_batches" else 0
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"Expected `{name}` to be None or an int >= {low}, but got {value!r}.")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"Expected `max_iter` to be an int >= 1, but got {max_iter!r}.")
        validate_forward_fn(forward_fn)
        validate_key(input_key, "input_key")
        validate_key(target_key, "target_key")
        self.dataloader = dataloader
        self.when = when
        self.per_class = per_class
        self.num_batches = num_batches
        self.dataloader_idx = dataloader_idx
        self.forward_fn = forward_fn
        self.input_key = input_key
        self.target_key = target_key
        self.max_iter = max_iter
        self.temperature: float | Tensor | None = None
        self.report: TemperatureScalingReport | None = None
        self._pending = False  # the last training batch of fit ran; fit at the next validation or at fit end
        self._fitted_step: int | None = None
        self._fingerprint: list[float] | None = None
        self._stale = False  # in a fit whose weights have no T yet

    def __repr__(self) -> str:
        loader = self.dataloader if isinstance(self.dataloader, str) else type(self.dataloader).__name__
        return f"{type(self).__name__}(dataloader={loader!r}, when={self.when!r}, per_class={self.per_class})"

    # --- hooks ---------------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A new fit: scaling is off until the new weights get their own T (a stale T must not scale)."""
        self._pending = False
        if self.when == "fit_end":
            self._stale = True
            scaler = pl_module.__dict__.get(_SCALER_ATTR)
            if isinstance(scaler, _Scaler):
                scaler.enabled = False

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Mark the last training batch of fit: T is fitted once every callback is done with the weights."""
        if self.when == "fit_end" and self._is_last_batch_of_fit(trainer, batch_idx):
            self._pending = True

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(pl_module)

    @override
    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Fit at the first batch of the validation after the last training batch of fit.

        By then every ``on_validation_start`` and ``on_validation_epoch_start`` has run (``WeightAveraging``
        swapped its average in).
        """
        if self._pending and not trainer.sanity_checking:
            self._pending = False
            self._fit(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Fit now when no validation followed the last batch, or when the weights changed since the fit."""
        if self.when != "fit_end":
            return
        pending, self._pending = self._pending, False
        changed = self._fitted_step == trainer.global_step and self._fingerprint != _fingerprint(pl_module)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Under DDP each rank keeps its own BatchNorm buffers: decide together, or one rank would wait alone.
            flag = torch.tensor([float(changed)], device=pl_module.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            changed = bool(flag.item())
        if not pending and not changed and self._fitted_step == trainer.global_step:
            self._stale = False
            return
        if any(isinstance(c, ModelCheckpoint) for c in trainer.callbacks):  # type: ignore[attr-defined]
            reason = (
                "the weights changed after the final validation"
                if changed
                else "no validation ran after the last "
                "training batch (early stopping, `max_time`, `limit_val_batches=0`, `check_val_every_n_epoch`)"
            )
            rank_zero_warn(
                f"`TemperatureScaling`: {reason}, so T is fitted now, in `on_fit_end`, after the last checkpoint was "
                "saved: the checkpoints of this fit do not hold this T. Save one now with "
                "`trainer.save_checkpoint(path)`."
            )
        self._fit(trainer, pl_module)

    @override
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.when == "test_start" and self.temperature is None:
            self._fit(trainer, pl_module)
        self._apply(pl_module)

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        t = self.temperature
        return {
            "temperature": t.tolist() if isinstance(t, Tensor) else t,
            "per_class": isinstance(t, Tensor),
            "fitted_step": self._fitted_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        t = state_dict.get("temperature")
        if t is not None and state_dict.get("per_class", False):
            t = torch.tensor(t, dtype=torch.float64)
        self.temperature = None if t is None else (t if isinstance(t, Tensor) else float(t))
        self._fitted_step = state_dict.get("fitted_step")

    # --- public helpers ------------------------------------------------------------------------------
    def calibrated(self, model: nn.Module) -> TemperatureScaled:
        """A plain ``nn.Module`` computing ``model(x) / T`` in every mode, for use without Lightning.

        Raises:
            RuntimeError: before ``T`` was fitted or loaded.
        """
        if self.temperature is None:
            raise RuntimeError("No temperature yet: fit the model with this callback first, or load its checkpoint.")
        if isinstance(model, L.LightningModule):
            _uninstall(model)  # the wrapper scales; the module's own patch would scale a second time in eval
        return TemperatureScaled(model, self.temperature)

    # --- helpers -------------------------------------------------------------------------------------
    def _apply(self, pl_module: L.LightningModule) -> None:
        if self.temperature is None or self._stale:
            return
        scaler = _install(pl_module)
        scaler.temperature = torch.as_tensor(self.temperature, dtype=torch.float64, device=pl_module.device)
        scaler.enabled = True

    @staticmethod
    def _is_last_batch_of_fit(trainer: L.Trainer, batch_idx: int) -> bool:
        end_of_epoch = trainer.is_last_batch or batch_idx + 1 >= trainer.num_training_batches
        max_steps = trainer.max_steps
        if max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps:
            return True
        max_epochs = trainer.max_epochs
        return end_of_epoch and max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs

    def _fit(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logits, targets = self._collect(trainer, pl_module)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        temperature = fit_temperature(
            logits, targets, per_class=self.per_class, max_iter=self.max_iter, distributed=distributed
        )
        t = torch.as_tensor(temperature, dtype=torch.float64, device=logits.device)
        hard = hard_targets(targets)
        before_bins = reliability_bins(logits.float().softmax(1), hard)
        after_bins = reliability_bins(scale_logits(logits.double(), t).float().softmax(1), hard)
        bins = torch.stack([before_bins, after_bins]).double()
        if distributed:
            dist.all_reduce(bins)
        self.report = TemperatureScalingReport(
            temperature=float(t.log().mean().exp()),
            nll_before=temperature_nll(logits, targets, distributed=distributed),
            nll_after=temperature_nll(logits, targets, t, distributed=distributed),
            ece_before=float(expected_calibration_error(bins[0])),
            ece_after=float(expected_calibration_error(bins[1])),
            num_samples=int(bins[0, 0].sum()),
        )
        self.temperature = temperature
        self._stale = False
        self._fitted_step = trainer.global_step
        self._fingerprint = _fingerprint(pl_module)
        self._apply(pl_module)
        metrics = {f"calibration/{name}": float(getattr(self.report, name)) for name in _LOGGED}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def _collect(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[Tensor, Tensor]:
        """The held-out logits and targets of this rank, unscaled, in eval mode, outside the global RNG."""
        loader = self._resolve_loader(trainer)
        limit = 1 if getattr(trainer, "fast_dev_run", False) else self.num_batches
        scaler = pl_module.__dict__.get(_SCALER_ATTR)
        was_enabled = scaler.enabled if isinstance(scaler, _Scaler) else None
        if isinstance(scaler, _Scaler):
            scaler.enabled = False
        modes = {module: module.training for module in pl_module.modules()}
        pl_module.eval()
        precision = trainer.precision_plugin
        all_logits: list[Tensor] = []
        all_targets: list[Tensor] = []
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad(), precision.forward_context():
                for i, batch in enumerate(loader):
                    if limit is not None and i >= limit:
                        break
                    batch = move_data_to_device(precision.convert_input(batch), pl_module.device)
                    logits = batch_logits(pl_module, batch, forward_fn=self.forward_fn, input_key=self.input_key)
                    targets = get_entry(batch, self.target_key, "target_key")
                    if not isinstance(logits, Tensor) or logits.ndim != 2:
                        got = f"shape {tuple(logits.shape)}" if isinstance(logits, Tensor) else type(logits).__name__
                        raise ValueError(f"Expected logits of shape (N, num_classes) for a batch, but got {got}.")
                    all_logits.append(logits.detach().float() if logits.dtype != torch.float64 else logits.detach())
                    all_targets.append(targets.detach())
        finally:
            for module, mode in modes.items():
                module.training = mode
            if isinstance(scaler, _Scaler) and was_enabled is not None:
                scaler.enabled = was_enabled
        if not all_logits:
            raise RuntimeError(
                "`TemperatureScaling` found no batch in its held-out loader (on this rank). Pass a non-empty "
                "loader: `TemperatureScaling(dataloader=my_loader)`."
            )
        return torch.cat(all_logits), torch.cat(all_targets)

    def _resolve_loader(self, trainer: L.Trainer) -> Iterable[Any]:
        if not isinstance(self.dataloader, str):
            return _fresh(self.dataloader)
        name = self.dataloader
        loaders: Any = trainer.val_dataloaders if name == "val" else trainer.test_dataloaders
        datamodule = getattr(trainer, "datamodule", None)
        if (loaders is None or loaders == []) and datamodule is not None:
            loaders = getattr(datamodule, f"{name}_dataloader")()
        if loaders is None or loaders == []:
            raise RuntimeError(
                f"`TemperatureScaling(dataloader={name!r})` found no {name} dataloader on the trainer or its "
                "datamodule (with `limit_val_batches=0` Lightning does not load the loaders passed to `fit`). Pass "
                "the held-out loader itself: `TemperatureScaling(dataloader=my_loader)`."
            )
        if isinstance(loaders, list | tuple | Mapping):
            items = list(loaders.values() if isinstance(loaders, Mapping) else loaders)
            if self.dataloader_idx is None and len(items) != 1:
                raise ValueError(
                    f"`TemperatureScaling(dataloader={name!r})` found {len(items)} {name} dataloaders: say which one "
                    "holds the in-distribution held-out data with `dataloader_idx=`."
                )
            index = self.dataloader_idx or 0
            if index >= len(items):
                raise ValueError(f"Expected `dataloader_idx` below {len(items)}, but got {index}.")
            loaders = items[index]
        if loaders is trainer.train_dataloader and loaders is not None:
            raise ValueError(
                f"The {name} dataloader is the training dataloader: T fitted on training logits comes out too low. "
                "Pass a held-out loader, or the training loader explicitly if you mean it."
            )
        return _fresh(loaders)


_LOGGED = ("temperature", "nll_before", "nll_after", "ece_before", "ece_after")


def _fresh(loader: Iterable[Any]) -> Iterable[Any]:
    """The loader, or for persistent workers a worker-free twin: ``iter()`` would reset the loop's own iterator."""
    if isinstance(loader, DataLoader) and loader.persistent_workers and loader.batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn)
    return loader
