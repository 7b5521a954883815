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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd

from lightning_reg.functional.uncertainty import entropy

__all__ = ["MCDropoutPrediction", "MCDropoutSites", "mc_dropout_predict", "mc_dropout_sampling"]

Method = Literal["auto", "batched", "naive"]
_METHODS: tuple[str, ...] = get_args(Method)

# Our own layers that drop something in training mode and are not `_DropoutNd` subclasses (LockedDropout is
# one, so it is found by type). Matched by qualified name over the MRO: `functional` sits below `nn` and must
# not import it. A user's own layer opts in with a class attribute `mc_dropout_kind = "dropout"` (sampled) or
# `"drop_path"` (sampled only with `include_drop_path=True`).
_OWN_DROPOUT_LAYERS = frozenset({"lightning_reg.nn.weight_drop.WeightDrop"})
# timm's stochastic depth and DropBlock: regularizers of training, not dropout sampling; opt-in.
_DROP_PATH_LAYERS = frozenset({"timm.layers.drop.DropPath", "timm.layers.drop.DropBlock2d"})


def _qualnames(module: nn.Module) -> set[str]:
    return {f"{cls.__module__}.{cls.__qualname__}" for cls in type(module).__mro__}


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
    attn_drop = getattr(module, "attn_drop", None)
    if hasattr(module, "fused_attn") and isinstance(attn_drop, _DropoutNd):
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


def _find_sites(model: nn.Module, include_drop_path: bool) -> MCDropoutSites:
    found = MCDropoutSites()
    for module in model.modules():
        kind = _classify(module, include_drop_path)
        if kind is None:
            continue
        is_site, rate = kind
        (found.sites if is_site else found.gates).append(module)
        if rate > 0:
            found.active.append(module)
    return found


def _running_stats(model: nn.Module) -> dict[str, Tensor]:
    stats: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, _NormBase) and module.track_running_stats:
            for buffer_name, buffer in module.named_buffers(recurse=False):
                if buffer is not None:
                    stats[f"{name}.{buffer_name}"] = buffer.detach().clone()
    return stats


@contextlib.contextmanager
def mc_dropout_sampling(model: nn.Module, *, include_drop_path: bool = False) -> Iterator[MCDropoutSites]:
    """Put exactly the model's dropout into sampling mode and everything else into eval mode.

    Sampled: ``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``, ``FeatureAlphaDropout`` and every other
    ``_DropoutNd`` (our ``LockedDropout``), our ``WeightDrop``, the attention dropout of
    ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``/``DecoderLayer``, the between-layer dropout of
    ``nn.LSTM``/``GRU``/``RNN``, timm's fused ``Attention`` and the ``drop_rate`` head dropout of timm's
    ResNet/EfficientNet-style models; timm's ``DropPath``/``DropBlock2d`` only with
    ``include_drop_path`` (stochastic depth is not dropout sampling). A layer of your own opts in with a class
    attribute ``mc_dropout_kind = "dropout"`` (or ``"drop_path"``). Dropout written as ``F.dropout(x,
    training=self.training)`` inside another module is not found.

    BatchNorm and every other module stay in eval mode, so running statistics never change; on exit every
    module's mode is restored and the running statistics are checked to be unchanged.

    Args:
        model: the network; its modes are changed inside the block and restored after it.
        include_drop_path: also sample stochastic depth (``DropPath``) and ``DropBlock2d``.

    Yields:
        The :class:`MCDropoutSites` switched on.

    Raises:
        ValueError: if the model has no dropout that can be sampled.
        RuntimeError: if a running statistic changed inside the block.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
        >>> with mc_dropout_sampling(net) as found:
        ...     [type(m).__name__ for m in found.sites], net[1].training, net[2].training
        (['Dropout'], False, True)
        >>> net.training, net[2].training
        (True, True)
    """
    found = _find_sites(model, include_drop_path)
    if not found.sites:
        hint = (
            " (it has DropPath/DropBlock: pass `include_drop_path=True` to sample them)"
            if any(
                _qualnames(m) & _DROP_PATH_LAYERS or getattr(type(m), "mc_dropout_kind", None) == "drop_path"
                for m in model.modules()
            )
            else ""
        )
        raise ValueError(
            f"Expected a model with dropout to sample for Monte-Carlo dropout, but {type(model).__name__} has no "
            f"dropout layer{hint}. Add dropout (e.g. `nn.Dropout(p)` before the classifier), or give your own "
            "layer the class attribute `mc_dropout_kind = 'dropout'`."
        )
    modes = {module: module.training for module in model.modules()}
    stats = _running_stats(model)
    model.eval()
    try:
        for module in (*found.sites, *found.gates):
            module.training = True  # this module only: its children keep their eval mode
        yield found
    finally:
        for module, mode in modes.items():
            module.training = mode
    changed = [name for name, before in _running_stats(model).items() if not torch.equal(before, stats[name])]
    if changed:
        # One anchor (lightning-uq-box) puts BatchNorm in train mode during MC prediction, which silently
        # corrupts the running statistics: refuse to let that pass.
        raise RuntimeError(
            f"Running statistics changed during Monte-Carlo dropout sampling: {changed}. Normalization layers "
            "must stay in eval mode while dropout is sampled; a module that switches them to training mode "
            "inside its forward pass cannot be sampled this way."
        )


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode


