"""Monte-Carlo dropout (Gal & Ghahramani, 2016, https://arxiv.org/abs/1506.02142): predictions with uncertainty.

Keeping dropout on at test time and averaging ``n_samples`` stochastic forward passes approximates the
predictive distribution of a Bayesian network. This module holds the two pieces:

- :func:`mc_dropout_sampling`, a context manager that switches exactly the model's dropout into sampling
  mode, keeps every other layer (BatchNorm first of all) in eval mode, restores all modes on exit and
  checks that no running statistic changed;
- :func:`mc_dropout_predict`, the sampler, which runs the deterministic trunk once where it can.

"Exactly the dropout" is harder than ``isinstance(m, nn.Dropout)``: several modules gate their dropout on
their *own* training flag, so switching their ``nn.Dropout`` children alone gives zero spread:

- ``nn.TransformerEncoderLayer`` takes a fused fast path in eval mode under ``no_grad``/``inference_mode``
  (what Lightning's evaluation loops use) that ignores its dropout modules (torch/nn/modules/transformer.py,
  "training is enabled" is one of the conditions that disable it);
- ``nn.MultiheadAttention`` stores its attention dropout as a float and passes ``training=self.training``;
- ``nn.LSTM``/``GRU``/``RNN`` pass ``self.dropout`` and ``self.training`` to the fused kernel;
- timm's ``Attention`` (and its relatives) call SDPA with ``dropout_p=self.attn_drop.p if self.training
  else 0.`` when ``fused_attn`` is on (timm/layers/attention.py).

Each of these modules is switched to training mode on its own (``module.training = True``, not
``module.train()``, which would recurse); their other behaviour does not depend on the flag.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import operator
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.dropout import _DropoutNd

from lightning_reg._random import accelerator_index, global_rng_forked
from lightning_reg.forward import ForwardInputs
from lightning_reg.functional.mc_masks import (
    AUTO_MIN_ELEMENTS,
    Masks,
    resolve_masks,
    samples_per_call,
    threshold_masks,
)
from lightning_reg.functional.uncertainty import entropy

__all__ = [
    "MCDropoutPrediction",
    "MCDropoutSites",
    "check_running_statistics",
    "find_mc_dropout_sites",
    "mc_dropout_predict",
    "mc_dropout_sampling",
    "running_statistics",
]

Method = Literal["auto", "batched", "naive"]
_METHODS: tuple[str, ...] = get_args(Method)

# Our own layers that drop something in training mode and are not `_DropoutNd` subclasses (LockedDropout is
# one, so it is found by type). Matched by qualified name over the MRO: `functional` sits below `nn` and must
# not import it. A user's own layer opts in with a class attribute `mc_dropout_kind = "dropout"` (sampled) or
# `"drop_path"` (sampled only with `include_drop_path=True`).
_OWN_DROPOUT_LAYERS = frozenset({"lightning_reg.nn.weight_drop.WeightDrop"})
# Stochastic depth and DropBlock (timm's and torchvision's): regularizers of training, not dropout sampling; opt-in.
_DROP_PATH_LAYERS = frozenset(
    {
        "timm.layers.drop.DropPath",
        "timm.layers.drop.DropBlock2d",
        "torchvision.ops.stochastic_depth.StochasticDepth",
    }
)


# Qualified names over each class's MRO, computed once per class (every sampling call classifies every module).
_QUALNAMES: weakref.WeakKeyDictionary[type, frozenset[str]] = weakref.WeakKeyDictionary()


def _qualnames(module: nn.Module) -> frozenset[str]:
    cls = type(module)
    names = _QUALNAMES.get(cls)
    if names is None:
        names = _QUALNAMES[cls] = frozenset(f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__)
    return names


def _rate(module: nn.Module) -> float:
    """The module's drop probability; 1.0 (treated as active) when it cannot be read."""
    for name in ("p", "drop_prob", "dropout"):
        value = getattr(module, name, None)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return 1.0


def _classify(module: nn.Module, include_drop_path: bool) -> tuple[bool, float] | None:
    """``(is_site, rate)`` when the module must be switched to training mode for sampling, else ``None``.

    A *site* draws random masks itself; a *gate* (``is_site=False``) only has to be in training mode for its
    dropout children or its own dropout rate to take effect.
    """
    kind = getattr(type(module), "mc_dropout_kind", None)
    names = _qualnames(module)
    if kind == "drop_path" or names & _DROP_PATH_LAYERS:
        return (True, _rate(module)) if include_drop_path else None
    if kind == "dropout" or isinstance(module, _DropoutNd) or names & _OWN_DROPOUT_LAYERS:
        return True, _rate(module)
    if isinstance(module, nn.MultiheadAttention):
        return (True, float(module.dropout)) if module.dropout > 0 else None
    if isinstance(module, nn.RNNBase):
        # Dropout between stacked layers only: a single-layer RNN has none.
        return (True, float(module.dropout)) if module.dropout > 0 and module.num_layers > 1 else None
    if isinstance(module, nn.TransformerEncoderLayer | nn.TransformerDecoderLayer):
        return False, 0.0  # leaves the fused fast path, so that its nn.Dropout children run
    # Looked up in the module's own dicts: `getattr` on a missing name goes through `nn.Module.__getattr__`, which
    # formats an AttributeError (most of the time of classifying a module that is none of the above).
    attn_drop = module._modules.get("attn_drop")
    if isinstance(attn_drop, _DropoutNd) and ("fused_attn" in module.__dict__ or hasattr(type(module), "fused_attn")):
        # timm: the fused SDPA call reads `self.training`, never calls `attn_drop`; the rate is the gate's.
        return False, float(attn_drop.p)
    if type(module).__module__.startswith("timm."):
        # timm modules that drop with the functional API on their own flag: `dropout_p=self.attn_drop_p if
        # self.training` (vision_transformer.py's parallel blocks), and `F.dropout(x, self.drop_rate,
        # self.training)` in the `forward_head` of ResNet, EfficientNet, MobileNetV3 and others.
        for name in ("attn_drop_p", "drop_rate"):
            rate = getattr(module, name, None)
            if isinstance(rate, int | float) and not isinstance(rate, bool) and rate > 0:
                return True, float(rate)
    return None


@dataclass
class MCDropoutSites:
    """What :func:`mc_dropout_sampling` switched to training mode.

    Attributes:
        sites: modules that draw random masks (``nn.Dropout``, ``nn.MultiheadAttention``, ``nn.LSTM``, ...).
        gates: modules switched only so that their dropout takes effect (``nn.TransformerEncoderLayer``,
            timm's fused ``Attention``).
        active: the modules whose call makes a forward pass random (a rate above 0): sites, and the gates that
            never call their dropout module (timm's fused attention).
    """

    sites: list[nn.Module] = field(default_factory=list)
    gates: list[nn.Module] = field(default_factory=list)
    active: list[nn.Module] = field(default_factory=list)


_MODULE_TRAIN = nn.Module.train
_MODULE_SETATTR = nn.Module.__setattr__

Named = list[tuple[str, nn.Module]]
"""``list(model.named_modules())``, taken once per call: each traversal hashes every module, and torchmetrics'
``Metric.__hash__`` hashes its states (measured about 3 ms a call on a zoo model with its metrics)."""


