"""The reports and errors of Monte-Carlo dropout, checked whole: what a user reads when something is wrong."""

from __future__ import annotations

import warnings

import pytest
import torch
from timm.layers import DropPath
from torch import Tensor, nn

from lightning_reg.forward import ForwardInputs
from lightning_reg.functional.mc_dropout import (
    check_running_statistics,
    find_mc_dropout_sites,
    mc_dropout_predict,
    running_statistics,
)

_NAN_ADVICE = (
    "They did not change during Monte-Carlo dropout, but every eval-mode prediction through them is NaN. "
    "BatchNorm statistics overflow in float16 (`precision='16-true'`): keep normalization in float32 "
    "(`precision='16-mixed'` or 'bf16-mixed'), then recalibrate them (`BNRecalibration`)."
)
_CHANGED_ADVICE = (
    "Normalization layers must stay in eval mode while dropout is sampled; a module that switches them to training "
    "mode inside its forward pass cannot be sampled this way."
)


def _norms(count: int) -> nn.Sequential:
    return nn.Sequential(*(nn.BatchNorm1d(2) for _ in range(count)))


def _nan_warning(model: nn.Module, before: dict[str, Tensor]) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_running_statistics(model, before, during="a test")
    assert [w.category for w in caught] == [RuntimeWarning]
    return str(caught[0].message)


# --- the running-statistics report ---------------------------------------------------------------------------


def test_nan_report_lists_four_buffers_without_an_ellipsis() -> None:
    model = _norms(2)
    for bn in model:
        bn.running_mean[1] = bn.running_var[0] = float("nan")
    message = _nan_warning(model, running_statistics(model))
    expected = "['0.running_mean', '0.running_var', '1.running_mean', '1.running_var']"
    assert message == f"Running statistics of Sequential are NaN: {expected}. {_NAN_ADVICE}"


def test_nan_report_lists_the_first_four_of_five_buffers_and_an_ellipsis() -> None:
    model = _norms(3)
    for bn in model[:2]:
        bn.running_mean[1] = bn.running_var[0] = float("nan")
    model[2].running_var[1] = float("nan")
    message = _nan_warning(model, running_statistics(model))
    expected = "['0.running_mean', '0.running_var', '1.running_mean', '1.running_var'] ..."
    assert message == f"Running statistics of Sequential are NaN: {expected}. {_NAN_ADVICE}"


def test_nan_report_names_a_buffer_with_one_nan_among_numbers_and_no_integer_buffer() -> None:
    model = _norms(1)
    model[0].running_var[1] = float("nan")
    message = _nan_warning(model, running_statistics(model))
    assert message == f"Running statistics of Sequential are NaN: ['0.running_var']. {_NAN_ADVICE}"


def test_a_nan_that_became_a_number_is_a_change_not_a_nan() -> None:
    model = _norms(1)
    model[0].running_mean[0] = float("nan")
    before = running_statistics(model)
    model[0].running_mean[0] = 1.0
    with pytest.raises(RuntimeError, match=r"^Running statistics changed") as raised:
        check_running_statistics(model, before, during="a test")
    assert str(raised.value) == f"Running statistics changed during a test: ['0.running_mean']. {_CHANGED_ADVICE}"


def test_a_number_that_became_nan_is_a_change() -> None:
    model = _norms(1)
    before = running_statistics(model)
    model[0].running_var[0] = float("nan")
    with pytest.raises(RuntimeError, match=r"changed during a test: \['0.running_var'\]\."):
        check_running_statistics(model, before, during="a test")


def test_change_report_lists_vanished_and_appeared_buffers_first_then_changed_ones_in_name_order() -> None:
    model = _norms(3)
    before = running_statistics(model)
    del before["1.running_mean"]  # appeared since
    model[0].running_var = None  # vanished since
    model[2].running_mean.add_(1.0)
    model[1].running_var.add_(1.0)
    with pytest.raises(RuntimeError, match=r"^Running statistics changed") as raised:
        check_running_statistics(model, before, during="a test")
    changed = "['0.running_var', '1.running_mean', '1.running_var', '2.running_mean']"
    assert str(raised.value) == f"Running statistics changed during a test: {changed}. {_CHANGED_ADVICE}"


