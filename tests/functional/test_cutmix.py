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


# --- issue 12, point 22: layouts of 5-D inputs ------------------------------------------------------------------
def test_five_dim_inputs_need_a_layout_and_video_is_cut_as_torchvision_does():
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    with pytest.raises(ValueError, match=r"cannot tell the layout of a 5-D input.*dims='NCDHW'.*dims='NTCHW'"):
        LF.cutmix(torch.zeros(2, 3, 4, 4, 4), torch.eye(2), 0.5, torch.tensor([1, 0]))
    g = _gen()
    video = torch.rand(4, 5, 3, 8, 8, generator=g)  # (N, T, C, H, W)
    labels = torch.tensor([0, 1, 2, 3])
    y1, x1, y2, x2 = 2, 1, 6, 4
    params = {"box": (x1, y1, x2, y2), "lam_adjusted": 1 - 12 / 64, "labels": labels, "batch_size": 4}
    tv = v2.CutMix(alpha=1.0, num_classes=4)
    expected = tv.transform(tv_tensors.Video(video), params).as_subclass(torch.Tensor)
    expected_labels = tv.transform(labels, params)
    box = LF.Box(torch.tensor([[y1, x1]]), torch.tensor([[y2, x2]]))
    index = torch.arange(4).roll(1)  # torchvision pairs sample i with sample i - 1
    ours, ours_labels, kept = LF.cutmix(video, LF.one_hot(labels, 4), 0.5, index, box=box, dims="NTCHW")
    assert torch.equal(ours, expected)  # every frame and channel gets the same box
    assert kept == pytest.approx(params["lam_adjusted"])
    assert torch.allclose(ours_labels, expected_labels)
    volume, _, _ = LF.cutmix(
        video,
        torch.eye(4),
        0.5,
        index,
        box=LF.Box(box.lo[:, :1].repeat(1, 3), box.hi[:, :1].repeat(1, 3)),
        dims="NCDHW",
    )
    assert (volume != video).any(dim=(0, 2, 3, 4)).tolist() == [True] * 5  # a volume box: all "channels" (dim 1) cut
    with pytest.raises(ValueError, match="names 5 dims, but the inputs have 4"):
        LF.cutmix(torch.zeros(2, 1, 4, 4), torch.eye(2), 0.5, torch.tensor([1, 0]), dims="NTCHW")
    with pytest.raises(ValueError, match=r"one of \['NT', 'NTD', 'NCHW', 'NCDHW', 'NTCHW'\]"):
        LF.cutmix(torch.zeros(2, 1, 4, 4), torch.eye(2), 0.5, torch.tensor([1, 0]), dims="NHWC")


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
    ours_kept = LF.box_lam(box, (h, w))
    timm_kept = 1 - (yu - yl) * (xu - xl) / (h * w)
    assert abs(float(ours_kept.mean()) - float(timm_kept.mean())) < 0.01  # same distribution of the kept area
    assert abs(float(box.lo[:, 0].float().mean()) - float(yl.mean())) < 0.3
    one = LF.sample_box(0.5, (h, w), generator=_gen(2), minmax=minmax)
    assert one.lo.shape == (1, 2)
    with pytest.raises(ValueError, match=r"0 < lo < hi <= 1"):
        LF.sample_box(0.5, (h, w), minmax=(0.8, 0.2))


def test_correct_lam_false_mixes_targets_by_the_drawn_lambda_as_timm():
    from timm.data.mixup import cutmix_bbox_and_lam

    x = torch.zeros(2, 1, 8, 8)
    box = LF.Box(torch.tensor([[6, 6]]), torch.tensor([[8, 8]]))  # a box clipped at the corner: 4 pixels of 64
    _, y_true, kept = LF.cutmix(x, torch.eye(2), 0.5, torch.tensor([1, 0]), box=box)
    _, y_drawn, lam = LF.cutmix(x, torch.eye(2), 0.5, torch.tensor([1, 0]), box=box, correct_lam=False)
    assert kept == 1 - 4 / 64
    assert lam == 0.5
    assert y_drawn[0].tolist() == [0.5, 0.5]
    assert y_true[0, 0] == pytest.approx(1 - 4 / 64)
    _, timm_lam = cutmix_bbox_and_lam((8, 8), 0.5, correct_lam=False)
    assert timm_lam == 0.5


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
    from lightning_reg.functional.cutmix import mix_elementwise

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
    ours_x = mix_elementwise(x, index, weight, LF.Box(lo, hi))
    ours_y = LF.smooth(LF.mixup(torch.zeros(n, 1), LF.one_hot(y, 5), kept, index)[1], 0.1)
    assert torch.allclose(ours_x, timm_x, atol=1e-6)
    assert torch.allclose(ours_y, timm_y, atol=1e-6)


def test_mix_elementwise_pastes_from_the_original_partner_and_rejects_batch_boxes():
    from lightning_reg.functional.cutmix import mix_elementwise

    x = torch.tensor([[0.0, 0.0], [8.0, 8.0]])
    box = LF.Box(torch.tensor([[0], [0]]), torch.tensor([[1], [0]]))  # sample 0 is cut, sample 1 mixed
    out = mix_elementwise(x, torch.tensor([1, 0]), torch.tensor([1.0, 0.5]), box)
    assert out.tolist() == [[8.0, 0.0], [4.0, 4.0]]  # sample 0 pasted the original 8, not the blended 4
    with pytest.raises(ValueError, match=r"per-sample boxes"):
        mix_elementwise(x, torch.tensor([1, 0]), torch.ones(2), LF.Box(torch.zeros(1, 1), torch.ones(1, 1)))


def test_mix_elementwise_with_a_shift_equals_the_gathered_partners():
    from lightning_reg.functional.cutmix import mix_elementwise

    g = _gen(3)
    x = torch.randn(6, 2, 8, 8, generator=g)
    weight = torch.where(torch.rand(6, generator=g) < 0.5, torch.rand(6, generator=g), torch.ones(6))
    box = LF.sample_box(torch.rand(6, generator=g), (8, 8), generator=g)
    box = LF.Box(box.lo, torch.where((weight == 1)[:, None], box.hi, box.lo))
    for k in range(1, 6):
        index = torch.arange(6).roll(-k)
        assert torch.equal(mix_elementwise(x, index, weight, box, shift=k), mix_elementwise(x, index, weight, box))


def test_box_side_is_the_root_of_one_minus_lam():
    # lam is the share of the original sample kept: the box covers 1 - lam, side L * sqrt(1 - lam) = 50 for
    # lam = 0.75 on 100 x 100 (a box from lam itself would have side 86).
    g = torch.Generator().manual_seed(0)
    boxes = [LF.sample_box(0.75, (100, 100), generator=g) for _ in range(40)]
    sides = [int((b.hi - b.lo).max()) for b in boxes]
    assert max(sides) == 50  # unclipped boxes have exactly that side; clipped ones are smaller
    per_sample = LF.sample_box(torch.full((40,), 0.75), (100, 100), generator=g)
    assert int((per_sample.hi - per_sample.lo).max()) == 50
