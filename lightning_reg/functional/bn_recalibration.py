"""Precise BatchNorm: exact running statistics over many batches (Wu & Johnson, https://arxiv.org/abs/2105.07576).

BatchNorm's running statistics are an exponential moving average collected while the weights were still
changing, often on augmented or mixed inputs. ``recalibrate_bn`` recomputes them with the final weights: the
population mean and unbiased variance of each layer's inputs over all samples seen, the numbers one batch
holding every sample would give.

How, in one pass with no extra reduction over activations: each recalibrated layer runs in training mode with
``momentum=1``, so after every call its ``running_mean``/``running_var`` hold exactly that call's batch mean and
unbiased batch variance. A forward hook reads them with the call's count of values per channel (samples times
spatial positions, as fvcore's ``update_bn_stats`` counts them) and folds them into per-channel shifted sums (in
``lightning_reg._device.accumulation_dtype``: float64, float32 on MPS); at the end the batches are pooled exactly::

    mean = sum_b n_b * mean_b / N
    M2   = sum_b [(n_b - 1) * var_b + n_b * (mean_b - mean)^2]      (Chan et al., 1979)
    var  = M2 / (N - 1)

``torch.optim.swa_utils.update_bn`` (a cumulative average, each batch weighted equally, of batch variances) and
fvcore's ``update_bn_stats`` (the same, weighted by batch) both leave out the ``n_b * (mean_b - mean)^2`` term:
they differ from the exact statistics whenever batch means differ (fvcore's newer ``_PopulationVarianceEstimator``
pools exactly too, with the biased ``1/N`` variance). A call in which a layer would get one value per channel (a
batch of one sample for BatchNorm1d, a 1x1 feature map of one image for BatchNorm2d) cannot run in training mode:
the decision is taken per layer and per call from the values per channel, so a batch of one image still counts
for every BatchNorm2d/3d it reaches. Under ``torch.distributed`` the per-layer
counts, sums and centred sums of squares are all-reduced (two ``all_reduce`` calls of one flat tensor each), so
N ranks get the statistics of the union of their batches.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import SyncBatchNorm, _BatchNorm, _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.parameter import is_lazy

from lightning_reg import _device
from lightning_reg._batch import BatchKey, validate_key
from lightning_reg.forward import ForwardFn, batch_inputs, validate_forward_fn

__all__ = ["BNRecalibrationReport", "is_frozen_norm", "recalibrate_bn", "tracking_norm_layers"]


@dataclass(frozen=True)
class BNRecalibrationReport:
    """What :func:`recalibrate_bn` did, summed over all ranks under ``torch.distributed``.

    Attributes:
        layers: qualified names of the recalibrated layers.
        frozen: qualified names of the tracking layers left alone because they count as frozen.
        num_batches: batches forwarded.
        num_samples: samples forwarded (first dimension of the inputs, or of the first tensor in the batch).
        num_skipped: batches whose forward stopped at a layer that would have got one value per channel (which
            BatchNorm cannot normalize in training mode): that layer and the layers after it did not count the
            batch, the layers before it did.
        mean_abs_change_mean: mean over all channels of ``|new running_mean - old running_mean|``.
        mean_abs_change_var: mean over all channels of ``|new running_var - old running_var|``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> report = recalibrate_bn(model, [torch.randn(8, 3), torch.randn(5, 3)])
        >>> report.layers, report.num_batches, report.num_samples
        (['1'], 2, 13)
    """

    layers: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    num_batches: int = 0
    num_samples: int = 0
    num_skipped: int = 0
    mean_abs_change_mean: float = 0.0
    mean_abs_change_var: float = 0.0


def tracking_norm_layers(model: nn.Module) -> list[tuple[str, _NormBase]]:
    """Named normalization layers of ``model`` that keep running statistics (``track_running_stats=True``).

    BatchNorm1d/2d/3d, SyncBatchNorm, the lazy variants, InstanceNorm with ``track_running_stats=True``, and any
    other ``torch.nn.modules.batchnorm._NormBase``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.InstanceNorm1d(4))
        >>> [name for name, _ in tracking_norm_layers(net)]
        ['1']
    """
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, _NormBase) and m.track_running_stats and m.running_mean is not None
    ]


def is_frozen_norm(layer: nn.Module, model: nn.Module) -> bool:
    """Whether a normalization layer counts as frozen: left alone by :func:`recalibrate_bn`.

    A layer is frozen when it keeps no running statistics (``track_running_stats=False``, which is what
    Lightning's ``BaseFinetuning.freeze`` sets on BatchNorm), or when it is in eval mode while ``model`` is in
    train mode (the "frozen BN" idiom of fine-tuning: ``model.train()`` then ``bn.eval()``). In an eval-mode model
    no layer can be told apart this way: pass the frozen layers explicitly to :func:`recalibrate_bn` then.

    Example:
        >>> net = nn.Sequential(nn.BatchNorm1d(2), nn.BatchNorm1d(2)).train()
        >>> _ = net[1].eval()
        >>> is_frozen_norm(net[0], net), is_frozen_norm(net[1], net)
        (False, True)
    """
    if isinstance(layer, _NormBase) and not layer.track_running_stats:
        return True
    return model.training and not layer.training


class _StopForward(Exception):  # noqa: N818 (a control-flow signal, not an error)
    """Raised by a layer's pre-hook to end a forward: the layer would get one value per channel."""


class _LayerAccumulator:
    """Per-channel shifted sums of one layer's per-call batch statistics.

    BatchNorm-like layers pool samples: ``s1 = sum n_b (mean_b - K)``, ``s2 = sum (n_b - 1) var_b + n_b (mean_b -
    K)^2`` with the shift ``K`` = the first call's mean (the shifted-data algorithm: no cancellation when the mean
    is far from 0). InstanceNorm records, as torch does for one batch, the average over instances of per-instance
    means and unbiased variances: ``s1 = sum w_b mean_b``, ``s2 = sum w_b var_b`` with ``w_b`` instances.
    """

    _CHUNK = 32  # calls buffered before folding them into the sums: 2 copies a call, the rest vectorized

    def __init__(self, layer: _NormBase) -> None:
        self.layer = layer
        self.instance = isinstance(layer, _InstanceNorm)
        self.count = 0  # values per channel (BatchNorm) or instances (InstanceNorm), over all counted calls
        self.calls = 0
        self.stops = 0  # calls refused: one value per channel
        self.shift: Tensor | None = None
        self.s1: Tensor | None = None
        self.s2: Tensor | None = None
        self._means: list[Tensor] = []
        self._vars: list[Tensor] = []
        self._ns: list[int] = []
        self._n = 0  # the weight of the call in progress, set by the pre-hook

    def _values_per_channel(self, x: Tensor) -> int:
        if self.instance:  # statistics per instance and channel, over the spatial positions
            spatial = self.layer._get_no_batch_dim() - 1  # type: ignore[operator]
            return int(torch.Size(x.shape[-spatial:]).numel())
        return x.numel() // x.shape[1]

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Decide for this layer and this call: one value per channel cannot run in training mode, stop there."""
        x = args[0]
        if self._values_per_channel(x) <= 1:
            self.stops += 1
            raise _StopForward
        if self.instance:
            batched = x.dim() > self.layer._get_no_batch_dim()  # type: ignore[operator]
            self._n = x.shape[0] if batched else 1
        else:
            self._n = x.numel() // x.shape[1]

    def hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        assert self.layer.running_mean is not None
        assert self.layer.running_var is not None
        n = self._n
        self._means.append(self.layer.running_mean.clone())  # (C,): the call's batch mean, as momentum is 1
        self._vars.append(self.layer.running_var.clone())  # (C,): the call's unbiased batch variance
        self._ns.append(n)
        self.count += n
        self.calls += 1
        if len(self._ns) >= self._CHUNK:
            self.fold()

    def fold(self) -> None:
        """Add the buffered calls to the sums (in the accumulation dtype of the device)."""
        if not self._ns:
            return
        dtype = _device.accumulation_dtype(self._means[0].device)
        means = torch.stack(self._means).to(dtype)  # (B, C)
        variances = torch.stack(self._vars).to(dtype)  # (B, C)
        ns = torch.tensor(self._ns, dtype=dtype, device=means.device).unsqueeze(1)  # (B, 1)
        self._means, self._vars, self._ns = [], [], []
        if self.s1 is None:
            self.shift = torch.zeros_like(means[0]) if self.instance else means[0].clone()
            self.s1 = torch.zeros_like(means[0])
            self.s2 = torch.zeros_like(means[0])
        assert self.shift is not None
        assert self.s2 is not None
        if self.instance:
            self.s1 += (ns * means).sum(0)
            self.s2 += (ns * variances).sum(0)
        else:
            d = means - self.shift  # (B, C)
            self.s1 += (ns * d).sum(0)
            self.s2 += ((ns - 1) * variances + ns * d * d).sum(0)

    def local_moments(self, channels: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """``(count, sum of x, second-moment part)``: see :func:`_pool`."""
        self.fold()
        dtype = _device.accumulation_dtype(device)
        count = torch.tensor(float(self.count), dtype=dtype, device=device)
        if self.s1 is None or self.shift is None or self.s2 is None:
            zeros = torch.zeros(channels, dtype=dtype, device=device)
            return count, zeros, zeros.clone()
        if self.instance:
            return count, self.s1, self.s2
        mean = self.shift + self.s1 / self.count
        m2 = self.s2 - self.s1 * self.s1 / self.count  # sum of squared deviations from the local mean
        return count, mean * self.count, m2


def _all_reduce(t: Tensor, distributed: bool) -> Tensor:
    if distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _pool(
    accs: list[_LayerAccumulator], counters: list[int], device: torch.device, distributed: bool
) -> tuple[list[tuple[int, Tensor, Tensor, int]], list[int]]:
    """Exact pooled ``(count, mean, var, calls)`` per layer and the summed ``counters``; two all-reduces under DDP."""
    dtype = _device.accumulation_dtype(device)
    moments = [acc.local_moments(_channels(acc.layer), device) for acc in accs]
    # stage 1, one flat tensor: [counters..., then per layer: count, calls, sum of x (C,)]
    parts = [torch.tensor([float(c) for c in counters], dtype=dtype, device=device)]
    for acc, (count, total, _) in zip(accs, moments, strict=True):
        parts += [count.reshape(1), torch.tensor([float(acc.calls)], dtype=dtype, device=device), total]
    flat = _all_reduce(torch.cat(parts), distributed)
    totals = [int(v) for v in flat[: len(counters)].tolist()]
    offset = len(counters)
    firsts: list[tuple[Tensor, Tensor, int]] = []  # global (count, mean, calls)
    second: list[Tensor] = []
    for acc, (count, total, m2) in zip(accs, moments, strict=True):
        c = total.numel()
        n, n_calls, s = flat[offset], flat[offset + 1], flat[offset + 2 : offset + 2 + c]
        offset += 2 + c
        mean = s / n.clamp_min(1)
        if acc.instance:
            second.append(m2)  # sum of w_b * var_b: additive across ranks as it is
        else:
            # stage 2: squared deviations about the global mean (Chan's parallel combination)
            local_mean = total / count.clamp_min(1)
            second.append(m2 + count * (local_mean - mean) ** 2)
        firsts.append((n, mean, int(n_calls.item())))
    flat2 = _all_reduce(torch.cat(second), distributed)
    out = []
    offset = 0
    for acc, (n, mean, calls) in zip(accs, firsts, strict=True):
        sq = flat2[offset : offset + mean.numel()]
        offset += mean.numel()
        var = sq / n.clamp_min(1) if acc.instance else sq / (n - 1).clamp_min(1)
        out.append((int(n.item()), mean, var, calls))
    return out, totals


def _channels(layer: _NormBase) -> int:
    assert layer.running_mean is not None
    return layer.running_mean.numel()


def _to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (in lists, tuples and dicts, nested) moved to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _leading_size(batch: Any) -> int:
    """The first dimension of the first batched tensor in ``batch`` (0 if there is none)."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 0
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, list | tuple) else ()
    for value in values:
        size = _leading_size(value)
        if size:
            return size
    return 0


