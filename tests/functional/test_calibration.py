from __future__ import annotations

import math
import re
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_reg.functional.calibration import fit_temperature, scale_logits, temperature_nll


def _data(n: int = 2000, k: int = 5, seed: int = 0, scale: float = 3.0) -> tuple[Tensor, Tensor]:
    """Logits of a calibrated model and targets drawn from its own softmax."""
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(n, k, generator=g)
    targets = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)
    return logits, targets


def _grid_optimum(logits: Tensor, targets: Tensor, lo: float = -3.0, hi: float = 3.0) -> float:
    """Brute force: the lowest NLL (F.cross_entropy, float64) on a grid of log T, step 0.01, then refined to 1e-4."""
    z = logits.double()
    y = targets.double() if targets.ndim == 2 else targets

    def best(grid: Tensor) -> float:
        nll = torch.stack([F.cross_entropy(z / t, y) for t in grid.exp()])
        return float(grid[nll.argmin()])

    coarse = best(torch.arange(lo, hi + 1e-9, 0.01, dtype=torch.float64))
    return math.exp(best(torch.linspace(coarse - 0.01, coarse + 0.01, 201, dtype=torch.float64)))


@pytest.mark.parametrize("scale", [0.25, 1.0, 3.0])
def test_the_temperature_matches_a_brute_force_grid(scale: float) -> None:
    logits, targets = _data()
    t = fit_temperature(scale * logits, targets)
    grid = _grid_optimum(scale * logits, targets)
    assert abs(math.log(t) - math.log(grid)) <= 1e-4  # the fine grid's step in log T
    # and nothing on the grid beats it
    assert temperature_nll(scale * logits, targets, t) <= temperature_nll(scale * logits, targets, grid) + 1e-12


def test_a_known_temperature_is_recovered() -> None:
    """Logits that are the calibrated ones times T0: the fit gives T0 back (up to sampling noise)."""
    logits, targets = _data(n=20000, seed=1)
    for t0 in (0.5, 2.5):
        t = fit_temperature(logits * t0, targets)
        assert t == pytest.approx(t0, rel=0.03)


def test_probability_targets_equal_index_targets_when_one_hot_and_match_the_grid_when_soft() -> None:
    logits, targets = _data()
    one_hot = F.one_hot(targets, 5).double()
    assert fit_temperature(2 * logits, one_hot) == pytest.approx(fit_temperature(2 * logits, targets), rel=1e-8)
    soft = (0.8 * one_hot + 0.2 * logits.softmax(1).double()).float()
    assert math.log(fit_temperature(2 * logits, soft)) == pytest.approx(
        math.log(_grid_optimum(2 * logits, soft)), abs=1e-4
    )


def test_the_fit_is_deterministic_and_leaves_the_logits_unchanged() -> None:
    logits, targets = _data()
    before = logits.clone()
    assert fit_temperature(logits * 2, targets) == fit_temperature(logits * 2, targets)
    assert torch.equal(logits, before)


def test_the_fit_works_inside_inference_mode_and_on_float16_logits() -> None:
    logits, targets = _data()
    expected = fit_temperature(2 * logits, targets)
    with torch.inference_mode():
        inference_logits = 2 * logits
        assert fit_temperature(inference_logits, targets) == expected
    half = (2 * logits).half()
    assert fit_temperature(half, targets) == pytest.approx(fit_temperature(half.float(), targets), rel=1e-12)


def test_the_nll_after_scaling_is_not_worse_than_before() -> None:
    logits, targets = _data()
    for scale in (0.3, 1.0, 4.0):
        t = fit_temperature(scale * logits, targets)
        assert temperature_nll(scale * logits, targets, t) <= temperature_nll(scale * logits, targets) + 1e-12


def test_separable_logits_run_off_and_give_the_lower_bound_with_a_warning() -> None:
    targets = torch.arange(30) % 3
    logits = 20.0 * F.one_hot(targets, 3).float()  # every sample right with a margin of 20
    with pytest.warns(UserWarning, match="runs off to 0"):
        assert fit_temperature(logits, targets) == 1e-2
    with pytest.warns(UserWarning, match="runs off to 0"):
        assert fit_temperature(logits, targets, min_temperature=0.05) == 0.05


def test_anti_informative_logits_run_off_to_the_upper_bound() -> None:
    targets = torch.arange(30) % 3
    logits = -5.0 * F.one_hot(targets, 3).float()  # the target is always the lowest logit
    with pytest.warns(UserWarning, match="runs off to infinity"):
        assert fit_temperature(logits, targets) == 1e2


