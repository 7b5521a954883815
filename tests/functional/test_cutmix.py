import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_reg import functional as LF


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


_BOX = LF.Box(torch.tensor([[0, 0]]), torch.tensor([[1, 1]]))


def test_cutmix_pastes_the_fixed_box_from_the_partner():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    box = LF.Box(torch.tensor([[1, 0]]), torch.tensor([[3, 2]]))  # rows 1..2, columns 0..1
    out, y, kept = LF.cutmix(x, torch.eye(2), box, torch.tensor([1, 0]))
    expected = x.clone()
    expected[:, :, 1:3, 0:2] = x.flip(0)[:, :, 1:3, 0:2]
    assert torch.equal(out, expected)
    assert kept.tolist() == [0.75, 0.75]  # a 2x2 box of a 4x4 image
    assert torch.allclose(y, torch.tensor([[0.75, 0.25], [0.25, 0.75]]))


def test_per_sample_boxes_match_a_loop_over_samples():
    g = _gen()
    x = torch.randn(5, 2, 6, 7, generator=g)
    index = torch.randperm(5, generator=g)
    lam = torch.rand(5, generator=g)
    box = LF.sample_box(lam, (6, 7), generator=g)
    out, _, kept = LF.cutmix(x, torch.eye(5), box, index)
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
    out, _, kept = LF.cutmix(x, torch.eye(2), box, torch.tensor([1, 0]), dims="NCDHW")
    assert kept.tolist() == [0.75, 0.75]
    assert float(out[0].sum()) == 16


def test_sequences_are_cut_along_time():
    x = torch.arange(12, dtype=torch.float32).view(2, 6)
    box = LF.Box(torch.tensor([[2]]), torch.tensor([[5]]))
    out, _, kept = LF.cutmix(x, torch.eye(2), box, torch.tensor([1, 0]))
    assert out[0].tolist() == [0, 1, 8, 9, 10, 5]
    assert kept.tolist() == [0.5, 0.5]


def test_uint8_images_are_cut_exactly():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=_gen())
    out, _, _ = LF.cutmix(x, torch.eye(4), LF.sample_box(0.5, (8, 8), generator=_gen()), torch.tensor([1, 2, 3, 0]))
    assert out.dtype == torch.uint8
    assert set(out.unique().tolist()) <= set(x.unique().tolist())


def test_cutmix_is_deterministic_given_the_generator():
    x = torch.randn(4, 3, 8, 8, generator=_gen())
    a = LF.cutmix(x, torch.eye(4), LF.sample_box(0.6, (8, 8), generator=_gen(5)), torch.tensor([1, 2, 3, 0]))
    b = LF.cutmix(x, torch.eye(4), LF.sample_box(0.6, (8, 8), generator=_gen(5)), torch.tensor([1, 2, 3, 0]))
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[2], b[2])


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
    box = LF.sample_box(lam_arg, spatial, generator=g)
    out, y, kept = LF.cutmix(x, LF.one_hot(torch.arange(n) % 3, 3), box, index, dims=dims)
    taken = (out != x).float().flatten(1).mean(1) if n > 1 else torch.zeros(1)
    expected = 1 - kept
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
        ({"out": torch.zeros(2, 1, 4, 5)}, "Expected `out` like `inputs`"),
    ],
)
def test_cutmix_rejects_bad_arguments(kwargs, match):
    box = LF.Box(torch.tensor([[0, 0]]), torch.tensor([[2, 2]]))
    args = {"inputs": torch.zeros(2, 1, 4, 4), "targets": torch.eye(2), "box": box, "index": torch.tensor([1, 0])}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        LF.cutmix(**args)


def test_sample_box_rejects_empty_sizes():
    with pytest.raises(ValueError, match="positive lengths"):
        LF.sample_box(0.5, ())


