from __future__ import annotations

import copy
import re
import warnings
from typing import Any, NamedTuple

import pytest
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn
from torch.overrides import TorchFunctionMode

from lightning_reg import functional as LF
from lightning_reg.functional.bn_recalibration import is_frozen_norm, tracking_norm_layers
from tests.helpers import TinyMLP, make_classification, make_loader
from tests.helpers.bn import norm_input_statistics as _reference


def _batches(shape: tuple[int, ...], sizes: list[int], seed: int = 0, shift: bool = True) -> list[Tensor]:
    """Batches of the given sizes whose means differ (``shift``), as after a non-shuffled sort by class."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *shape, generator=g) * (1 + i) + (2.0 * i if shift else 0.0) for i, n in enumerate(sizes)]


def _assert_exact(
    model: nn.Module, batches: list[Any], calls: dict[str, int] | None = None
) -> LF.BNRecalibrationReport:
    """``recalibrate_bn`` gives the reference statistics; each layer counted ``calls[name]`` calls (all batches)."""
    expected = _reference(model, batches)
    report = LF.recalibrate_bn(model, batches)
    layers = dict(tracking_norm_layers(model))
    assert set(expected) == set(layers)
    for name, (mean, var) in expected.items():
        torch.testing.assert_close(layers[name].running_mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layers[name].running_var.double(), var, rtol=1e-5, atol=1e-5)
        assert int(layers[name].num_batches_tracked) == (calls or {}).get(name, len(batches))
    return report


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
    report = LF.recalibrate_bn(model, batches)
    var, mean = torch.var_mean(torch.cat(batches), dim=0)
    torch.testing.assert_close(model[0].running_mean, mean)
    torch.testing.assert_close(model[0].running_var, var)
    # it had no statistics before, so no change is measured
    assert (report.mean_abs_change_mean, report.mean_abs_change_var) == (0.0, 0.0)


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


def test_batchnorm1d_batches_of_one_sample_stop_the_forward_and_are_counted() -> None:
    batches = _batches((3,), [4, 1, 5, 1])
    model = nn.Sequential(nn.BatchNorm1d(3))
    report = LF.recalibrate_bn(model, batches)
    assert (report.num_batches, report.num_samples, report.num_skipped) == (4, 11, 2)
    var, mean = torch.var_mean(torch.cat([batches[0], batches[2]]), dim=0)
    torch.testing.assert_close(model[0].running_mean, mean)
    torch.testing.assert_close(model[0].running_var, var)
    assert int(model[0].num_batches_tracked) == 2


def test_only_one_value_per_channel_raises_and_restores() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3))
    model[0].running_var.fill_(5.0)
    with pytest.raises(ValueError, match="more than one value per channel"):
        LF.recalibrate_bn(model, _batches((3,), [1, 1]))
    assert torch.equal(model[0].running_var, torch.full((3,), 5.0))


def _fvcore_population_stats(layer: nn.Module, batches: list[Tensor]) -> tuple[Tensor, Tensor, int]:
    """fvcore's ``update_bn_stats`` (its ``_PopulationVarianceEstimator``) for one BatchNorm layer, written out.

    fvcore sets ``momentum=1``, records per call the values per channel ``x.numel() // x.shape[1]`` (spatial
    positions count as samples), and pools ``mean`` and ``E[x^2]`` weighted by those counts; its variance is the
    biased ``E[x^2] - mean^2``. Returns ``(mean, biased var, total values per channel)``, in float64.
    """
    bn = copy.deepcopy(layer).double().train()
    bn.momentum = 1.0
    pop_mean = torch.zeros_like(bn.running_mean)
    pop_square_mean = torch.zeros_like(bn.running_var)
    total = 0
    with torch.no_grad():
        for x in batches:
            size = x.numel() // x.shape[1]
            bn(x.double())
            total += size
            square_mean = bn.running_mean.square() + bn.running_var * (size - 1) / size
            pop_mean += (bn.running_mean - pop_mean) * (size / total)
            pop_square_mean += (square_mean - pop_square_mean) * (size / total)
    return pop_mean, pop_square_mean - pop_mean.square(), total


@pytest.mark.parametrize(
    ("layer", "shape"), [(nn.BatchNorm2d(3), (3, 4, 5)), (nn.BatchNorm3d(3), (3, 2, 3, 3))], ids=["bn2d", "bn3d"]
)
def test_a_batch_of_one_image_counts_as_in_fvcore_and_in_the_concatenation(layer: nn.Module, shape: tuple) -> None:
    """Batches [one image + 5, two images]: the single image holds H x W (x D) values per channel."""
    one = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0)) + 5.0
    two = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    batches = [one, two]
    model = nn.Sequential(copy.deepcopy(layer))
    report = _assert_exact(model, batches)  # the hook-captured concatenation of the inputs
    assert (report.num_batches, report.num_samples, report.num_skipped) == (2, 3, 0)
    # fvcore's semantics: the same values counted, the same mean, its biased variance times N / (N - 1)
    mean, biased_var, total = _fvcore_population_stats(layer, batches)
    assert total == 3 * torch.Size(shape[1:]).numel()
    torch.testing.assert_close(model[0].running_mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[0].running_var.double(), biased_var * total / (total - 1), rtol=1e-5, atol=1e-5)
    # and directly: per channel over every value of the three images
    flat = torch.cat([one, two]).transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(model[0].running_mean, flat.mean(1))
    torch.testing.assert_close(model[0].running_var, flat.var(1))


def test_a_loader_of_batch_size_one_recalibrates_batchnorm2d() -> None:
    images = torch.randn(6, 2, 5, 5, generator=torch.Generator().manual_seed(0)) * 2 + 1
    loader = make_loader(images, torch.zeros(6, dtype=torch.long), batch_size=1)  # detection/segmentation style
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    expected = _reference(model, [images[i : i + 1] for i in range(6)])
    report = LF.recalibrate_bn(model, loader)
    assert (report.num_batches, report.num_samples, report.num_skipped) == (6, 6, 0)
    for name, (mean, var) in expected.items():
        layer = dict(tracking_norm_layers(model))[name]
        torch.testing.assert_close(layer.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.running_var.double(), var, rtol=1e-5, atol=1e-5)
        assert int(layer.num_batches_tracked) == 6


def test_the_decision_is_per_layer_one_image_counts_for_bn2d_not_for_the_bn1d_head() -> None:
    """A CNN with a BatchNorm1d head: a batch of one image counts for the BatchNorm2d layers, then stops."""
    model = _cnn().train()
    batches = _batches((2, 5, 5), [1, 3, 1, 4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: every layer counted some batch
        report = _assert_exact(model, batches, calls={"1": 4, "5": 4, "9": 2})
    assert (report.num_batches, report.num_samples, report.num_skipped) == (4, 9, 2)


def test_a_one_by_one_feature_map_of_one_image_stops_at_that_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(2), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(2))
    batches = _batches((2, 3, 3), [1, 4, 2])
    report = _assert_exact(model, batches, calls={"0": 3, "2": 2})
    assert report.num_skipped == 1


def test_a_layer_that_only_ever_gets_one_value_per_channel_keeps_its_statistics_with_a_warning() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(2), nn.Flatten(), nn.BatchNorm1d(18))
    model[2].running_mean.fill_(4.0)
    with pytest.warns(UserWarning, match=r"\['2'\] got one value per channel in every batch"):
        report = LF.recalibrate_bn(model, _batches((2, 3, 3), [1, 1]))
    assert report.layers == ["0"]
    assert torch.equal(model[2].running_mean, torch.full((18,), 4.0))
    assert int(model[0].num_batches_tracked) == 2


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


def _ddp_recalibrate(rank: int, world_size: int) -> dict[str, Any]:
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
    before = [*model[1].running_mean.tolist(), *model[1].running_var.tolist()]
    try:  # every rank's batches empty: every rank raises (none waits for the others), nothing changed
        LF.recalibrate_bn(model, [])
    except ValueError as error:
        out["empty_error"] = str(error)
    out["unchanged"] = [before == [*model[1].running_mean.tolist(), *model[1].running_var.tolist()]]
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
    for rank in (rank0, rank1):
        assert rank["empty_error"] == (
            "Expected `batches` to yield at least one batch on some rank, but every rank's was empty; no statistics "
            "were changed."
        )
        assert rank["unchanged"] == [True]


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


def test_a_first_batch_far_from_the_rest_leaves_the_variance_exact_to_float32_rounding() -> None:
    """The first batch's mean is the shift of the sums. Two samples near 0, then 400 near 1000 (data sorted by
    class): the shifted second moment and ``s1**2 / N`` both grow as 400 * 1000**2 and cancel down to about
    2 * 1000**2, a factor of 200 that float64 sums absorb (4e-8 off) and float32 sums do not (1e-5 to 6e-5 off)."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 4, generator=g)] + [1000.0 + torch.randn(10, 4, generator=g) for _ in range(40)]
    model = nn.Sequential(nn.BatchNorm1d(4))
    LF.recalibrate_bn(model, batches)
    var, mean = torch.var_mean(torch.cat(batches).double(), dim=0)
    torch.testing.assert_close(model[0].running_mean, mean.float())
    # float32 rounding of the result is 6e-8 relative; 1e-6 leaves room for torch's float32 batch statistics
    torch.testing.assert_close(model[0].running_var.double(), var, rtol=1e-6, atol=0.0)


