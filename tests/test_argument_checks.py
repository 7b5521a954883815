"""The argument checks shared by the mixing functions and the callbacks, seen through their public callers.

Each error is compared whole (the message says what was expected and what came); each boundary is checked on
both sides. The callbacks are only constructed (no Trainer), so these tests take milliseconds.
"""

import re

import pytest
import torch

from lightning_reg import functional as LF
from lightning_reg.callbacks import CutMix, MixUp, MixUpCutMix

LAYOUTS = "['NT', 'NTD', 'NCHW', 'NCDHW', 'NTCHW']"


def _raises(exc: type[Exception], message: str):
    return pytest.raises(exc, match="^" + re.escape(message) + "$")


def _pasted(inputs: torch.Tensor, index: torch.Tensor, lo: list[int], hi: list[int], axes: list[int]) -> torch.Tensor:
    """The naive CutMix reference: a copy of ``inputs`` with the box ``lo:hi`` along ``axes`` taken from the partner."""
    expected = inputs.clone()
    region = [slice(None)] * inputs.ndim
    for axis, a, b in zip(axes, lo, hi, strict=True):
        region[axis] = slice(a, b)
    expected[tuple(region)] = inputs[index][tuple(region)]
    return expected


# --- alpha ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0, -1.0, float("inf"), float("nan"), True, "1"])
def test_sample_mixup_refuses_alpha_that_is_not_a_positive_finite_number(alpha):
    with _raises(ValueError, f"Expected `alpha` to be a positive finite float, but got {alpha!r}."):
        LF.sample_mixup(4, alpha)


# --- probabilities ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [-0.1, 1.5, True, "0.5"])
def test_probabilities_outside_zero_one_are_refused_with_their_name(p):
    with _raises(ValueError, f"Expected `prob` to be a float in [0, 1], but got {p!r}."):
        MixUp(prob=p)
    with _raises(ValueError, f"Expected `switch_prob` to be a float in [0, 1], but got {p!r}."):
        MixUpCutMix(switch_prob=p)


@pytest.mark.parametrize("p", [0, 0.5, 1])
def test_probabilities_in_zero_one_are_kept_as_floats(p):
    assert MixUp(prob=p).prob == p
    switch = MixUpCutMix(switch_prob=p).switch_prob
    assert switch == p
    assert type(switch) is float


# --- CutMix's dims ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dims", "kept"), [(None, None), ("NCHW", "NCHW"), (2, (2,)), ([2], (2,)), ([3, 2], (3, 2)), ((-1,), (-1,))]
)
def test_cutmix_keeps_dims_given_as_axes_or_a_layout(dims, kept):
    assert CutMix(dims=dims).dims == kept


@pytest.mark.parametrize("dims", [True, [], [2.0], (2, True), 2.5])
def test_cutmix_refuses_dims_that_are_neither_axes_nor_a_layout(dims):
    with _raises(ValueError, f"Expected `dims` as axes (ints) or a layout in {LAYOUTS}, but got {dims!r}."):
        CutMix(dims=dims)


def test_cutmix_refuses_an_unknown_layout_listing_the_known_ones():
    with _raises(ValueError, f"Expected a layout `dims` to be one of {LAYOUTS}, but got 'NHWC'."):
        CutMix(dims="NHWC")


# --- axes resolved against the input ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "dims", "axes"), [((3, 8), 1, [1]), ((3, 8, 2), None, [1]), ((3, 2, 5, 6), (-1, 2), [2, 3])]
)
def test_cutmix_pastes_the_partners_box_along_the_resolved_axes(shape, dims, axes):
    inputs = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    index = torch.tensor([2, 0, 1])
    lo, hi = [1] * len(axes), [shape[a] - 1 for a in axes]
    box = LF.Box(torch.tensor([lo]), torch.tensor([hi]))
    mixed, _, _ = LF.cutmix(inputs, torch.eye(3), box, index, dims=dims)
    torch.testing.assert_close(mixed, _pasted(inputs, index, lo, hi, axes), rtol=0, atol=0)