@pytest.mark.parametrize("per_sample", [False, True])
def test_shift_pairing_matches_the_gathered_partners(per_sample):
    # The shift path (two contiguous runs) and the gather path (in place, it gathers) paste the same pixels.
    g = _gen(1)
    x = torch.randn(6, 2, 8, 8, generator=g)
    lam = torch.rand(6, generator=g) if per_sample else 0.6
    box = LF.sample_box(lam, (8, 8), generator=g)
    for k in range(6):
        index = torch.arange(6).roll(-k)
        shifted, _, kept = LF.cutmix(x, torch.eye(6), box, index)
        into_out, _, _ = LF.cutmix(x, torch.eye(6), box, index, out=torch.empty_like(x))
        inplace = x.clone()
        gathered, _, kept_gathered = LF.cutmix(inplace, torch.eye(6), box, index, out=inplace)
        assert gathered is inplace
        assert torch.equal(shifted, gathered)
        assert torch.equal(into_out, gathered)
        assert torch.equal(kept, kept_gathered)


def test_cutmix_out_is_the_inputs_themselves_or_memory_of_its_own():
    x = torch.zeros(2, 1, 4, 4)
    box = LF.Box(torch.tensor([[0, 0]]), torch.tensor([[2, 2]]))
    with pytest.raises(ValueError, match=r"shares memory with `inputs`; pass `out=inputs` itself"):
        LF.cutmix(x, torch.eye(2), box, torch.tensor([1, 0]), out=x.view(2, 1, 4, 4))


@pytest.mark.parametrize("per_sample", [False, True])
def test_kept_is_one_tensor_type_on_every_path(per_sample):
    # One box or one per sample, float32 or float64 targets: kept is a (N,) tensor in the targets' dtype.
    x = torch.randn(5, 2, 7, 9, generator=_gen())
    lam = torch.rand(5, generator=_gen(1)) if per_sample else 0.42
    box = LF.sample_box(lam, (7, 9), generator=_gen(7))
    for dtype in (torch.float32, torch.float64):
        _, y, kept = LF.cutmix(x, torch.eye(5, dtype=dtype), box, torch.tensor([3, 0, 4, 1, 2]))
        assert kept.shape == (5,)
        assert kept.dtype == dtype
        area = ((box.hi - box.lo).prod(1) / 63).expand(5)  # the naive area of each box
        torch.testing.assert_close(kept, (1 - area).to(dtype))
        torch.testing.assert_close(y.diagonal(), kept)  # each sample's own class weighs what it kept


# --- issue 12, point 22: layouts of 5-D inputs ------------------------------------------------------------------
def test_five_dim_inputs_need_a_layout_and_video_is_cut_as_torchvision_does():
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    with pytest.raises(ValueError, match=r"cannot tell the layout of a 5-D input.*dims='NCDHW'.*dims='NTCHW'"):
        LF.cutmix(torch.zeros(2, 3, 4, 4, 4), torch.eye(2), _BOX, torch.tensor([1, 0]))
    g = _gen()
    video = torch.rand(4, 5, 3, 8, 8, generator=g)  # (N, T, C, H, W)
    labels = torch.tensor([0, 1, 2, 3])
    y1, x1, y2, x2 = 2, 1, 6, 4
    params = {"box": (x1, y1, x2, y2), "lam_adjusted": 1 - 12 / 64, "labels": labels, "batch_size": 4}
    tv = v2.CutMix(alpha=1.0, num_classes=4)
    expected = tv.transform(tv_tensors.Video(video), params).as_subclass(torch.Tensor)
    expected_labels = tv.transform(labels, params)
    box = LF.Box.from_xyxy(torch.tensor([params["box"]]))  # torchvision's (x1, y1, x2, y2)
    assert box.lo.tolist() == [[y1, x1]]
    assert box.hi.tolist() == [[y2, x2]]
    index = torch.arange(4).roll(1)  # torchvision pairs sample i with sample i - 1
    ours, ours_labels, kept = LF.cutmix(video, LF.one_hot(labels, 4), box, index, dims="NTCHW")
    assert torch.equal(ours, expected)  # every frame and channel gets the same box
    assert kept.tolist() == pytest.approx([params["lam_adjusted"]] * 4)
    assert torch.allclose(ours_labels, expected_labels)
    volume_box = LF.Box(box.lo[:, :1].repeat(1, 3), box.hi[:, :1].repeat(1, 3))
    volume, _, _ = LF.cutmix(video, torch.eye(4), volume_box, index, dims="NCDHW")
    assert (volume != video).any(dim=(0, 2, 3, 4)).tolist() == [True] * 5  # a volume box: all "channels" (dim 1) cut
    with pytest.raises(ValueError, match="names 5 dims, but the inputs have 4"):
        LF.cutmix(torch.zeros(2, 1, 4, 4), torch.eye(2), _BOX, torch.tensor([1, 0]), dims="NTCHW")
    with pytest.raises(ValueError, match=r"one of \['NT', 'NTD', 'NCHW', 'NCDHW', 'NTCHW'\]"):
        LF.cutmix(torch.zeros(2, 1, 4, 4), torch.eye(2), _BOX, torch.tensor([1, 0]), dims="NHWC")


