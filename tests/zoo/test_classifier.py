import lightning as L
import pytest
import torch
from torch import nn

import zoo
from tests.helpers import fast_trainer
from zoo.classifier import _WarmupCosine, split_decay_parameters


def test_no_weight_decay_on_biases_and_norm_gains():
    model = zoo.CNNClassifier(widths=(8,), norm="batch")
    decay, no_decay = split_decay_parameters(model)
    assert all(p.ndim >= 2 for p in decay)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert any(p is bn.weight for p in no_decay)
    groups = model.parameter_groups()
    assert [g["weight_decay"] for g in groups] == [model.weight_decay, 0.0]


def test_warmup_cosine_schedule_shape():
    f = _WarmupCosine(warmup_steps=10, total_steps=110)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)
    assert f(110) == pytest.approx(0.0)


def test_classifier_trains_on_soft_targets():
    model = zoo.CNNClassifier(widths=(8,), num_classes=3)
    x = torch.randn(4, 1, 8, 8)
    soft = torch.softmax(torch.randn(4, 3), dim=1)
    loss = model.training_step([x, soft], 0)
    loss.backward()
    assert torch.isfinite(loss)


def test_classifier_trains_and_reloads_from_checkpoint(tmp_path):
    L.seed_everything(0, verbose=False)
    dm = zoo.data.DigitsDataModule(batch_size=128)
    model = zoo.create("cnn_small", widths=(8, 16))
    trainer = fast_trainer(tmp_path, max_epochs=2, limit_train_batches=4, limit_val_batches=2)
    trainer.fit(model, datamodule=dm)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = zoo.CNNClassifier.load_from_checkpoint(path)
    assert restored.hparams.widths == (8, 16)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(restored.eval()(x), model.eval()(x))


def test_classifier_forward_head_of_features_equals_forward():
    model = zoo.create("cnn_small").eval()
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(model.forward_head(model.forward_features(x)), model(x))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 1}, "num_classes"),
        ({"lr": 0.0}, "lr"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"scheduler": "step"}, r"one of \('cosine', 'none'\)"),
    ],
)
def test_classifier_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        zoo.CNNClassifier(**kwargs)


def test_forward_inputs_are_the_inputs_and_the_extras_and_other_layouts_are_refused():
    model = zoo.RNNClassifier(3, hidden_size=8)
    x, y, lengths = torch.randn(2, 5, 8), torch.tensor([0, 1]), torch.tensor([5, 2])
    args = model.forward_inputs([x, y, lengths])
    assert len(args) == 2
    assert args[0] is x
    assert args[1] is lengths
    assert model.forward_inputs(x)[0] is x
    with pytest.raises(TypeError, match=r"Override `forward_inputs\(batch\)`"):
        model.forward_inputs({"inputs": x, "targets": y})