def _local_forward(layer: SyncBatchNorm) -> Any:
    # SyncBatchNorm all-reduces every call's statistics: that would need every rank to forward the same number of
    # batches and would count other ranks' samples in this rank's sums. Run it as a local BatchNorm instead; the
    # exact pooling across ranks happens once at the end.
    def forward(x: Tensor) -> Tensor:
        return _BatchNorm.forward(layer, x)

    return forward


def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    *,
    input_key: BatchKey = 0,
    forward_fn: ForwardFn | None = None,
    frozen: Iterable[nn.Module] | None = None,
    device: torch.device | str | None = None,
    distributed: bool | None = None,
) -> BNRecalibrationReport:
    """Precise BatchNorm: set running statistics to the exact statistics over ``batches``.

    Resets the running statistics of every normalization layer that tracks them (see
    :func:`tracking_norm_layers`) and is not frozen (see :func:`is_frozen_norm`), forwards up to ``num_batches``
    batches with those layers in training mode and every other module in eval mode (dropout off) under
    ``torch.no_grad()``, and writes each layer's exact statistics over all values it saw: the population mean and
    unbiased variance per channel, the numbers one batch holding all samples would give, also for unequal batch
    sizes. ``num_batches_tracked`` becomes the number of calls the layer counted. Wu & Johnson, "Rethinking 'Batch'
    in BatchNorm", 2021 (https://arxiv.org/abs/2105.07576).

    Each batch is forwarded the way the callbacks forward it (``lightning_reg.forward``): ``forward_fn(model,
    batch)`` if given, else ``model(*model.forward_inputs(batch))`` when the model defines ``forward_inputs``
    (sequence lengths, attention masks), else ``model(batch[input_key])``; a tensor batch is the inputs. Tensors
    are moved to ``device`` first. Whether a call counts is decided per layer from its values per channel: a layer
    that would get one value per channel (which training-mode BatchNorm refuses) ends that forward, so it and the
    layers after it do not count the batch while the layers before it do. A batch of one image counts for
    BatchNorm2d/3d (H x W values per channel).

    Only those buffers change: parameters, other buffers, momentum and every module's train/eval mode are as
    before. If the forward raises, the running statistics are restored too and the error propagates. Under
    ``torch.distributed`` (``distributed=None`` and a process group of more than one rank), call it on every rank:
    the statistics are those of the union of all ranks' batches.

    Args:
        model: the network (a LightningModule is a network).
        batches: an iterable of batches: tensors, lists/tuples with the inputs at ``input_key``, or dicts.
        num_batches: take at most this many batches from ``batches``; ``None`` takes all.
        input_key: position (list/tuple batch) or key (dict batch) of the inputs, for models without
            ``forward_inputs`` and without ``forward_fn``.
        forward_fn: ``forward_fn(model, batch)`` runs the model on one batch (already on ``device``); its
            output is ignored.
        frozen: layers to leave alone in addition to those with ``track_running_stats=False``. ``None`` detects
            them: layers in eval mode while ``model`` is in train mode. Pass them when ``model`` is in eval mode.
        device: move tensors of the batches here; ``None`` uses the device of the model's first parameter or buffer.
        distributed: all-reduce the statistics across ranks; ``None`` does when a process group of more than one
            rank is initialized.

    Returns:
        A :class:`BNRecalibrationReport` with the layers, counts and the mean absolute change of the statistics.

    Raises:
        ValueError: ``batches`` is empty, or no layer got more than one value per channel in any batch;
            ``num_batches`` is not a positive int.
        KeyError, TypeError: the batch has no entry ``input_key``; ``forward_fn`` is not callable.

    A model without such layers gets a warning and is left unchanged.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
        >>> data = [torch.randn(5, 3), torch.randn(3, 3) + 1.0]  # unequal sizes, different means
        >>> report = recalibrate_bn(net, data)
        >>> h = net[0](torch.cat(data)).detach()  # the BN layer's inputs, all 8 samples at once
        >>> torch.allclose(net[1].running_mean, h.mean(0)), torch.allclose(net[1].running_var, h.var(0))
        (True, True)
        >>> report.num_samples, int(net[1].num_batches_tracked)
        (8, 2)
    """
    validate_key(input_key, "input_key")
    validate_forward_fn(forward_fn)
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)):
        raise ValueError(f"Expected `num_batches` to be a positive int or None, but got {num_batches!r}.")
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"Expected `num_batches` to be a positive int or None, but got {num_batches!r}.")
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    tracking = tracking_norm_layers(model)
    explicit_frozen = {id(m) for m in frozen} if frozen is not None else None
    targets: list[tuple[str, _NormBase]] = []
    frozen_names: list[str] = []
    for name, layer in tracking:
        is_frozen = id(layer) in explicit_frozen if explicit_frozen is not None else is_frozen_norm(layer, model)
        if is_frozen:
            frozen_names.append(name)
        else:
            targets.append((name, layer))
    if not targets:
        warnings.warn(
            f"`recalibrate_bn` found no normalization layer with running statistics to recalibrate in "
            f"{type(model).__name__} ({len(frozen_names)} frozen); nothing was changed. Only layers with "
            "`track_running_stats=True` (BatchNorm, SyncBatchNorm, InstanceNorm(track_running_stats=True)) that are "
            "not frozen are recalibrated.",
            UserWarning,
            stacklevel=2,
        )
        return BNRecalibrationReport(frozen=frozen_names)

    if device is None:
        first = next(itertools.chain(model.parameters(), model.buffers()))
        device = first.device
    device = torch.device(device)

    iterator = iter(batches if num_batches is None else itertools.islice(batches, num_batches))
    sentinel = object()
    first_batch = next(iterator, sentinel)
    if first_batch is sentinel and not distributed:
        raise ValueError(
            "Expected `batches` to yield at least one batch, but it is empty; no statistics were changed. Pass the "
            "training dataloader (or another non-empty iterable of batches)."
        )
    stream = iterator if first_batch is sentinel else itertools.chain([first_batch], iterator)

    layers = [layer for _, layer in targets]
    # snapshots, to restore on error and to measure the change (None for uninitialized lazy buffers)
    saved = [_snapshot(m) for m in layers]
    modes = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in layers]
    accs = [_LayerAccumulator(m) for m in layers]
    handles = []
    counters = [0, 0, 0]  # batches, samples, stopped early
    try:
        model.eval()
        for layer, acc, snapshot in zip(layers, accs, saved, strict=True):
            layer.train()
            layer.momentum = 1.0  # running stats := this call's batch statistics, read by the hook
            if snapshot is not None:
                layer.reset_running_stats()
            if isinstance(layer, SyncBatchNorm):
                layer.forward = _local_forward(layer)  # type: ignore[method-assign]
            handles.append(layer.register_forward_pre_hook(acc.pre_hook))
            handles.append(layer.register_forward_hook(acc.hook))
        with torch.no_grad():
            for batch in stream:
                if forward_fn is not None:
                    batch = _to_device(batch, device)
                    size = _leading_size(batch)
                    run: Any = lambda batch=batch: forward_fn(model, batch)  # noqa: E731
                else:
                    inputs = batch_inputs(model, batch, input_key).map(lambda t: t.to(device, non_blocking=True))
                    size = _leading_size(list(inputs.args) + list(inputs.kwargs.values()))
                    run = lambda inputs=inputs: inputs(model)  # noqa: E731
                counters[0] += 1
                counters[1] += size
                try:
                    run()
                except _StopForward:
                    counters[2] += 1
        results, totals = _pool(accs, counters, device, distributed)
        if totals[0] == 0:
            raise ValueError(
                "Expected `batches` to yield at least one batch on some rank, but every rank's was empty; no "
                "statistics were changed."
            )
        if all(n == 0 for n, _, _, _ in results):
            raise ValueError(
                f"Expected at least one batch in which a normalization layer gets more than one value per channel, "
                f"but every one of the {totals[0]} batches stopped at a layer with one value per channel (batches of "
                "one sample for BatchNorm1d, or 1x1 feature maps); no statistics were changed. Use batches of at "
                "least 2 samples (BatchNorm cannot compute a variance from one value)."
            )
        unused: list[str] = []
        starved: list[str] = []
        changes_mean: list[Tensor] = []
        changes_var: list[Tensor] = []
        dtype = _device.accumulation_dtype(device)
        for (name, layer), acc, (n, mean, var, calls), snapshot in zip(targets, accs, results, saved, strict=True):
            assert layer.running_mean is not None
            assert layer.running_var is not None
            if n == 0:  # the forward never reached this layer with two values per channel: keep what it had
                (starved if acc.stops else unused).append(name)
                if snapshot is not None:
                    _restore(layer, snapshot)
                continue
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
            if layer.num_batches_tracked is not None:
                layer.num_batches_tracked.fill_(calls)
            if snapshot is not None:
                changes_mean.append((layer.running_mean - snapshot[0]).abs().flatten().to(dtype))
                changes_var.append((layer.running_var - snapshot[1]).abs().flatten().to(dtype))
    except BaseException:
        for layer, snapshot in zip(layers, saved, strict=True):
            if snapshot is not None:
                _restore(layer, snapshot)
        raise
    finally:
        for handle in handles:
            handle.remove()
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
            if isinstance(layer, SyncBatchNorm) and "forward" in vars(layer):
                del layer.forward
        for module, training in modes:
            module.training = training
    if unused:
        warnings.warn(
            f"`recalibrate_bn`: the forward never called {unused}; their statistics were left as they were.",
            UserWarning,
            stacklevel=2,
        )
    if starved:
        warnings.warn(
            f"`recalibrate_bn`: {starved} got one value per channel in every batch that reached them (batches of one "
            "sample?); their statistics were left as they were. Use batches of at least 2 samples.",
            UserWarning,
            stacklevel=2,
        )
    return BNRecalibrationReport(
        layers=[name for name, _ in targets if name not in unused and name not in starved],
        frozen=frozen_names,
        num_batches=totals[0],
        num_samples=totals[1],
        num_skipped=totals[2],
        mean_abs_change_mean=float(torch.cat(changes_mean).mean()) if changes_mean else 0.0,
        mean_abs_change_var=float(torch.cat(changes_var).mean()) if changes_var else 0.0,
    )


def _snapshot(layer: _NormBase) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """Copies of the statistics, or ``None`` for a lazy layer that has not been initialized yet."""
    if layer.running_mean is None or layer.running_var is None or is_lazy(layer.running_mean):
        return None
    tracked = None if layer.num_batches_tracked is None else layer.num_batches_tracked.clone()
    return layer.running_mean.clone(), layer.running_var.clone(), tracked


def _restore(layer: _NormBase, snapshot: tuple[Tensor, Tensor, Tensor | None]) -> None:
    assert layer.running_mean is not None
    assert layer.running_var is not None
    layer.running_mean.copy_(snapshot[0])
    layer.running_var.copy_(snapshot[1])
    if snapshot[2] is not None and layer.num_batches_tracked is not None:
        layer.num_batches_tracked.copy_(snapshot[2])