def test_constant_logits_give_one_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="does not depend on the temperature"):
        assert fit_temperature(torch.ones(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])) == 1.0


def test_a_single_wrong_sample_keeps_the_optimum_finite_without_warning() -> None:
    targets = torch.arange(30) % 3
    logits = 4.0 * F.one_hot(targets, 3).float()
    logits[0] = torch.tensor([0.0, 4.0, 0.0])  # one confident mistake
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = fit_temperature(logits, targets)
    assert math.log(t) == pytest.approx(math.log(_grid_optimum(logits, targets, -4, 4)), abs=1e-4)


def test_per_class_temperatures_match_a_closed_form_and_beat_one_temperature() -> None:
    """Columns stretched by known factors: the per-class fit undoes each one, and its gradient vanishes."""
    logits, targets = _data(n=20000, k=3, seed=2)
    column_scale = torch.tensor([0.5, 1.0, 2.0])  # each class' logit stretched differently
    distorted = logits * column_scale
    per_class = fit_temperature(distorted, targets, per_class=True)
    assert per_class.shape == (3,)
    assert per_class.dtype == torch.float64
    # undoing the stretch per class gives back the calibrated logits: T_k = scale_k (up to a common shift-free
    # factor and noise)
    torch.testing.assert_close(per_class.float(), column_scale, rtol=0.06, atol=0.0)
    one = fit_temperature(distorted, targets)
    nll_vector = temperature_nll(distorted, targets, per_class)
    assert nll_vector < temperature_nll(distorted, targets, one)
    # the gradient of the NLL in log T_k vanishes at the fit
    log_t = per_class.log().clone().requires_grad_(True)
    F.cross_entropy(distorted.double() / log_t.exp(), targets).backward()
    assert log_t.grad is not None
    assert float(log_t.grad.abs().max()) < 1e-6


def test_scale_logits_divides_by_one_or_per_class_temperatures() -> None:
    logits = torch.tensor([[2.0, -4.0]])
    torch.testing.assert_close(scale_logits(logits, 2.0), torch.tensor([[1.0, -2.0]]))
    torch.testing.assert_close(
        scale_logits(logits, torch.tensor([2.0, 4.0], dtype=torch.float64)), torch.tensor([[1.0, -1.0]])
    )
    assert scale_logits(logits.half(), torch.tensor(2.0, dtype=torch.float64)).dtype == torch.float16


@pytest.mark.parametrize(
    ("logits", "targets", "error", "match"),
    [
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), ValueError, "at least one sample"),
        (torch.zeros(4), torch.zeros(4, dtype=torch.long), ValueError, r"shape \(N, num_classes\)"),
        (torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), ValueError, "sigmoid head"),
        (torch.zeros(4, 3), torch.zeros(5, dtype=torch.long), ValueError, "Expected 4 targets"),
        (torch.zeros(4, 3), torch.full((4,), 3), ValueError, r"class indices in \[0, 3\)"),
        (torch.zeros(4, 3), torch.zeros(4), TypeError, "integer dtype"),
        (torch.zeros(4, 3), torch.zeros(4, 2), ValueError, r"shape \(4, 3\)"),
        (torch.zeros(4, 3), torch.full((4, 3), 0.5), ValueError, "sum to 1"),
        (torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long), TypeError, "floating-point"),
        (torch.tensor([[0.0, math.nan], [1.0, 0.0]]), torch.tensor([0, 1]), ValueError, "1 NaN or infinite"),
        (torch.tensor([[0.0, math.inf], [1.0, 0.0]]), torch.tensor([0, 1]), ValueError, "finite logits"),
    ],
)
def test_bad_input_gets_a_clear_error(logits: Tensor, targets: Tensor, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        fit_temperature(logits, targets)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_iter": 0}, "max_iter"),
        ({"min_temperature": 0.0}, "min_temperature"),
        ({"max_temperature": 0.5}, "max_temperature"),
    ],
)
def test_bad_options_get_a_clear_error(kwargs: dict[str, Any], match: str) -> None:
    logits, targets = _data(n=10)
    with pytest.raises(ValueError, match=match):
        fit_temperature(logits, targets, **kwargs)


# --- DDP: N ranks give what one process gives on the union -----------------------------------------


def _rank_share(rank: int) -> tuple[Tensor, Tensor]:
    logits, targets = _data(n=1001, seed=3)
    cut = 400  # unequal shards
    return (2.0 * logits[:cut], targets[:cut]) if rank == 0 else (2.0 * logits[cut:], targets[cut:])