def test_a_buffer_that_changed_its_shape_is_listed_and_the_buffers_after_it_are_still_compared() -> None:
    model = _norms(2)
    before = running_statistics(model)
    model[0].running_mean = torch.zeros(3)
    model[1].running_var.add_(1.0)
    with pytest.raises(RuntimeError, match=r"^Running statistics changed") as raised:
        check_running_statistics(model, before, during="a test")
    assert str(raised.value).startswith(
        "Running statistics changed during a test: ['0.running_mean', '1.running_var']."
    )


def test_a_buffer_moved_to_another_device_is_a_change() -> None:
    model = _norms(2)
    before = running_statistics(model)
    model[0].running_mean = model[0].running_mean.to("meta")
    with pytest.raises(RuntimeError, match=r"changed during a test: \['0.running_mean'\]\."):
        check_running_statistics(model, before, during="a test")


def test_meta_statistics_are_skipped_and_the_real_ones_after_them_still_compared() -> None:
    model = nn.Sequential(nn.BatchNorm1d(2, device="meta"), nn.BatchNorm1d(2))
    before = running_statistics(model)
    check_running_statistics(model, before, during="a test")  # meta values cannot be compared: silent
    model[1].running_mean.add_(1.0)
    with pytest.raises(RuntimeError, match=r"changed during a test: \['1.running_mean'\]\."):
        check_running_statistics(model, before, during="a test")


def test_sampling_reports_the_statistics_under_the_name_of_the_sampler() -> None:
    class FlipsBatchNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn, self.drop, self.fc = nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            self.bn.train()  # what one anchor does inside its prediction
            return self.fc(self.drop(self.bn(x)))

    with pytest.raises(RuntimeError, match=r"^Running statistics changed") as raised:
        mc_dropout_predict(FlipsBatchNorm(), torch.randn(4, 4), 2, method="naive")
    changed = "['bn.num_batches_tracked', 'bn.running_mean', 'bn.running_var']"
    expected = f"Running statistics changed during Monte-Carlo dropout sampling: {changed}. {_CHANGED_ADVICE}"
    assert str(raised.value) == expected


# --- models with nothing to sample -------------------------------------------------------------------------


def _no_dropout_message(model: nn.Module, **kwargs: bool) -> str:
    with pytest.raises(ValueError, match=r"^Expected") as raised:
        find_mc_dropout_sites(model, **kwargs)
    return str(raised.value)


_ADD_DROPOUT = (
    " Add dropout (e.g. `nn.Dropout(p)` before the classifier), or give your own layer the class attribute "
    "`mc_dropout_kind = 'dropout'`."
)


def test_a_model_without_dropout_is_named_in_the_error() -> None:
    message = _no_dropout_message(nn.Sequential(nn.Linear(2, 2)))
    expected = "Expected a model with dropout to sample for Monte-Carlo dropout, but Sequential has no dropout layer."
    assert message == expected + _ADD_DROPOUT


def test_one_drop_path_layer_is_named_with_the_flag_that_samples_it() -> None:
    message = _no_dropout_message(nn.Sequential(nn.Linear(2, 2), DropPath(0.0), DropPath(0.2)))
    hint = (
        " It has 1 drop-path layer with a rate above 0 (e.g. `2`, DropPath): pass `include_drop_path=True` to "
        "sample them."
    )
    expected = "Expected a model with dropout to sample for Monte-Carlo dropout, but Sequential has no dropout layer."
    assert message == expected + hint + _ADD_DROPOUT


def test_several_drop_path_layers_are_counted_in_the_plural() -> None:
    message = _no_dropout_message(nn.Sequential(DropPath(0.1), nn.Linear(2, 2), DropPath(0.2)))
    assert " It has 2 drop-path layers with a rate above 0 (e.g. `0`, DropPath): pass " in message


def test_drop_path_with_the_flag_and_rate_zero_is_the_rate_zero_error() -> None:
    message = _no_dropout_message(nn.Sequential(nn.Linear(2, 2), DropPath(0.0)), include_drop_path=True)
    assert message == (
        "Expected a model with dropout to sample for Monte-Carlo dropout, but every dropout layer of Sequential has "
        "rate 0 (1 layer: `1`), so all samples would be identical. Give a dropout layer a rate above 0."
    )