# --- how a batch is forwarded: the protocol of lightning_reg.forward -------------------------------


class _SeqBN(nn.Module):
    """Padded sequences ``(N, T, 3)``: mean over the valid steps, then BatchNorm1d. Without lengths: every step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        h = self.proj(x)  # (N, T, 4)
        if lengths is None:
            return self.bn(h.mean(1))
        valid = (torch.arange(x.shape[1])[None, :] < lengths[:, None]).to(h.dtype)  # (N, T)
        return self.bn((h * valid[..., None]).sum(1) / lengths[:, None].to(h.dtype))

    def forward_inputs(self, batch: list[Tensor]) -> tuple[Tensor, Tensor]:
        return batch[0], batch[2]


def _padded_batches() -> list[list[Tensor]]:
    """``[x, y, lengths]`` batches whose padding holds large values (what reading it as real steps would see)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (4, 3, 5):
        lengths = torch.randint(1, 7, (n,), generator=g)
        x = torch.randn(n, 6, 3, generator=g)
        x[torch.arange(6)[None, :] >= lengths[:, None]] = 10.0
        out.append([x, torch.zeros(n, dtype=torch.long), lengths])
    return out


def _valid_step_features(model: _SeqBN, batches: list[list[Tensor]]) -> Tensor:
    """The BN layer's inputs computed sample by sample over the valid steps only (a naive loop)."""
    with torch.no_grad():
        rows = [model.proj(x[i, : int(lengths[i])]).mean(0) for x, _, lengths in batches for i in range(len(x))]
    return torch.stack(rows)


