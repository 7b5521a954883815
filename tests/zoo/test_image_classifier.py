import lightning as L
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import zoo
from tests.helpers import fast_trainer, make_images, make_loader
from zoo.image_classifier import load_backbone_weights

BACKBONE = "test_resnet"  # timm's tiny ResNet (BN, a `fc` head): a real architecture at test size


def _images(num_classes=4, n=16):
    x, y = make_images(n=n, channels=3, size=16, num_classes=num_classes)
    return make_loader(x, y, batch_size=8)


def _fit(model, tmp_path, steps=2, num_classes=4):
    trainer = fast_trainer(tmp_path, max_steps=steps, limit_val_batches=1)
    trainer.fit(model, train_dataloaders=_images(num_classes), val_dataloaders=_images(num_classes, n=8))
    return trainer


def _backbone_state(model):
    return {k: v.clone() for k, v in model.net.state_dict().items() if not k.startswith("fc.")}


@pytest.mark.parametrize("fmt", ["ckpt", "pth", "safetensors"])
def test_finetune_from_a_local_file_with_another_number_of_classes(tmp_path, fmt):
    L.seed_everything(0, verbose=False)
    source = zoo.ImageClassifier(num_classes=4, backbone=BACKBONE)
    trainer = _fit(source, tmp_path)
    path = tmp_path / f"source.{fmt}"
    if fmt == "ckpt":
        trainer.save_checkpoint(path)
    elif fmt == "pth":
        torch.save(source.net.state_dict(), path)
    else:
        save_file(source.net.state_dict(), str(path))

    target = zoo.ImageClassifier(num_classes=7, backbone=BACKBONE, pretrained=str(path))
    expected = _backbone_state(source)
    for key, value in _backbone_state(target).items():
        torch.testing.assert_close(value, expected[key], msg=key)
    assert target.net.fc.out_features == 7
    assert target.backbone_lr_scale == 0.1  # pretrained: the backbone learns 10x slower than the new head


def test_same_number_of_classes_keeps_the_head(tmp_path):
    source = zoo.ImageClassifier(num_classes=4, backbone=BACKBONE)
    torch.save(source.net.state_dict(), tmp_path / "w.pth")
    target = zoo.ImageClassifier(num_classes=4, backbone=BACKBONE, pretrained=tmp_path / "w.pth")
    torch.testing.assert_close(target.net.fc.weight, source.net.fc.weight)


def test_frozen_backbone_parameters_do_not_change_after_a_step(tmp_path):
    L.seed_everything(0, verbose=False)
    model = zoo.ImageClassifier(num_classes=4, backbone=BACKBONE, freeze_backbone=True, freeze_bn=True)
    params_before = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    head_before = model.net.fc.weight.detach().clone()
    _fit(model, tmp_path, steps=1)
    for name, param in model.net.named_parameters():
        if not name.startswith("fc."):
            assert not param.requires_grad, name
            torch.testing.assert_close(param, params_before[name], rtol=0, atol=0, msg=name)
    assert not torch.equal(model.net.fc.weight, head_before)


def test_frozen_bn_keeps_statistics_while_the_rest_trains(tmp_path):
    L.seed_everything(0, verbose=False)
    model = zoo.ImageClassifier(num_classes=4, backbone=BACKBONE, freeze_bn=True)
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    stats_before = [(bn.running_mean.clone(), bn.running_var.clone(), bn.weight.detach().clone()) for bn in bns]
    conv = next(m for m in model.net.modules() if isinstance(m, nn.Conv2d))
    conv_before = conv.weight.detach().clone()
    _fit(model, tmp_path, steps=2)
    for bn, (mean, var, weight) in zip(bns, stats_before, strict=True):
        assert not bn.training
        assert torch.equal(bn.running_mean, mean)
        assert torch.equal(bn.running_var, var)
        assert torch.equal(bn.weight, weight)
    assert not torch.equal(conv.weight, conv_before)  # the rest of the backbone trains
    assert model.train().training
    assert not any(bn.training for bn in bns)


