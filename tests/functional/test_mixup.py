import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.transforms import v2

from lightning_reg import functional as LF


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_mixup_formula_with_fixed_lambda_and_pairing():
    x = torch.randn(4, 3, generator=_gen())
    y = LF.one_hot(torch.tensor([0, 1, 2, 0]), 3)
    index = torch.tensor([2, 0, 3, 1])
    out_x, out_y = LF.mixup(x, y, 0.3, index)
    assert torch.allclose(out_x, 0.3 * x + 0.7 * x[index])
    assert torch.allclose(out_y, 0.3 * y + 0.7 * y[index])


def test_mixup_per_sample_lambda():
    x = torch.randn(3, 2, 2, generator=_gen())
    y = torch.eye(3)
    lam = torch.tensor([0.0, 0.5, 1.0])
    index = torch.tensor([1, 2, 0])
    out_x, out_y = LF.mixup(x, y, lam, index)
    assert torch.allclose(out_x, lam[:, None, None] * x + (1 - lam[:, None, None]) * x[index])
    assert torch.allclose(out_y, lam[:, None] * y + (1 - lam[:, None]) * y[index])


def test_mixup_does_not_change_its_arguments_unless_inplace():
    x = torch.randn(4, 5, generator=_gen())
    before = x.clone()
    out, _ = LF.mixup(x, torch.eye(4), 0.4, torch.tensor([1, 0, 3, 2]))
    assert torch.equal(x, before)
    out_inplace, _ = LF.mixup(x, torch.eye(4), 0.4, torch.tensor([1, 0, 3, 2]), out=x)
    assert out_inplace is x
    assert torch.allclose(x, out)


def test_mixup_matches_torchvision_mixup_with_its_roll_pairing():
    images = torch.rand(6, 3, 8, 8, generator=_gen())
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    tv = v2.MixUp(alpha=1.0, num_classes=5)
    params = {"lam": 0.37, "labels": labels, "batch_size": 6}
    tv_images, tv_labels = tv.transform(images, params), tv.transform(labels, params)
    index = torch.arange(6).roll(1)  # torchvision pairs sample i with sample i - 1
    ours_images, ours_labels = LF.mixup(images, LF.one_hot(labels, 5), 0.37, index)
    assert torch.allclose(ours_images, tv_images, atol=1e-6)
    assert torch.allclose(ours_labels, tv_labels, atol=1e-6)


def test_uint8_images_are_blended_in_float_and_rounded_back():
    x = torch.tensor([[0, 255], [10, 20]], dtype=torch.uint8)
    out, _ = LF.mixup(x, torch.eye(2), 0.5, torch.tensor([1, 0]))
    assert out.dtype == torch.uint8
    assert out.tolist() == [[5, 138], [5, 138]]  # 0.5 * (0 + 10) = 5, 0.5 * (255 + 20) = 137.5 -> 138 (half to even)


def test_sampling_is_reproducible_from_the_generator_and_draws_a_permutation():
    a = LF.sample_mixup(8, 0.4, per_sample=True, generator=_gen(3))
    b = LF.sample_mixup(8, 0.4, per_sample=True, generator=_gen(3))
    assert torch.equal(a.lam, b.lam)
    assert torch.equal(a.index, b.index)
    assert sorted(a.index.tolist()) == list(range(8))