def _ddp_fit(rank: int, world_size: int) -> dict[str, Any]:
    logits, targets = _rank_share(rank)
    out: dict[str, Any] = {"t": fit_temperature(logits, targets), "nll": temperature_nll(logits, targets, 1.5)}
    out["per_class"] = fit_temperature(logits, targets, per_class=True).tolist()
    # `distributed=False` inside the group: each rank fits its own share, with no collective (rank 1 skips one fit)
    out["t_local"] = fit_temperature(logits, targets, distributed=False)
    out["nll_local"] = temperature_nll(logits, targets, 1.5, distributed=False)
    empty = (logits[:0], targets[:0]) if rank == 1 else (logits, targets)  # one rank with no samples
    out["t_empty_rank"] = fit_temperature(*empty)
    try:  # non-finite logits on one rank only: both ranks raise, none hangs
        bad = logits.clone()
        if rank == 1:
            bad[0, 0] = math.nan
        fit_temperature(bad, targets)
    except ValueError as err:
        out["error"] = str(err)
    try:  # 3 classes on rank 0, 4 on rank 1: both ranks raise with both counts
        extra = torch.cat([logits, logits[:, :1]], 1) if rank == 1 else logits
        fit_temperature(extra, targets)
    except ValueError as err:
        out["classes_error"] = str(err)
    return out


def test_two_ranks_fit_the_temperature_of_the_union(process_group_pool: Any) -> None:
    rank0, rank1 = process_group_pool(_ddp_fit)
    logits, targets = (torch.cat(parts) for parts in zip(_rank_share(0), _rank_share(1), strict=True))
    expected = fit_temperature(logits, targets)
    assert rank0["t"] == rank1["t"]  # bit-identical on every rank
    assert rank0["t"] == pytest.approx(expected, rel=1e-9)  # the union's (summation order aside)
    assert rank0["nll"] == rank1["nll"] == pytest.approx(temperature_nll(logits, targets, 1.5), rel=1e-12)
    assert rank0["per_class"] == rank1["per_class"]
    for rank, out in enumerate((rank0, rank1)):
        assert out["t_local"] == pytest.approx(fit_temperature(*_rank_share(rank)), rel=1e-9)
        assert out["nll_local"] == pytest.approx(temperature_nll(*_rank_share(rank), 1.5), rel=1e-12)
    assert rank0["t_local"] != pytest.approx(rank1["t_local"], rel=1e-3)
    torch.testing.assert_close(
        torch.tensor(rank0["per_class"], dtype=torch.float64),
        fit_temperature(logits, targets, per_class=True),
        rtol=1e-7,
        atol=0.0,
    )
    assert rank0["t_empty_rank"] == rank1["t_empty_rank"] == pytest.approx(fit_temperature(*_rank_share(0)), rel=1e-9)
    assert "1 NaN or infinite" in rank0["error"]
    assert "1 NaN or infinite" in rank1["error"]
    k = logits.shape[1]
    for rank, here in ((rank0, k), (rank1, k + 1)):
        assert rank["classes_error"] == (
            f"Expected the same number of classes on every rank, but got {here} here and between {k} and {k + 1} "
            "across ranks."
        )


def test_a_finite_optimum_outside_the_bounds_is_clamped_with_a_warning() -> None:
    logits, targets = _data()
    assert fit_temperature(0.3 * logits, targets) < 0.5
    with pytest.warns(UserWarning, match="lies outside the range"):
        assert fit_temperature(0.3 * logits, targets, min_temperature=0.5) == 0.5
    assert fit_temperature(3.0 * logits, targets) > 2.0  # over-confident: the optimum is near 3
    with pytest.warns(UserWarning, match="lies outside the range"):
        assert fit_temperature(3.0 * logits, targets, max_temperature=2.0) == 2.0