def _find_sites(named: Named, include_drop_path: bool) -> MCDropoutSites:
    found = MCDropoutSites()
    for _, module in named:
        kind = _classify(module, include_drop_path)
        if kind is None:
            continue
        is_site, rate = kind
        (found.sites if is_site else found.gates).append(module)
        if rate > 0:
            found.active.append(module)
    return found


def _is_drop_path(module: nn.Module) -> bool:
    return bool(_qualnames(module) & _DROP_PATH_LAYERS) or getattr(type(module), "mc_dropout_kind", None) == "drop_path"


def find_mc_dropout_sites(model: nn.Module, *, include_drop_path: bool = False) -> MCDropoutSites:
    """The dropout that :func:`mc_dropout_sampling` would switch on; raise when sampling would be pointless.

    Sampling needs at least one dropout with a rate above 0: with every rate 0 (timm builds ``nn.Dropout(p=0)``
    by default) all samples are the eval output, the mutual information is 0 and the cost is ``n_samples``
    forward passes for nothing. Call it before a long run (``MCDropoutEvaluation`` does at fit start).

    Args:
        model: the network.
        include_drop_path: count stochastic depth (timm's ``DropPath``, torchvision's ``StochasticDepth``) and
            ``DropBlock2d`` as dropout.

    Returns:
        The :class:`MCDropoutSites`.

    Raises:
        ValueError: if the model has no dropout to sample, or only dropout with rate 0; the message names
            ``include_drop_path=True`` when the model has drop-path layers with a rate above 0.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.0), nn.Linear(4, 2))
        >>> try:
        ...     find_mc_dropout_sites(net)
        ... except ValueError as error:
        ...     print(str(error).split(", so")[0][-25:])
        has rate 0 (1 layer: `1`)
    """
    return _checked_sites(model, list(model.named_modules()), include_drop_path)


def _checked_sites(model: nn.Module, named: Named, include_drop_path: bool) -> MCDropoutSites:
    found = _find_sites(named, include_drop_path)
    if found.active and found.sites:
        return found
    names = {id(module): name or type(model).__name__ for name, module in named}
    drop_paths = [m for _, m in named if _is_drop_path(m) and _rate(m) > 0] if not include_drop_path else []
    hint = (
        f" It has {len(drop_paths)} drop-path layer{'s' if len(drop_paths) > 1 else ''} with a rate above 0 "
        f"(e.g. `{names[id(drop_paths[0])]}`, {type(drop_paths[0]).__name__}): pass `include_drop_path=True` to sample "
        "them."
        if drop_paths
        else ""
    )
    if not found.sites:
        raise ValueError(
            f"Expected a model with dropout to sample for Monte-Carlo dropout, but {type(model).__name__} has no "
            f"dropout layer.{hint} Add dropout (e.g. `nn.Dropout(p)` before the classifier), or give your own "
            "layer the class attribute `mc_dropout_kind = 'dropout'`."
        )
    if not found.active:
        zero = found.sites
        listed = ", ".join(f"`{names[id(m)]}`" for m in zero[:3]) + (", ..." if len(zero) > 3 else "")
        raise ValueError(
            f"Expected a model with dropout to sample for Monte-Carlo dropout, but every dropout layer of "
            f"{type(model).__name__} has rate 0 ({len(zero)} layer{'s' if len(zero) > 1 else ''}: {listed}), so all "
            f"samples would be identical.{hint or ' Give a dropout layer a rate above 0.'}"
        )
    return found


def running_statistics(model: nn.Module) -> dict[str, Tensor]:
    """A copy of every normalization buffer (running mean, variance, batch count), by qualified name.

    Copies stay on the buffers' device: taking them never waits for the device.

    Example:
        >>> sorted(running_statistics(nn.Sequential(nn.BatchNorm1d(2))))
        ['0.num_batches_tracked', '0.running_mean', '0.running_var']
    """
    return _statistics(list(model.named_modules()))


def _statistics(named: Named, copy: bool = True) -> dict[str, Tensor]:
    stats: dict[str, Tensor] = {}
    for name, module in named:
        if isinstance(module, _NormBase) and module.track_running_stats:
            for buffer_name, buffer in module.named_buffers(recurse=False):
                if buffer is not None:
                    stats[f"{name}.{buffer_name}" if name else buffer_name] = (
                        buffer.detach().clone() if copy else buffer
                    )
    return stats


def _unchanged_and_finite(before: dict[str, Tensor], after: dict[str, Tensor]) -> bool:
    """Whether every statistic equals its copy in ``before`` and none is NaN, with a few ops per device and dtype.

    The common case, checked with one ``torch.equal`` per CPU buffer (no host sync to save there) and one
    concatenation per (device, dtype) of an accelerator, one sync per device; anything else (a change, a NaN, a
    buffer that appeared, vanished or changed its shape, device or dtype) returns False and is named by the
    per-buffer comparison.
    """
    if before.keys() != after.keys():
        return False
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
    for name, a in before.items():
        b = after[name]
        if a.shape != b.shape or a.device != b.device or a.dtype != b.dtype:
            return False
        if a.device.type == "cpu":  # NaN != NaN here too: a NaN takes the per-buffer path
            if not torch.equal(a, b):
                return False
        elif a.device.type != "meta":  # no values to compare on meta
            pair = groups.setdefault((a.device, a.dtype), ([], []))
            pair[0].append(a.reshape(-1))
            pair[1].append(b.reshape(-1))
    flags: dict[torch.device, list[Tensor]] = {}
    for (device, _), (olds, news) in groups.items():
        old, new = torch.cat(olds), torch.cat(news)
        bad = (old != new).any()  # NaN != NaN: a NaN (changed or not) takes the per-buffer path
        flags.setdefault(device, []).append(bad)
    return not any(torch.stack(bad).any().item() for bad in flags.values())  # one sync per device


def check_running_statistics(model: nn.Module, before: dict[str, Tensor], *, during: str) -> None:
    """Raise when a normalization buffer differs from ``before``; warn when some are NaN.

    NaN equals NaN here: statistics that were already NaN (BatchNorm overflowing under ``16-true``) did not change,
    and are reported as NaN instead. One host sync for all buffers together.

    Args:
        model: the network.
        before: :func:`running_statistics` taken earlier.
        during: what ran in between, for the message.

    Raises:
        RuntimeError: if a statistic changed (or a buffer appeared or vanished).

    Example:
        >>> bn = nn.BatchNorm1d(2)
        >>> before = running_statistics(bn)
        >>> check_running_statistics(bn, before, during="nothing")  # unchanged: silent
    """
    _check_statistics(model, list(model.named_modules()), before, during)