# --- issue 12, point 22: cutmix_minmax and correct_lam ------------------------------------------------------------
def test_minmax_boxes_follow_timms_rand_bbox_minmax():
    import numpy as np
    from timm.data.mixup import rand_bbox_minmax

    h, w, minmax, count = 20, 30, (0.2, 0.8), 4000
    box = LF.sample_box(torch.rand(count, generator=_gen()), (h, w), generator=_gen(1), minmax=minmax)
    sides = box.hi - box.lo
    assert bool((box.lo >= 0).all())
    assert bool((box.hi <= torch.tensor([h, w])).all())
    np.random.seed(0)
    yl, yu, xl, xu = rand_bbox_minmax((h, w), minmax, count=count)
    assert set(sides[:, 0].tolist()) == set((yu - yl).tolist()) == set(range(int(h * 0.2), int(h * 0.8)))
    assert set(sides[:, 1].tolist()) == set((xu - xl).tolist()) == set(range(int(w * 0.2), int(w * 0.8)))
    ours_kept = 1 - sides.prod(1) / (h * w)
    timm_kept = 1 - (yu - yl) * (xu - xl) / (h * w)
    assert abs(float(ours_kept.mean()) - float(timm_kept.mean())) < 0.01  # same distribution of the kept area
    assert abs(float(box.lo[:, 0].float().mean()) - float(yl.mean())) < 0.3
    one = LF.sample_box(0.5, (h, w), generator=_gen(2), minmax=minmax)
    assert one.lo.shape == (1, 2)
    with pytest.raises(ValueError, match=r"0 < lo < hi <= 1"):
        LF.sample_box(0.5, (h, w), minmax=(0.8, 0.2))


def test_kept_is_the_clipped_area_and_timms_correct_lam_agrees():
    # A box clipped at the corner keeps 60 of 64 pixels: the targets are mixed by that, as timm's correct_lam=True
    # does; mixing by the drawn lambda instead (correct_lam=False) is the callbacks' option, see tests/callbacks.
    from timm.data.mixup import cutmix_bbox_and_lam

    x = torch.zeros(2, 1, 8, 8)
    box = LF.Box(torch.tensor([[6, 6]]), torch.tensor([[8, 8]]))  # a box clipped at the corner: 4 pixels of 64
    _, y_true, kept = LF.cutmix(x, torch.eye(2), box, torch.tensor([1, 0]))
    assert kept.tolist() == [1 - 4 / 64] * 2
    assert y_true[0, 0] == pytest.approx(1 - 4 / 64)
    (yl, yh, xl, xh), timm_lam = cutmix_bbox_and_lam((8, 8), 0.5, ratio_minmax=None, correct_lam=True)
    assert timm_lam == pytest.approx(1 - (yh - yl) * (xh - xl) / 64)  # timm's kept fraction: the same formula
    _, timm_drawn = cutmix_bbox_and_lam((8, 8), 0.5, correct_lam=False)
    assert timm_drawn == 0.5