@pytest.mark.parametrize("per_sample", [True, False])
def test_lambda_follows_beta_alpha_alpha_by_a_kolmogorov_smirnov_test(per_sample):
    # Both paths (a (N,) tensor of draws, and one float a batch). 4000 draws tell Beta(0.2) from Beta(0.45): their
    # CDFs differ by up to 0.135, ten times the KS statistic's spread (about 0.013) at this sample size.
    from scipy import stats

    g = _gen()
    if per_sample:
        lam = LF.sample_mixup(4000, 0.2, per_sample=True, generator=g).lam.double().numpy()
    else:
        lam = [LF.sample_mixup(2, 0.2, generator=g).lam for _ in range(4000)]
    assert stats.kstest(lam, stats.beta(0.2, 0.2).cdf).pvalue > 1e-3
    assert stats.kstest(lam, stats.beta(0.45, 0.45).cdf).pvalue < 1e-6  # the test rejects the wrong alpha


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    n=st.integers(1, 7),
    lam=st.floats(0.0, 1.0),
    per_sample=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_mixup_properties(shape, n, lam, per_sample, seed):
    g = _gen(seed)
    x = torch.randn(n, *shape, generator=g)
    y = LF.one_hot(torch.randint(0, 3, (n,), generator=g), 3)
    index = torch.randperm(n, generator=g)
    lam_arg = torch.rand(n, generator=g) if per_sample else lam
    out_x, out_y = LF.mixup(x, y, lam_arg, index)
    assert out_x.shape == x.shape
    assert torch.allclose(out_y.sum(1), torch.ones(n), atol=1e-6)
    w = lam_arg.view(-1, *[1] * len(shape)) if per_sample else lam_arg
    assert torch.allclose(out_x, w * x + (1 - w) * x[index], atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"targets": torch.tensor([0, 1])}, ValueError, r"float probabilities of shape \(N, K\).*one_hot"),
        ({"targets": torch.eye(3)}, ValueError, "same batch size, but got 2 inputs and 3 targets"),
        ({"lam": 1.5}, ValueError, r"`lam` to be a float in \[0, 1\]"),
        ({"lam": torch.tensor([0.5])}, ValueError, r"floats of shape \(2,\)"),
        ({"lam": torch.tensor([0.5, 2.0])}, ValueError, r"every `lam` in \[0, 1\]"),
        ({"index": torch.tensor([0, 2])}, ValueError, r"`index` values in \[0, 2\)"),
        ({"index": torch.tensor([0.0, 1.0])}, ValueError, "int64 tensor of shape"),
        ({"inputs": torch.zeros(2, 1, dtype=torch.bool)}, TypeError, "real-valued `inputs`"),
    ],
)
def test_mixup_rejects_bad_arguments(kwargs, error, match):
    args = {"inputs": torch.zeros(2, 1), "targets": torch.eye(2), "lam": 0.5, "index": torch.tensor([1, 0])}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        LF.mixup(**args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 0.0}, "positive finite"),
        ({"batch_size": 0}, "positive int"),
        ({"pairing": "flip"}, r"`pairing` to be one of \['shift', 'permutation'\], but got 'flip'"),
    ],
)
def test_sample_mixup_rejects_bad_arguments(kwargs, match):
    args = {"batch_size": 2, "alpha": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        LF.sample_mixup(**args)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("shape", [(7, 3), (6, 2, 5, 5)])
def test_shift_pairing_is_bit_identical_to_gathering_the_partners(per_sample, shape):
    g = _gen()
    x = torch.randn(shape, generator=g)
    n = shape[0]
    lam = torch.rand(n, generator=g) if per_sample else 0.37
    w = lam.view(-1, *[1] * (len(shape) - 1)) if per_sample else lam
    for k in range(n):
        index = torch.arange(n).roll(-k)  # index[i] = (i + k) % n: applied without a gather
        gathered = x[index].lerp_(x, w)  # the reference: partner + lam * (x - partner)
        y = torch.eye(n)
        assert torch.equal(LF.mixup(x, y, lam, index)[0], gathered)
        assert torch.equal(LF.mixup(x, y, lam, index, out=torch.empty_like(x))[0], gathered)
        inplace = x.clone()
        assert torch.equal(LF.mixup(inplace, y, lam, index, out=inplace)[0], gathered)


@pytest.mark.parametrize("index", [[1, 0, 2], [4, 3, 2, 1, 0], [2, 0, 3, 1], [1, 2, 0, 4, 3]])
def test_pairings_that_are_not_rolls_are_gathered_correctly(index):
    # Pairings that start or end like a roll but are none: the result is the gathered reference all the same.
    index = torch.tensor(index)
    x = torch.randn(len(index), 3, generator=_gen())
    out, _ = LF.mixup(x, torch.eye(len(index)), 0.3, index)
    assert torch.equal(out, x[index].lerp_(x, 0.3))


def test_default_pairing_is_a_random_shift_without_self_pairs_and_permutation_is_available():
    draws = [LF.sample_mixup(6, 1.0, generator=_gen(seed)) for seed in range(60)]
    assert all(torch.equal(p.index, torch.arange(6).roll(-p.shift)) for p in draws)  # index[i] = (i + k) % N
    assert {p.shift for p in draws} == {1, 2, 3, 4, 5}  # every k in 1..N-1, never 0 (a sample mixed with itself)
    perms = [LF.sample_mixup(6, 1.0, pairing="permutation", generator=_gen(seed)).index for seed in range(60)]
    assert all(sorted(p.tolist()) == list(range(6)) for p in perms)
    rolls = [torch.arange(6).roll(-k) for k in range(6)]
    assert any(not any(torch.equal(p, r) for r in rolls) for p in perms)
    assert LF.sample_mixup(6, 1.0, pairing="permutation", generator=_gen()).shift is None
    assert LF.sample_mixup(1, 1.0, generator=_gen()).index.tolist() == [0]


def test_out_receives_the_mixed_inputs():
    x = torch.randn(4, 3, generator=_gen())
    out = torch.empty_like(x)
    index = torch.tensor([2, 0, 3, 1])
    mixed, _ = LF.mixup(x, torch.eye(4), 0.3, index, out=out)
    assert mixed.data_ptr() == out.data_ptr()
    assert torch.allclose(out, 0.3 * x + 0.7 * x[index])
    uint8 = torch.tensor([[0, 255], [10, 20]], dtype=torch.uint8)
    out8 = torch.empty_like(uint8)
    assert LF.mixup(uint8, torch.eye(2), 0.5, torch.tensor([1, 0]), out=out8)[0].tolist() == [[5, 138], [5, 138]]
    assert out8.tolist() == [[5, 138], [5, 138]]


def test_inputs_that_require_grad_keep_their_graph_with_a_shift_pairing():
    x = torch.randn(4, 3, generator=_gen(), requires_grad=True)
    mixed, _ = LF.mixup(x, torch.eye(4), 0.25, torch.arange(4).roll(-1))
    mixed.sum().backward()
    assert torch.allclose(x.grad, torch.ones(4, 3))  # each sample enters once with 0.25 and once with 0.75


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"inputs": [0.0, 1.0]}, TypeError, r"`inputs` to be a tensor of shape \(N, ...\)"),
        ({"out": torch.empty(2, 2)}, ValueError, "Expected `out` like `inputs`"),
        ({"out": "buffer"}, ValueError, "Expected `out` like `inputs`"),
    ],
)
def test_mixup_rejects_bad_inputs_and_out(kwargs, error, match):
    args = {"inputs": torch.zeros(2, 1), "targets": torch.eye(2), "lam": 0.5, "index": torch.tensor([1, 0])}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        LF.mixup(**args)