@pytest.mark.parametrize(
    ("count", "listed"),
    [
        (1, "1 layer: `0`"),
        (2, "2 layers: `0`, `1`"),
        (3, "3 layers: `0`, `1`, `2`"),
        (4, "4 layers: `0`, `1`, `2`, ..."),
    ],
)
def test_rate_zero_error_lists_at_most_three_layers(count: int, listed: str) -> None:
    message = _no_dropout_message(nn.Sequential(*(nn.Dropout(0.0) for _ in range(count))))
    assert message == (
        "Expected a model with dropout to sample for Monte-Carlo dropout, but every dropout layer of Sequential has "
        f"rate 0 ({listed}), so all samples would be identical. Give a dropout layer a rate above 0."
    )


def test_rate_zero_error_names_a_bare_dropout_by_its_class_and_hints_at_drop_path() -> None:
    assert "has rate 0 (1 layer: `Dropout`)" in _no_dropout_message(nn.Dropout(0.0))
    message = _no_dropout_message(nn.Sequential(nn.Dropout(0.0), DropPath(0.3)))
    assert message.endswith(
        "so all samples would be identical. It has 1 drop-path layer with a rate above 0 (e.g. `1`, DropPath): pass "
        "`include_drop_path=True` to sample them."
    )


def test_a_gate_without_a_site_is_no_dropout() -> None:
    encoder = nn.TransformerEncoderLayer(4, 1, 8, dropout=0.0, batch_first=True)
    for module in encoder.modules():  # a gate left with no dropout module below it
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Dropout):
                setattr(module, name, nn.Identity())
    encoder.self_attn.dropout = 0.0
    assert "TransformerEncoderLayer has no dropout layer." in _no_dropout_message(encoder)


def test_a_site_with_a_rate_is_found() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0), nn.Dropout(0.1))
    found = find_mc_dropout_sites(model)
    assert found.sites == [model[1], model[2]]
    assert found.active == [model[2]]
    assert found.gates == []


# --- what the model returns and the arguments ----------------------------------------------------------------


def test_single_logit_error_is_whole() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Linear(2, 1))
    with pytest.raises(ValueError, match=r"^Expected") as raised:
        mc_dropout_predict(model, torch.randn(3, 2), 2, method="naive")
    assert str(raised.value) == (
        "Expected logits of shape (N, num_classes) with num_classes >= 2, but got shape (3, 1): a softmax over one "
        "logit is always 1, so every sample would have confidence 1 and mutual information 0. For a binary sigmoid "
        "head return two logits, `torch.cat([torch.zeros_like(z), z], dim=1)`, whose softmax is "
        "`[1 - sigmoid(z), sigmoid(z)]` (in a `forward_fn` of the callback, or in the model)."
    )


class _Returns(nn.Module):
    def __init__(self, make) -> None:
        super().__init__()
        self.drop, self.make = nn.Dropout(0.5), make

    def forward(self, x: Tensor):
        return self.make(self.drop(x))


_WRAP = " Wrap the model so that its forward returns a logits tensor."


@pytest.mark.parametrize(
    ("make", "got"),
    [
        (lambda x: (x,), "tuple"),
        (lambda x: {"logits": x}, "dict"),
        (lambda x: x[:, None], "shape ({rows}, 1, 2)"),
        (lambda x: x[0], "shape (2,)"),
        (lambda x: x[:2], "shape (2, 2)"),
    ],
    ids=["tuple", "dict", "3-D", "1-D", "rows"],
)
@pytest.mark.parametrize("method", ["auto", "batched", "naive"])
def test_an_output_that_is_not_logits_is_named_with_the_rows_expected(make, got: str, method: str) -> None:
    # The batched path passes both samples of the 3 rows at once: 6 rows in, 6 logits expected.
    rows = 3 if method == "naive" else 6
    with pytest.raises(ValueError, match=r"^Expected") as raised:
        mc_dropout_predict(_Returns(make), torch.randn(3, 2), 2, method=method)  # type: ignore[arg-type]
    expected = f"Expected the model to return logits of shape ({rows}, num_classes), but got {got.format(rows=rows)}."
    assert str(raised.value) == expected + _WRAP