# --- issue 12, point 22: timm's mode="elem" / "pair" ----------------------------------------------------------------
def _timm_with_params(monkeypatch, mode, lam, use_cutmix, boxes):
    """timm's Mixup with its numpy draws replaced by fixed ones (lambda, switch, and the boxes in order)."""
    import numpy as np
    import timm.data.mixup as tm

    queue = list(boxes)

    def fixed_box(img_shape, lam_i, ratio_minmax=None, correct_lam=True, count=None):
        (yl, yh, xl, xh) = queue.pop(0)
        return (yl, yh, xl, xh), 1.0 - (yh - yl) * (xh - xl) / float(img_shape[-2] * img_shape[-1])

    monkeypatch.setattr(tm, "cutmix_bbox_and_lam", fixed_box)
    mixer = tm.Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, mode=mode, label_smoothing=0.1, num_classes=5)
    monkeypatch.setattr(mixer, "_params_per_elem", lambda n: (np.array(lam, dtype=np.float32), np.array(use_cutmix)))
    return mixer


@pytest.mark.parametrize("mode", ["elem", "pair"])
def test_per_sample_switch_matches_timm_elem_and_pair_modes(monkeypatch, mode):
    from lightning_reg.functional._apply import mix_elementwise

    n = 6
    g = _gen()
    x = torch.rand(n, 3, 8, 8, generator=g)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    draws = 3 if mode == "pair" else n
    lam = [0.7, 0.4, 1.0, 0.25, 0.6, 0.9][:draws]  # one sample (pair) not mixed: lambda 1
    use_cutmix = [False, True, True, True, False, True][:draws]
    timm_boxes = [(1, 5, 2, 7), (0, 3, 0, 8), (4, 8, 5, 8), (2, 6, 2, 6)]  # (yl, yh, xl, xh) for each cut, in order
    cut_rows = [i for i in range(draws) if use_cutmix[i] and lam[i] != 1.0]
    mixer = _timm_with_params(monkeypatch, mode, lam, use_cutmix, timm_boxes)
    timm_x, timm_y = mixer(x.clone(), y)
    # Ours: the same draws expanded per sample; partner i <-> N - 1 - i (timm's flip).
    index = torch.arange(n).flip(0)
    members = list(range(draws)) + ([n - 1 - i for i in range(draws)] if mode == "pair" else [])
    source = list(range(draws)) * (2 if mode == "pair" else 1)
    weight, kept = torch.ones(n), torch.ones(n)
    lo, hi = torch.zeros(n, 2, dtype=torch.long), torch.zeros(n, 2, dtype=torch.long)
    for sample, draw in zip(members, source, strict=True):
        if lam[draw] == 1.0:
            continue
        if use_cutmix[draw]:
            yl, yh, xl, xh = timm_boxes[cut_rows.index(draw)]
            lo[sample], hi[sample] = torch.tensor([yl, xl]), torch.tensor([yh, xh])
            kept[sample] = 1 - (yh - yl) * (xh - xl) / 64
        else:
            weight[sample] = kept[sample] = lam[draw]
    ours_x = mix_elementwise(x, index, weight, lo, hi, (2, 3))
    ours_y = LF.smooth(LF.mixup(torch.zeros(n, 1), LF.one_hot(y, 5), kept, index)[1], 0.1)
    assert torch.allclose(ours_x, timm_x, atol=1e-6)
    assert torch.allclose(ours_y, timm_y, atol=1e-6)


def test_mix_elementwise_pastes_from_the_original_partner_and_rejects_batch_boxes():
    from lightning_reg.functional._apply import mix_elementwise

    x = torch.tensor([[0.0, 0.0], [8.0, 8.0]])
    lo, hi = torch.tensor([[0], [0]]), torch.tensor([[1], [0]])  # sample 0 is cut, sample 1 mixed
    out = mix_elementwise(x, torch.tensor([1, 0]), torch.tensor([1.0, 0.5]), lo, hi, (1,))
    assert out.tolist() == [[8.0, 0.0], [4.0, 4.0]]  # sample 0 pasted the original 8, not the blended 4
    with pytest.raises(ValueError, match=r"per-sample boxes"):
        mix_elementwise(x, torch.tensor([1, 0]), torch.ones(2), torch.zeros(1, 1), torch.ones(1, 1), (1,))