@pytest.mark.parametrize("dims", [(0,), (4,), (5,), (-5,), (2, 2), (2, -2), ()])
def test_cutmix_refuses_dims_that_are_not_distinct_non_batch_axes(dims):
    inputs, box = (
        torch.zeros(3, 2, 5, 6),
        LF.Box(torch.zeros(1, max(len(dims), 1), dtype=torch.long), torch.ones(1, max(len(dims), 1), dtype=torch.long)),
    )
    with _raises(
        ValueError, f"Expected `dims` to be distinct non-batch axes of an input with 4 dims, but got {dims!r}."
    ):
        LF.cutmix(inputs, torch.eye(3), box, torch.tensor([1, 2, 0]), dims=dims)


def test_cutmix_asks_for_dims_on_five_dim_and_six_dim_inputs():
    box = LF.Box(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))
    five = (
        "CutMix cannot tell the layout of a 5-D input: a volume (N, C, D, H, W) is cut along D, H and W "
        "(`dims='NCDHW'`, i.e. (2, 3, 4)), a video (N, T, C, H, W) along every frame's H and W, as torchvision "
        "does (`dims='NTCHW'`, i.e. (3, 4)). Pass `dims=` saying which."
    )
    with _raises(ValueError, five):
        LF.cutmix(torch.zeros(2, 1, 2, 2, 2), torch.eye(2), box, torch.tensor([1, 0]))
    six = (
        "CutMix has no default dims for inputs with 6 dims; expected sequences (N, T) or (N, T, D), "
        "images (N, C, H, W), or 5-D inputs with `dims=`. Pass `dims=` naming the axes to cut along."
    )
    with _raises(ValueError, six):
        LF.cutmix(torch.zeros(2, 1, 1, 2, 2, 2), torch.eye(2), box, torch.tensor([1, 0]))


# --- boxes ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("lo", "hi"), [((2,), (2,)), ((1, 2), (1, 3)), ((1, 3), (1, 3)), ((2, 2), (2, 2))])
def test_cutmix_refuses_a_box_of_the_wrong_shape(lo, hi):
    box = LF.Box(torch.zeros(lo, dtype=torch.long), torch.ones(hi, dtype=torch.long))
    with _raises(
        ValueError,
        f"Expected a box with `lo`/`hi` of shape (1, 2) or (4, 2), but got {lo} and {hi}. "
        "Draw it with `sample_box(lam, sizes)`.",
    ):
        LF.cutmix(torch.zeros(4, 1, 5, 5), torch.eye(4), box, torch.tensor([1, 2, 3, 0]))


@pytest.mark.parametrize("minmax", [0.5, "ab", (0.1, 0.2, 0.3), (0.1, "x"), (True, 0.5), (0.2,)])
def test_sample_box_refuses_minmax_that_is_not_two_floats(minmax):
    with _raises(ValueError, f"Expected `cutmix_minmax` as two floats (lo, hi), side fractions, but got {minmax!r}."):
        LF.sample_box(0.5, (8, 8), minmax=minmax)


@pytest.mark.parametrize("minmax", [(0.0, 0.5), (0.5, 0.5), (0.6, 0.5), (0.5, 1.5)])
def test_sample_box_refuses_minmax_outside_zero_lo_hi_one(minmax):
    with _raises(ValueError, f"Expected `cutmix_minmax` (lo, hi) with 0 < lo < hi <= 1, but got {minmax!r}."):
        LF.sample_box(0.5, (8, 8), minmax=minmax)


def test_sample_box_accepts_minmax_up_to_the_whole_side():
    box = LF.sample_box(0.5, (8, 8), minmax=(0.5, 1.0), generator=torch.Generator().manual_seed(0))
    sides = box.hi - box.lo
    assert bool(((sides >= 4) & (sides <= 8)).all())


# --- index, lam, targets, out -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("index", "got"),
    [
        ([1, 0, 2], "[1, 0, 2]"),
        (torch.tensor([1, 0]), "shape (2,) dtype torch.int64"),
        (torch.tensor([1.0, 0.0, 2.0]), "shape (3,) dtype torch.float32"),
    ],
)
def test_mixup_refuses_an_index_that_is_not_a_pairing_of_the_batch(index, got):
    with _raises(
        ValueError, f"Expected `index` as an int64 tensor of shape (3,), a pairing of the batch, but got {got}."
    ):
        LF.mixup(torch.zeros(3, 2), torch.eye(3), 0.5, index)


def test_mixup_refuses_an_index_outside_a_batch_of_one():
    with _raises(ValueError, "Expected `index` values in [0, 1), but got [1, 1]."):
        LF.mixup(torch.zeros(1, 2), torch.eye(1), 0.5, torch.tensor([1]))