def test_a_function_input_has_no_row_count_to_expect() -> None:
    model = _Returns(lambda x: x)
    with pytest.raises(ValueError, match=r"^Expected") as raised:
        mc_dropout_predict(model, lambda m: m(torch.randn(3, 2))[0], 2)
    assert (
        str(raised.value)
        == f"Expected the model to return logits of shape (N, num_classes), but got shape (2,).{_WRAP}"
    )
    out = mc_dropout_predict(model, lambda m: m(torch.randn(3, 2)), 2)
    assert out.method == "naive"
    assert out.probs.shape == (2, 3, 2)


@pytest.mark.parametrize("n_samples", [0, -1, 2.0, True, "3"])
def test_bad_n_samples_error_is_whole(n_samples: object) -> None:
    with pytest.raises(ValueError, match=r"^Expected") as raised:
        mc_dropout_predict(_Returns(lambda x: x), torch.randn(3, 2), n_samples)  # type: ignore[arg-type]
    assert str(raised.value) == f"Expected `n_samples` to be an int >= 1, but got {n_samples!r}."


def test_one_sample_is_enough() -> None:
    out = mc_dropout_predict(_Returns(lambda x: x), torch.randn(3, 2), 1)
    assert out.probs.shape == (1, 3, 2)


@pytest.mark.parametrize("chunk_size", [0, -4, 1.5, False])
def test_bad_chunk_size_error_is_whole(chunk_size: object) -> None:
    with pytest.raises(ValueError, match=r"^Expected") as raised:
        mc_dropout_predict(_Returns(lambda x: x), torch.randn(3, 2), 2, chunk_size=chunk_size)  # type: ignore[arg-type]
    assert str(raised.value) == (
        f"Expected `chunk_size` to be None (all rows at once) or an int >= 1, but got {chunk_size!r}. It is the most "
        "input rows per forward pass."
    )


def test_a_chunk_of_one_row_is_allowed() -> None:
    out = mc_dropout_predict(_Returns(lambda x: x), torch.randn(3, 2), 2, chunk_size=1, method="batched")
    assert out.method == "batched"
    assert out.probs.shape == (2, 3, 2)


def test_bad_method_error_is_whole() -> None:
    with pytest.raises(ValueError, match=r"^Expected") as raised:
        mc_dropout_predict(_Returns(lambda x: x), torch.randn(3, 2), 2, method="loop")  # type: ignore[arg-type]
    assert str(raised.value) == "Expected `method` to be one of ('auto', 'batched', 'naive'), but got 'loop'."


def test_inputs_of_another_type_error_is_whole() -> None:
    with pytest.raises(TypeError, match=r"^Expected") as raised:
        mc_dropout_predict(_Returns(lambda x: x), [torch.randn(3, 2)], 2)  # type: ignore[arg-type]
    assert str(raised.value) == (
        "Expected `inputs` to be a tensor, a `ForwardInputs` or a function `fn(model) -> logits`, but got list."
    )


@pytest.mark.parametrize(
    ("inputs", "got"),
    [
        (torch.randn(0, 2), "shape (0, 2)"),
        (torch.tensor(1.0), "shape ()"),
        (ForwardInputs((), {"flag": True}), "no tensor"),
    ],
    ids=["empty", "scalar", "no-tensor"],
)
def test_inputs_without_a_batch_error_is_whole(inputs: object, got: str) -> None:
    with pytest.raises(ValueError, match=r"^Expected") as raised:
        mc_dropout_predict(_Returns(lambda x: x), inputs, 2)  # type: ignore[arg-type]
    hint = (
        " A dict batch goes in as keyword arguments, `ForwardInputs((), batch)`, or pass `fn(model) -> logits`."
        if got == "no tensor"
        else ""
    )
    assert (
        str(raised.value) == f"Expected `inputs` to hold a non-empty tensor with the batch first, but got {got}.{hint}"
    )


class _OwnDropPath(nn.Module):
    mc_dropout_kind = "drop_path"

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        return x


def test_a_drop_path_layer_of_your_own_is_named_in_the_hint() -> None:
    message = _no_dropout_message(nn.Sequential(nn.Linear(2, 2), _OwnDropPath(0.0), _OwnDropPath(0.3)))
    assert " It has 1 drop-path layer with a rate above 0 (e.g. `2`, _OwnDropPath): pass " in message