def test_out_must_not_share_memory_with_inputs_or_serve_inputs_that_require_grad():
    x = torch.zeros(2, 1)
    with pytest.raises(ValueError, match=r"shares memory with `inputs`.*`out=inputs` itself"):
        LF.mixup(x, torch.eye(2), 0.5, torch.tensor([1, 0]), out=x.view(2, 1))
    with pytest.raises(ValueError, match="cannot record autograd history"):
        LF.mixup(x.requires_grad_(), torch.eye(2), 0.5, torch.tensor([1, 0]), out=torch.empty(2, 1))


# --- issue 12, point 23: permutation pairing without fixed points ---------------------------------------------------
def test_permutation_pairing_is_a_uniform_derangement():
    from collections import Counter

    g = _gen()
    draws = [LF.sample_mixup(8, 1.0, pairing="permutation", generator=g).index for _ in range(300)]
    assert all(bool((d != torch.arange(8)).all()) for d in draws)  # nobody is paired with itself
    assert all(sorted(d.tolist()) == list(range(8)) for d in draws)
    counts = Counter(
        tuple(LF.sample_mixup(4, 1.0, pairing="permutation", generator=g).index.tolist()) for _ in range(2700)
    )
    assert len(counts) == 9  # all 9 derangements of 4 elements
    assert max(counts.values()) < 400
    assert min(counts.values()) > 200
    assert LF.sample_mixup(2, 1.0, pairing="permutation", generator=g).index.tolist() == [1, 0]
    assert LF.sample_mixup(1, 1.0, pairing="permutation", generator=g).index.tolist() == [0]  # N=1: nothing to mix


