"""The deterministic prefix of Monte-Carlo dropout on models written the way users write them (issue 19).

Each case was a silent wrong result or a crash of ``method="auto"`` on a model the naive loop samples correctly:
the prefix must be the model's own computation, with the model's current tensors and attributes.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_reg.functional import mc_dropout_predict

_LOGGER = "lightning_reg.functional.mc_dropout"


def _seed(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_the_loops_draws(model: nn.Module, inputs: Tensor, taken: str | None = "cached", **kwargs: object) -> None:
    ours = mc_dropout_predict(model, inputs, 8, generator=_seed(), deterministic=True, **kwargs)  # type: ignore[arg-type]
    naive = mc_dropout_predict(model, inputs, 8, method="naive", generator=_seed(), deterministic=True, **kwargs)  # type: ignore[arg-type]
    if taken is not None:
        assert ours.method == taken
    torch.testing.assert_close(ours.probs, naive.probs, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.deterministic_probs, naive.deterministic_probs, rtol=0, atol=1e-6)


class _Normalized(nn.Module):
    """A root-level buffer and parameter (fx holds them as graph attributes) before a head dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(8))
        self.scale = nn.Parameter(torch.ones(8))
        self.body, self.drop, self.head = nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(torch.relu(self.body((x - self.mean) * self.scale))))


def test_tensors_replaced_on_the_model_after_a_call_are_the_ones_the_next_call_uses() -> None:
    torch.manual_seed(0)
    model, inputs = _Normalized().eval(), torch.randn(16, 8)
    _assert_the_loops_draws(model, inputs)  # traces and caches the split
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["mean"], state["scale"] = torch.full((8,), 3.0), torch.full((8,), 2.0)
    model.load_state_dict(state, assign=True)  # new tensor objects
    _assert_the_loops_draws(model, inputs)
    model.mean = torch.full((8,), -3.0)  # a buffer reassigned
    _assert_the_loops_draws(model, inputs)
    model.load_state_dict(state)  # copied in place into the current tensors
    _assert_the_loops_draws(model, inputs)


class _Configured(nn.Module):
    """Attributes a trace bakes in as constants: a config object's field and a list element."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(scale=1.0, options={"shift": 0.0})
        self.scales = [1.0]
        self.body, self.drop, self.head = nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.body(x)) * self.cfg.scale * self.scales[0] + self.cfg.options["shift"]
        return self.head(self.drop(h))


def test_a_changed_config_field_list_element_or_dict_value_retraces_the_prefix() -> None:
    torch.manual_seed(0)
    model, inputs = _Configured().eval(), torch.randn(16, 8)
    _assert_the_loops_draws(model, inputs)
    model.cfg.scale = 4.0
    _assert_the_loops_draws(model, inputs)
    model.scales[0] = -2.0
    _assert_the_loops_draws(model, inputs)
    model.cfg.options["shift"] = 1.5
    _assert_the_loops_draws(model, inputs)


class _FeaturesHead(nn.Module):
    """The timm convention, with a ``forward`` of the user's own."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.drop, self.fc = nn.Sequential(nn.Linear(8, 16), nn.ReLU()), nn.Dropout(0.5), nn.Linear(16, 3)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.fc(self.drop(features))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class _Tempered(_FeaturesHead):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) / 3.0  # a temperature that forward_head does not apply


class _Masked(_FeaturesHead):
    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.forward_head(self.forward_features(x if mask is None else x * mask))


def _hooked() -> nn.Module:
    model = _FeaturesHead()
    model.register_forward_hook(lambda module, args, out: out * 2.0)  # `model(x)` runs it, `forward_head` does not
    return model


class _AlwaysOnDropout(_FeaturesHead):
    def forward_features(self, x: Tensor) -> Tensor:
        return F.dropout(self.body(x), 0.3, training=True)  # MC dropout written by hand: draws in eval mode too