def _check_statistics(model: nn.Module, named: Named, before: dict[str, Tensor], during: str) -> None:
    after = _statistics(named, copy=False)
    if _unchanged_and_finite(before, after):
        return
    names = sorted(before.keys() | after.keys())
    missing = [name for name in names if name not in before or name not in after]
    common = [name for name in names if name in before and name in after]
    flags: dict[torch.device, list[tuple[str, Tensor]]] = {}  # per device: (name, [changed, has NaN])
    for name in common:
        a, b = before[name], after[name]
        if a.shape != b.shape or a.device != b.device:
            missing.append(name)
            continue
        if a.device.type == "meta":
            continue  # no values to compare
        same = a == b
        nan = a.isnan() if a.is_floating_point() else torch.zeros_like(a, dtype=torch.bool)
        if a.is_floating_point():
            same = same | (nan & b.isnan())
        flags.setdefault(a.device, []).append((name, torch.stack([~same.all(), nan.any()])))
    changed, nans = list(missing), []
    for entries in flags.values():
        values = torch.stack([flag for _, flag in entries]).tolist()  # one sync per device
        changed += [name for (name, _), (diff, _) in zip(entries, values, strict=True) if diff]
        nans += [name for (name, _), (_, nan) in zip(entries, values, strict=True) if nan]
    if changed:
        # One anchor (lightning-uq-box) puts BatchNorm in train mode during MC prediction, which silently
        # corrupts the running statistics: refuse to let that pass.
        raise RuntimeError(
            f"Running statistics changed during {during}: {changed}. Normalization layers must stay in eval mode "
            "while dropout is sampled; a module that switches them to training mode inside its forward pass cannot "
            "be sampled this way."
        )
    if nans:
        warnings.warn(
            f"Running statistics of {type(model).__name__} are NaN: {nans[:4]}{' ...' if len(nans) > 4 else ''}. "
            "They did not change during Monte-Carlo dropout, but every eval-mode prediction through them is NaN. "
            "BatchNorm statistics overflow in float16 (`precision='16-true'`): keep normalization in float32 "
            "(`precision='16-mixed'` or 'bf16-mixed'), then recalibrate them (`BNRecalibration`).",
            RuntimeWarning,
            stacklevel=2,
        )


def _row_mixing_layers(named: Named) -> list[nn.Module]:
    """Layers whose eval-mode output for one row depends on the other rows of the batch.

    A BatchNorm without running statistics (``track_running_stats=False``) normalizes with the statistics of the
    batch even in eval mode; a layer of your own says so with the class attribute ``mc_dropout_mixes_rows = True``.
    GroupNorm, LayerNorm and InstanceNorm are per row.
    """
    return [
        m
        for _, m in named
        if (isinstance(m, _BatchNorm) and m.running_mean is None and m.running_var is None)
        or getattr(type(m), "mc_dropout_mixes_rows", False) is True
    ]


@contextlib.contextmanager
def mc_dropout_sampling(
    model: nn.Module, *, include_drop_path: bool = False, check_statistics: bool = True
) -> Iterator[MCDropoutSites]:
    """Put exactly the model's dropout into sampling mode and everything else into eval mode.

    Sampled: ``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``, ``FeatureAlphaDropout`` and every other
    ``_DropoutNd`` (our ``LockedDropout``), our ``WeightDrop``, the attention dropout of
    ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``/``DecoderLayer``, the between-layer dropout of
    ``nn.LSTM``/``GRU``/``RNN``, timm's fused ``Attention`` and the ``drop_rate`` head dropout of timm's
    ResNet/EfficientNet-style models; stochastic depth (timm's ``DropPath``, torchvision's ``StochasticDepth``)
    and ``DropBlock2d`` only with ``include_drop_path`` (stochastic depth is not dropout sampling). A layer of
    your own opts in with a class attribute ``mc_dropout_kind = "dropout"`` (or ``"drop_path"``). Dropout written
    as ``F.dropout(x, training=self.training)`` inside another module is not found.

    BatchNorm and every other module stay in eval mode, so running statistics never change; on exit every
    module's mode is restored and the running statistics are checked to be unchanged.

    Args:
        model: the network; its modes are changed inside the block and restored after it.
        include_drop_path: also sample stochastic depth and ``DropBlock2d``.
        check_statistics: compare the running statistics before and after the block (one host sync); a caller
            that samples many batches checks once around all of them instead (:func:`check_running_statistics`).

    Yields:
        The :class:`MCDropoutSites` switched on.

    Raises:
        ValueError: if the model has no dropout that can be sampled, or only dropout with rate 0.
        RuntimeError: if a running statistic changed inside the block.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
        >>> with mc_dropout_sampling(net) as found:
        ...     [type(m).__name__ for m in found.sites], net[1].training, net[2].training
        (['Dropout'], False, True)
        >>> net.training, net[2].training
        (True, True)
    """
    with _sampling(model, list(model.named_modules()), include_drop_path, check_statistics) as found:
        yield found


@contextlib.contextmanager
def _sampling(
    model: nn.Module, named: Named, include_drop_path: bool, check_statistics: bool
) -> Iterator[MCDropoutSites]:
    found = _checked_sites(model, named, include_drop_path)
    stats = _statistics(named) if check_statistics else None
    with _eval_mode(model, named):
        # these modules only: their children keep their eval mode
        _set_modes((module, True) for module in (*found.sites, *found.gates))
        yield found
    if stats is not None:
        _check_statistics(model, named, stats, "Monte-Carlo dropout sampling")


def _set_modes(modes: Iterable[tuple[nn.Module, bool]]) -> None:
    """Set each module's ``training`` flag; straight into its ``__dict__`` unless its class has a ``__setattr__``."""
    for module, mode in modes:
        if type(module).__setattr__ is _MODULE_SETATTR:
            # what `nn.Module.__setattr__` does for a flag (it is no parameter, buffer or submodule), without its
            # lookups: measured a fifth of the time spent entering and leaving the sampler on zoo cnn_small
            module.__dict__["training"] = mode
        else:
            module.training = mode


def _eval(model: nn.Module, named: Named) -> None:
    """``model.eval()``: flag by flag when no module overrides ``train`` (no recursion, no module hashing)."""
    if any(type(module).train is not _MODULE_TRAIN for _, module in named):
        model.eval()
    else:
        _set_modes((module, False) for _, module in named)


@contextlib.contextmanager
def _eval_mode(model: nn.Module, named: Named) -> Iterator[None]:
    """Every module in eval mode inside the block; each module's own mode restored after it."""
    # (module, mode) pairs, not a dict: torchmetrics' `Metric.__hash__` hashes its states
    modes = [(module, module.training) for _, module in named]
    _eval(model, named)
    try:
        yield
    finally:
        _set_modes(modes)


@contextlib.contextmanager
def _rng_from(generator: torch.Generator | None, device: torch.device) -> Iterator[None]:
    """Run the block on a global RNG seeded from ``generator``, leaving the global stream untouched.

    torch's dropout kernels draw from the global (CPU or device) RNG and take no ``torch.Generator``. To honour
    ``generator`` we save the global RNG of the CPU and of ``device`` (``global_rng_forked``), seed both from one
    draw of ``generator`` (drawn on the generator's own device, whatever the inputs' device), and restore them
    afterwards: results are a function of the generator's state. ``mps`` has a module-level RNG
    (``torch.mps.manual_seed``); indexed accelerators seed the inputs' device index.
    """
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    with global_rng_forked(device):
        torch.default_generator.manual_seed(seed)
        if device.type in ("cpu", "meta"):
            yield
        elif device.type == "mps":
            torch.mps.manual_seed(seed)
            yield
        else:
            module, index = accelerator_index(device)
            with module.device(index):
                module.manual_seed(seed)  # seeds the current device: the one the inputs' kernels draw from
                yield