def test_mix_elementwise_with_a_shift_equals_the_gathered_partners():
    from lightning_reg.functional._apply import mix_elementwise

    g = _gen(3)
    x = torch.randn(6, 2, 8, 8, generator=g)
    weight = torch.where(torch.rand(6, generator=g) < 0.5, torch.rand(6, generator=g), torch.ones(6))
    box = LF.sample_box(torch.rand(6, generator=g), (8, 8), generator=g)
    box = LF.Box(box.lo, torch.where((weight == 1)[:, None], box.hi, box.lo))
    for k in range(1, 6):
        index = torch.arange(6).roll(-k)
        shifted = mix_elementwise(x, index, weight, box.lo, box.hi, (2, 3), shift=k)
        assert torch.equal(shifted, mix_elementwise(x, index, weight, box.lo, box.hi, (2, 3)))


def test_box_side_is_the_root_of_one_minus_lam():
    # lam is the share of the original sample kept: the box covers 1 - lam, side L * sqrt(1 - lam) = 50 for
    # lam = 0.75 on 100 x 100 (a box from lam itself would have side 86).
    g = torch.Generator().manual_seed(0)
    boxes = [LF.sample_box(0.75, (100, 100), generator=g) for _ in range(40)]
    sides = [int((b.hi - b.lo).max()) for b in boxes]
    assert max(sides) == 50  # unclipped boxes have exactly that side; clipped ones are smaller
    per_sample = LF.sample_box(torch.full((40,), 0.75), (100, 100), generator=g)
    assert int((per_sample.hi - per_sample.lo).max()) == 50


def test_box_converts_to_and_from_torchvisions_xyxy():
    from torchvision.ops import box_area, masks_to_boxes

    box = LF.sample_box(torch.rand(6, generator=_gen()), (10, 12), generator=_gen(1))
    box = LF.Box(box.lo, torch.maximum(box.hi, box.lo + 1))  # non-empty, so that a mask has a bounding box
    xyxy = box.to_xyxy()
    assert torch.equal(LF.Box.from_xyxy(xyxy).lo, box.lo)
    assert torch.equal(LF.Box.from_xyxy(xyxy).hi, box.hi)
    assert torch.equal(box_area(xyxy), (box.hi - box.lo).prod(1))  # torchvision's area of the same boxes
    mask = torch.zeros(6, 10, 12, dtype=torch.bool)
    for i, ((y0, x0), (y1, x1)) in enumerate(zip(box.lo.tolist(), box.hi.tolist(), strict=True)):
        mask[i, y0:y1, x0:x1] = True
    inclusive = masks_to_boxes(mask).long()  # torchvision's own reading of the mask: x2, y2 inclusive
    assert torch.equal(inclusive + torch.tensor([0, 0, 1, 1]), xyxy)
    with pytest.raises(ValueError, match=r"integer boxes \(B, 4\)"):
        LF.Box.from_xyxy(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="d == 2"):
        LF.Box(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long)).to_xyxy()


@pytest.mark.parametrize("lam", [0.7, torch.full((64,), 0.7)], ids=["one box", "a box per sample"])
@pytest.mark.parametrize("minmax", [None, (0.2, 0.8)])
def test_a_seeded_generator_gives_the_same_boxes_and_leaves_the_global_rng_alone(lam, minmax) -> None:
    state = torch.get_rng_state()
    a = LF.sample_box(lam, (8, 8), generator=torch.Generator().manual_seed(3), minmax=minmax)
    b = LF.sample_box(lam, (8, 8), generator=torch.Generator().manual_seed(3), minmax=minmax)
    c = LF.sample_box(lam, (8, 8), generator=torch.Generator().manual_seed(4), minmax=minmax)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.lo, b.lo)
    assert torch.equal(a.hi, b.hi)
    assert not (torch.equal(a.lo, c.lo) and torch.equal(a.hi, c.hi))