def test_temperature_nll_is_torchs_cross_entropy_of_the_scaled_logits() -> None:
    logits, targets = _data(n=50, k=4, seed=3)
    z = logits.double()
    g = torch.Generator().manual_seed(4)
    soft = torch.rand(50, 4, generator=g, dtype=torch.float64).softmax(1)
    per_class = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    assert temperature_nll(logits, targets) == pytest.approx(float(F.cross_entropy(z, targets)), rel=1e-6)
    for y in (targets, soft.float()):
        for t in (1.3, per_class):
            expected = float(F.cross_entropy(z / t, y.double() if y.ndim == 2 else y))
            assert temperature_nll(logits, y, t) == pytest.approx(expected, rel=1e-6), (y.ndim, t)
    # float64 logits keep float64 arithmetic: a python float T is not rounded to float32 on the way
    assert temperature_nll(z, targets, 1.3) == pytest.approx(float(F.cross_entropy(z / 1.3, targets)), rel=1e-13)
    assert temperature_nll(z, soft, 1.3) == pytest.approx(float(F.cross_entropy(z / 1.3, soft)), rel=1e-13)
    assert temperature_nll(z[:1], targets[:1], 2.0) == pytest.approx(float(F.cross_entropy(z[:1] / 2, targets[:1])))


def test_the_run_off_and_clamp_warnings_say_why_and_where() -> None:
    targets = torch.arange(30) % 3
    low = (
        r"runs off to 0: every held-out sample's target is its top logit \(all classified correctly\), so the NLL "
        r"keeps falling as T goes to 0\. Returning T = 0\.01 \(the `min_temperature` bound\)"
    )
    with pytest.warns(UserWarning, match=low):
        fit_temperature(20.0 * F.one_hot(targets, 3).float(), targets)
    high = (
        r"runs off to infinity: the target logits are on average no higher than the mean logit \(the logits carry "
        r"no information about the targets, or point away from them\), so the NLL keeps falling as T grows\. "
        r"Returning T = 100\.0 \(the `max_temperature` bound\)"
    )
    with pytest.warns(UserWarning, match=high):
        fit_temperature(-5.0 * F.one_hot(targets, 3).float(), targets)
    # the clamp names the optimum it clamped: one T, or the range of the per-class ones
    logits, targets = _data()
    free = fit_temperature(0.3 * logits, targets)
    with pytest.warns(UserWarning, match=rf"\(T = {free:.3g}\)\. It is clamped"):
        fit_temperature(0.3 * logits, targets, min_temperature=0.5)
    free_per_class = fit_temperature(0.3 * logits, targets, per_class=True)
    lo, hi = float(free_per_class.min()), float(free_per_class.max())
    with pytest.warns(UserWarning, match=rf"\(T = {lo:.3g} to {hi:.3g}\)\. It is clamped"):
        fit_temperature(0.3 * logits, targets, per_class=True, min_temperature=0.5)


def test_temperature_nll_of_no_sample_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"^Expected at least one sample, but got empty logits \(on every rank\)\.$"):
        temperature_nll(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_separable_logits_with_different_margins_per_sample_still_run_off_to_zero() -> None:
    targets = torch.arange(30) % 3
    margins = torch.linspace(2.0, 20.0, 30)[:, None]  # each row right, by its own margin
    with pytest.warns(UserWarning, match="runs off to 0"):
        assert fit_temperature(margins * F.one_hot(targets, 3).float(), targets) == 1e-2


@pytest.mark.parametrize(
    ("logits", "targets", "error", "message"),
    [
        (
            [[0.0, 1.0]],
            torch.zeros(1, dtype=torch.long),
            ValueError,
            "Expected `logits` of shape (N, num_classes), but got list.",
        ),
        (
            torch.zeros(4),
            torch.zeros(4, dtype=torch.long),
            ValueError,
            "Expected `logits` of shape (N, num_classes), but got shape (4,).",
        ),
        (
            torch.zeros(4, 1),
            torch.zeros(4, dtype=torch.long),
            ValueError,
            "Expected logits of at least 2 classes, but got shape (4, 1). A single logit is a sigmoid head: pass "
            "`torch.stack([-z / 2, z / 2], 1)` (the same probabilities as two-class logits).",
        ),
        (torch.zeros(4, 3), [0, 1, 2, 0], TypeError, "Expected `targets` to be a tensor, but got list."),
        (
            torch.zeros(4, 3),
            torch.zeros(4),
            TypeError,
            "Expected index targets `(N,)` of an integer dtype, but got dtype torch.float32. Pass class indices "
            "(`.long()`) or probabilities of shape (N, num_classes).",
        ),
        (
            torch.zeros(4, 3),
            torch.zeros(4, 3, dtype=torch.long),
            TypeError,
            "Expected floating-point probability targets, but got dtype torch.int64.",
        ),
        (
            torch.zeros(2, 2),
            torch.tensor([[1.5, -0.5], [0.5, 0.5]]),  # rows sum to 1, one entry is negative
            ValueError,
            "Expected probability targets: non-negative rows that sum to 1. Pass class indices `(N,)`, or normalize "
            "the rows (multi-label targets are not supported by softmax temperature scaling).",
        ),
        (
            torch.zeros(4, 3),
            torch.zeros(4, 3, 2),
            ValueError,
            "Expected targets of shape (N,) (class indices) or (N, num_classes) (probabilities), but got shape "
            "(4, 3, 2).",
        ),
    ],
)
def test_bad_input_gets_the_whole_message(logits: Any, targets: Any, error: type, message: str) -> None:
    for function in (fit_temperature, temperature_nll):
        with pytest.raises(error, match=f"^{re.escape(message)}$"):
            function(logits, targets)


def test_the_options_accept_their_bounds_and_refuse_just_beyond_with_the_whole_message() -> None:
    logits, targets = _data(n=200)
    assert fit_temperature(logits, targets, max_iter=1) > 0  # one LBFGS iteration is allowed
    assert fit_temperature(logits, targets, min_temperature=0.5, max_temperature=1.5) > 0
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=rf"^Expected `max_iter` to be an int >= 1, but got {bad!r}\.$"):
            fit_temperature(logits, targets, max_iter=bad)  # type: ignore[arg-type]
    for low, high in ((1.0, 2.0), (0.5, 1.0), (0.5, math.inf), (0.0, 2.0)):
        message = (
            r"^Expected 0 < `min_temperature` < 1 < `max_temperature` < inf, but got "
            rf"min_temperature={low!r}, max_temperature={high!r}\.$"
        )
        with pytest.raises(ValueError, match=message):
            fit_temperature(logits, targets, min_temperature=low, max_temperature=high)