@dataclass(frozen=True)
class MCDropoutPrediction:
    """Monte-Carlo dropout samples and the uncertainty read from them.

    Attributes:
        probs: class probabilities of each sample ``(n_samples, N, K)``.
        method: how they were drawn: ``"cached"`` (trunk once, head sampled), ``"batched"`` (inputs repeated
            along the batch) or ``"naive"`` (``n_samples`` forward passes).
        deterministic_probs: the eval-mode probabilities ``(N, K)`` when asked for with ``deterministic=True``.

    Example:
        >>> import torch
        >>> probs = torch.tensor([[[0.9, 0.1]], [[0.1, 0.9]]])  # 2 samples that disagree on 1 input
        >>> pred = MCDropoutPrediction(probs, method="naive")
        >>> pred.mean_probs
        tensor([[0.5000, 0.5000]])
        >>> bool(pred.mutual_information > 0.3)  # disagreement between samples: epistemic uncertainty
        True
    """

    probs: Tensor
    method: str
    deterministic_probs: Tensor | None = None

    @property
    def mean_probs(self) -> Tensor:
        """The predictive distribution: the mean of the sampled probabilities ``(N, K)``."""
        return self.probs.mean(dim=0)

    @property
    def predictive_entropy(self) -> Tensor:
        """Entropy of the mean prediction ``(N,)``: total uncertainty."""
        return entropy(self.mean_probs)

    @property
    def expected_entropy(self) -> Tensor:
        """Mean over samples of each sample's entropy ``(N,)``: the aleatoric part."""
        return entropy(self.probs).mean(dim=0)

    @property
    def mutual_information(self) -> Tensor:
        """Predictive minus expected entropy ``(N,)`` (BALD): the epistemic part, clamped at 0 against rounding."""
        return (self.predictive_entropy - self.expected_entropy).clamp_min(0.0)


class _RandomInTrunkError(Exception):
    """Raised by a forward hook when a sampled dropout runs inside the trunk: the features cannot be cached."""


_log = logging.getLogger(__name__)

Inputs = Tensor | ForwardInputs | Callable[[nn.Module], Tensor]
"""What :func:`mc_dropout_predict` samples: a tensor (the one argument of ``model``), the arguments of
``model.forward`` (:class:`~lightning_reg.forward.ForwardInputs`), or ``fn(model) -> logits``."""


def _split(
    model: nn.Module, found: MCDropoutSites, inputs: ForwardInputs, named: Named
) -> tuple[Callable[[], Any], Callable[..., Any]] | None:
    """``(trunk, head)`` with ``model(*inputs) == head(trunk())``, or ``None`` when the model offers no split."""
    forward_features = getattr(model, "forward_features", None)
    forward_head = getattr(model, "forward_head", None)
    if callable(forward_features) and callable(forward_head):
        # the timm convention; zoo models follow it. Every argument of `forward` goes to the trunk (lengths, masks).
        reason = _features_head_reason(model, forward_features, forward_head, inputs, named)
        if reason is None:
            return (lambda: inputs(forward_features)), forward_head
        _log.debug(
            "Monte-Carlo dropout: not using forward_features/forward_head of %s: %s", type(model).__name__, reason
        )
    if isinstance(model, nn.Sequential) and len(inputs.args) == 1 and not inputs.kwargs:
        active = set(found.active)
        first = next((i for i, child in enumerate(model) if any(m in active for m in child.modules())), 0)
        if first > 0:
            trunk, head = model[:first], model[first:]  # split just before the first dropout
            return (lambda: trunk(inputs.args[0])), head
    return _fx_split(model, found, inputs, named)


# Per model: whether `forward` is `forward_head(forward_features(...))`, checked once (see `_features_head_reason`).
_CONVENTION: weakref.WeakKeyDictionary[nn.Module, tuple[Any, str | None]] = weakref.WeakKeyDictionary()


def _features_head_reason(
    model: nn.Module, forward_features: Callable[..., Any], forward_head: Callable[..., Any], inputs: ForwardInputs,
    named: Named,
) -> str | None:  # fmt: skip
    """Why ``forward_head(forward_features(*inputs))`` may not be ``model(*inputs)``, or ``None`` when it is.

    Having the two methods is a convention, not a proof: a ``forward`` that divides by a temperature, takes arguments
    ``forward_features`` does not, or draws in its trunk (``F.dropout(x, training=True)``) would be sampled wrongly.
    So the first call per model (and per class, instance ``forward``, hooks and argument names) compares both in eval
    mode on its batch, on a forked RNG (the draws stay the naive loop's); a difference makes it take the other paths.
    """
    own = vars(model)
    key = (
        type(model), own.get("forward"), own.get("forward_features"), own.get("forward_head"),
        len(model._forward_hooks), len(model._forward_pre_hooks), len(inputs.args), tuple(sorted(inputs.kwargs)),
    )  # fmt: skip
    known = _CONVENTION.get(model)
    if known is not None and known[0] == key:
        return known[1]
    reason: str | None
    try:
        inspect.signature(forward_features).bind(*inputs.args, **inputs.kwargs)
        bound = True
    except (TypeError, ValueError) as error:
        reason, bound = f"`forward_features` does not take the arguments of `forward` ({error})", False
    if bound:  # `model(...)`, with its hooks and an instance `forward` (TemperatureScaling patches both methods)
        device = inputs.tensors()[0].device
        with global_rng_forked(device), _eval_mode(model, named):
            expected = _logits_of(inputs(model), None)
            got = _logits_of(forward_head(inputs(forward_features)), None)
        same = got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-4, atol=1e-6, equal_nan=True)
        reason = None if same else "`forward_head(forward_features(x))` differs from `forward(x)` in eval mode"
    if reason is not None:
        _log.info(
            "Monte-Carlo dropout: %s: %s; sampling the traced graph or the whole model.", type(model).__name__, reason
        )
    _CONVENTION[model] = (key, reason)
    return reason


# Functions that draw random numbers when traced as graph nodes: what depends on them is not deterministic.
_RANDOM_FUNCTIONS = frozenset(
    {
        torch.nn.functional.dropout,
        torch.nn.functional.dropout1d,
        torch.nn.functional.dropout2d,
        torch.nn.functional.dropout3d,
        torch.nn.functional.alpha_dropout,
        torch.nn.functional.feature_alpha_dropout,
        torch.bernoulli,
        torch.rand,
        torch.rand_like,
        torch.randn,
        torch.randn_like,
        torch.randint,
        torch.randint_like,
        torch.randperm,
        torch.multinomial,
        torch.normal,
    }
)
# Traced graphs per model, keyed by the modules that were active (a different set needs a different split).
_FX_SPLITS: weakref.WeakKeyDictionary[nn.Module, tuple[Any, Any, Any]] = weakref.WeakKeyDictionary()