def test_every_sample_blends_two_labels_as_in_torchvisions_tests():
    # torchvision's TestCutMixMixUp: labels unique in the batch, so every mixed row has exactly 2 non-zero entries.
    g = _gen()
    y = torch.arange(32)
    for pairing in ("shift", "permutation"):
        for _ in range(20):
            params = LF.sample_mixup(32, 1.0, pairing=pairing, generator=g)
            _, target = LF.mixup(torch.zeros(32, 1), LF.one_hot(y, 100), params.lam, params.index)
            assert target.shape == (32, 100)
            assert torch.allclose(target.sum(-1), torch.ones(32))
            assert bool(((target != 0).sum(-1) == 2).all())


def test_draws_move_to_a_device_as_one_object():
    params = LF.sample_mixup(4, 1.0, per_sample=True, generator=_gen())
    moved = params.to(torch.device("meta"))
    assert moved.index.device.type == "meta"
    assert moved.lam.device.type == "meta"
    assert moved.shift == params.shift


@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.parametrize("per_sample", [False, True])
def test_a_batch_of_one_is_its_own_partner_and_mixup_returns_it_unchanged(per_sample: bool, seeded: bool) -> None:
    generator = torch.Generator().manual_seed(0) if seeded else None
    params = LF.sample_mixup(1, 0.4, per_sample=per_sample, generator=generator)
    assert params.index.dtype == torch.long
    assert params.index.tolist() == [0]
    assert params.shift == 0
    lam = params.lam if isinstance(params.lam, float) else float(params.lam[0])
    assert 0.0 < lam < 1.0
    x, y = torch.randn(1, 3), torch.tensor([[0.0, 1.0]])
    mixed, targets = LF.mixup(x, y, params.lam, params.index)
    torch.testing.assert_close(mixed, x)
    torch.testing.assert_close(targets, y)