def test_mixup_refuses_lam_outside_zero_one_for_a_batch_of_one():
    with _raises(ValueError, "Expected every `lam` in [0, 1], but got values in [1.5, 1.5]."):
        LF.mixup(torch.zeros(1, 2), torch.eye(1), torch.tensor([1.5]), torch.tensor([0]))
    with _raises(ValueError, "Expected `lam` to be a float in [0, 1] or a (N,) tensor, but got True."):
        LF.mixup(torch.zeros(1, 2), torch.eye(1), True, torch.tensor([0]))


@pytest.mark.parametrize(
    ("targets", "got"),
    [
        ([0, 1, 2], "[0, 1, 2]"),
        (torch.tensor([0, 1, 2]), "shape (3,) dtype torch.int64"),
        (torch.zeros(3), "shape (3,) dtype torch.float32"),
        (torch.zeros(3, 2, dtype=torch.long), "shape (3, 2) dtype torch.int64"),
    ],
)
def test_mixup_refuses_targets_that_are_not_probability_rows(targets, got):
    with _raises(
        ValueError,
        f"Expected `targets` as float probabilities of shape (N, K), but got {got}. "
        "Convert class indices with `one_hot(targets, num_classes)` first.",
    ):
        LF.mixup(torch.zeros(3, 2), targets, 0.5, torch.tensor([1, 2, 0]))


def test_mixup_refuses_targets_of_another_batch_size_naming_both_sizes():
    with _raises(
        ValueError,
        "Expected `inputs` and `targets` with the same batch size, but got 4 inputs and 3 targets. "
        "Check that the batch keys point at the right entries.",
    ):
        LF.mixup(torch.zeros(4, 2), torch.zeros(3, 5), 0.5, torch.tensor([1, 2, 3, 0]))


@pytest.mark.parametrize(
    ("out", "got"),
    [
        (torch.zeros(3, 2, dtype=torch.float64), "((3, 2), torch.float64, cpu)"),
        (torch.zeros(3, 3), "((3, 3), torch.float32, cpu)"),
        ([0.0], "[0.0]"),
    ],
)
def test_mixup_refuses_an_out_unlike_the_inputs(out, got):
    with _raises(
        ValueError,
        f"Expected `out` like `inputs` ((3, 2), torch.float32, cpu), but got {got}. "
        "Pass `out=torch.empty_like(inputs)`, or `out=inputs` to overwrite the inputs.",
    ):
        LF.mixup(torch.zeros(3, 2), torch.eye(3), 0.5, torch.tensor([1, 2, 0]), out=out)


def test_mixup_refuses_an_out_that_shares_the_inputs_memory_or_records_no_grad():
    inputs = torch.zeros(3, 2)
    with _raises(ValueError, "`out` shares memory with `inputs`; pass `out=inputs` itself to overwrite the inputs."):
        LF.mixup(inputs, torch.eye(3), 0.5, torch.tensor([1, 2, 0]), out=inputs[:])
    leaf = torch.zeros(3, 2, requires_grad=True)
    with _raises(ValueError, "`out=` cannot record autograd history, and `inputs` require grad: leave `out` unset."):
        LF.mixup(leaf, torch.eye(3), 0.5, torch.tensor([1, 2, 0]), out=torch.empty(3, 2))


def test_mixup_of_an_empty_batch_into_an_empty_out_is_empty():
    inputs = torch.zeros(0, 3)
    mixed, targets = LF.mixup(inputs, torch.zeros(0, 2), 0.5, torch.zeros(0, dtype=torch.long), out=torch.empty(0, 3))
    assert mixed.shape == (0, 3)
    assert targets.shape == (0, 2)


@pytest.mark.parametrize(("lam", "own"), [(1, True), (1.0, True), (0.0, False)])
def test_mixup_accepts_the_ends_of_lam_keeping_the_own_or_the_partners_sample(lam, own):
    inputs, index = torch.arange(6.0).reshape(3, 2), torch.tensor([1, 2, 0])
    mixed, targets = LF.mixup(inputs, torch.eye(3), lam, index)
    torch.testing.assert_close(mixed, inputs if own else inputs[index], rtol=0, atol=0)
    torch.testing.assert_close(targets, torch.eye(3) if own else torch.eye(3)[index], rtol=0, atol=0)
