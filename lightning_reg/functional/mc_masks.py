"""Cheaper dropout masks for Monte-Carlo sampling: 32-bit random integers against a threshold (issue 19).

On the CPU, torch's dropout draws its Bernoulli mask one float uniform at a time; drawing the same number of
32-bit random integers (64-bit draws viewed as two 32-bit words) and comparing them with a threshold gives the
same distribution in about half the time (the numbers are on the MC dropout page of the docs). The keep
probability is quantized at ``2**-32``, finer than the 24-bit float uniforms torch's Bernoulli draws compare
against. :func:`threshold_dropout` is the function; :func:`threshold_masks` swaps it in for torch's
``nn.Dropout``/``Dropout1d``/``Dropout2d``/``Dropout3d`` layers while Monte-Carlo dropout samples, and only then.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from lightning_reg.functional._bernoulli import _same_device

__all__ = ["AUTO_MIN_ELEMENTS", "Masks", "resolve_masks", "samples_per_call", "threshold_dropout", "threshold_masks"]

Masks = Literal["auto", "torch", "threshold"]
_MASKS: tuple[str, ...] = get_args(Masks)


def resolve_masks(masks: object, device: torch.device) -> Literal["torch", "threshold"]:
    """The mask source ``masks`` means for inputs on ``device``: ``"auto"`` is ``"threshold"`` on the CPU only.

    The threshold masks were measured faster on the CPU; on an accelerator torch's dropout is one fused kernel
    and ours three, not measured here, so ``"auto"`` keeps torch's there.

    Raises:
        ValueError: if ``masks`` is not one of ``"auto"``, ``"torch"``, ``"threshold"``.

    Example:
        >>> resolve_masks("auto", torch.device("cpu")), resolve_masks("auto", torch.device("cuda"))
        ('threshold', 'torch')
    """
    if masks not in _MASKS:
        raise ValueError(f"Expected `masks` to be one of {_MASKS}, but got {masks!r}.")
    if masks == "auto":
        return "threshold" if device.type == "cpu" else "torch"
    return masks  # type: ignore[return-value]


def _random_words(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> Tensor:
    """Independent uniform int32 words of ``shape``: full-range int64 draws, each viewed as two int32 words.

    Each row (index of the first dimension) takes its own ``ceil(row size / 2)`` int64 draws, so the words of a row do
    not depend on how many rows are drawn together: sampling ``k`` samples of ``N`` rows in one call gives the words
    of ``k`` calls of ``N`` rows (the naive loop's draws).
    """
    rows = shape[0] if shape else 1
    per_row = math.prod(shape[1:]) if shape else 1
    where = device if generator is None or _same_device(generator, device) else generator.device
    # `random_(-2**63, None)` is torch's full 64-bit range (every bit uniform); `random_()` would leave the top
    # bit 0 (its range is [0, 2**63 - 1]), biasing every second word.
    draws = torch.empty((rows, (per_row + 1) // 2), dtype=torch.int64, device=where)
    words = draws.random_(-(2**63), None, generator=generator).view(torch.int32)  # (rows, 2 * ceil(per_row / 2))
    words = words.view(shape) if per_row % 2 == 0 else words[:, :per_row].reshape(shape)
    return words if where == device else words.to(device, non_blocking=True)


def threshold_dropout(
    input: Tensor,
    p: float,
    *,
    mask_dims: int | None = None,
    inplace: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Dropout with a mask from 32-bit random integers: ``input * keep / (1 - p)``, ``keep ~ Bernoulli(1 - p)``.

    A word ``w`` uniform on ``[-2**31, 2**31)`` is kept when ``w < -2**31 + round((1 - p) * 2**32)``: the keep
    probability is ``1 - p`` rounded to a multiple of ``2**-32``.

    Args:
        input: any tensor; the output has its dtype and device.
        p: the drop probability, in ``[0, 1]``.
        mask_dims: ``None`` drops each element on its own (``nn.Dropout``); ``k`` draws one value per index of the
            first ``k`` dimensions, shared by the rest (channel-wise dropout: ``2`` for ``(N, C, H, W)`` as in
            ``nn.Dropout2d``, ``1`` for an unbatched ``(C, L)`` as in ``nn.Dropout1d``).
        inplace: multiply ``input`` in place (as ``nn.Dropout(inplace=True)`` does).
        generator: where the words come from; ``None``: the global RNG of ``input``'s device. A generator on
            another device draws there, and the mask is copied.

    Returns:
        The dropped-out tensor.

    Raises:
        ValueError: for ``p`` outside ``[0, 1]`` or ``mask_dims`` outside ``[1, input.ndim]``.

    Example:
        >>> x = torch.ones(4, 3, 4, 4)
        >>> y = threshold_dropout(x, 0.5, mask_dims=2, generator=torch.Generator().manual_seed(0))
        >>> sorted(set(y.flatten().tolist())), bool((y.amax((2, 3)) == y.amin((2, 3))).all())  # whole channels
        ([0.0, 2.0], True)
    """
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
        raise ValueError(f"Expected the dropout probability `p` to be a float in [0, 1], but got {p!r}.")
    if mask_dims is not None and (
        isinstance(mask_dims, bool) or not isinstance(mask_dims, int) or not 1 <= mask_dims <= input.ndim
    ):
        raise ValueError(
            f"Expected `mask_dims` to be None (elementwise) or an int in [1, {input.ndim}] (the input's number of "
            f"dimensions), but got {mask_dims!r}."
        )
    if p == 0.0:
        return input
    if p == 1.0:  # as torch: every element times 0 (NaN stays NaN)
        return input.mul_(0.0) if inplace else input * 0.0
    return _threshold_dropout(input, p, mask_dims, inplace, generator)


def _threshold_dropout(
    input: Tensor, p: float, mask_dims: int | None, inplace: bool, generator: torch.Generator | None
) -> Tensor:
    """:func:`threshold_dropout` for a valid ``0 < p < 1``, without the checks (it runs once per sample)."""
    shape = tuple(input.shape) if mask_dims is None else (*input.shape[:mask_dims], *(1,) * (input.ndim - mask_dims))
    kept = min(round((1.0 - p) * 2**32), 2**32 - 1)  # (keep probability) * 2**32; 2**32 itself is no int32
    words = _random_words(shape, input.device, generator)
    # The comparison writes the mask in the input's dtype (measured 2-4x faster than a bool mask that `input * keep`
    # then converts), and it is scaled first, as torch scales its noise: `input * (keep / (1 - p))`.
    # `empty_like` keeps the input's memory format (channels_last), as torch's dropout does
    out = torch.empty_like(input) if mask_dims is None else torch.empty(shape, dtype=input.dtype, device=input.device)
    noise = torch.lt(words, kept - 2**31, out=out)
    scale = _scale(p, input.dtype)  # 1 / (1 - p) as torch's `div_` rounds it in this dtype; mul_ is faster
    if math.isinf(scale):  # float16 with p > 1 - 2**-16: 0 * inf would be NaN where torch's 0 / (1 - p) is 0
        noise.div_(1.0 - p)
    else:
        noise.mul_(scale)
    if inplace:
        return input.mul_(noise)
    return noise.mul_(input) if noise.shape == input.shape else input * noise


@functools.lru_cache(maxsize=256)
def _scale(p: float, dtype: torch.dtype) -> float:
    """``1 / (1 - p)`` rounded in ``dtype`` exactly as torch's dropout scales its noise (``noise.div_(1 - p)``).

    Multiplying the 0/1 noise by this number gives the very values of ``div_`` (1 times a number of the dtype is
    that number), and ``mul_`` by a scalar measured about 2.5x faster than ``div_`` (one thread, 2048 x 64 floats:
    10 against 25 us).
    """
    return torch.ones((), dtype=dtype).div_(1.0 - p).item()


_Rule = Callable[[int], int | Literal[False] | None]


def _elementwise(ndim: int) -> int | Literal[False] | None:
    return None


def _channels(batched: int, unbatched: int | None) -> _Rule:
    """``mask_dims`` for channel-wise dropout: 2 for the batched rank, 1 for the unbatched one, else torch's."""

    def rule(ndim: int) -> int | Literal[False] | None:
        return 2 if ndim == batched else 1 if ndim == unbatched else False

    return rule


# torch's own `forward` of each layer -> the mask shape for an input of `ndim` dimensions (`False`: keep torch's,
# with its warnings and errors: Dropout2d on a 3-D input, which torch treats as Dropout1d and warns about, and
# every rank torch deprecates). AlphaDropout/FeatureAlphaDropout are not here: their dropped units are set to
# SELU's negative saturation and the result is affinely corrected, another formula; they keep torch's.
_RULES: dict[Callable[..., Tensor], _Rule] = {
    nn.Dropout.forward: _elementwise,
    nn.Dropout1d.forward: _channels(3, 2),
    nn.Dropout2d.forward: _channels(4, None),
    nn.Dropout3d.forward: _channels(5, 4),
}


# Below this many elements, torch's dropout is faster (Python overhead; measured one thread: 512 elements 26 us
# against 47 us, 2048 44 us against 49 us, 4096 61 us against 44 us): `masks="auto"` keeps torch's there.
AUTO_MIN_ELEMENTS = 4096


_SAMPLES_PER_CALL: contextvars.ContextVar[float] = contextvars.ContextVar("samples_per_call", default=1.0)


@contextlib.contextmanager
def samples_per_call(samples: float) -> Iterator[None]:
    """Declare that each forward pass in the block stacks ``samples`` samples of the batch along its rows.

    :func:`threshold_masks` then compares ``min_elements`` with one sample's share of an input (its elements divided
    by ``samples``), so the choice between threshold and torch masks, and with it the draws, is the naive loop's
    whatever the chunk: ``masks="auto"`` gives the same masks on the cached, batched and naive paths. ``samples``
    may be fractional (a chunk of fewer rows than the batch).

    Args:
        samples: rows of the pass divided by the rows of one sample (the batch size); positive.

    Example:
        >>> layer = nn.Dropout(0.5).train()
        >>> with threshold_masks([layer], min_elements=64), samples_per_call(4.0):
        ...     _ = layer(torch.ones(16, 8))  # 128 elements, 32 a sample: torch's masks, as one sample's call would
        >>> "forward" in vars(layer)
        False
    """
    token = _SAMPLES_PER_CALL.set(samples)
    try:
        yield
    finally:
        _SAMPLES_PER_CALL.reset(token)


def _threshold_forward(module: _DropoutNd, rule: _Rule, min_elements: int, input: Tensor) -> Tensor:
    p = float(module.p)
    dims = rule(input.ndim) if isinstance(input, Tensor) else False
    small = min_elements > 0 and input.numel() < min_elements * _SAMPLES_PER_CALL.get()  # one sample's share
    if not module.training or p in (0.0, 1.0) or dims is False or small:
        return type(module).forward(module, input)  # eval mode (the deterministic pass), p 0 or 1, odd ranks
    return _threshold_dropout(input, p, dims, module.inplace, None)


@contextlib.contextmanager
def threshold_masks(modules: Iterable[nn.Module], *, min_elements: int = 0) -> Iterator[list[nn.Module]]:
    """Inside the block, torch's ``Dropout``/``Dropout1d``/``2d``/``3d`` among ``modules`` draw threshold masks.

    Each such module gets :func:`threshold_dropout` as its own ``forward`` (an instance attribute, removed on exit,
    also when the block raises); it reads the module's ``training`` flag as torch's does, so an eval-mode pass inside
    the block is the identity. The words come from the global RNG of the inputs' device (which
    :func:`~lightning_reg.functional.mc_dropout_predict` seeds from its generator and restores). Left alone:
    subclasses with their own ``forward`` (our ``LockedDropout``), ``AlphaDropout``/``FeatureAlphaDropout``, and
    modules that already have an instance-level ``forward``, and inputs of fewer than ``min_elements`` elements a
    sample (see :func:`samples_per_call`; ``masks="auto"`` passes :data:`AUTO_MIN_ELEMENTS`, below which torch's
    measured faster).

    Yields:
        The modules whose masks are replaced.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.AlphaDropout(0.5))
        >>> with threshold_masks(net.modules()) as replaced:
        ...     [type(m).__name__ for m in replaced], "forward" in vars(net[1])
        (['Dropout'], True)
        >>> "forward" in vars(net[1])
        False
    """
    replaced: list[nn.Module] = []
    try:
        for module in modules:
            rule = _RULES.get(type(module).forward)
            if rule is None or "forward" in vars(module) or module in replaced:
                continue
            module.forward = functools.partial(_threshold_forward, module, rule, min_elements)  # type: ignore[arg-type]
            replaced.append(module)
        yield replaced
    finally:
        for module in replaced:
            del module.forward