class _Prefix(nn.Module):
    """The deterministic prefix of a traced model and the stochastic rest, as two graph modules."""

    def __init__(self, prefix: nn.Module, suffix: nn.Module, copied: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.prefix, self.suffix = prefix, suffix
        self.copied = copied  # frontier values a sampled in-place dropout changes: each sample gets its own copy


_INPLACE_FUNCTIONS = frozenset(
    {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ipow, operator.setitem}
)
_VIEW_METHODS = frozenset(
    {
        "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose", "permute", "narrow",
        "select", "squeeze", "unsqueeze", "expand", "expand_as", "t", "split", "chunk", "unbind", "__getitem__",
        "as_strided", "detach", "contiguous",
    }
)  # fmt: skip
_VIEW_FUNCTIONS = frozenset(
    {
        torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze, torch.narrow,
        torch.select, torch.split, torch.chunk, torch.unbind, torch.t, torch.detach, operator.getitem,
    }
)  # fmt: skip


def _mutates_first_argument(model: nn.Module, node: Any) -> bool:
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        trailing = name.endswith("_") and not name.endswith("__")  # torch.relu_, torch.sigmoid_, torch.add_ ...
        return node.target in _INPLACE_FUNCTIONS or trailing or bool(node.kwargs.get("inplace", False))
    if node.op == "call_module":
        return bool(getattr(model.get_submodule(str(node.target)), "inplace", False))
    return False


def _bases(node: Any) -> Iterator[Any]:
    """``node`` and, through view-like operations, the nodes whose memory it may share."""
    while True:
        yield node
        viewing = (node.op == "call_method" and node.target in _VIEW_METHODS) or (
            node.op == "call_function" and node.target in _VIEW_FUNCTIONS
        )
        if not viewing or not node.args or not hasattr(node.args[0], "op"):
            return
        node = node.args[0]


def _trace_split(model: nn.Module, found: MCDropoutSites) -> _Prefix | str:
    """Split ``model``'s ``torch.fx`` graph at its stochastic nodes, or the reason why it cannot be split."""
    import torch.fx as fx

    active = set(found.active)
    stochastic_modules = {m for m in model.modules() if any(sub in active for sub in m.modules())}

    class Tracer(fx.Tracer):
        def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
            # A module that holds sampled dropout stays one node (its own code decides what it draws).
            return (
                module in active
                or (module in found.gates and module in stochastic_modules)
                or (super().is_leaf_module(module, qualified_name))
            )

    if "forward" in vars(model) or model._forward_hooks or model._forward_pre_hooks:
        # torch.fx traces the class's `forward` and drops the instance's own (TemperatureScaling's division by T)
        # and the root's forward hooks: the graph would not be what `model(...)` computes.
        return f"{type(model).__name__} has an instance-level `forward` or forward hooks, which torch.fx does not trace"
    try:
        graph = Tracer().trace(model)
    except Exception as error:  # any tracing failure means: no split, take the other paths
        return f"torch.fx could not trace {type(model).__name__} ({type(error).__name__}: {error})"
    random_nodes = set()
    for node in graph.nodes:
        sampled = node.op == "call_module" and model.get_submodule(str(node.target)) in stochastic_modules
        if sampled or (node.op == "call_function" and node.target in _RANDOM_FUNCTIONS):
            random_nodes.add(node)
        elif any(arg in random_nodes for arg in node.all_input_nodes) and node.op != "output":
            random_nodes.add(node)  # depends on a draw
    if not random_nodes:
        return "no sampled dropout in the traced graph"
    called = {str(node.target) for node in graph.nodes if node.op == "call_module"}
    for name, module in model.named_modules():
        if name and (module._forward_hooks or module._forward_pre_hooks) and name not in called:
            # torch.fx runs the hooks of the modules it keeps as calls only; it traces through the others' forward
            return f"`{name}` has forward hooks, which torch.fx drops when it traces through the module"
    output = next(node for node in graph.nodes if node.op == "output")
    frontier = [
        node
        for node in graph.nodes
        if node not in random_nodes
        and node.op != "output"
        and any(user in random_nodes or user is output for user in node.users)
    ]
    if all(node.op in ("placeholder", "get_attr") for node in frontier):
        first = next(node for node in graph.nodes if node in random_nodes)
        what = f"`{first.target}` ({type(model.get_submodule(str(first.target))).__name__})" if (
            first.op == "call_module"
        ) else f"`{first.name}`"  # fmt: skip
        return f"the first sampled node, {what}, reads the inputs directly: nothing to run once"
    # The graph does not record what an in-place operation changes: one on a value that the sampled part reads (or
    # on a view of it) would make that value differ between the prefix-once run and the naive loop. Refuse.
    # One exception, torchvision's `Dropout(inplace=True)` heads (MobileNet, EfficientNet): a sampled dropout that
    # changes a frontier value in place, read by nothing in the prefix after it and sharing memory with no other
    # frontier value, is exact when each sample gets its own copy of that value.
    shared = set(frontier)
    order = {node: i for i, node in enumerate(graph.nodes)}
    copied: set[Any] = set()
    for node in graph.nodes:
        mutating = node.args and hasattr(node.args[0], "op") and _mutates_first_argument(model, node)
        hit = [base for base in _bases(node.args[0]) if base in shared] if mutating else []
        if not hit:
            continue
        target = node.args[0]
        alone = hit == [target] and not any(o is not target and target in set(_bases(o)) for o in frontier)
        unread = all(u is node or u in random_nodes or order[u] < order[node] for u in target.users)
        if node in random_nodes and alone and unread:
            copied.add(target)
            continue
        return f"the in-place operation `{node.name}` changes `{target.name}`, which the sampled part reads"
    prefix_graph, suffix_graph = fx.Graph(), fx.Graph()
    env: dict[Any, Any] = {}
    for node in graph.nodes:
        if node not in random_nodes and node.op != "output":
            env[node] = prefix_graph.node_copy(node, lambda n: env[n])
    prefix_graph.output(tuple(env[node] for node in frontier))
    env = {node: suffix_graph.placeholder(f"frontier_{i}") for i, node in enumerate(frontier)}
    for node in graph.nodes:
        if node in random_nodes or node.op == "output":
            env[node] = suffix_graph.node_copy(node, lambda n: env[n])
    copies = tuple(i for i, node in enumerate(frontier) if node in copied)
    return _Prefix(fx.GraphModule(model, prefix_graph), fx.GraphModule(model, suffix_graph), copies)


_PLAIN = (bool, int, float, str, type(None))


def _snapshot(value: Any, depth: int = 2) -> Any:
    """A comparable copy of what a trace may have baked in from ``value``; ``_OPAQUE`` for what it cannot copy.

    Plain values; a tensor attribute by identity (fx stores it as a constant); and, ``depth`` levels down, tuples,
    lists and dicts of up to 8 plain values (``self.scales[0]``; a growing list of step outputs or tensors is data,
    not configuration, and would retrace the graph every batch) and the fields of a config-like object holding no
    other object (``self.cfg.scale``, HF's ``self.config``; not the Trainer a LightningModule holds, whose loops'
    counters move every batch).
    """
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, Tensor):
        return ("tensor", id(value))
    if depth <= 0:
        return _OPAQUE
    if isinstance(value, tuple | list | dict):
        items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
        if len(items) > 8 or not all(isinstance(k, _PLAIN) and isinstance(v, _PLAIN) for k, v in items):
            return _OPAQUE
        return (type(value).__name__, tuple(items))
    if not isinstance(value, nn.Module | type) and not callable(value) and hasattr(value, "__dict__"):
        fields = tuple((k, _snapshot(v, depth - 1)) for k, v in vars(value).items())
        if all(not (isinstance(v, tuple) and v[:1] == ("object",)) for _, v in fields):
            return ("object", id(value), fields)
    return _OPAQUE


