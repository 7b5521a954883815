"""Temperature scaling (Guo et al., 2017, https://arxiv.org/abs/1706.04599): post-hoc calibration of logits.

One scalar ``T > 0`` divides the logits, ``softmax(z / T)``: the predicted class never changes, only the
confidence. ``T`` is the minimizer of the mean negative log-likelihood on held-out data. The fit here:

- optimizes ``t = log T`` with ``torch.optim.LBFGS`` and a strong-Wolfe line search, so ``T = exp(t)`` is
  positive by construction and the result is a deterministic function of the logits (float64 arithmetic,
  fixed start ``T = 1``);
- under ``torch.distributed`` all-reduces the summed NLL and its gradient at every evaluation, so every rank
  takes the same steps and gets the ``T`` one process gets on the union of all ranks' logits;
- clamps ``T`` to ``[min_temperature, max_temperature]`` with a warning when the optimum runs off (every
  sample classified correctly with a margin: the NLL keeps falling as ``T -> 0``).

The NLL of ``z / T`` is convex in ``1 / T`` (a log-sum-exp of linear functions minus a linear function), hence
unimodal in ``log T``: the minimum LBFGS finds is the global one.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, overload

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from lightning_reg._device import accumulation_dtype

__all__ = ["fit_temperature", "scale_logits", "temperature_nll"]


def _is_distributed(distributed: bool | None) -> bool:
    if distributed is None:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return distributed


def _all_reduce(t: Tensor, distributed: bool, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    if distributed:
        dist.all_reduce(t, op=op)
    return t


def _check_inputs(logits: Tensor, targets: Tensor) -> None:
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        got = f"shape {tuple(logits.shape)}" if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"Expected `logits` of shape (N, num_classes), but got {got}.")
    if logits.shape[1] < 2:
        raise ValueError(
            f"Expected logits of at least 2 classes, but got shape {tuple(logits.shape)}. A single logit is a "
            "sigmoid head: pass `torch.stack([-z / 2, z / 2], 1)` (the same probabilities as two-class logits)."
        )
    if not logits.is_floating_point():
        raise TypeError(f"Expected floating-point `logits`, but got dtype {logits.dtype}.")
    if not isinstance(targets, Tensor):
        raise TypeError(f"Expected `targets` to be a tensor, but got {type(targets).__name__}.")
    n, k = logits.shape
    if targets.ndim == 1:
        if targets.is_floating_point() or targets.dtype == torch.bool:
            raise TypeError(
                f"Expected index targets `(N,)` of an integer dtype, but got dtype {targets.dtype}. "
                "Pass class indices (`.long()`) or probabilities of shape (N, num_classes)."
            )
        if targets.shape[0] != n:
            raise ValueError(f"Expected {n} targets to match logits of shape {(n, k)}, but got {targets.shape[0]}.")
        if n and (int(targets.min()) < 0 or int(targets.max()) >= k):
            raise ValueError(
                f"Expected class indices in [0, {k}) for logits of {k} classes, but got values in "
                f"[{int(targets.min())}, {int(targets.max())}]."
            )
    elif targets.ndim == 2:
        if tuple(targets.shape) != (n, k):
            raise ValueError(
                f"Expected probability targets of shape {(n, k)} to match the logits, but got {tuple(targets.shape)}."
            )
        if not targets.is_floating_point():
            raise TypeError(f"Expected floating-point probability targets, but got dtype {targets.dtype}.")
        if n and (
            not bool(torch.isfinite(targets).all())
            or bool((targets < 0).any())
            or not torch.allclose(targets.sum(1).double(), torch.ones(n, dtype=torch.float64, device=targets.device))
        ):
            raise ValueError(
                "Expected probability targets: non-negative rows that sum to 1. Pass class indices `(N,)`, or "
                "normalize the rows (multi-label targets are not supported by softmax temperature scaling)."
            )
    else:
        raise ValueError(
            f"Expected targets of shape (N,) (class indices) or (N, num_classes) (probabilities), but got "
            f"shape {tuple(targets.shape)}."
        )


def _nll_sum(logits: Tensor, targets: Tensor, inv_temperature: Tensor) -> Tensor:
    """``sum_i NLL(z_i / T)`` for index or probability targets; ``inv_temperature`` is ``()`` or ``(K,)``."""
    log_probs = F.log_softmax(logits * inv_temperature, dim=1)  # (N, K)
    if targets.ndim == 1:
        return -log_probs.gather(1, targets.long().unsqueeze(1)).sum()
    return -(targets * log_probs).sum()


def _slopes(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Summed slopes of the NLL in ``beta = 1 / T`` at ``beta = 0`` and ``beta -> inf``, and ``sum |z|``.

    ``NLL(beta) = logsumexp(beta z) - beta E_q[z]`` is convex in ``beta`` with slope ``E_p[z] - E_q[z]``, where
    ``p = softmax(beta z)`` and ``q`` the target distribution. At ``beta = 0`` ``p`` is uniform (``mean_k z``);
    as ``beta -> inf`` it concentrates on the row maximum. The optimum is finite iff the summed slope is
    negative at 0 and positive at infinity; a slope <= 0 at infinity means every sample's target is its top
    logit (the NLL falls as ``T -> 0``).
    """
    target_logit = z.gather(1, y.unsqueeze(1)).squeeze(1) if y.ndim == 1 else (y * z).sum(1)  # E_q[z], (N,)
    at_zero = (z.mean(1) - target_logit).sum()
    at_infinity = (z.amax(1) - target_logit).sum() if len(z) else z.new_zeros(())
    return at_zero, at_infinity, z.abs().sum()


