import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_reg import functional as LF
from lightning_reg.functional._targets import mixed_one_hot


def test_one_hot_of_indices_matches_torch():
    y = torch.tensor([2, 0, 1])
    assert torch.equal(LF.one_hot(y, 3), F.one_hot(y, 3).float())


def test_smoothed_one_hot_gives_the_same_loss_as_cross_entropy_label_smoothing():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 0])
    expected = F.cross_entropy(logits, y, label_smoothing=0.2)
    assert torch.allclose(F.cross_entropy(logits, LF.one_hot(y, 4, smoothing=0.2)), expected)


def test_probability_targets_pass_through_and_are_smoothed_if_asked():
    p = torch.tensor([[0.25, 0.75]])
    assert LF.one_hot(p, 2) is p
    assert torch.allclose(LF.one_hot(p, 2, smoothing=0.5), torch.tensor([[0.375, 0.625]]))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 6), k=st.integers(1, 7), s=st.floats(0.0, 0.99))
def test_rows_sum_to_one(n, k, s):
    y = torch.arange(n) % k
    probs = LF.one_hot(y, k, smoothing=s)
    assert probs.shape == (n, k)
    assert torch.allclose(probs.sum(1), torch.ones(n))


@pytest.mark.parametrize(
    ("targets", "num_classes", "smoothing", "match"),
    [
        (torch.tensor([0, 3]), 3, 0.0, r"indices in \[0, 3\).*\[0, 3\]"),
        (torch.tensor([-1, 0]), 3, 0.0, r"indices in \[0, 3\)"),
        (torch.ones(2, 4), 3, 0.0, "num_classes=3 columns"),
        (torch.zeros(2, 1, dtype=torch.long), 3, 0.0, r"Squeeze \(N, 1\)"),
        (torch.tensor([0.0, 1.0]), 3, 0.0, "cast float indices"),
        (torch.tensor([0, 1]), 0, 0.0, "`num_classes` to be a positive int"),
        (torch.tensor([0, 1]), 3, 1.0, r"`smoothing` to be a float in \[0, 1\)"),
    ],
)
def test_one_hot_rejects_bad_input(targets, num_classes, smoothing, match):
    with pytest.raises(ValueError, match=match):
        LF.one_hot(targets, num_classes, smoothing)


def test_one_hot_rejects_non_tensor_targets():
    with pytest.raises(TypeError, match="got list"):
        LF.one_hot([0, 1], 2)


@pytest.mark.parametrize("per_sample", [False, True])
def test_mixed_one_hot_equals_mixing_the_one_hot_rows(per_sample):
    from lightning_reg.functional._targets import mixed_one_hot

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (7,), generator=g)
    index = torch.randperm(7, generator=g)
    lam = torch.rand(7, generator=g) if per_sample else 0.3
    expected = LF.mixup(torch.zeros(7, 1), LF.one_hot(y, 5, smoothing=0.1), lam, index)[1]
    assert torch.allclose(mixed_one_hot(y, 5, lam, index, smoothing=0.1), expected, atol=1e-6)
    assert torch.allclose(mixed_one_hot(LF.one_hot(y, 5), 5, lam, index, smoothing=0.1), expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"indices in \[0, 3\)"):
        mixed_one_hot(y, 3, lam, index)


def test_mixed_one_hot_rounds_a_float64_lam_to_the_row_dtype_before_one_minus_lam():
    # Mixing float32 one-hot rows multiplies by lam and 1 - lam in float32: 1 - lam is taken after the rounding.
    g = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 8
    index = torch.arange(64).roll(-1)  # every partner has another class
    lam = torch.rand(64, generator=g, dtype=torch.float64)
    w = lam.float()
    expected = torch.zeros(64, 8)
    expected[torch.arange(64), y] = w
    expected[torch.arange(64), y[index]] = 1 - w
    assert bool((1 - w != (1 - lam).float()).any())  # the data tells the two orders apart
    torch.testing.assert_close(mixed_one_hot(y, 8, lam, index), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_mixed_one_hot_of_narrow_integer_labels_equals_that_of_int64_labels(dtype):
    y, index = torch.tensor([0, 2, 1, 2]), torch.tensor([1, 2, 3, 0])
    expected = 0.25 * F.one_hot(y, 3).float() + 0.75 * F.one_hot(y[index], 3).float()
    torch.testing.assert_close(mixed_one_hot(y.to(dtype), 3, 0.25, index), expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(mixed_one_hot(y.to(dtype), 3, 0.25, index, shift=1), expected, rtol=0, atol=1e-7)


def test_mixed_one_hot_with_a_per_sample_lam_warns_nothing():
    # A kernel writing into a wrongly sized buffer would resize it, and torch warns about that.
    y, index = torch.tensor([0, 2, 1, 2]), torch.tensor([1, 2, 3, 0])
    lam = torch.tensor([0.1, 0.4, 0.6, 0.9])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = mixed_one_hot(y, 3, lam, index)
    expected = lam[:, None] * F.one_hot(y, 3) + (1 - lam)[:, None] * F.one_hot(y[index], 3)
    torch.testing.assert_close(rows, expected, rtol=0, atol=1e-7)


def test_mixed_one_hot_on_the_cpu_reports_a_wrong_out_before_reading_the_labels():
    # On the CPU the labels' range is left to the scatter (no host sync before it): the `out` check comes first.
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Expected `out` as a float tensor of shape (3, 3) on cpu, but got (3, 4) torch.float32 on cpu. "
            "Pass `out=torch.empty(3, 3)`."
        ),
    ):
        mixed_one_hot(torch.tensor([0, 5, 1]), 3, 0.25, torch.tensor([1, 2, 0]), out=torch.empty(3, 4))