def test_a_module_with_forward_inputs_is_recalibrated_with_its_lengths() -> None:
    model, batches = _SeqBN(), _padded_batches()
    features = _valid_step_features(model, batches)
    report = LF.recalibrate_bn(model, batches)
    var, mean = torch.var_mean(features, dim=0)
    torch.testing.assert_close(model.bn.running_mean, mean)
    torch.testing.assert_close(model.bn.running_var, var)
    assert report.num_samples == 12


def test_forward_fn_runs_each_batch_on_the_device_and_takes_precedence() -> None:
    model = _SeqBN()
    batches = [{"ids": x, "mask_lengths": lengths} for x, _, lengths in _padded_batches()]
    seen: list[str] = []

    def forward_fn(module: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        seen.append(batch["ids"].device.type)
        return module(batch["ids"], batch["mask_lengths"])

    report = LF.recalibrate_bn(model, batches, forward_fn=forward_fn, device="cpu")
    features = _valid_step_features(model, [[b["ids"], b["ids"], b["mask_lengths"]] for b in batches])
    var, mean = torch.var_mean(features, dim=0)
    torch.testing.assert_close(model.bn.running_mean, mean)
    torch.testing.assert_close(model.bn.running_var, var)
    assert seen == ["cpu"] * 3
    assert report.num_samples == 12


def test_forward_fn_must_be_callable() -> None:
    with pytest.raises(TypeError, match="`forward_fn` to be None or a callable"):
        LF.recalibrate_bn(nn.Sequential(nn.BatchNorm1d(3)), [torch.randn(4, 3)], forward_fn="model")  # type: ignore[arg-type]


# --- the accumulation dtype comes from the one place that decides it --------------------------------


class _DtypeRecorder(TorchFunctionMode):
    """Records the dtypes of every tensor that a torch function returns."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, tuple | list) else [out]:
            if isinstance(value, Tensor):
                self.dtypes.add(value.dtype)
        return out


def test_statistics_are_accumulated_in_the_dtype_that_accumulation_dtype_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Patched to float32 (what MPS gets, having no float64), the pass creates no float64 tensor at all."""
    asked: list[torch.device] = []

    def float32_only(device: torch.device | str) -> torch.dtype:
        asked.append(torch.device(device))
        return torch.float32

    monkeypatch.setattr("lightning_reg._device.accumulation_dtype", float32_only)
    model = _cnn().train()
    batches = _batches((2, 5, 5), [7, 2, 5])
    expected = _reference(model, batches)
    with _DtypeRecorder() as recorder:
        report = LF.recalibrate_bn(model, batches)
    assert torch.float64 not in recorder.dtypes
    assert asked
    assert set(asked) == {torch.device("cpu")}
    assert report.mean_abs_change_var > 0
    for name, layer in tracking_norm_layers(model):
        torch.testing.assert_close(layer.running_mean.double(), expected[name][0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(layer.running_var.double(), expected[name][1], rtol=1e-4, atol=1e-4)


def test_torchvision_resnet18_with_single_images_counts_each_layer_as_far_as_torch_can() -> None:
    """At 32x32 a single image reaches layer4 as a 1x1 map: those layers count only the two-image batch."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    batches = [torch.randn(1, 3, 32, 32) for _ in range(3)] + [torch.randn(2, 3, 32, 32)]
    one_by_one = {name for name, _ in tracking_norm_layers(model) if name.startswith("layer4")}
    calls = {name: (1 if name in one_by_one else 4) for name, _ in tracking_norm_layers(model)}
    report = _assert_exact(model, batches, calls=calls)
    assert len(one_by_one) == 5
    assert report.num_skipped == 3


# --- batches of any structure, reports and messages ------------------------------------------------


class _Pair(NamedTuple):
    x: Tensor
    lengths: Tensor


def test_nested_batches_reach_forward_fn_with_their_structure_and_types() -> None:
    data = _batches((3,), [5, 4])
    batches = [{"pair": (x, torch.arange(len(x))), "named": _Pair(x, torch.ones(len(x))), "list": [x]} for x in data]
    seen: list[tuple[type, type, type]] = []

    def forward_fn(module: nn.Module, batch: dict[str, Any]) -> Tensor:
        seen.append((type(batch["pair"]), type(batch["named"]), type(batch["list"])))
        assert torch.equal(batch["pair"][0], batch["named"].x)
        assert torch.equal(batch["list"][0], batch["named"].x)
        return module(batch["named"].x)

    model = nn.Sequential(nn.BatchNorm1d(3))
    report = LF.recalibrate_bn(model, batches, forward_fn=forward_fn)
    assert seen == [(tuple, _Pair, list)] * 2
    var, mean = torch.var_mean(torch.cat(data), dim=0)
    torch.testing.assert_close(model[0].running_mean, mean)
    torch.testing.assert_close(model[0].running_var, var)
    assert report.num_samples == 9


@pytest.mark.parametrize(
    ("batch", "samples"),
    [
        ({"name": "abc", "scale": torch.tensor(2.0), "x": torch.randn(5, 3)}, 5),  # a string, a scalar, then rows
        ({"x": torch.randn(6)}, 6),  # one value per sample
        ({"files": ["a.png", "b.png"], "seed": 3}, 0),  # no tensor: forward_fn loads its own data
        (None, 0),
    ],
    ids=["string-scalar-rows", "vector", "no-tensor", "none"],
)
def test_num_samples_is_the_first_batched_dimension_found_in_the_batch(batch: Any, samples: int) -> None:
    def forward_fn(module: nn.Module, batch: Any) -> Tensor:
        x = batch.get("x") if isinstance(batch, dict) else None
        x = torch.randn(4, 3) if x is None else x.reshape(len(x), -1).expand(-1, 3)
        return module(x)

    report = LF.recalibrate_bn(nn.Sequential(nn.BatchNorm1d(3)), [batch, batch], forward_fn=forward_fn)
    assert (report.num_batches, report.num_samples) == (2, 2 * samples)


def test_one_instance_gives_instance_norm_its_unbiased_variance() -> None:
    x = torch.randn(1, 3, 7)
    layer = nn.InstanceNorm1d(3, track_running_stats=True)
    LF.recalibrate_bn(nn.Sequential(layer), [x])
    torch.testing.assert_close(layer.running_mean, x[0].mean(-1))
    torch.testing.assert_close(layer.running_var, x[0].var(-1))


def test_num_batches_of_one_takes_the_first_batch() -> None:
    batches = _batches((3,), [4, 4])
    model = nn.Sequential(nn.BatchNorm1d(3))
    assert LF.recalibrate_bn(model, batches, num_batches=1).num_batches == 1
    torch.testing.assert_close(model[0].running_mean, batches[0].mean(0))


def test_the_report_measures_the_change_from_nonzero_statistics_in_float64() -> None:
    batches = _batches((3,), [6, 7])
    layer = nn.BatchNorm1d(3)
    layer.running_mean.copy_(torch.tensor([0.3, -1.7, 2.9]))
    layer.running_var.copy_(torch.tensor([0.5, 3.1, 1.3]))
    old_mean, old_var = layer.running_mean.double(), layer.running_var.double()
    report = LF.recalibrate_bn(nn.Sequential(layer), batches)
    assert report.mean_abs_change_mean == pytest.approx(
        float((layer.running_mean.double() - old_mean).abs().mean()), rel=1e-12
    )
    assert report.mean_abs_change_var == pytest.approx(
        float((layer.running_var.double() - old_var).abs().mean()), rel=1e-12
    )


def test_the_report_averages_a_change_below_float32_resolution_next_to_a_large_one() -> None:
    """Changes of 9995.5 and 2**-12: their mean, 4997.75 + 2**-13, needs more bits than a float32 has."""
    x = torch.stack([torch.arange(1.0, 9.0), torch.full((8,), 0.5)], dim=1)  # batch means exactly 4.5 and 0.5
    layer = nn.BatchNorm1d(2)
    layer.running_mean.copy_(torch.tensor([1e4, 0.5 + 2**-12]))
    report = LF.recalibrate_bn(nn.Sequential(layer), [x])
    assert layer.running_mean.tolist() == [4.5, 0.5]
    assert report.mean_abs_change_mean == (9995.5 + 2**-12) / 2


def test_a_layer_before_an_unreached_one_and_after_it_are_both_recalibrated() -> None:
    layers = nn.ModuleList([nn.BatchNorm1d(3), nn.BatchNorm1d(3), nn.BatchNorm1d(3)])

    class SkipsTheMiddle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = layers

        def forward(self, x: Tensor) -> Tensor:
            self.layers[0](x)
            return self.layers[2](x)

    batches = _batches((3,), [5, 5])  # different means: the last batch's statistics are not those of both
    with pytest.warns(UserWarning, match=r"never called \['layers.1'\]"):
        report = LF.recalibrate_bn(SkipsTheMiddle(), batches)
    assert report.layers == ["layers.0", "layers.2"]
    var, mean = torch.var_mean(torch.cat(batches), dim=0)
    for layer in (layers[0], layers[2]):
        torch.testing.assert_close(layer.running_mean, mean)
        torch.testing.assert_close(layer.running_var, var)


def test_an_instance_level_forward_of_a_batch_norm_is_kept() -> None:
    # wrappers (accelerate's hooks, profilers) set `layer.forward` on the instance; it must survive
    layer = nn.BatchNorm1d(3)
    calls: list[int] = []

    def forward(x: Tensor) -> Tensor:
        calls.append(len(x))
        return nn.BatchNorm1d.forward(layer, x)

    layer.forward = forward  # type: ignore[method-assign]
    LF.recalibrate_bn(nn.Sequential(layer), _batches((3,), [4]))
    assert vars(layer)["forward"] is forward
    assert calls == [4]


def _whole(message: str) -> str:
    return f"^{re.escape(message)}$"


def test_batches_whose_forward_stops_everywhere_raise_with_the_number_of_batches() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3))
    model[0].running_var.fill_(5.0)
    message = (
        "Expected at least one batch in which a normalization layer gets more than one value per channel, but every "
        "one of the 2 batches stopped at a layer with one value per channel (batches of one sample for BatchNorm1d, "
        "or 1x1 feature maps); no statistics were changed. Use batches of at least 2 samples (BatchNorm cannot "
        "compute a variance from one value)."
    )
    with pytest.raises(ValueError, match=_whole(message)):  # 8 samples in 2 batches, one of each reaches the layer
        LF.recalibrate_bn(model, _batches((3,), [4, 4]), forward_fn=lambda m, x: m(x[:1]))
    assert torch.equal(model[0].running_var, torch.full((3,), 5.0))


def test_an_empty_iterable_raises_the_single_process_message() -> None:
    message = (
        "Expected `batches` to yield at least one batch, but it is empty; no statistics were changed. Pass the "
        "training dataloader (or another non-empty iterable of batches)."
    )
    with pytest.raises(ValueError, match=_whole(message)):
        LF.recalibrate_bn(nn.Sequential(nn.BatchNorm1d(3)), [])


def test_a_model_whose_layers_are_all_frozen_warns_and_reports_them() -> None:
    model = TinyMLP(batch_norm=True).train()
    model.body[1].eval()
    message = (
        "`recalibrate_bn` found no normalization layer with running statistics to recalibrate in TinyMLP (1 frozen); "
        "nothing was changed. Only layers with `track_running_stats=True` (BatchNorm, SyncBatchNorm, "
        "InstanceNorm(track_running_stats=True)) that are not frozen are recalibrated."
    )
    with pytest.warns(UserWarning, match=_whole(message)):
        report = LF.recalibrate_bn(model, _batches((8,), [4]))
    assert report.frozen == ["body.1"]
    assert report.layers == []


def test_a_starved_layer_is_named_in_the_whole_warning() -> None:
    model = nn.Sequential(nn.BatchNorm2d(2), nn.Flatten(), nn.BatchNorm1d(18))
    message = (
        "`recalibrate_bn`: ['2'] got one value per channel in every batch that reached them (batches of one sample?); "
        "their statistics were left as they were. Use batches of at least 2 samples."
    )
    with pytest.warns(UserWarning, match=_whole(message)):
        LF.recalibrate_bn(model, _batches((2, 3, 3), [1]))


def test_instance_norm_over_many_batched_and_unbatched_inputs_records_one_concatenated_batch() -> None:
    # 40 calls (more than one buffered chunk); an unbatched (C, L) input is one instance, as torch counts it
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randn(3, 6, generator=g) + i if i % 3 == 0 else torch.randn(2, 3, 6, generator=g) for i in range(40)
    ]
    model = nn.Sequential(nn.InstanceNorm1d(3, track_running_stats=True))
    LF.recalibrate_bn(model, batches)
    one = nn.InstanceNorm1d(3, track_running_stats=True, momentum=1.0).train()
    one(torch.cat([b if b.dim() == 3 else b.unsqueeze(0) for b in batches]))
    torch.testing.assert_close(model[0].running_mean, one.running_mean)
    torch.testing.assert_close(model[0].running_var, one.running_var)


def test_instance_norm_inputs_of_one_position_stop_and_the_others_count() -> None:
    batches = [torch.randn(2, 3, 5), torch.randn(4, 3, 1), torch.randn(3, 1)]  # one value per instance and channel
    model = nn.Sequential(nn.InstanceNorm1d(3, track_running_stats=True))
    report = LF.recalibrate_bn(model, batches)
    assert report.num_skipped == 2
    torch.testing.assert_close(model[0].running_mean, batches[0].mean(-1).mean(0))
    torch.testing.assert_close(model[0].running_var, batches[0].var(-1).mean(0))
