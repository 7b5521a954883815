from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

from lightning_reg import functional as LF
from lightning_reg.functional.bn_recalibration import is_frozen_norm, tracking_norm_layers
from tests.helpers import TinyMLP, make_classification, make_loader


def _batches(shape: tuple[int, ...], sizes: list[int], seed: int = 0, shift: bool = True) -> list[Tensor]:
    """Batches of the given sizes whose means differ (``shift``), as after a non-shuffled sort by class."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *shape, generator=g) * (1 + i) + (2.0 * i if shift else 0.0) for i, n in enumerate(sizes)]


def _reference(model: nn.Module, batches: list[Any]) -> dict[str, tuple[Tensor, Tensor]]:
    """Mean and unbiased variance per channel of each norm layer's inputs, concatenated over all batches.

    The inputs are captured by hooks in the regime "norm layers in training mode, everything else in eval", the
    pass ``recalibrate_bn`` makes; the statistics are computed here independently with ``torch.var_mean``.
    """
    ref = copy.deepcopy(model).eval()
    seen: dict[str, list[Tensor]] = {}
    for name, layer in tracking_norm_layers(ref):
        layer.train()
        layer.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, []).append(args[0].clone()))
    with torch.no_grad():
        for x in batches:
            ref(x)
    out = {}
    for name, xs in seen.items():
        flat = torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in xs], dim=1).double()  # (C, all)
        var, mean = torch.var_mean(flat, dim=1)
        out[name] = (mean, var)
    return out


def _assert_exact(model: nn.Module, batches: list[Any]) -> None:
    expected = _reference(model, batches)
    LF.recalibrate_bn(model, batches)
    layers = dict(tracking_norm_layers(model))
    assert set(expected) == set(layers)
    for name, (mean, var) in expected.items():
        torch.testing.assert_close(layers[name].running_mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layers[name].running_var.double(), var, rtol=1e-5, atol=1e-5)
        assert int(layers[name].num_batches_tracked) == len(batches)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 5 * 5, 8),
        nn.BatchNorm1d(8),
    )


@pytest.mark.parametrize("sizes", [[8, 8, 8], [9, 3, 17, 2]], ids=["equal", "unequal"])
@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (nn.BatchNorm1d(3), (3,)),
        (nn.BatchNorm1d(3), (3, 5)),
        (nn.BatchNorm2d(3), (3, 4, 4)),
        (nn.BatchNorm3d(3), (3, 2, 3, 3)),
    ],
    ids=["bn1d", "bn1d-seq", "bn2d", "bn3d"],
)
def test_statistics_equal_those_of_all_batches_concatenated(layer: nn.Module, shape: tuple, sizes: list[int]) -> None:
    _assert_exact(nn.Sequential(copy.deepcopy(layer)), _batches(shape, sizes))


@pytest.mark.parametrize("sizes", [[6, 6], [7, 2, 5]], ids=["equal", "unequal"])
def test_multi_layer_cnn_statistics_are_exact_and_dropout_is_off(sizes: list[int]) -> None:
    _assert_exact(_cnn().train(), _batches((2, 5, 5), sizes))


def test_first_layer_result_matches_the_closed_form_on_the_raw_data() -> None:
    batches = _batches((4,), [5, 11, 3])
    model = nn.Sequential(nn.BatchNorm1d(4))
    LF.recalibrate_bn(model, batches)
    var, mean = torch.var_mean(torch.cat(batches), dim=0)
    torch.testing.assert_close(model[0].running_mean, mean)
    torch.testing.assert_close(model[0].running_var, var)


def test_update_bn_agrees_for_equal_batches_with_equal_means_and_differs_otherwise() -> None:
    base = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    same_means = [base, base.flip(0), base.roll(3, 0)]  # equal sizes, equal means and variances
    ours, theirs = nn.Sequential(nn.BatchNorm1d(4)), nn.Sequential(nn.BatchNorm1d(4))
    LF.recalibrate_bn(ours, same_means)
    update_bn(same_means, theirs)
    torch.testing.assert_close(ours[0].running_mean, theirs[0].running_mean)
    # update_bn averages unbiased batch variances: equal to the pooled one up to the (n-1)/(N-1) factors
    torch.testing.assert_close(ours[0].running_var, theirs[0].running_var * (3 * 7) / (3 * 8 - 1))

    shifted = _batches((4,), [8, 8, 8])
    LF.recalibrate_bn(ours, shifted)
    update_bn(shifted, theirs)
    torch.testing.assert_close(ours[0].running_mean, theirs[0].running_mean)  # equal sizes: means agree
    exact = torch.cat(shifted).var(0)
    torch.testing.assert_close(ours[0].running_var, exact)
    assert (theirs[0].running_var < 0.95 * exact).all()  # update_bn misses the spread between batch means


def test_parameters_modes_momentum_and_other_buffers_are_unchanged() -> None:
    model = _cnn().train()
    model[1].momentum = None  # cumulative averaging, restored as None
    model.register_buffer("other", torch.arange(3.0))
    model[4].eval()  # a frozen layer in a train-mode model
    params = {k: v.clone() for k, v in model.named_parameters()}
    modes = {name: m.training for name, m in model.named_modules()}
    momenta = {name: getattr(m, "momentum", None) for name, m in model.named_modules()}
    LF.recalibrate_bn(model, _batches((2, 5, 5), [4, 4]))
    assert all(torch.equal(params[k], v) for k, v in model.named_parameters())
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: getattr(m, "momentum", None) for name, m in model.named_modules()} == momenta
    torch.testing.assert_close(model.other, torch.arange(3.0))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


class _FailOnSecondBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.1))
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("boom")
        return self.net(x)


def test_an_error_mid_pass_restores_statistics_modes_momentum_and_hooks() -> None:
    model = _FailOnSecondBatch().train()
    bn = model.net[1]
    bn.running_mean.fill_(0.5)
    bn.running_var.fill_(2.0)
    bn.num_batches_tracked.fill_(7)
    with pytest.raises(RuntimeError, match="boom"):
        LF.recalibrate_bn(model, _batches((3,), [4, 4, 4]))
    assert torch.equal(bn.running_mean, torch.full((4,), 0.5))
    assert torch.equal(bn.running_var, torch.full((4,), 2.0))
    assert int(bn.num_batches_tracked) == 7
    assert bn.momentum == 0.1
    assert all(m.training for m in model.modules())
    assert not bn._forward_hooks


def test_frozen_layers_keep_their_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4), nn.BatchNorm1d(4)).train()
    model[2].eval()  # frozen BN idiom: eval in a train-mode model
    model[3].track_running_stats = False  # Lightning's BaseFinetuning.freeze
    for bn in model[1:]:
        bn.running_mean.fill_(3.0)
    report = LF.recalibrate_bn(model, _batches((3,), [5, 5]))
    assert report.layers == ["1"]
    assert report.frozen == ["2"]  # model[3] keeps no statistics at all
    assert not torch.equal(model[1].running_mean, torch.full((4,), 3.0))
    assert torch.equal(model[2].running_mean, torch.full((4,), 3.0))
    assert torch.equal(model[3].running_mean, torch.full((4,), 3.0))
    assert is_frozen_norm(model[2], model)
    assert is_frozen_norm(model[3], model)


def test_explicit_frozen_layers_for_an_eval_mode_model() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3)).eval()
    model[1].running_mean.fill_(3.0)
    report = LF.recalibrate_bn(model, _batches((3,), [5, 5]), frozen=[model[1]])
    assert report.layers == ["0"]
    assert torch.equal(model[1].running_mean, torch.full((3,), 3.0))
    assert not model[0].training  # eval mode restored


def test_sync_batchnorm_without_a_process_group_matches_batchnorm() -> None:
    batches = _batches((3, 4, 4), [6, 3])
    plain = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    assert isinstance(synced[1], nn.SyncBatchNorm)
    LF.recalibrate_bn(plain, batches)
    LF.recalibrate_bn(synced, batches)
    torch.testing.assert_close(synced[1].running_mean, plain[1].running_mean)
    torch.testing.assert_close(synced[1].running_var, plain[1].running_var)
    assert "forward" not in vars(synced[1])


def test_instance_norm_records_what_one_concatenated_batch_would() -> None:
    batches = _batches((2, 6), [3, 5])
    model = nn.Sequential(nn.InstanceNorm1d(2, track_running_stats=True))
    LF.recalibrate_bn(model, batches)
    one = nn.InstanceNorm1d(2, track_running_stats=True, momentum=1.0).train()
    one(torch.cat(batches))
    torch.testing.assert_close(model[0].running_mean, one.running_mean)
    torch.testing.assert_close(model[0].running_var, one.running_var)


def test_lazy_batchnorm_is_initialized_and_recalibrated() -> None:
    batches = _batches((3,), [4, 6])
    model = nn.Sequential(nn.LazyBatchNorm1d())
    LF.recalibrate_bn(model, batches)
    var, mean = torch.var_mean(torch.cat(batches), dim=0)
    torch.testing.assert_close(model[0].running_mean, mean)
    torch.testing.assert_close(model[0].running_var, var)


def test_a_model_without_norm_layers_warns_and_is_unchanged() -> None:
    model = TinyMLP()
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="found no normalization layer"):
        report = LF.recalibrate_bn(model, _batches((8,), [4]))
    assert report.layers == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_an_empty_iterable_raises_before_any_statistic_changes() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3))
    model[0].running_mean.fill_(1.0)
    with pytest.raises(ValueError, match=r"at least one batch.*empty"):
        LF.recalibrate_bn(model, [])
    with pytest.raises(ValueError, match=r"at least one batch.*empty"):
        LF.recalibrate_bn(model, iter([]))
    assert torch.equal(model[0].running_mean, torch.ones(3))


def test_batches_of_size_one_are_skipped_and_counted() -> None:
    batches = _batches((3,), [4, 1, 5, 1])
    model = nn.Sequential(nn.BatchNorm1d(3))
    report = LF.recalibrate_bn(model, batches)
    assert (report.num_batches, report.num_samples, report.num_skipped) == (2, 9, 2)
    var, mean = torch.var_mean(torch.cat([batches[0], batches[2]]), dim=0)
    torch.testing.assert_close(model[0].running_mean, mean)
    torch.testing.assert_close(model[0].running_var, var)


def test_only_batches_of_size_one_raise_and_restore() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3))
    model[0].running_var.fill_(5.0)
    with pytest.raises(ValueError, match="only batches of size 1"):
        LF.recalibrate_bn(model, _batches((3,), [1, 1]))
    assert torch.equal(model[0].running_var, torch.full((3,), 5.0))


@pytest.mark.parametrize("as_dict", [False, True], ids=["list", "dict"])
def test_loader_batches_list_and_dict_give_the_same_statistics(as_dict: bool) -> None:
    inputs, targets = make_classification(n=40, features=8)
    model = TinyMLP(batch_norm=True)
    loader = make_loader(inputs, targets, batch_size=12, as_dict=as_dict)
    LF.recalibrate_bn(model, loader, input_key="inputs" if as_dict else 0)
    expected = copy.deepcopy(model)
    LF.recalibrate_bn(expected, [inputs[i : i + 12] for i in range(0, 40, 12)])  # tensor batches
    torch.testing.assert_close(model.body[1].running_mean, expected.body[1].running_mean)
    torch.testing.assert_close(model.body[1].running_var, expected.body[1].running_var)


def test_tuple_batch_with_input_key() -> None:
    batches = [(torch.zeros(2), x) for x in _batches((3,), [4, 4])]
    model = nn.Sequential(nn.BatchNorm1d(3))
    LF.recalibrate_bn(model, batches, input_key=1)
    torch.testing.assert_close(model[0].running_mean, torch.cat([b[1] for b in batches]).mean(0))


def test_num_batches_takes_only_the_first_batches() -> None:
    batches = _batches((3,), [4, 4, 4])
    model = nn.Sequential(nn.BatchNorm1d(3))
    report = LF.recalibrate_bn(model, iter(batches), num_batches=2)
    assert report.num_batches == 2
    assert int(model[0].num_batches_tracked) == 2
    torch.testing.assert_close(model[0].running_mean, torch.cat(batches[:2]).mean(0))


def test_report_gives_the_mean_absolute_change() -> None:
    batches = _batches((3,), [6, 6])
    model = nn.Sequential(nn.BatchNorm1d(3))  # starts at mean 0, var 1
    report = LF.recalibrate_bn(model, batches)
    assert report.mean_abs_change_mean == pytest.approx(float(model[0].running_mean.abs().mean()))
    assert report.mean_abs_change_var == pytest.approx(float((model[0].running_var - 1).abs().mean()))


def test_a_layer_the_forward_never_reaches_is_left_alone_with_a_warning() -> None:
    model = nn.ModuleDict({"used": nn.BatchNorm1d(3), "unused": nn.BatchNorm1d(3)})
    model["unused"].running_mean.fill_(2.0)

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, x: Tensor) -> Tensor:
            return self.m["used"](x)

    with pytest.warns(UserWarning, match="never called"):
        report = LF.recalibrate_bn(Wrapper(), _batches((3,), [4]))
    assert report.layers == ["m.used"]
    assert torch.equal(model["unused"].running_mean, torch.full((3,), 2.0))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_batches": 0}, ValueError, "`num_batches` to be a positive int"),
        ({"num_batches": 1.5}, ValueError, "`num_batches` to be a positive int"),
        ({"input_key": 1.0}, TypeError, "`input_key` to be an int"),
        ({"input_key": 3}, KeyError, "not a valid position"),
    ],
)
def test_invalid_arguments_raise_with_the_fix(kwargs: dict, error: type[Exception], match: str) -> None:
    model = nn.Sequential(nn.BatchNorm1d(3))
    with pytest.raises(error, match=match):
        LF.recalibrate_bn(model, [[torch.randn(4, 3), torch.zeros(4)]], **kwargs)
    assert torch.equal(model[0].running_mean, torch.zeros(3))


# --- 2 processes: the union of both ranks' batches -----------------------------------------------


def _sizes_per_rank() -> list[list[int]]:
    return [[5, 9], [3, 7, 4]]


def _ddp_recalibrate(rank: int, world_size: int) -> dict[str, list[float]]:
    model = _cnn()
    all_batches = _batches((2, 5, 5), [n for sizes in _sizes_per_rank() for n in sizes])
    mine = all_batches[:2] if rank == 0 else all_batches[2:]
    if rank == 1:
        model[5] = nn.SyncBatchNorm.convert_sync_batchnorm(model[5])  # runs locally, pooled at the end
    report = LF.recalibrate_bn(model, mine)
    out = {
        name: [*layer.running_mean.tolist(), *layer.running_var.tolist()] for name, layer in tracking_norm_layers(model)
    }
    out["counts"] = [report.num_batches, report.num_samples, int(model[1].num_batches_tracked)]
    return out


def test_two_ranks_get_the_statistics_of_the_union_of_their_batches(process_group_pool: Any) -> None:
    rank0, rank1 = process_group_pool(_ddp_recalibrate)
    model = _cnn()
    all_batches = _batches((2, 5, 5), [n for sizes in _sizes_per_rank() for n in sizes])
    report = LF.recalibrate_bn(model, all_batches)
    for name, layer in tracking_norm_layers(model):
        expected = torch.tensor([*layer.running_mean.tolist(), *layer.running_var.tolist()])
        torch.testing.assert_close(torch.tensor(rank0[name]), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(rank1[name]), expected, rtol=1e-5, atol=1e-5)
    assert rank0["counts"] == rank1["counts"] == [report.num_batches, report.num_samples, 5]


def test_many_unequal_batches_far_from_zero_stay_exact() -> None:
    """More batches than one buffered chunk, with a mean far from 0 (no cancellation in float64 sums)."""
    sizes = [2 + (7 * i) % 11 for i in range(75)]
    batches = [x + 1000.0 for x in _batches((3,), sizes)]
    model = nn.Sequential(nn.BatchNorm1d(3))
    LF.recalibrate_bn(model, batches)
    var, mean = torch.var_mean(torch.cat(batches).double(), dim=0)
    torch.testing.assert_close(model[0].running_mean.double(), mean, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(model[0].running_var.double(), var, rtol=1e-5, atol=1e-4)
    assert int(model[0].num_batches_tracked) == 75