def scale_logits(logits: Tensor, temperature: float | Tensor) -> Tensor:
    """``logits / temperature``: one temperature, or one per class (the last dimension).

    Args:
        logits: ``(..., K)`` logits.
        temperature: a positive float, a 0-d tensor or a ``(K,)`` tensor.

    Example:
        >>> scale_logits(torch.tensor([[2.0, -1.0]]), 2.0)
        tensor([[ 1.0000, -0.5000]])
    """
    if isinstance(temperature, Tensor):
        return logits / temperature.to(device=logits.device, dtype=logits.dtype)
    return logits / temperature


def temperature_nll(
    logits: Tensor, targets: Tensor, temperature: float | Tensor = 1.0, *, distributed: bool | None = None
) -> float:
    """Mean negative log-likelihood (nats) of ``softmax(logits / temperature)``, over all ranks under DDP.

    Args:
        logits: ``(N, K)``.
        targets: class indices ``(N,)`` or probabilities ``(N, K)``.
        temperature: a positive float or a ``(K,)`` tensor (one per class).
        distributed: sum over the ranks of ``torch.distributed``; ``None`` does when a group of more than one
            rank is initialized.

    Example:
        >>> round(temperature_nll(torch.tensor([[2.0, 0.0]]), torch.tensor([0]), 2.0), 4)
        0.3133
    """
    _check_inputs(logits, targets)
    distributed = _is_distributed(distributed)
    dtype = accumulation_dtype(logits.device)
    inv = 1.0 / torch.as_tensor(temperature, dtype=dtype, device=logits.device)
    with torch.no_grad():
        total = _nll_sum(logits.to(dtype), targets.to(dtype) if targets.ndim == 2 else targets, inv)
        stats = _all_reduce(
            torch.stack([total, torch.tensor(float(len(logits)), dtype=dtype, device=total.device)]), distributed
        )
    if stats[1] == 0:
        raise ValueError("Expected at least one sample, but got empty logits (on every rank).")
    return float(stats[0] / stats[1])


@overload
def fit_temperature(
    logits: Tensor,
    targets: Tensor,
    *,
    per_class: Literal[False] = False,
    max_iter: int = ...,
    min_temperature: float = ...,
    max_temperature: float = ...,
    distributed: bool | None = ...,
) -> float: ...


@overload
def fit_temperature(
    logits: Tensor,
    targets: Tensor,
    *,
    per_class: Literal[True],
    max_iter: int = ...,
    min_temperature: float = ...,
    max_temperature: float = ...,
    distributed: bool | None = ...,
) -> Tensor: ...


@overload
def fit_temperature(
    logits: Tensor,
    targets: Tensor,
    *,
    per_class: bool,
    max_iter: int = ...,
    min_temperature: float = ...,
    max_temperature: float = ...,
    distributed: bool | None = ...,
) -> float | Tensor: ...


