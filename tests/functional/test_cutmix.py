import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_reg import functional as LF


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_cutmix_pastes_the_fixed_box_from_the_partner():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    box = LF.Box(torch.tensor([[1, 0]]), torch.tensor([[3, 2]]))  # rows 1..2, columns 0..1
    out, y, lam = LF.cutmix(x, torch.eye(2), 0.5, torch.tensor([1, 0]), box=box)
    expected = x.clone()
    expected[:, :, 1:3, 0:2] = x.flip(0)[:, :, 1:3, 0:2]
    assert torch.equal(out, expected)
    assert lam == 0.75  # a 2x2 box of a 4x4 image
    assert torch.allclose(y, torch.tensor([[0.75, 0.25], [0.25, 0.75]]))


def test_per_sample_boxes_match_a_loop_over_samples():
    g = _gen()
    x = torch.randn(5, 2, 6, 7, generator=g)
    index = torch.randperm(5, generator=g)
    lam = torch.rand(5, generator=g)
    box = LF.sample_box(lam, (6, 7), generator=g)
    out, _, kept = LF.cutmix(x, torch.eye(5), lam, index, box=box)
    for i in range(5):
        (y0, x0), (y1, x1) = box.lo[i].tolist(), box.hi[i].tolist()
        expected = x[i].clone()
        expected[:, y0:y1, x0:x1] = x[index[i], :, y0:y1, x0:x1]
        assert torch.equal(out[i], expected)
        assert kept[i] == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 42)


def test_volume_box_covers_the_last_three_dims():
    x = torch.zeros(2, 1, 4, 4, 4)
    x[1] = 1
    box = LF.Box(torch.tensor([[0, 0, 0]]), torch.tensor([[2, 2, 4]]))
    out, _, lam = LF.cutmix(x, torch.eye(2), 0.5, torch.tensor([1, 0]), box=box, dims="NCDHW")
    assert lam == 0.75
    assert float(out[0].sum()) == 16


def test_sequences_are_cut_along_time():
    x = torch.arange(12, dtype=torch.float32).view(2, 6)
    box = LF.Box(torch.tensor([[2]]), torch.tensor([[5]]))
    out, _, lam = LF.cutmix(x, torch.eye(2), 0.5, torch.tensor([1, 0]), box=box)
    assert out[0].tolist() == [0, 1, 8, 9, 10, 5]
    assert lam == 0.5


def test_uint8_images_are_cut_exactly():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=_gen())
    out, _, _ = LF.cutmix(x, torch.eye(4), 0.5, torch.tensor([1, 2, 3, 0]), generator=_gen())
    assert out.dtype == torch.uint8
    assert set(out.unique().tolist()) <= set(x.unique().tolist())


def test_cutmix_is_deterministic_given_the_generator():
    x = torch.randn(4, 3, 8, 8, generator=_gen())
    a = LF.cutmix(x, torch.eye(4), 0.6, torch.tensor([1, 2, 3, 0]), generator=_gen(5))
    b = LF.cutmix(x, torch.eye(4), 0.6, torch.tensor([1, 2, 3, 0]), generator=_gen(5))
    assert torch.equal(a[0], b[0])
    assert a[2] == b[2]


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 6),
    spatial=st.sampled_from([(5,), (4, 6), (3, 4, 5)]),
    lam=st.floats(0.0, 1.0),
    per_sample=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fraction_taken_from_partner_is_one_minus_returned_lambda(n, spatial, lam, per_sample, seed):
    g = _gen(seed)
    shape = (n, *spatial) if len(spatial) == 1 else (n, 2, *spatial)
    # Distinct values per sample, so that every pasted element differs from the one it replaces.
    x = torch.arange(n, dtype=torch.float32).view(-1, *[1] * (len(shape) - 1)).expand(shape).contiguous()
    index = (torch.arange(n) + 1) % n
    lam_arg = torch.rand(n, generator=g) if per_sample else lam
    dims = "NCDHW" if len(spatial) == 3 else None
    out, y, kept = LF.cutmix(x, LF.one_hot(torch.arange(n) % 3, 3), lam_arg, index, generator=g, dims=dims)
    taken = (out != x).float().flatten(1).mean(1) if n > 1 else torch.zeros(1)
    expected = 1 - (kept if per_sample else torch.full((n,), kept))
    if n > 1:
        assert torch.allclose(taken, expected.float(), atol=1e-6)
    assert torch.allclose(y.sum(1), torch.ones(n), atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"inputs": torch.zeros(2, 1, 1, 1, 1, 1)}, "no default dims for inputs with 6 dims"),
        ({"dims": (0,)}, "distinct non-batch axes"),
        ({"dims": (2, 2)}, "distinct non-batch axes"),
        ({"box": LF.Box(torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2, dtype=torch.long))}, "Expected a box"),
        ({"targets": torch.eye(3)}, "same batch size"),
    ],
)
def test_cutmix_rejects_bad_arguments(kwargs, match):
    args = {"inputs": torch.zeros(2, 1, 4, 4), "targets": torch.eye(2), "lam": 0.5, "index": torch.tensor([1, 0])}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        LF.cutmix(**args)


def test_sample_box_rejects_empty_sizes():
    with pytest.raises(ValueError, match="positive lengths"):
        LF.sample_box(0.5, ())


@pytest.mark.parametrize("per_sample", [False, True])
def test_shift_pairing_matches_the_gathered_partners(per_sample):
    # The shift path (two contiguous runs) and the gather path (inplace=True gathers) paste the same pixels.
    g = _gen(1)
    x = torch.randn(6, 2, 8, 8, generator=g)
    lam = torch.rand(6, generator=g) if per_sample else 0.6
    box = LF.sample_box(lam, (8, 8), generator=g)
    for k in range(6):
        index = torch.arange(6).roll(-k)
        shifted, _, kept = LF.cutmix(x, torch.eye(6), lam, index, box=box)
        into_out, _, _ = LF.cutmix(x, torch.eye(6), lam, index, box=box, out=torch.empty_like(x))
        gathered, _, kept_gathered = LF.cutmix(x.clone(), torch.eye(6), lam, index, box=box, inplace=True)
        assert torch.equal(shifted, gathered)
        assert torch.equal(into_out, gathered)
        assert torch.equal(torch.as_tensor(kept), torch.as_tensor(kept_gathered))


def test_cutmix_rejects_out_together_with_inplace():
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="either `inplace=True` or `out=`"):
        LF.cutmix(x, torch.eye(2), 0.5, torch.tensor([1, 0]), inplace=True, out=torch.empty_like(x))


@pytest.mark.parametrize("per_sample", [False, True])
def test_sample_cutmix_box_draws_the_box_cutmix_draws(per_sample):
    from lightning_reg.functional.cutmix import sample_cutmix_box

    x = torch.randn(5, 2, 7, 9, generator=_gen())
    lam = torch.rand(5, generator=_gen(1)) if per_sample else 0.42
    index = torch.tensor([3, 0, 4, 1, 2])
    box, kept = sample_cutmix_box(x, lam, generator=_gen(7))
    direct, _, kept_direct = LF.cutmix(x, torch.eye(5), lam, index, generator=_gen(7))
    with_box, _, kept_box = LF.cutmix(x, torch.eye(5), lam, index, box=box)
    assert torch.equal(direct, with_box)
    assert torch.equal(torch.as_tensor(kept), torch.as_tensor(kept_direct))
    assert torch.equal(torch.as_tensor(kept), torch.as_tensor(kept_box))
