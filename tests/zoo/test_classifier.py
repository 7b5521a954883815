import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from timm.optim import param_groups_weight_decay
from torch import nn

import zoo
from tests.helpers import fast_trainer


def test_no_weight_decay_on_biases_and_norm_gains():
    model = zoo.CNNClassifier(widths=(8,), norm="batch")
    decay, no_decay = (g["params"] for g in model.parameter_groups())
    assert all(p.ndim >= 2 for p in decay)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert any(p is bn.weight for p in no_decay)
    groups = model.parameter_groups()
    assert [g["weight_decay"] for g in groups] == [model.weight_decay, 0.0]


@pytest.mark.parametrize("name", ["mlp", "cnn_small", "lstm", "transformer", "vit_tiny", "resnet18"])
def test_weight_decay_groups_equal_the_ndim_rule_and_timms_own_grouping(name):
    kwargs = {"image_size": 8, "patch_size": 4, "dim": 12, "depth": 2, "num_heads": 3} if name == "vit_tiny" else {}
    model = zoo.create(name, num_classes=3, **kwargs)
    exempt = {"net.pos_embed", "net.cls_token"} if "transformer" in type(model).__module__ else set()
    # The rule written out: decay matrices and kernels, not biases, norm gains, position embeddings, [CLS].
    by_rule = ([], [])
    for param_name, p in model.named_parameters():
        by_rule[int(p.ndim < 2 or param_name in exempt)].append(p)
    groups = [g for g in model.parameter_groups()]
    decay = [p for g in groups if g["weight_decay"] > 0 for p in g["params"]]
    no_decay = [p for g in groups if g["weight_decay"] == 0 for p in g["params"]]
    assert {id(p) for p in decay} == {id(p) for p in by_rule[0]}
    assert {id(p) for p in no_decay} == {id(p) for p in by_rule[1]}
    if name != "resnet18":  # one learning rate: the groups are timm's, in our order (decayed first)
        timm_groups = param_groups_weight_decay(model, model.weight_decay, no_weight_decay_list=exempt)
        assert [(g["weight_decay"], [id(p) for p in g["params"]]) for g in reversed(timm_groups)] == [
            (g["weight_decay"], [id(p) for p in g["params"]]) for g in groups
        ]


def test_weight_decay_groups_follow_timms_rule_where_it_differs_from_ndim():
    class WithMatrixBias(zoo.ClassifierModule):
        def __init__(self) -> None:
            super().__init__(3, weight_decay=0.0)
            self.fc = nn.Linear(4, 3)
            self.scale = nn.Module()
            self.scale.bias = nn.Parameter(torch.zeros(2, 3))  # 2-D, named like a bias: timm leaves it undecayed
            self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)

    model = WithMatrixBias()
    decay, no_decay = model.parameter_groups()
    assert [id(p) for p in decay["params"]] == [id(model.fc.weight)]
    assert [id(p) for p in no_decay["params"]] == [id(model.fc.bias), id(model.scale.bias)]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.0, 0.0)  # two groups even at rate 0


def _warmup_cosine_closed_form(step: int, warmup: int, total: int) -> float:
    """The schedule's factor as a formula: linear warmup to 1 over ``warmup`` steps, cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _optimizer_and_schedule(model, total_steps):
    model.trainer = SimpleNamespace(estimated_stepping_batches=total_steps)  # what configure_optimizers reads
    config = model.configure_optimizers()
    return config["optimizer"], config["lr_scheduler"]["scheduler"]


@pytest.mark.parametrize(
    ("warmup_fraction", "total"), [(0.05, 110), (0.0, 10), (0.1, 10), (0.5, 3), (0.3, 7), (0.1, 1), (0.05, 2000)]
)
def test_learning_rate_schedule_equals_the_closed_form_at_every_step(warmup_fraction, total):
    model = zoo.CNNClassifier(widths=(4,), lr=0.02, warmup_fraction=warmup_fraction)
    optimizer, schedule = _optimizer_and_schedule(model, total)
    warmup = int(warmup_fraction * total)
    for step in range(total + 1):  # the Trainer takes `total` steps; the value after the last one is 0
        expected = 0.02 * _warmup_cosine_closed_form(step, warmup, total)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([expected] * 2, rel=1e-9, abs=1e-15)
        optimizer.step()
        schedule.step()


def test_warmup_cosine_schedule_shape():
    optimizer, schedule = _optimizer_and_schedule(zoo.CNNClassifier(widths=(4,), lr=1.0, warmup_fraction=10 / 110), 110)
    lrs = []
    for _ in range(111):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.5)
    assert lrs[110] == pytest.approx(0.0)


def test_learning_rate_schedule_resumes_from_its_state_dict():
    model = zoo.CNNClassifier(widths=(4,), lr=0.02, warmup_fraction=0.2)
    optimizer, schedule = _optimizer_and_schedule(model, 50)
    for _ in range(17):
        optimizer.step()
        schedule.step()
    state = schedule.state_dict()
    resumed_optimizer, resumed = _optimizer_and_schedule(
        zoo.CNNClassifier(widths=(4,), lr=0.02, warmup_fraction=0.2), 50
    )
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(state)
    for step in range(17, 50):
        assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(0.02 * _warmup_cosine_closed_form(step, 10, 50))
        resumed_optimizer.step()
        resumed.step()


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


def test_every_zoo_model_takes_the_base_optimization_arguments_in_the_cli_and_passes_them_on():
    from jsonargparse import ArgumentParser

    optim = {"lr": 0.02, "weight_decay": 0.1, "label_smoothing": 0.1, "warmup_fraction": 0.2, "scheduler": "none"}
    base_defaults = {"weight_decay": 0.05, "label_smoothing": 0.0, "warmup_fraction": 0.05, "scheduler": "cosine"}
    lr_defaults = {"mlp": 3e-3, "cnn": 3e-3, "lstm": 3e-3, "transformer": 1e-3, "resnet18": 1e-3, "vit_tiny": 1e-3}
    for name in zoo.list_models():
        model = zoo.create(name, num_classes=3, **optim)
        assert {k: getattr(model, k) for k in optim} == optim, name
        assert {k: model.hparams[k] for k in optim} == optim, name  # saved, so load_from_checkpoint rebuilds it
        # What LightningCLI sees: the five keys at `model.init_args.*`, with the base's defaults and the class's lr.
        registered = zoo.MODELS[name]
        parser = ArgumentParser()
        parser.add_class_arguments(getattr(registered, "func", registered), "model")
        resolved = vars(parser.parse_args([]).model)
        assert {k: resolved[k] for k in base_defaults} == base_defaults, name
        if name in lr_defaults:
            assert resolved["lr"] == zoo.create(name, num_classes=3).lr == lr_defaults[name], name