@pytest.mark.parametrize("lam", [0.9, torch.full((4000,), 0.9)], ids=["one box", "a box per sample"])
def test_boxes_start_at_every_position_including_the_border(lam) -> None:
    # lam 0.9 on 8x8: sides of 3; the centre is uniform on 0..7, so the box starts at 0 for centres 0 and 1.
    g = torch.Generator().manual_seed(0)
    if isinstance(lam, float):
        starts = torch.cat([LF.sample_box(lam, (8, 8), generator=g).lo for _ in range(400)])
    else:
        starts = LF.sample_box(lam, (8, 8), generator=g).lo
    for dim in range(2):
        assert set(starts[:, dim].tolist()) == set(range(7))  # 0 .. 6 (the last centre 7 starts at 6)


def test_minmax_sides_equal_the_lower_bound_when_both_bounds_floor_to_it() -> None:
    # timm's rand_bbox_minmax: side ~ U{int(L lo) .. max(int(L hi), int(L lo) + 1) - 1}; 8 * 0.5 = 4, 8 * 0.6 = 4.8.
    box = LF.sample_box(torch.zeros(500), (8, 8), minmax=(0.5, 0.6), generator=torch.Generator().manual_seed(0))
    assert set((box.hi - box.lo).flatten().tolist()) == {4}


def test_a_dimension_of_length_one_is_a_valid_size() -> None:
    box = LF.sample_box(0.5, (1, 8), generator=torch.Generator().manual_seed(0))
    assert box.lo[0, 0] == 0
    assert box.hi[0, 0] in (0, 1)


@pytest.mark.parametrize(
    ("boxes", "got"),
    [
        (torch.tensor([0, 0, 2, 2]), "shape (4,) dtype torch.int64"),
        (torch.zeros(2, 3, dtype=torch.long), "shape (2, 3) dtype torch.int64"),
        (torch.zeros(1, 4), "shape (1, 4) dtype torch.float32"),
        ([[0, 0, 2, 2]], "[[0, 0, 2, 2]]"),
    ],
)
def test_box_from_xyxy_names_what_it_got(boxes, got: str) -> None:
    with pytest.raises(
        ValueError, match=re.escape(f"Expected integer boxes (B, 4) as [x1, y1, x2, y2], but got {got}.")
    ):
        LF.Box.from_xyxy(boxes)


# --- the kernels behind cutmix (functional/_apply.py), against naive per-sample loops --------------------------------
def _naive_paste(x, lo, hi, index, axes, base=None):
    """Sample ``i``: ``base[i]`` (default ``x[i]``) with its box ``[lo[i], hi[i])`` along ``axes`` from its partner."""
    expected = (x if base is None else base).detach().clone()
    for i in range(x.shape[0]):
        b = 0 if lo.shape[0] == 1 else i
        region = [slice(None)] * (x.ndim - 1)
        for j, d in enumerate(axes):
            region[d - 1] = slice(int(lo[b, j]), int(hi[b, j]))
        expected[i][tuple(region)] = x[int(index[i])].detach()[tuple(region)]
    return expected


def _boxes(n, g):
    box = LF.sample_box(torch.rand(n, generator=g), (6, 5), generator=g)
    return box.lo, box.hi