def test_fit_temperature_errors_and_warnings_in_full() -> None:
    with pytest.raises(
        ValueError, match=r"^Expected at least one sample to fit the temperature on, but got empty logits\.$"
    ):
        fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    nan = (
        r"^Expected finite logits, but got 1 NaN or infinite values\. Check the model's outputs \(mixed precision "
        r"overflow, a division by zero\) before fitting a temperature\.$"
    )
    with pytest.raises(ValueError, match=nan):
        fit_temperature(torch.tensor([[0.0, math.nan], [1.0, 0.0]]), torch.tensor([0, 1]))
    constant = (
        r"^The NLL of these logits does not depend on the temperature \(every row's logits are equal, or the target "
        r"logit is at once the mean and the maximum\): returning T = 1\.$"
    )
    targets = torch.arange(30) % 3
    cases = [
        (torch.ones(6, 3), torch.tensor([0, 1, 2, 0, 1, 2]), constant),
        (20.0 * F.one_hot(targets, 3).float(), targets, r"fit on more \(or harder\) held-out data\.$"),
    ]
    for logits, y, message in cases:
        with pytest.warns(UserWarning, match=message):
            fit_temperature(logits, y)


def test_max_iter_bounds_the_lbfgs_iterations() -> None:
    # Per-class temperatures 0.5 ... 4: a few iterations stop short of them; the default reaches them.
    g = torch.Generator().manual_seed(0)
    true_logits = 3.0 * torch.randn(2000, 5, generator=g)
    targets = torch.multinomial(true_logits.softmax(1), 1, generator=g).squeeze(1)
    scales = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    logits = true_logits * scales.float()
    short = fit_temperature(logits, targets, per_class=True, max_iter=3)
    full = fit_temperature(logits, targets, per_class=True)
    assert isinstance(short, Tensor)
    assert isinstance(full, Tensor)
    torch.testing.assert_close(full, scales, rtol=0.05, atol=0.0)
    assert (short.log() - full.log()).abs().max() > 0.2
    assert (fit_temperature(logits, targets, per_class=True, max_iter=200) - full).abs().max() < 1e-6


def test_a_fit_that_ends_at_a_non_finite_temperature_raises_instead_of_returning_it(monkeypatch) -> None:
    # No real input makes this LBFGS diverge (the NLL is convex in log T); a step that leaves NaN stands in for it.
    def diverging_step(self, closure):
        closure()
        for group in self.param_groups:
            for param in group["params"]:
                param.data.fill_(float("nan"))

    monkeypatch.setattr(torch.optim.LBFGS, "step", diverging_step)
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(256, 4, generator=g)
    targets = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)  # a finite optimum, near T = 1
    with pytest.raises(RuntimeError, match="diverged") as raised:
        fit_temperature(logits, targets)
    assert str(raised.value) == "The temperature fit diverged (non-finite log T); please report this with the logits."