_OPAQUE = ("opaque",)
_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # `_parameters`, `_modules`, the hook dicts, `training`, ...


def _trace_key(module: nn.Module) -> tuple[Any, ...]:
    """What a traced graph of ``module`` depends on besides its submodules: identity, attributes, hook counts."""
    baked = tuple((k, _snapshot(v)) for k, v in vars(module).items() if k not in _MODULE_INTERNALS)
    return id(module), module.training, baked, len(module._forward_hooks), len(module._forward_pre_hooks)


def _graph_tensors(model: nn.Module, split: _Prefix) -> tuple[tuple[str, Any], ...]:
    """``(target, tensor)`` of every parameter or buffer the graphs hold as attributes (``get_attr`` nodes).

    ``fx.GraphModule`` copies these references when it is built: a tensor replaced later on the model
    (``load_state_dict(assign=True)``, ``model.mean = ...``) would be stale in the graph, so the split is retraced.
    """
    held = []
    for graph_module in (split.prefix, split.suffix):
        for node in graph_module.graph.nodes:  # type: ignore[union-attr]
            if node.op == "get_attr":
                try:
                    held.append((str(node.target), operator.attrgetter(str(node.target))(model)))
                except AttributeError:  # a constant fx made of a tensor attribute: `_trace_key` holds its identity
                    continue
    return tuple(held)


def _tensors_current(model: nn.Module, held: tuple[tuple[str, Any], ...]) -> bool:
    getter = operator.attrgetter
    try:
        return all(getter(target)(model) is tensor for target, tensor in held)
    except AttributeError:
        return False


def _fx_split(
    model: nn.Module, found: MCDropoutSites, inputs: ForwardInputs, named: Named
) -> tuple[Callable[[], Any], Callable[..., Any]] | None:
    """The deterministic prefix of any traceable module, run once; the stochastic rest sampled (issue 19).

    ``torch.fx`` traces the model with the sampled dropout as leaf nodes; every node that depends on a draw is
    stochastic, the others are the prefix, and the prefix values the stochastic nodes read (the *frontier*: the
    input of a head dropout, the identity of a skip connection around it) are computed once per batch. The rest
    is sampled one sample of ``N`` rows per pass, in the naive loop's order: the same draws as the naive loop.
    """
    # The graph holds references to the submodules and has the Python control flow of the trace baked in (`if
    # self.flag:` is traced for the flag's value then): retrace when a submodule, a plain attribute of one, its hooks
    # or the sampled set changed.
    key = (tuple(_trace_key(m) for _, m in named), frozenset(id(m) for m in found.active))
    cached = _FX_SPLITS.get(model)
    if cached is None or cached[0] != key or not _tensors_current(model, cached[2]):
        traced = _trace_split(model, found)
        cached = (key, traced, () if isinstance(traced, str) else _graph_tensors(model, traced))
        _FX_SPLITS[model] = cached
    split = cached[1]
    if isinstance(split, str):
        _log.debug("Monte-Carlo dropout: no deterministic prefix for %s: %s", type(model).__name__, split)
        return None
    frontier_holder: list[tuple[Any, ...]] = []

    def trunk() -> Any:
        try:
            # `forward`, not `__call__`: fx's call wrapper prints a traceback to stderr for an error we handle
            frontier_holder[:] = [inputs(split.prefix.forward)]
        except _RandomInTrunkError:
            raise
        except Exception as error:  # e.g. traced for an argument this call leaves out: no prefix
            _log.debug("Monte-Carlo dropout: the traced prefix of %s failed (%s)", type(model).__name__, error)
            return None
        return _FRONTIER

    def head(_: Any) -> Any:
        values = frontier_holder[0]
        if split.copied:
            values = tuple(v.clone() if i in split.copied else v for i, v in enumerate(values))
        return split.suffix.forward(*values)

    return trunk, head


_FRONTIER = object()  # the trunk's output on the fx path: the frontier lives in the closure, not in a tensor


def _features(trunk: Callable[[], Any], found: MCDropoutSites) -> Any | None:
    """The trunk's output, or ``None`` as soon as a sampled dropout runs inside it (then it is random)."""

    def hook(module: nn.Module, args: Any) -> None:
        raise _RandomInTrunkError

    handles = [module.register_forward_pre_hook(hook) for module in found.active]
    try:
        return trunk()
    except _RandomInTrunkError:
        return None
    finally:
        for handle in handles:
            handle.remove()


def _logits_of(output: Any, rows: int | None) -> Tensor:
    if isinstance(output, Tensor) and output.ndim == 2 and output.shape[1] == 1:
        raise ValueError(
            f"Expected logits of shape (N, num_classes) with num_classes >= 2, but got shape {tuple(output.shape)}: "
            "a softmax over one logit is always 1, so every sample would have confidence 1 and mutual information 0. "
            "For a binary sigmoid head return two logits, `torch.cat([torch.zeros_like(z), z], dim=1)`, whose "
            "softmax is `[1 - sigmoid(z), sigmoid(z)]` (in a `forward_fn` of the callback, or in the model)."
        )
    if not isinstance(output, Tensor) or output.ndim != 2 or (rows is not None and output.shape[0] != rows):
        got = f"shape {tuple(output.shape)}" if isinstance(output, Tensor) else type(output).__name__
        raise ValueError(
            f"Expected the model to return logits of shape ({rows if rows is not None else 'N'}, num_classes), but "
            f"got {got}. Wrap the model so that its forward returns a logits tensor."
        )
    return output


# Rows per forward pass on the batched path when `chunk_size` is None (see `mc_dropout_predict`).
_AUTO_BATCHED_ROWS = 256
# Feature elements per head call on the cached path when `chunk_size` is None: small features take several samples
# per call (zoo cnn_small, 64 features, batch 256, one thread: 2048 rows per call 1.55x one eval pass, 256 rows 1.62x,
# 7680 rows 1.70x); features of 512 or more per row keep one sample of N rows per call.
_AUTO_CACHED_ELEMENTS = 2**17


def _take_rows(inputs: ForwardInputs, rows: Tensor, n: int) -> ForwardInputs:
    """``inputs`` with every batched tensor argument (first dimension ``n``) indexed by ``rows``; others as they are.

    Lengths ``(N,)`` and masks ``(N, T)`` follow their rows; a tensor shared by the batch (a ``(T, T)`` causal mask,
    a scalar) is passed as it is. Each tensor is indexed on its own device (lengths often live on the CPU).
    """
    on_device: dict[torch.device, Tensor] = {rows.device: rows}

    def take(t: Tensor) -> Tensor:
        if t.ndim == 0 or t.shape[0] != n:
            return t
        if t.device not in on_device:
            on_device[t.device] = rows.to(t.device)
        return _index_rows(t, on_device[t.device])

    return inputs.map(take)