@pytest.mark.parametrize("pairing", ["shift", "permutation"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_a_seeded_generator_gives_the_same_params_and_leaves_the_global_rng_alone(per_sample: bool, pairing) -> None:
    state = torch.get_rng_state()
    draws = [
        LF.sample_mixup(16, 0.4, per_sample=per_sample, pairing=pairing, generator=torch.Generator().manual_seed(s))
        for s in (5, 5, 6)
    ]
    assert torch.equal(torch.get_rng_state(), state)
    a, b, c = draws
    assert torch.equal(a.index, b.index)
    assert torch.equal(torch.as_tensor(a.lam), torch.as_tensor(b.lam))
    assert not torch.equal(torch.as_tensor(a.lam), torch.as_tensor(c.lam))
    if per_sample:
        assert a.lam.dtype == torch.float32


def test_a_bool_batch_size_is_refused() -> None:
    with pytest.raises(ValueError, match="Expected `batch_size` to be a positive int, but got True"):
        LF.sample_mixup(True, 0.4)


def test_moving_params_with_one_float_lambda_keeps_the_float() -> None:
    params = LF.sample_mixup(4, 0.4, generator=torch.Generator().manual_seed(0)).to(torch.device("cpu"))
    assert isinstance(params.lam, float)


# --- the draws behind sample_mixup (functional/_draws.py) -----------------------------------------------------------
def _naive_shift(index):
    """The ``k`` with ``index[i] == (i + k) % N`` for every ``i``, by trying every ``k``; else ``None``."""
    n = len(index)
    found = [k for k in range(n) if all(int(index[i]) == (i + k) % n for i in range(n))]
    return found[0] if found else None


def test_cyclic_shift_finds_exactly_the_rolls_among_all_permutations_of_four():
    from itertools import permutations

    from lightning_reg.functional._draws import cyclic_shift

    for perm in permutations(range(4)):
        for dtype in (torch.int64, torch.int32):
            index = torch.tensor(perm, dtype=dtype)
            assert cyclic_shift(index) == _naive_shift(perm), perm
    for index in ([1, 2, 0], [0], [4, 1, 2, 3], [-1, 0, 1, 2], [1, 2, 3, 4], [0, 1, 2, 4]):
        assert cyclic_shift(torch.tensor(index)) == _naive_shift(index), index


def test_cyclic_shift_is_none_for_an_index_that_is_not_one_dim_or_empty():
    from lightning_reg.functional._draws import cyclic_shift

    for index in (
        torch.tensor(0),
        torch.tensor([[1, 0]]),
        torch.tensor([[0, 1], [1, 0]]),
        torch.zeros(0, dtype=torch.long),
    ):
        assert cyclic_shift(index) is None


def test_beta_is_the_first_of_two_gamma_variates_over_their_sum_in_float64():
    # The same generator stream drawn through the Gamma primitive directly: one (2, *size) draw per call.
    from lightning_reg._torch_private import standard_gamma
    from lightning_reg.functional._draws import beta, beta_float

    g, ref = _gen(3), _gen(3)
    for size in ((5,), (2, 3)):
        lam = beta(0.4, size, generator=g)
        gammas = standard_gamma(torch.full((2, *size), 0.4, dtype=torch.float64), ref)
        assert lam.dtype == torch.float64
        torch.testing.assert_close(lam, gammas[0] / (gammas[0] + gammas[1]), rtol=0, atol=0)
    for seed in range(5):
        expected = float(beta(0.4, (), generator=_gen(seed)))
        assert beta_float(0.4, _gen(seed)) == expected


@pytest.mark.parametrize("n", [0, 1, True, 2.0])
def test_derangement_refuses_fewer_than_two_samples_or_a_non_int(n):
    from lightning_reg.functional._draws import derangement

    message = f"Expected `n` to be an int >= 2 (a single sample has no other partner), but got {n!r}."
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        derangement(n)


def test_derangement_has_no_fixed_point_on_every_draw():
    from lightning_reg.functional._draws import derangement

    g = _gen(1)
    for n in (2, 3, 5):
        for _ in range(50):
            index = derangement(n, generator=g)
            assert sorted(index.tolist()) == list(range(n))
            assert all(int(index[i]) != i for i in range(n))


@pytest.mark.parametrize("index", [[2, 0, 3, 1], [1, 2, 3, 0]], ids=["gather", "shift"])
def test_blend_writes_the_per_sample_lerp_into_out_or_in_place_through_scratch(index):
    from lightning_reg.functional._apply import blend
    from lightning_reg.functional._draws import cyclic_shift

    x = torch.randn(4, 3, 2, generator=_gen(7))
    index, lam = torch.tensor(index), torch.tensor([0.2, 0.9, 0.5, 0.7])
    expected = torch.stack([torch.lerp(x[int(index[i])], x[i], lam[i]) for i in range(4)])
    shift = cyclic_shift(index)
    out = torch.full_like(x, float("nan"))
    assert blend(x, lam, index, shift, out=out).data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)
    inplace, scratch = x.clone(), torch.full_like(x, float("nan"))
    assert blend(inplace, lam, index, shift, out=inplace, scratch=scratch) is inplace
    torch.testing.assert_close(inplace, expected, rtol=0, atol=1e-6)  # x + (1 - lam)(p - x): other rounding
    torch.testing.assert_close(scratch, x[index], rtol=0, atol=0)  # the partners were gathered into `scratch`


def test_mixup_with_a_float64_per_sample_lam_blends_in_the_inputs_dtype():
    x, index = torch.randn(4, 3, generator=_gen(8)), torch.tensor([1, 2, 3, 0])
    lam = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64)
    mixed, _ = LF.mixup(x, torch.eye(4), lam, index)
    assert mixed.dtype == torch.float32
    expected = torch.stack([torch.lerp(x[int(index[i])], x[i], lam[i].float()) for i in range(4)])
    torch.testing.assert_close(mixed, expected, rtol=0, atol=1e-7)
    images = torch.tensor([[0, 100], [200, 50], [10, 255], [3, 4]], dtype=torch.uint8)
    mixed_images, _ = LF.mixup(images, torch.eye(4), lam, index)
    naive = [(lam[i] * images[i].double() + (1 - lam[i]) * images[int(index[i])].double()).round() for i in range(4)]
    torch.testing.assert_close(mixed_images, torch.stack(naive).to(torch.uint8), rtol=0, atol=1)