def test_backbone_learning_rate_is_scaled_against_the_head():
    model = zoo.ImageClassifier(num_classes=4, backbone=BACKBONE, lr=1e-2, backbone_lr_scale=0.25)
    groups = list(model.parameter_groups())
    head_ids = {id(p) for p in model.net.fc.parameters()}
    assert [g["lr"] for g in groups] == [2.5e-3, 2.5e-3, 1e-2, 1e-2]
    assert {id(p) for g in groups[2:] for p in g["params"]} == head_ids
    assert not any(id(p) in head_ids for g in groups[:2] for p in g["params"])
    assert [g["weight_decay"] for g in groups] == [model.weight_decay, 0.0, model.weight_decay, 0.0]


def test_checkpoint_reload_needs_neither_the_weights_file_nor_the_network(tmp_path):
    source = zoo.ImageClassifier(num_classes=4, backbone=BACKBONE)
    torch.save(source.net.state_dict(), tmp_path / "w.pth")
    model = zoo.ImageClassifier(num_classes=3, backbone=BACKBONE, pretrained=tmp_path / "w.pth", freeze_bn=True)
    trainer = _fit(model, tmp_path, steps=1, num_classes=3)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    (tmp_path / "w.pth").unlink()
    restored = zoo.ImageClassifier.load_from_checkpoint(tmp_path / "m.ckpt")
    assert "pretrained" not in restored.hparams
    assert restored.freeze_bn
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(restored.eval()(x), model.eval()(x))


def test_create_falls_through_to_any_timm_model():
    model = zoo.create(BACKBONE, num_classes=5, drop_rate=0.2)
    assert isinstance(model, zoo.ImageClassifier)
    assert model.hparams.backbone == BACKBONE
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Expected `backbone` to be a timm model name.*'resnet_18'"):
        zoo.ImageClassifier(backbone="resnet_18")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"drop_rate": 1.0}, "drop_rate"),
        ({"drop_path_rate": -0.1}, "drop_path_rate"),
        ({"backbone_lr_scale": 0.0}, "backbone_lr_scale"),
        ({"pretrained": 3}, "Expected `pretrained` to be a bool or a file path"),
    ],
)
def test_image_classifier_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        zoo.ImageClassifier(backbone=BACKBONE, **kwargs)


def test_weights_file_errors_say_what_is_wrong(tmp_path):
    net = zoo.ImageClassifier(num_classes=3, backbone=BACKBONE).net
    with pytest.raises(ValueError, match=r"ending in one of \('\.safetensors'"):
        load_backbone_weights(net, tmp_path / "weights.txt")
    with pytest.raises(FileNotFoundError, match="No weights file"):
        load_backbone_weights(net, tmp_path / "missing.pth")
    torch.save(zoo.ImageClassifier(num_classes=3, backbone="test_vit").net.state_dict(), tmp_path / "vit.pth")
    with pytest.raises(ValueError, match=r"another architecture|do not fit the model"):
        load_backbone_weights(net, tmp_path / "vit.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ValueError, match="to hold a state dict"):
        load_backbone_weights(net, tmp_path / "tensor.pth")


def test_timms_file_overlay_does_not_cover_what_load_backbone_weights_does(tmp_path):
    """Why the zoo keeps its loader: timm's ``pretrained_cfg_overlay={"file": ...}`` (timm/models/_builder.py).

    timm drops the head whenever ``num_classes`` differs from the hub config's (1000), even when the file's head
    fits, and then loads with ``strict=False``, so a file of another architecture loads nothing and says so only
    in a log line. If timm changes this, this test fails and the overlay may replace the loader.
    """
    import timm

    source = timm.create_model(BACKBONE, num_classes=4)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    torch.save(timm.create_model("test_vit", num_classes=4).state_dict(), tmp_path / "vit.pth")
    overlay = {"pretrained": True, "num_classes": 4}
    by_timm = timm.create_model(BACKBONE, **overlay, pretrained_cfg_overlay={"file": str(tmp_path / "w.pth")})
    assert not torch.equal(by_timm.fc.weight, source.fc.weight)  # timm: a fresh head
    ours = zoo.ImageClassifier(num_classes=4, backbone=BACKBONE, pretrained=tmp_path / "w.pth").net
    torch.testing.assert_close(ours.fc.weight, source.fc.weight)  # ours: the file's head, which fits
    timm.create_model(BACKBONE, **overlay, pretrained_cfg_overlay={"file": str(tmp_path / "vit.pth")})  # no error
    with pytest.raises(ValueError, match="another architecture"):
        zoo.ImageClassifier(num_classes=4, backbone=BACKBONE, pretrained=tmp_path / "vit.pth")