@pytest.mark.parametrize("index", [[2, 0, 3, 1], [1, 2, 3, 0]], ids=["gather", "shift"])
@pytest.mark.parametrize("per_sample", [True, False])
def test_paste_writes_the_naive_paste_into_out_or_in_place_or_with_a_graph(index, per_sample):
    from lightning_reg.functional._apply import paste
    from lightning_reg.functional._draws import cyclic_shift

    g = _gen(5)
    x = torch.randn(4, 2, 6, 5, generator=g)
    index = torch.tensor(index)
    lo, hi = _boxes(4, g)
    if not per_sample:
        lo, hi = lo[:1], hi[:1]
    expected = _naive_paste(x, lo, hi, index, (2, 3))
    out = torch.full_like(x, float("nan"))
    result = paste(x, lo, hi, index, cyclic_shift(index), (2, 3), out=out)
    assert result.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(paste(x, lo, hi, index, cyclic_shift(index), (2, 3)), expected, rtol=0, atol=0)
    inplace = x.clone()
    assert paste(inplace, lo, hi, index, cyclic_shift(index), (2, 3), out=inplace) is inplace
    torch.testing.assert_close(inplace, expected, rtol=0, atol=0)
    leaf = x.clone().requires_grad_(True)
    mixed = paste(leaf, lo, hi, index, cyclic_shift(index), (2, 3))
    torch.testing.assert_close(mixed.detach(), expected, rtol=0, atol=0)
    assert mixed.requires_grad


@pytest.mark.parametrize("index", [[2, 0, 3, 1], [1, 2, 3, 0]], ids=["gather", "shift"])
def test_mix_elementwise_equals_a_lerp_then_a_paste_per_sample(index):
    from lightning_reg.functional._apply import mix_elementwise
    from lightning_reg.functional._draws import cyclic_shift

    g = _gen(6)
    x = torch.randn(4, 2, 6, 5, generator=g)
    index = torch.tensor(index)
    weight = torch.tensor([0.3, 1.0, 0.8, 1.0])
    lo, hi = _boxes(4, g)
    blended = torch.stack([torch.lerp(x[int(index[i])], x[i], weight[i]) for i in range(4)])
    expected = _naive_paste(x, lo, hi, index, (2, 3), base=blended)
    shift = cyclic_shift(index)
    out = torch.full_like(x, float("nan"))
    result = mix_elementwise(x, index, weight, lo, hi, (2, 3), out=out, shift=shift)
    assert result.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    leaf = x.clone().requires_grad_(True)
    mixed = mix_elementwise(leaf, index, weight, lo, hi, (2, 3), shift=shift)
    torch.testing.assert_close(mixed.detach(), expected, rtol=0, atol=0)
    assert mixed.requires_grad
    message = "Expected per-sample boxes with `lo`/`hi` of shape (4, 2), but got (4, 2) and (4, 1)."
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        mix_elementwise(x, index, weight, lo, hi[:, :1], (2, 3))


@pytest.mark.parametrize(
    ("lows", "highs", "sizes"),
    [([1, 0], [3, 5], (6, 5)), ([2], [2], (7,)), ([4, 1], [2, 3], (6, 5)), ([0, 0, 1], [2, 3, 4], (2, 3, 4))],
)
def test_kept_one_and_kept_fraction_are_one_minus_the_box_volume_over_the_sample_volume(lows, highs, sizes):
    from fractions import Fraction
    from math import prod

    from lightning_reg.functional._apply import kept_fraction, kept_one

    volume = prod(max(h - l, 0) for l, h in zip(lows, highs, strict=True))  # noqa: E741
    expected = 1 - Fraction(volume, prod(sizes))
    assert kept_one(lows, highs, sizes) == pytest.approx(float(expected), abs=1e-15)
    fraction = kept_fraction(torch.tensor([lows]), torch.tensor([highs]), sizes)
    assert fraction.dtype == torch.float64
    assert float(fraction[0]) == kept_one(lows, highs, sizes)
    with pytest.raises(ValueError, match="zip"):  # corners of another length than the box
        kept_one(lows, highs[:-1] if len(highs) > 1 else [], sizes)


def test_box_mask_refuses_no_axes():
    from lightning_reg.functional._apply import box_mask

    with pytest.raises(ValueError, match=r"^Expected at least one axis to cut along\.$"):
        box_mask(
            torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, dtype=torch.long), (), (2, 3), torch.device("cpu")
        )