def test_mixed_one_hot_writes_into_out_and_rejects_a_wrong_out():
    from lightning_reg.functional._targets import mixed_one_hot

    y, index = torch.tensor([0, 2, 1]), torch.tensor([1, 2, 0])
    out = torch.full((3, 3), 7.0)  # stale values must not leak into the result
    result = mixed_one_hot(y, 3, 0.25, index, smoothing=0.1, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(result, mixed_one_hot(y, 3, 0.25, index, smoothing=0.1))
    with pytest.raises(ValueError, match=r"Expected `out` as a float tensor of shape \(3, 3\)"):
        mixed_one_hot(y, 3, 0.25, index, out=torch.empty(3, 4))


# --- issue 12, point 5: multi-hot and dense targets -----------------------------------------------------------------
def test_multi_hot_rows_are_smoothed_per_entry_and_mixed_as_timm_does():
    from timm.data.mixup import mixup_target

    from lightning_reg.functional._targets import mixed_one_hot

    y = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    index = torch.arange(3).flip(0)  # timm pairs i with N - 1 - i
    for lam in (1.0, 0.3):
        expected = mixup_target(y, 4, lam=lam, smoothing=0.2, multi_label=True)
        assert torch.allclose(mixed_one_hot(y, 4, lam, index, 0.2, multi_label=True), expected)
    assert torch.allclose(LF.one_hot(y, 4, 0.2, multi_label=True), y * 0.8 + 0.1)
    with pytest.raises(ValueError, match="multi-hot float rows"):
        LF.one_hot(torch.tensor([0, 1]), 4, multi_label=True)


def test_rows_that_are_not_distributions_are_reported_with_the_fix():
    from lightning_reg.functional._checks import check_rows

    check_rows(torch.tensor([[0.3, 0.7]]))
    with pytest.raises(ValueError, match=r"rows sum to 1, but a row sums to 2.*multi_label=True"):
        check_rows(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    check_rows(torch.tensor([[1.0, 1.0], [0.0, 1.0]]), multi_label=True)
    with pytest.raises(ValueError, match=r"entries in \[0, 1\].*softmax"):
        check_rows(torch.tensor([[2.0, -1.0]]))


@pytest.mark.parametrize("targets", [torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 4, 4)])
def test_dense_targets_say_plainly_that_they_are_not_supported(targets):
    with pytest.raises(ValueError, match=r"segmentation masks \(N, H, W\) are not supported") as info:
        LF.one_hot(targets, 3)
    assert "Squeeze" not in str(info.value)


# --- issue 12, point 8: float64 default dtype -------------------------------------------------------------------
def test_mixed_one_hot_follows_a_float64_default_dtype():
    from lightning_reg.functional._targets import mixed_one_hot

    y, index = torch.tensor([0, 2, 1]), torch.tensor([1, 2, 0])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for lam in (0.3, torch.tensor([0.2, 0.5, 0.9])):
            out = mixed_one_hot(y, 3, lam, index, smoothing=0.1)
            rows = LF.one_hot(y, 3, smoothing=0.1)
            w = lam[:, None] if isinstance(lam, torch.Tensor) else lam
            assert out.dtype == rows.dtype == torch.float64
            assert torch.allclose(out, w * rows + (1 - w) * rows[index], atol=1e-15)
    finally:
        torch.set_default_dtype(previous)
    assert mixed_one_hot(y, 3, 0.3, index, dtype=torch.float64).dtype == torch.float64


# --- the validation helpers the callbacks share: their boundaries and their messages ----------------------------


def test_check_range_accepts_exactly_the_indices_zero_to_k_minus_one() -> None:
    from lightning_reg.functional._checks import check_range

    check_range(torch.tensor([0, 2]), 3)  # both ends of the range
    check_range(torch.tensor([], dtype=torch.long), 3)  # an empty batch has no range to read
    message = (
        r"^Expected class indices in \[0, 3\), but got values in \[{}, {}\]\. "
        r"Pass the right `num_classes`, or remap the labels to 0\.\.num_classes-1\.$"
    )
    for bad, (low, high) in ((torch.tensor([3]), (3, 3)), (torch.tensor([-1, 0]), (-1, 0))):
        with pytest.raises(ValueError, match=message.format(low, high)):
            check_range(bad, 3)


def test_check_rows_boundaries_are_inclusive_at_the_tolerance() -> None:
    from lightning_reg.functional._checks import check_rows

    # Values exact in binary, so that a bound is met exactly: -atol, 1 + atol, and a row sum of 1 + atol pass.
    check_rows(torch.tensor([[-0.25, 1.25]], dtype=torch.float64), atol=0.25)
    check_rows(torch.tensor([[0.5, 0.75]], dtype=torch.float64), atol=0.25)
    check_rows(torch.zeros(0, 3))  # nothing to check
    entries = (
        r"^Expected probability targets with entries in \[0, 1\], but got values in \[{}, {}\]\. Pass probabilities "
        r"\(apply softmax to logits\), or class indices as an integer tensor \(N,\)\.$"
    )
    for row, low, high in (([[2.0]], "2", "2"), ([[-0.5, 0.5, 1.0]], "-0.5", "1"), ([[1.5, 0.0]], "0", "1.5")):
        with pytest.raises(ValueError, match=entries.format(low, high)):
            check_rows(torch.tensor(row))
    sums = (
        r"^Expected probability targets \(N, K\) whose rows sum to 1, but a row sums to 1\.5 \(rows sum to "
        r"\[1\.5, 1\.5\]\)\. Multi-hot \(multi-label\) targets need `multi_label=True`: each entry is then an "
        r"independent binary label, smoothed towards 1/2\.$"
    )
    with pytest.raises(ValueError, match=sums):
        check_rows(torch.tensor([[0.75, 0.75]]))
    check_rows(torch.tensor([[0.75, 0.75]]), multi_label=True)


@pytest.mark.parametrize("dtype", [torch.long, torch.bool, "float32"])
def test_one_hot_rejects_a_dtype_that_is_not_floating(dtype: object) -> None:
    with pytest.raises(ValueError, match=r"^Expected `dtype` to be a floating torch\.dtype or None, but got "):
        LF.one_hot(torch.tensor([0, 1]), 2, dtype=dtype)  # type: ignore[arg-type]


def test_smooth_spreads_over_the_k_classes_unless_told_multi_label() -> None:
    rows = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(LF.smooth(rows, 0.4), torch.tensor([[0.7, 0.1, 0.1, 0.1]]))
    torch.testing.assert_close(LF.smooth(rows, 0.4, multi_label=True), torch.tensor([[0.8, 0.2, 0.2, 0.2]]))


def _naive_mixed(rows: torch.Tensor, lam: torch.Tensor, partner: torch.Tensor, smoothing: float) -> torch.Tensor:
    """``smooth(lam * rows + (1 - lam) * rows[partner])`` in float64, row by row."""
    k = rows.shape[1]
    out = torch.stack([lam[i] * rows[i] + (1 - lam[i]) * rows[j] for i, j in enumerate(partner.tolist())])
    return (1 - smoothing) * out + smoothing / k


@pytest.mark.parametrize("as_rows", [False, True], ids=["indices", "probability rows"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["float lam", "tensor lam"])
def test_mixed_one_hot_with_a_shift_or_an_index_is_the_naive_mix_in_float64(as_rows: bool, per_sample: bool) -> None:
    g = torch.Generator().manual_seed(0)
    n, k, shift, smoothing = 6, 5, 2, 0.1
    labels = torch.tensor([0, 3, 1, 4, 4, 2])
    rows = torch.rand(n, k, generator=g, dtype=torch.float64)
    rows /= rows.sum(1, keepdim=True)
    targets = rows if as_rows else labels
    reference_rows = rows if as_rows else F.one_hot(labels, k).double()
    # a float32 lam tensor (exact eighths), to be cast to the rows' float64
    lam = (
        torch.randint(1, 8, (n,), generator=g).double() / 8
        if per_sample
        else torch.full((n,), 0.3, dtype=torch.float64)
    )
    lam_arg = lam.float() if per_sample else 0.3
    partner = (torch.arange(n) + shift) % n
    expected = _naive_mixed(reference_rows, lam, partner, smoothing)
    dtype = None if as_rows else torch.float64
    by_index = mixed_one_hot(targets, k, lam_arg, partner, smoothing, dtype=dtype)
    # `shift` promises index[i] == (i + shift) % N and is not read: a wrong index shows whether it is
    wrong = torch.zeros(n, dtype=torch.long)
    by_shift = mixed_one_hot(targets, k, lam_arg, wrong, smoothing, shift=shift, dtype=dtype)
    for got in (by_index, by_shift):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # into a float64 buffer, dtype taken from it
    out = torch.empty(n, k, dtype=torch.float64)
    if not as_rows:
        mixed_one_hot(labels, k, lam_arg, partner, smoothing, out=out)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_mixed_one_hot_refuses_class_indices_for_multi_label_with_the_fix() -> None:
    message = (
        r"^`multi_label=True` expects multi-hot float rows \(N, K\), but got class indices of shape \(3,\)\. Build "
        r"the multi-hot rows in the dataset, or drop `multi_label` for single-label classes\.$"
    )
    with pytest.raises(ValueError, match=message):
        mixed_one_hot(torch.tensor([0, 1, 2]), 3, 0.5, torch.tensor([1, 2, 0]), multi_label=True)


def test_one_hot_builds_rows_of_the_dtype_asked_for_and_names_the_bad_targets() -> None:
    rows = LF.one_hot(torch.tensor([2, 0]), 3, 0.3, dtype=torch.float64)
    assert rows.dtype == torch.float64
    torch.testing.assert_close(rows, torch.tensor([[0.1, 0.1, 0.8], [0.8, 0.1, 0.1]], dtype=torch.float64))
    dense = (
        r"^Expected `targets` with one label per sample: class indices \(N,\) or per-class rows \(N, K\) "
        r"\(probabilities, or multi-hot rows with `multi_label=True`\), but got shape {shape} and dtype {dtype}\. "
        r"Dense targets such as segmentation masks \(N, H, W\) are not supported: mixing and smoothing here act on "
        r"one label distribution per sample\.$"
    )
    for bad in (torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, 3, 3)):
        shape = re.escape(str(tuple(bad.shape)))
        with pytest.raises(ValueError, match=dense.format(shape=shape, dtype=re.escape(str(bad.dtype)))):
            LF.one_hot(bad, 3)
    squeeze = (
        r"^Expected `targets` as class indices of shape \(N,\) with an integer dtype or probabilities of shape "
        r"\(N, K\) with a float dtype, but got shape \(4, 1\) and dtype torch\.int64\. Squeeze \(N, 1\) targets to "
        r"\(N,\), cast float indices with `\.long\(\)`, or pass one-hot rows as float\.$"
    )
    with pytest.raises(ValueError, match=squeeze):
        LF.one_hot(torch.zeros(4, 1, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"^`multi_label=True` expects multi-hot float rows \(N, K\), but got class "):
        LF.one_hot(torch.tensor([0, 1]), 3, multi_label=True)
    with pytest.raises(ValueError, match=r"^`multi_label=True` expects .* class indices of shape \(2,\)\. Build"):
        LF.one_hot(torch.tensor([0, 1]), 3, multi_label=True)
    with pytest.raises(ValueError, match=r"^Expected `smoothing` to be a float in \[0, 1\), but got '0\.1'\.$"):
        LF.one_hot(torch.tensor([0, 1]), 3, "0.1")  # type: ignore[arg-type]


def test_mixed_one_hot_refuses_a_non_float_out_buffer_and_a_non_int_num_classes() -> None:
    labels, index = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0])
    message = (
        r"^Expected `out` as a float tensor of shape \(3, 3\) on cpu, but got \(3, 3\) torch\.int64 on cpu\. "
        r"Pass `out=torch\.empty\(3, 3\)`\.$"
    )
    with pytest.raises(ValueError, match=message):
        mixed_one_hot(labels, 3, 0.5, index, out=torch.empty(3, 3, dtype=torch.long))
    for bad in (2.5, True, 0):
        with pytest.raises(ValueError, match=rf"^Expected `num_classes` to be a positive int, but got {bad!r}\.$"):
            mixed_one_hot(labels, bad, 0.5, index)  # type: ignore[arg-type]
