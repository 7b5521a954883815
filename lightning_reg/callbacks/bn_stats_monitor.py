"""Watch BatchNorm statistics while training: how far each batch is from the running statistics used at eval."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

__all__ = ["BNStatsMonitor", "batch_vs_running"]


def batch_vs_running(x: Tensor, layer: _BatchNorm, eps: float | None = None) -> tuple[Tensor, Tensor]:
    """Per-channel distance between the batch statistics of ``x`` and ``layer``'s running statistics.

    Returns ``(mean_shift, var_log_ratio)``, each ``(C,)``:

    - ``mean_shift = |batch_mean - running_mean| / sqrt(running_var + eps)``: how far off-centre the batch lands
      when normalized with the running statistics, in running standard deviations;
    - ``var_log_ratio = |log((batch_var + eps) / (running_var + eps))|``: the scale mismatch (0 when equal).

    Both are 0 when the batch matches the running statistics: the train/test discrepancy of BatchNorm.

    Example:
        >>> bn = nn.BatchNorm1d(2)  # running mean 0, var 1
        >>> shift, ratio = batch_vs_running(torch.tensor([[1.0, 0.0], [3.0, 0.0]]), bn, eps=0.0)
        >>> shift.tolist(), ratio[0].item() == 0.6931471824645996
        ([2.0, 0.0], True)
    """
    assert layer.running_mean is not None
    assert layer.running_var is not None
    eps = layer.eps if eps is None else eps
    dims = [0, *range(2, x.dim())]  # all but the channel dimension
    var, mean = torch.var_mean(x.detach().float(), dim=dims)  # (C,), unbiased like running_var
    running_mean, running_var = layer.running_mean.float(), layer.running_var.float()
    shift = (mean - running_mean).abs() / (running_var + eps).sqrt()
    ratio = ((var + eps) / (running_var + eps)).log().abs()
    return shift, ratio


class BNStatsMonitor(Callback):
    """Log the train/test discrepancy of every BatchNorm layer: batch statistics against running statistics.

    Args:
        log_every_n_steps: measure at every N-th step (``trainer.global_step % N == 0``).
        histograms: write histograms to loggers that support them.

    Example:
        >>> from lightning_reg import BNStatsMonitor
        >>> BNStatsMonitor(log_every_n_steps=10).log_every_n_steps
        10

    Notes:
        Logs, per layer with running statistics, ``bn_stats/<layer>/mean_shift`` (``|batch mean - running mean| /
        running std``) and ``bn_stats/<layer>/var_log_ratio`` (``|log(batch var / running var)|``), channel means
        measured just before the layer updates its statistics (see :func:`batch_vs_running`); ``last_stats`` keeps
        the last values. Large values are a case for :class:`~lightning_reg.BNRecalibration`. See
        docs/bn_stats_monitor.md.
    """

    def __init__(self, log_every_n_steps: int = 50, *, histograms: bool = True) -> None:
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(f"Expected `log_every_n_steps` to be a positive int, but got {log_every_n_steps!r}.")
        self.log_every_n_steps = log_every_n_steps
        self.histograms = histograms
        self.last_stats: dict[str, float] = {}
        self._handles: list[RemovableHandle] = []
        self._measured: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        self._step = 0
        self._measured_step: int | None = None  # the optimizer step measured last (one micro-batch per step)
        self._warned_no_bn = False

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._measured_step = None  # a new fit (a new Trainer may start at step 0 again): nothing measured yet
        if self._warned_no_bn or any(_monitored(m) for m in pl_module.modules()):
            return
        self._warned_no_bn = True
        rank_zero_warn(
            f"`BNStatsMonitor` found no BatchNorm layer with running statistics in {type(pl_module).__name__}: it "
            "will log nothing. Remove the callback, or check that the model's BatchNorm layers keep running "
            "statistics (`track_running_stats=True`)."
        )

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._remove_hooks()
        step = trainer.global_step  # optimizer steps done: the same for every micro-batch of one step
        if step % self.log_every_n_steps != 0 or step == self._measured_step:
            return
        self._step = self._measured_step = step
        for name, module in pl_module.named_modules():
            if _monitored(module):
                self._handles.append(module.register_forward_pre_hook(self._make_hook(name)))

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._handles:
            return
        step = self._step
        self._remove_hooks()
        measured, self._measured = self._measured, {}
        if not measured:
            self.last_stats = {}
            return
        names = list(measured)
        # one device-to-host copy for all layers: (L, 2) channel means of mean_shift and var_log_ratio
        means = torch.stack([torch.stack([shift.mean(), ratio.mean()]) for shift, ratio, _, _ in measured.values()])
        values = means.tolist()  # (L, 2) on the host
        metrics: dict[str, float] = {}
        for name, (shift_mean, ratio_mean) in zip(names, values, strict=True):
            metrics[f"bn_stats/{name}/mean_shift"] = shift_mean
            metrics[f"bn_stats/{name}/var_log_ratio"] = ratio_mean
        self.last_stats = metrics
        if not trainer.is_global_zero:
            return
        histograms: dict[str, Tensor] | None = None
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            experiment: Any = getattr(logger, "experiment", None)
            if self.histograms and hasattr(experiment, "add_histogram"):
                histograms = histograms if histograms is not None else _on_host(measured)
                for tag, values_ in histograms.items():
                    experiment.add_histogram(tag, values_, step)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hooks()

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def _make_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if name in self._measured or not isinstance(module, _BatchNorm) or not isinstance(args[0], Tensor):
                return  # a layer called twice: keep its first call
            with torch.no_grad():  # all on the device: the host sees the values once, at the end of the batch
                shift, ratio = batch_vs_running(args[0], module)
                assert module.running_mean is not None
                assert module.running_var is not None
                self._measured[name] = (
                    shift,
                    ratio,
                    module.running_mean.detach().to(torch.float32, copy=True),  # the layer updates it in place next
                    module.running_var.detach().to(torch.float32, copy=True),
                )

        return hook

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _monitored(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm) and module.running_mean is not None


def _on_host(measured: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]]) -> dict[str, Tensor]:
    """The histogram tensors of every layer, moved to the CPU in one copy: ``bn_stats/<layer>/<name>`` -> values."""
    keys = ("mean_shift", "var_log_ratio", "running_mean", "running_var")
    tags: list[str] = []
    parts: list[Tensor] = []
    for name, tensors in measured.items():
        for key, tensor in zip(keys, tensors, strict=True):
            if key != "var_log_ratio":
                tags.append(f"bn_stats/{name}/{key}")
                parts.append(tensor.flatten().float())
    flat = torch.cat(parts).cpu()
    return dict(zip(tags, flat.split([p.numel() for p in parts]), strict=True))