@contextlib.contextmanager
def _rng_from(generator: torch.Generator | None, device: torch.device) -> Iterator[None]:
    """Run the block on a global RNG seeded from ``generator``, leaving the global stream untouched.

    torch's dropout kernels draw from the global (CPU or device) RNG and take no ``torch.Generator``. To honour
    ``generator`` we fork the global RNG of the CPU and of ``device`` (``torch.random.fork_rng``), seed it from
    one draw of ``generator``, and restore it afterwards: results are a function of the generator's state.
    """
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
        return
    index = device.index if device.index is not None else torch.get_device_module(device.type).current_device()
    with torch.random.fork_rng(devices=[index], device_type=device.type):
        torch.default_generator.manual_seed(seed)
        with torch.get_device_module(device.type).device(index):
            torch.get_device_module(device.type).manual_seed(seed)
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


def _split(
    model: nn.Module, found: MCDropoutSites
) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Any]] | None:
    """``(trunk, head)`` with ``model(x) == head(trunk(x))``, or ``None`` when the model offers no split."""
    forward_features = getattr(model, "forward_features", None)
    forward_head = getattr(model, "forward_head", None)
    if callable(forward_features) and callable(forward_head):
        return forward_features, forward_head  # the timm convention; zoo models follow it
    if isinstance(model, nn.Sequential):
        active = set(found.active)
        first = next((i for i, child in enumerate(model) if any(m in active for m in child.modules())), 0)
        if first > 0:
            return model[:first], model[first:]  # split just before the first dropout
    return None


def _features(trunk: Callable[[Tensor], Tensor], inputs: Tensor, found: MCDropoutSites) -> Tensor | None:
    """The trunk's output, or ``None`` as soon as a sampled dropout runs inside it (then it is random)."""

    def hook(module: nn.Module, args: Any) -> None:
        raise _RandomInTrunkError

    handles = [module.register_forward_pre_hook(hook) for module in found.active]
    try:
        return trunk(inputs)
    except _RandomInTrunkError:
        return None
    finally:
        for handle in handles:
            handle.remove()


def _logits_of(output: Any, rows: int) -> Tensor:
    if not isinstance(output, Tensor) or output.ndim != 2 or output.shape[0] != rows:
        got = f"shape {tuple(output.shape)}" if isinstance(output, Tensor) else type(output).__name__
        raise ValueError(
            f"Expected the model to return logits of shape ({rows}, num_classes), but got {got}. "
            "Wrap the model so that its forward returns a logits tensor."
        )
    return output


# Rows per forward pass on the batched path when `chunk_size` is None (see `mc_dropout_predict`).
_AUTO_BATCHED_ROWS = 256


def _sample_rows(fn: Callable[[Tensor], Any], x: Tensor, n_samples: int, chunk_size: int | None) -> Tensor:
    """``fn`` on ``n_samples`` copies of ``x`` stacked along the batch, ``chunk_size`` rows at a time.

    Row ``r`` of the stacked input is sample ``r // N`` of item ``r % N``. Every mask torch's dropout layers
    draw is independent per batch row (elementwise for ``Dropout``/``AlphaDropout``, per row and channel for
    ``Dropout1d/2d/3d``/``FeatureAlphaDropout``, per row, head and position for attention dropout, per row for
    locked dropout and drop path), and in eval mode no other layer mixes rows (BatchNorm uses its running
    statistics). So each copy draws its own mask, independent of the others: the same distribution as
    ``n_samples`` separate forward passes. The one exception, a mask shared across the batch (``WeightDrop``'s
    DropConnect draws one weight mask per call), is sampled with ``method="naive"`` instead.
    """
    n = x.shape[0]
    total = n_samples * n
    step = total if chunk_size is None else chunk_size
    if step == n:  # one sample per pass: the rows are `x` itself, no gather needed
        return torch.stack([_logits_of(fn(x), n) for _ in range(n_samples)])
    outputs = []
    for start in range(0, total, step):
        rows = torch.arange(start, min(start + step, total), device=x.device) % n  # item of each row
        outputs.append(_logits_of(fn(x.index_select(0, rows)), len(rows)))  # (rows, K)
    return torch.cat(outputs).view(n_samples, n, -1)  # (S, N, K)