def fit_temperature(
    logits: Tensor,
    targets: Tensor,
    *,
    per_class: bool = False,
    max_iter: int = 100,
    min_temperature: float = 1e-2,
    max_temperature: float = 1e2,
    distributed: bool | None = None,
) -> float | Tensor:
    """Temperature scaling (`Guo et al., 2017 <https://arxiv.org/abs/1706.04599>`_): the ``T`` minimizing the NLL.

    Minimizes the mean negative log-likelihood of ``softmax(logits / T)`` over ``t = log T`` with LBFGS and a
    strong-Wolfe line search, in float64 from ``T = 1``: deterministic, and ``T > 0`` by construction.

    Args:
        logits: held-out logits ``(N, K)`` (not probabilities), any floating dtype; they are not changed.
        targets: class indices ``(N,)`` or probabilities ``(N, K)`` (rows summing to 1).
        per_class: fit one temperature per class (``logits / T_k``), returned as a ``(K,)`` tensor. Unlike one
            ``T`` this can change the predicted class; see the calibration docs for when it helps.
        max_iter: the most LBFGS iterations.
        min_temperature: the smallest ``T`` returned; an optimum below it is clamped, with a warning.
        max_temperature: the largest ``T`` returned; an optimum above it is clamped, with a warning.
        distributed: fit on the union of all ranks' logits (NLL and gradient all-reduced, same steps on every
            rank); ``None`` does when a ``torch.distributed`` group of more than one rank is initialized. Call it
            on every rank then.

    Returns:
        ``T`` as a float, or a ``(K,)`` float64 tensor on the logits' device with ``per_class=True``.

    Raises:
        ValueError: empty logits (on every rank), shapes that do not match, non-finite logits, targets out of
            range, bad bounds.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> true_logits = 3.0 * torch.randn(2000, 5, generator=g)
        >>> targets = torch.multinomial(true_logits.softmax(1), 1, generator=g).squeeze(1)
        >>> round(fit_temperature(2.0 * true_logits, targets), 1)  # over-confident by 2x
        2.0
    """
    _check_inputs(logits, targets)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"Expected `max_iter` to be an int >= 1, but got {max_iter!r}.")
    if not (0 < min_temperature < 1 < max_temperature < math.inf):
        raise ValueError(
            "Expected 0 < `min_temperature` < 1 < `max_temperature` < inf, but got "
            f"min_temperature={min_temperature!r}, max_temperature={max_temperature!r}."
        )
    distributed = _is_distributed(distributed)
    device = logits.device
    dtype = accumulation_dtype(device)
    n, k = logits.shape

    # One all-reduce checks every rank's input together (so that all ranks raise, none is left waiting) and sums
    # the two slopes of the NLL in beta = 1 / T that tell whether the optimum is finite (see `_slopes`).
    z = logits.detach().to(dtype)
    y = targets.detach().to(dtype) if targets.ndim == 2 else targets.detach().long()
    bad = (~torch.isfinite(z)).sum().to(dtype)
    header = torch.stack([torch.tensor(float(n), dtype=dtype, device=device), bad, *_slopes(z, y)])
    _all_reduce(header, distributed)
    if distributed:
        classes = torch.tensor([float(k), -float(k)], dtype=dtype, device=device)
        _all_reduce(classes, distributed, dist.ReduceOp.MAX)
        if classes[0] != k or -classes[1] != k:
            raise ValueError(
                f"Expected the same number of classes on every rank, but got {k} here and between "
                f"{int(-classes[1])} and {int(classes[0])} across ranks."
            )
    total_n = float(header[0])
    if total_n == 0:
        raise ValueError("Expected at least one sample to fit the temperature on, but got empty logits.")
    if header[1] > 0:
        raise ValueError(
            f"Expected finite logits, but got {int(header[1])} NaN or infinite values. Check the model's outputs "
            "(mixed precision overflow, a division by zero) before fitting a temperature."
        )
    slope_at_zero, slope_at_infinity, scale = (float(v) / total_n for v in header[2:])
    tolerance = 1e-12 * (1.0 + scale)
    if not per_class and slope_at_infinity <= tolerance and slope_at_zero >= -tolerance:
        # Convex with zero slope at both ends: the NLL does not depend on T (e.g. every row of logits constant).
        warnings.warn(
            "The NLL of these logits does not depend on the temperature (every row's logits are equal, or "
            "the target logit is at once the mean and the maximum): returning T = 1.",
            stacklevel=2,
        )
        return 1.0
    if not per_class and (slope_at_infinity <= tolerance or slope_at_zero >= -tolerance):
        # The NLL is monotone in T: no finite optimum. LBFGS would stop wherever the gradient underflows.
        low = slope_at_infinity <= tolerance
        bound = min_temperature if low else max_temperature
        warnings.warn(
            f"The NLL-optimal temperature runs off to {'0' if low else 'infinity'}: {_runoff_reason(low)} "
            f"Returning T = {bound} (the `{'min' if low else 'max'}_temperature` bound); fit on more (or "
            "harder) held-out data.",
            stacklevel=2,
        )
        return bound

    # float64 copies outside inference mode: Lightning's evaluation loops run under `torch.inference_mode`, whose
    # tensors cannot be saved for backward.
    with torch.inference_mode(False):
        z = z.clone()
        y = y.clone()
        # sum_i q_i z_i per class, the target part of the gradient (constant during the fit), (K,)
        if y.ndim == 1:
            target_z = torch.zeros(k, dtype=dtype, device=device).index_add_(0, y, z.gather(1, y.unsqueeze(1))[:, 0])
        else:
            target_z = (y * z).sum(0)
        log_t = torch.zeros(k if per_class else (), dtype=dtype, device=device, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [log_t],
            lr=1.0,
            max_iter=max_iter,
            tolerance_grad=1e-10,
            tolerance_change=1e-14,
            history_size=max(10, min(k, 50)),
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            # NLL and its gradient in closed form (no autograd graph: 2-3x faster on small inputs):
            # d NLL_i / d beta_k = (p_ik - q_ik) z_ik and d beta_k / d log T_k = -beta_k.
            with torch.no_grad():
                beta = torch.exp(-log_t)
                log_p = F.log_softmax(z * beta, dim=1)
                nll = -(log_p.gather(1, y.unsqueeze(1)).sum() if y.ndim == 1 else (y * log_p).sum())
                per_class_grad = -(log_p.exp() * z).sum(0).sub_(target_z)  # -sum_i (p_ik - q_ik) z_ik
                grad = beta * (per_class_grad if per_class else per_class_grad.sum())
                # One all-reduce of [NLL sum, gradient]: every rank then holds the union's numbers.
                flat = _all_reduce(torch.cat([nll.reshape(1), grad.reshape(-1)]), distributed) / total_n
            log_t.grad = flat[1:].reshape(log_t.shape).clone()
            return flat[0]

        optimizer.step(closure)
        result = log_t.detach().clone()

    if not bool(torch.isfinite(result).all()):
        raise RuntimeError("The temperature fit diverged (non-finite log T); please report this with the logits.")
    temperature = result.exp()
    if bool(((temperature < min_temperature) | (temperature > max_temperature)).any()):
        warnings.warn(
            f"The NLL-optimal temperature lies outside the range [{min_temperature}, {max_temperature}] "
            f"(T = {_describe(temperature)}). It is clamped to the range; fit on more (or harder) held-out data, "
            "or widen `min_temperature`/`max_temperature`.",
            stacklevel=2,
        )
        temperature = temperature.clamp(min_temperature, max_temperature)
    if per_class:
        return temperature
    return float(temperature)


def _describe(temperature: Tensor) -> str:
    if temperature.ndim == 0:
        return f"{float(temperature):.3g}"
    return f"{float(temperature.min()):.3g} to {float(temperature.max()):.3g}"


def _runoff_reason(low: bool) -> str:
    if low:
        return (
            "every held-out sample's target is its top logit (all classified correctly), so the NLL keeps "
            "falling as T goes to 0."
        )
    return (
        "the target logits are on average no higher than the mean logit (the logits carry no information about "
        "the targets, or point away from them), so the NLL keeps falling as T grows."
    )