def test_forward_features_and_forward_head_are_used_when_forward_is_their_composition() -> None:
    torch.manual_seed(0)
    model = _FeaturesHead().eval()
    calls: list[int] = []
    model.body.register_forward_hook(lambda *_: calls.append(1))
    _assert_the_loops_draws(model, torch.randn(16, 8))
    calls.clear()
    mc_dropout_predict(model, torch.randn(16, 8), 8)  # checked once per model: the trunk runs once now
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_Tempered, "`forward_head(forward_features(x))` differs from `forward(x)` in eval mode"),
        (_AlwaysOnDropout, "`forward_head(forward_features(x))` differs from `forward(x)` in eval mode"),
        (_hooked, "`forward_head(forward_features(x))` differs from `forward(x)` in eval mode"),
    ],
    ids=["temperature in forward", "F.dropout(training=True) in forward_features", "forward hook on the model"],
)
def test_a_forward_that_is_not_head_of_features_is_sampled_as_forward_with_the_reason_logged(
    make: Callable[[], nn.Module], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    with caplog.at_level("INFO", logger=_LOGGER):
        _assert_the_loops_draws(make().eval(), torch.randn(16, 8), taken=None)
    assert reason in caplog.text


def test_forward_arguments_that_forward_features_does_not_take_fall_back_instead_of_raising(
    caplog: pytest.LogCaptureFixture,
) -> None:
    torch.manual_seed(0)
    from lightning_reg.forward import ForwardInputs

    model, x = _Masked().eval(), torch.randn(16, 8)
    inputs = ForwardInputs((x,), {"mask": (torch.rand(16, 8) > 0.5).float()})
    with caplog.at_level("INFO", logger=_LOGGER):
        ours = mc_dropout_predict(model, inputs, 8, generator=_seed())
    naive = mc_dropout_predict(model, inputs, 8, method="naive", generator=_seed())
    torch.testing.assert_close(ours.probs, naive.probs, rtol=0, atol=1e-6)
    assert "`forward_features` does not take the arguments of `forward`" in caplog.text


class _InPlaceFunction(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.body, self.drop, self.head = nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        out = self.head(self.drop(h))  # the dropout reads h, then h is changed in place
        if self.form == "torch.relu_":
            torch.relu_(h)
        else:
            torch.sigmoid_(h)
        return out + h[:, :3]


@pytest.mark.parametrize("form", ["torch.relu_", "torch.sigmoid_"])
def test_an_in_place_torch_function_on_a_value_the_sampled_part_reads_falls_back(
    form: str, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    with caplog.at_level("DEBUG", logger=_LOGGER):
        _assert_the_loops_draws(_InPlaceFunction(form).eval(), torch.randn(16, 8), taken="batched")
    assert "the in-place operation" in caplog.text


class _OptionalArgument(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.drop, self.head = nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 3)

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        h = self.body(x)
        if attention_mask is not None:
            h = h * attention_mask
        return self.head(self.drop(h))


def test_a_traced_prefix_that_fails_for_a_call_falls_back_without_printing(capfd: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model, x = _OptionalArgument().eval(), torch.randn(16, 8)  # traced with a mask proxy; called without one
    for _ in range(2):
        _assert_the_loops_draws(model, x, taken="batched")
    assert capfd.readouterr().err == ""


def test_a_generator_of_the_wrong_type_raises_with_the_fix() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    with pytest.raises(TypeError, match=r"torch\.Generator or None, but got int.*manual_seed"):
        mc_dropout_predict(model, torch.randn(4, 4), 3, generator=0)  # type: ignore[arg-type]


class _InPlaceDropoutHead(nn.Module):
    """torchvision's MobileNet/EfficientNet head: a ``Dropout(inplace=True)`` on the last features."""

    def __init__(self, read_after: bool) -> None:
        super().__init__()
        self.read_after = read_after
        self.body, self.drop, self.head = nn.Linear(8, 16), nn.Dropout(0.5, inplace=True), nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.body(x))
        out = self.head(self.drop(h))
        return out + h[:, :3] if self.read_after else out  # h as the dropout left it: a value the prefix holds


def test_a_sampled_in_place_dropout_on_the_frontier_gets_a_copy_per_sample() -> None:
    torch.manual_seed(0)
    model, inputs = _InPlaceDropoutHead(read_after=False).eval(), torch.randn(16, 8)
    for masks in ("threshold", "torch"):
        _assert_the_loops_draws(model, inputs, taken="cached", masks=masks)


def test_a_value_an_in_place_dropout_changes_and_the_prefix_reads_after_it_falls_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    torch.manual_seed(0)
    with caplog.at_level("DEBUG", logger=_LOGGER):
        _assert_the_loops_draws(_InPlaceDropoutHead(read_after=True).eval(), torch.randn(16, 8), taken="batched")
    assert "the in-place operation `drop` changes `relu`" in caplog.text


def test_torchvision_mobilenet_v3_runs_its_prefix_once_with_the_loops_draws() -> None:
    from torchvision.models import mobilenet_v3_small

    torch.manual_seed(0)
    model = mobilenet_v3_small(num_classes=3)
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 32, 32))  # BN statistics
    _assert_the_loops_draws(model.eval(), torch.randn(3, 3, 32, 32), taken="cached")


def test_a_dict_batch_passed_as_the_one_positional_argument_raises_with_the_keyword_fix() -> None:
    from lightning_reg.forward import ForwardInputs

    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"got no tensor\. A dict batch goes in as keyword arguments"):
        mc_dropout_predict(model, ForwardInputs(({"pixel_values": torch.randn(4, 4)},), {}), 3)


def test_a_lightning_module_on_the_traced_path_is_traced_once_across_epochs_of_validation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A LightningModule holds its Trainer, whose loops' counters move every batch, and lists it appends step outputs
    # to: neither may retrace the graph every batch.
    from lightning_reg import MCDropoutEvaluation
    from lightning_reg.functional import mc_dropout as mc
    from tests.helpers import TinyMLP, UserClassifier, fast_trainer, make_classification, make_loader

    traces: list[int] = []
    trace = mc._trace_split
    monkeypatch.setattr(mc, "_trace_split", lambda *args: traces.append(1) or trace(*args))
    torch.manual_seed(0)
    loader = make_loader(*make_classification(48), batch_size=8)
    model = UserClassifier(TinyMLP(dropout=0.5))
    trainer = fast_trainer(max_epochs=2, callbacks=[MCDropoutEvaluation(n_samples=4)])
    trainer.fit(model, loader, loader)
    # Once, and once more when `train_losses` (a list of floats the model appends to each step) passes 8 items and
    # stops being keyed as configuration; `seen_targets` (lists of tensors) never is.
    assert len(model.train_losses) == 12
    assert len(traces) == 2


def test_stacked_samples_through_two_dropouts_say_they_are_not_the_loops_draws_and_chunk_size_n_is(
    caplog: pytest.LogCaptureFixture,
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 16), nn.Dropout(0.5), nn.Linear(16, 3)
    ).eval()
    inputs = torch.randn(16, 8)
    with caplog.at_level("DEBUG", logger=_LOGGER):
        mc_dropout_predict(model, inputs, 8, generator=_seed())
    assert "several samples share each pass" in caplog.text
    assert "chunk_size=16" in caplog.text
    caplog.clear()
    with caplog.at_level("DEBUG", logger=_LOGGER):
        _assert_the_loops_draws(model, inputs, chunk_size=16)  # one sample a pass: the loop's draws
    assert "several samples share each pass" not in caplog.text