def _per_call_masks(found: MCDropoutSites) -> bool:
    """Whether a site draws one mask per call shared by all batch rows (then rows are not independent)."""
    return any(_qualnames(m) & _OWN_DROPOUT_LAYERS for m in found.active)


def mc_dropout_predict(
    model: nn.Module,
    inputs: Tensor,
    n_samples: int,
    *,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    include_drop_path: bool = False,
    method: Method = "auto",
    deterministic: bool = False,
) -> MCDropoutPrediction:
    """Monte-Carlo dropout prediction: ``n_samples`` stochastic forward passes with only dropout sampled.

    The model must map ``inputs`` (batch first) to logits ``(N, K)``. With ``method="auto"`` the cheapest
    exact path is taken:

    - when the model has ``forward_features``/``forward_head`` (the timm convention; zoo models do) and no
      sampled dropout runs inside ``forward_features``, the features are computed once and only the head is
      sampled; for an ``nn.Sequential`` the split is just before the first dropout module (``"cached"``);
    - otherwise the inputs are repeated ``n_samples`` times along the batch dimension, ``chunk_size`` rows per
      forward pass (``"batched"``).

    Both give the distribution of the naive loop of ``n_samples`` forward passes (``method="naive"``).

    Args:
        model: the network, in any mode: modes are restored after sampling (see :func:`mc_dropout_sampling`).
        inputs: the batch ``(N, ...)``.
        n_samples: number of Monte-Carlo samples, at least 1.
        generator: makes the draws a function of its state and leaves the global RNG untouched (torch's dropout
            draws from the global RNG, so it is forked and seeded from this generator). ``None`` draws from the
            global RNG as a training forward pass would (reproducible under ``seed_everything``).
        chunk_size: the most rows (copies of input items) per forward pass on the batched path, or per head
            call on the cached path, to cap memory. ``None``: automatic: the cached path samples the head on all
            ``n_samples * N`` rows at once; the batched path forwards ``max(N, 256)`` rows at a time, so small
            batches share a forward pass and batches of 256 or more run one sample per pass. (Measured on CPU
            with the zoo Transformer, 30 x 256 rows: one forward of all 7,680 rows took 1.4x the naive loop and
            time grew with the chunk; past a few hundred rows the per-call overhead is paid off and larger
            chunks only cost memory and cache.)
        include_drop_path: also sample timm's ``DropPath``/``DropBlock2d``.
        method: ``"auto"``, ``"batched"`` (never cache) or ``"naive"`` (the reference loop).
        deterministic: also return the eval-mode probabilities in ``deterministic_probs`` (computed from the
            cached features when the cached path is taken, at no extra trunk pass).

    Returns:
        An :class:`MCDropoutPrediction`.

    Raises:
        ValueError: for ``n_samples < 1``, a bad ``chunk_size`` or ``method``, a model without dropout, or a
            model that does not return ``(N, K)`` logits.

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
    if not isinstance(inputs, Tensor) or inputs.ndim < 1 or inputs.shape[0] == 0:
        got = f"shape {tuple(inputs.shape)}" if isinstance(inputs, Tensor) else type(inputs).__name__
        raise ValueError(f"Expected `inputs` to be a non-empty tensor with the batch first, but got {got}.")

    det_logits: Tensor | None = None
    with (
        torch.no_grad(),
        _rng_from(generator, inputs.device),
        mc_dropout_sampling(model, include_drop_path=include_drop_path) as found,
    ):
        taken: str = "naive" if method == "naive" or _per_call_masks(found) else "batched"
        logits: Tensor | None = None
        split = _split(model, found) if method == "auto" and taken == "batched" else None
        if split is not None:
            trunk, head = split
            features = _features(trunk, inputs, found)
            if features is not None:
                taken = "cached"
                logits = _sample_rows(head, features, n_samples, chunk_size)
                if deterministic:
                    with _eval_mode(model):
                        det_logits = _logits_of(head(features), inputs.shape[0])
        if logits is None and taken == "naive":
            logits = torch.stack([_logits_of(model(inputs), inputs.shape[0]) for _ in range(n_samples)])
        elif logits is None:
            rows = chunk_size if chunk_size is not None else max(inputs.shape[0], _AUTO_BATCHED_ROWS)
            logits = _sample_rows(model, inputs, n_samples, rows)
        if deterministic and det_logits is None:
            with _eval_mode(model):
                det_logits = _logits_of(model(inputs), inputs.shape[0])
    probs = logits.float().softmax(dim=-1)
    det_probs = None if det_logits is None else det_logits.float().softmax(dim=-1)
    return MCDropoutPrediction(probs=probs, method=taken, deterministic_probs=det_probs)