def _index_rows(t: Tensor, index: Tensor) -> Tensor:
    """``t.index_select(0, index)``, also for the compressed sparse layouts (CSR, CSC, BSR, BSC), which lack it."""
    if t.layout in (torch.strided, torch.sparse_coo):
        return t.index_select(0, index)
    blocksize = tuple(t.values().shape[1:3]) if t.layout in (torch.sparse_bsr, torch.sparse_bsc) else None
    return t.to_sparse_coo().index_select(0, index).to_sparse(layout=t.layout, blocksize=blocksize)


def _repeat_rows(inputs: ForwardInputs, k: int, n: int) -> ForwardInputs:
    """``inputs`` with every batched tensor argument (first dimension ``n``) stacked ``k`` times; others as they are.

    The rows of ``_take_rows(inputs, arange(k * n) % n, n)``, without building and gathering an index (measured
    on (256, 64) features, one thread: 15 against 24 us a call).
    """

    def take(t: Tensor) -> Tensor:
        if t.ndim == 0 or t.shape[0] != n:
            return t
        if t.layout != torch.strided:  # sparse tensors cannot be expanded
            return _index_rows(t, torch.arange(k * n, device=t.device) % n)
        if k == 1:  # reshape would return `t` itself: a copy, as a gather gives, so no layer writes into the batch
            return t.clone()
        return t.unsqueeze(0).expand(k, *t.shape).reshape(k * n, *t.shape[1:])

    return inputs.map(take)


