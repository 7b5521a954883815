import lightning as L
import pytest
import torch

from lightning_reg import LabelSmoothing, MixUp
from lightning_reg import functional as LF
from tests.helpers import UserClassifier, fast_trainer, make_classification, make_loader


def _loader():
    return make_loader(*make_classification(32), batch_size=16)


def _train_targets(tmp_path, callbacks, model=None):
    L.seed_everything(0, verbose=False)
    model = model or UserClassifier()
    fast_trainer(tmp_path, max_steps=2, callbacks=callbacks).fit(model, _loader(), _loader())
    return model


def test_training_targets_are_smoothed_and_validation_targets_are_not(tmp_path):
    model = _train_targets(tmp_path, [LabelSmoothing(0.3)])
    _, y = make_classification(32)
    assert torch.allclose(model.seen_targets["train"][0], LF.one_hot(y[:16], 3, smoothing=0.3))
    assert all(t.ndim == 1 for t in model.seen_targets["val"])


def test_with_mixup_labels_are_smoothed_once_in_either_order(tmp_path):
    folded = _train_targets(tmp_path, [MixUp(alpha=1.0, label_smoothing=0.2)]).seen_targets["train"]
    after = _train_targets(tmp_path, [MixUp(alpha=1.0), LabelSmoothing(0.2)]).seen_targets["train"]
    before = _train_targets(tmp_path, [LabelSmoothing(0.2), MixUp(alpha=1.0)]).seen_targets["train"]
    for a, b, c in zip(folded, after, before, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
        assert torch.allclose(a, c, atol=1e-6)
        assert float(a.min()) >= 0.2 / 3 - 1e-6  # smoothed at least once: every class keeps s / K
        assert float(a.max()) <= 1 - 0.2 + 0.2 / 3 + 1e-6


def test_two_sources_of_smoothing_are_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"smoothed more than once, by MixUp\(label_smoothing=0.1\), LabelSmoothing"):
        _train_targets(tmp_path, [MixUp(label_smoothing=0.1), LabelSmoothing(0.1)])
    model = UserClassifier()
    model.label_smoothing = 0.1
    with pytest.raises(ValueError, match=r"UserClassifier.label_smoothing=0.1"):
        _train_targets(tmp_path, [LabelSmoothing(0.1)], model=model)


@pytest.mark.parametrize(("smoothing", "match"), [(1.0, r"in \[0, 1\), but got 1.0"), (-0.1, "but got -0.1")])
def test_bad_smoothing_is_an_error(smoothing, match):
    with pytest.raises(ValueError, match=match):
        LabelSmoothing(smoothing)


def test_state_dict_is_empty():
    assert LabelSmoothing(0.1).state_dict() == {}


def _set_up(tmp_path, smoothing, model):
    callback = LabelSmoothing(smoothing)
    callback.setup(fast_trainer(tmp_path, callbacks=[callback]), model, "fit")


class _SmoothsThreeWays(UserClassifier):
    def __init__(self, attribute: float = 0.05, loss: float = 0.2, timm_loss: float = 0.1) -> None:
        from timm.loss import LabelSmoothingCrossEntropy

        super().__init__()
        self.label_smoothing = attribute
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=loss)
        self.timm_criterion = LabelSmoothingCrossEntropy(smoothing=timm_loss)


def test_every_source_of_smoothing_is_named_in_one_message(tmp_path):
    with pytest.raises(ValueError, match="smoothed more than once") as raised:
        _set_up(tmp_path, 0.1, _SmoothsThreeWays())
    assert str(raised.value) == (
        "Labels would be smoothed more than once, by LabelSmoothing(0.1), _SmoothsThreeWays.label_smoothing=0.05, "
        "_SmoothsThreeWays.criterion = CrossEntropyLoss(label_smoothing=0.2), _SmoothsThreeWays.timm_criterion = "
        "LabelSmoothingCrossEntropy(smoothing=0.1). Keep exactly one: a `LabelSmoothing` callback (it composes with "
        "mixing in either order), or `label_smoothing=` of the mixing callback, or the module's own smoothing (its "
        "`label_smoothing`, or its loss's)."
    )


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"loss": 0.0, "timm_loss": 0.0}, "_SmoothsThreeWays.label_smoothing=0.05"),
        ({"attribute": 0.0, "timm_loss": 0.0}, "_SmoothsThreeWays.criterion = CrossEntropyLoss(label_smoothing=0.2)"),
        ({"attribute": 0, "loss": 0.0}, "_SmoothsThreeWays.timm_criterion = LabelSmoothingCrossEntropy(smoothing=0.1)"),
    ],
    ids=["attribute", "loss", "timm loss"],
)
def test_each_source_of_the_module_alone_is_a_second_source_and_a_zero_is_none(tmp_path, kwargs, named):
    model = _SmoothsThreeWays(**kwargs)
    with pytest.raises(ValueError, match="smoothed more than once") as raised:
        _set_up(tmp_path, 0.1, model)
    assert str(raised.value).startswith(f"Labels would be smoothed more than once, by LabelSmoothing(0.1), {named}. ")
    _set_up(tmp_path, 0.0, model)  # no smoothing callback: the module's is one
    nothing = _SmoothsThreeWays(attribute=0.0, loss=0.0, timm_loss=0.0)
    _set_up(tmp_path, 0.1, nothing)