def _sample_rows(
    fn: Callable[..., Any], x: ForwardInputs, n: int, n_samples: int, chunk_size: int | None, *, fresh: bool = False
) -> Tensor:
    """``fn`` on ``n_samples`` copies of ``x`` stacked along the batch, ``chunk_size`` rows at a time.

    With ``fresh``, a pass of one sample gets its own copy of ``x`` too, not ``x`` itself: cached features must
    reach every sample as computed, also when the head writes into its input (``nn.Dropout(inplace=True)``).

    Row ``r`` of the stacked input is sample ``r // N`` of item ``r % N``. Every mask torch's dropout layers
    draw is independent per batch row (elementwise for ``Dropout``/``AlphaDropout``, per row and channel for
    ``Dropout1d/2d/3d``/``FeatureAlphaDropout``, per row, head and position for attention dropout, per row for
    locked dropout and row-mode drop path), and in eval mode no other layer mixes rows (BatchNorm uses its running
    statistics; a layer that mixes rows forces ``chunk_size=N`` in :func:`mc_dropout_predict`). So each copy draws
    its own mask, independent of the others: the same distribution as ``n_samples`` separate forward passes. A mask
    shared across the batch (``WeightDrop``'s DropConnect, ``StochasticDepth(mode="batch")``) is sampled with
    ``method="naive"`` instead.
    """
    total = n_samples * n
    step = total if chunk_size is None else chunk_size
    if step == n:  # one sample per pass: the rows are `x` itself (or a copy of it), no gather needed
        return torch.stack([_logits_of((_repeat_rows(x, 1, n) if fresh else x)(fn), n) for _ in range(n_samples)])
    device = x.tensors()[0].device
    outputs = []
    for start in range(0, total, step):
        stop = min(start + step, total)
        if start % n == 0 and (stop - start) % n == 0:  # whole copies of the batch
            chunk = _repeat_rows(x, (stop - start) // n, n)
        else:
            chunk = _take_rows(x, torch.arange(start, stop, device=device) % n, n)  # the item of each row
        with samples_per_call((stop - start) / n):  # `masks="auto"` decides as the naive loop's call of N rows does
            outputs.append(_logits_of(chunk(fn), stop - start))  # (rows, K)
    return torch.cat(outputs).view(n_samples, n, -1)  # (S, N, K)


# Below this many classes torch's CPU softmax over the last dimension measured 4-10x slower than over the first,
# one thread (logits (30, 256, 10): 1.53 ms against 0.20 ms; 2 classes 0.43 against 0.05; 16 classes 0.24 against 0.32).
_SOFTMAX_FIRST_BELOW = 16


def _softmax(logits: Tensor) -> Tensor:
    """Float softmax over the last dimension (the classes); on the CPU, few classes are moved first for speed."""
    logits = logits.float()
    if logits.device.type == "cpu" and logits.shape[-1] < _SOFTMAX_FIRST_BELOW:
        return logits.movedim(-1, 0).contiguous().softmax(0).movedim(0, -1).contiguous()
    return logits.softmax(dim=-1)


def _log_draw_order(found: MCDropoutSites, rows: int, n: int, n_samples: int) -> None:
    """Say (DEBUG) when stacked samples draw the naive loop's distribution but not its draws."""
    if n_samples > 1 and rows > n and len(found.active) > 1:
        _log.debug(
            "Monte-Carlo dropout: %d sampled layers and %d rows a pass for batches of %d: several samples share each "
            "pass, so each layer draws for all of them at once, the naive loop's distribution but not its draws "
            "(pass chunk_size=%d or method='naive' for those).",
            len(found.active), rows, n, n,
        )  # fmt: skip


def _per_call_masks(found: MCDropoutSites) -> bool:
    """Whether a site draws one mask per call shared by all batch rows (then rows are not independent)."""
    return any(
        _qualnames(m) & _OWN_DROPOUT_LAYERS or (getattr(m, "mode", None) == "batch" and _is_drop_path(m))
        for m in found.active
    )


def mc_dropout_predict(
    model: nn.Module,
    inputs: Inputs,
    n_samples: int,
    *,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    include_drop_path: bool = False,
    method: Method = "auto",
    deterministic: bool = False,
    check_statistics: bool = True,
    masks: Masks = "auto",
) -> MCDropoutPrediction:
    """Monte-Carlo dropout prediction: ``n_samples`` stochastic forward passes with only dropout sampled.

    The model maps ``inputs`` (batch first) to logits ``(N, K)``, ``K >= 2``. ``inputs`` is a tensor, the
    arguments of ``model.forward`` as a :class:`~lightning_reg.forward.ForwardInputs` (sequence lengths, attention
    masks: see :func:`lightning_reg.forward.batch_inputs`), or a function ``fn(model) -> logits`` that computes the
    logits itself (then only the naive loop can sample it). With ``method="auto"`` the cheapest exact path is
    taken:

    - when the model has ``forward_features``/``forward_head`` (the timm convention; zoo models do) and no
      sampled dropout runs inside ``forward_features(*args, **kwargs)``, the features are computed once and only
      the head is sampled; for an ``nn.Sequential`` the split is just before the first dropout module
      (``"cached"``);
    - otherwise every batched tensor argument is repeated ``n_samples`` times along the batch dimension,
      ``chunk_size`` rows per forward pass (``"batched"``).

    Every path gives the distribution of the naive loop (``method="naive"``); the cached path gives its very draws
    (the same probabilities for the same generator) when it samples one sample per call (``chunk_size=N``, the
    ``torch.fx`` prefix, or ``N >= 256`` with features of 512 elements or more a row), or with threshold masks
    and one dropout in the head. See the MC
    dropout page of the docs for layers that mix rows and masks shared by the batch.

    Args:
        model: the network, in any mode: modes are restored after sampling (see :func:`mc_dropout_sampling`).
        inputs: the batch: a tensor ``(N, ...)``, a ``ForwardInputs``, or ``fn(model) -> logits``.
        n_samples: number of Monte-Carlo samples, at least 1.
        generator: makes the draws a function of its state and leaves the global RNG untouched (torch's dropout
            draws from the global RNG, so it is forked and seeded from this generator). ``None`` draws from the
            global RNG as a training forward pass would (reproducible under ``seed_everything``).
        chunk_size: the most rows (copies of input items) per forward pass on the batched path, or per head
            call on the cached path, to cap memory. ``None``: ``max(N, 256)`` rows at a time, so small batches
            share a call and batches of 256 or more take one sample per call; on the cached path also up to 2**17
            feature elements per call (measured: see the MC dropout page of the docs).
        include_drop_path: also sample stochastic depth (timm's ``DropPath``, torchvision's ``StochasticDepth``)
            and ``DropBlock2d``.
        method: ``"auto"``, ``"batched"`` (never cache) or ``"naive"`` (the reference loop).
        deterministic: also return the eval-mode probabilities in ``deterministic_probs`` (computed from the
            cached features when the cached path is taken, at no extra trunk pass).
        check_statistics: check that no running statistic changed (one host sync per call); see
            :func:`mc_dropout_sampling`.
        masks: the masks of torch's ``Dropout``/``Dropout1d/2d/3d`` while sampling: ``"threshold"`` (32-bit
            random integers against a threshold, :func:`~lightning_reg.functional.mc_masks.threshold_dropout`;
            the same distribution, measured about 2x faster than torch's on the CPU), ``"torch"`` (torch's own),
            or ``"auto"``: ``"threshold"`` on the CPU for inputs of 4096 elements or more a sample, ``"torch"``
            elsewhere.
            Other dropout keeps torch's.

    Returns:
        An :class:`MCDropoutPrediction`.

    Raises:
        ValueError: for ``n_samples < 1``, a bad ``chunk_size``, ``method`` or ``masks``, a model without dropout (or
            with every rate 0), or a model that does not return ``(N, K)`` logits with ``K >= 2``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
        >>> out = mc_dropout_predict(net, torch.randn(5, 4), 20, generator=torch.Generator().manual_seed(0))
        >>> out.method, tuple(out.probs.shape), tuple(out.mean_probs.shape), tuple(out.mutual_information.shape)
        ('cached', (20, 5, 3), (5, 3), (5,))
        >>> bool((out.mutual_information >= 0).all())
        True
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"Expected `n_samples` to be an int >= 1, but got {n_samples!r}.")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(
            f"Expected `chunk_size` to be None (all rows at once) or an int >= 1, but got {chunk_size!r}. "
            "It is the most input rows per forward pass."
        )
    if method not in _METHODS:
        raise ValueError(f"Expected `method` to be one of {_METHODS}, but got {method!r}.")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"Expected `generator` to be a torch.Generator or None, but got {type(generator).__name__}: for a seed, "
            "pass `torch.Generator().manual_seed(seed)`."
        )
    forward_inputs: ForwardInputs | None
    if isinstance(inputs, Tensor):
        forward_inputs = ForwardInputs((inputs,), {})
    elif isinstance(inputs, ForwardInputs):
        forward_inputs = inputs
    elif callable(inputs):
        forward_inputs = None
    else:
        raise TypeError(
            "Expected `inputs` to be a tensor, a `ForwardInputs` or a function `fn(model) -> logits`, but got "
            f"{type(inputs).__name__}."
        )
    n: int | None = None
    device = torch.device("cpu")
    if forward_inputs is not None:
        tensors = forward_inputs.tensors()
        if not tensors or tensors[0].ndim < 1 or tensors[0].shape[0] == 0:
            got = f"shape {tuple(tensors[0].shape)}" if tensors else "no tensor"
            hint = (
                " A dict batch goes in as keyword arguments, `ForwardInputs((), batch)`, or pass `fn(model) -> logits`."
                if not tensors
                else ""
            )
            raise ValueError(f"Expected `inputs` to hold a non-empty tensor with the batch first, but got {got}.{hint}")
        n, device = int(tensors[0].shape[0]), tensors[0].device
    else:
        device = next((p.device for p in model.parameters()), device)
    mask_source = resolve_masks(masks, device)
    named = list(model.named_modules())  # one traversal for the whole call

    def forward() -> Tensor:
        if forward_inputs is None:
            return _logits_of(inputs(model), n)  # type: ignore[operator]
        return _logits_of(forward_inputs(model), n)

    det_logits: Tensor | None = None
    with (
        torch.no_grad(),
        _rng_from(generator, device),
        _sampling(model, named, include_drop_path, check_statistics) as found,
        threshold_masks(found.active, min_elements=AUTO_MIN_ELEMENTS if masks == "auto" else 0)
        if mask_source == "threshold"
        else contextlib.nullcontext(),
    ):
        naive = method == "naive" or forward_inputs is None or _per_call_masks(found)
        per_sample = bool(_row_mixing_layers(named))  # each pass must see exactly the N rows of the batch
        taken: str = "naive" if naive else "batched"
        logits: Tensor | None = None
        split = _split(model, found, forward_inputs, named) if method == "auto" and not naive else None  # type: ignore[arg-type]
        if split is not None:
            trunk, head = split
            features = _features(trunk, found)
            if features is _FRONTIER:  # any module: its deterministic prefix ran once, the rest per sample
                taken = "cached"
                logits = torch.stack([_logits_of(head(None), n) for _ in range(n_samples)])
                if deterministic:
                    with _eval_mode(model, named):
                        det_logits = _logits_of(head(None), n)
            elif isinstance(features, Tensor) and features.ndim >= 1 and features.shape[0] == n:
                taken = "cached"
                cached = ForwardInputs((features,), {})
                auto = max(features.shape[0], _AUTO_BATCHED_ROWS, _AUTO_CACHED_ELEMENTS // max(features[0].numel(), 1))
                rows = features.shape[0] if per_sample else auto if chunk_size is None else chunk_size
                _log_draw_order(found, rows, features.shape[0], n_samples)
                logits = _sample_rows(head, cached, features.shape[0], n_samples, rows, fresh=True)
                if deterministic:
                    with _eval_mode(model, named):
                        det_logits = _logits_of(head(features), n)
        if logits is None and not naive and not per_sample:
            assert forward_inputs is not None
            assert n is not None
            rows = chunk_size if chunk_size is not None else max(n, _AUTO_BATCHED_ROWS)
            _log_draw_order(found, rows, n, n_samples)
            logits = _sample_rows(model, forward_inputs, n, n_samples, rows)
        elif logits is None:
            taken = "naive"  # also for row-mixing layers: one pass per sample of the N rows is the naive loop
            first = forward()
            n = first.shape[0]
            logits = torch.stack([first, *(forward() for _ in range(n_samples - 1))])
        if deterministic and det_logits is None:
            with _eval_mode(model, named):
                det_logits = forward()
    probs = _softmax(logits)
    det_probs = None if det_logits is None else _softmax(det_logits)
    return MCDropoutPrediction(probs=probs, method=taken, deterministic_probs=det_probs)
