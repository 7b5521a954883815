"""The zoo MLP: Keras's Dense-BatchNorm-ReLU-Dropout blocks, its registry entry, and what it learns on digits."""

import lightning as L
import pytest
import torch
from torch import nn

import zoo
from lightning_reg.functional import mc_dropout_predict
from tests.helpers import fast_trainer
from zoo.data import DigitsDataModule
from zoo.mlp import MLP


def test_blocks_are_linear_norm_relu_dropout_and_match_a_hand_built_sequential():
    torch.manual_seed(0)
    net = MLP(3, in_features=12, widths=(8, 6), norm="batch", dropout=0.25)
    kinds = [type(m).__name__ for m in (*net.features, *net.head)]
    # with BatchNorm, dropout only after the last BN (dropout feeding a BN shifts its variance)
    assert kinds == ["Flatten", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]
    assert net.features[1].bias is None  # the norm's shift replaces the bias
    # the same network written out by hand, as in the Keras articles, with the same weights
    reference = nn.Sequential(
        nn.Flatten(),
        nn.Linear(12, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Linear(8, 6, bias=False), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.25),
        nn.Linear(6, 3),
    )  # fmt: skip
    x = torch.randn(5, 3, 4)
    net.train()
    net(x)  # one training pass moves the BN running statistics away from their initial values
    net.eval()
    reference.load_state_dict(dict(zip(reference.state_dict(), net.state_dict().values(), strict=True)))
    reference.eval()
    torch.testing.assert_close(net(x), reference(x))


@pytest.mark.parametrize(("norm", "kind"), [("layer", nn.LayerNorm), ("none", None)])
def test_other_norms(norm, kind):
    net = MLP(3, in_features=4, widths=(5,), norm=norm, dropout=0.0)
    if norm == "layer":
        assert isinstance(net.features[2], kind)
    assert (net.features[1].bias is not None) == (norm == "none")
    assert not any(isinstance(m, nn.BatchNorm1d) for m in net.modules())
    assert net(torch.randn(2, 4)).shape == (2, 3)


def test_training_and_eval_modes_differ_only_through_dropout_and_batchnorm():
    torch.manual_seed(0)
    net = MLP(3, in_features=4, widths=(16,), norm="batch", dropout=0.5)
    x = torch.randn(8, 4)
    net.train()
    assert not torch.equal(net(x), net(x))  # dropout draws new masks
    net.eval()
    torch.testing.assert_close(net(x), net(x))
    torch.testing.assert_close(net(x[:1]), net(x)[:1])  # eval BN: running statistics, rows independent


def test_mc_dropout_caches_the_trunk_when_only_the_head_drops():
    torch.manual_seed(0)
    one_block = MLP(3, in_features=4, widths=(16,), dropout=0.3).eval()
    out = mc_dropout_predict(one_block, torch.randn(6, 4), 10, generator=torch.Generator().manual_seed(0))
    assert out.method == "cached"
    assert float(out.mutual_information.mean()) > 0
    two_bn_blocks = MLP(3, in_features=4, widths=(16, 8), dropout=0.3).eval()  # BN: dropout in the head only
    assert mc_dropout_predict(two_bn_blocks, torch.randn(6, 4), 4).method == "cached"
    two_ln_blocks = MLP(3, in_features=4, widths=(16, 8), norm="layer", dropout=0.3).eval()
    assert mc_dropout_predict(two_ln_blocks, torch.randn(6, 4), 4).method == "batched"  # dropout in the trunk


def test_errors_say_what_was_wrong():
    with pytest.raises(ValueError, match=r"`norm` to be one of \('batch', 'layer', 'none'\)"):
        MLP(3, norm="group")
    with pytest.raises(ValueError, match="`widths` to be a non-empty sequence"):
        MLP(3, widths=())
    with pytest.raises(ValueError, match=r"`dropout` in \[0, 1\)"):
        MLP(3, dropout=1.0)
    with pytest.raises(ValueError, match=r"64 features a sample \(`in_features`\), but got shape \(2, 3, 32, 32\)"):
        MLP(3)(torch.randn(2, 3, 32, 32))


def test_registry_builds_it_and_it_learns_the_digits(tmp_path):
    L.seed_everything(0, verbose=False)
    model = zoo.create("mlp", num_classes=10)
    assert isinstance(model, zoo.MLPClassifier)
    assert model.hparams.widths == (256, 128)
    data = DigitsDataModule(batch_size=64)
    trainer = fast_trainer(tmp_path, max_epochs=4)
    trainer.fit(model, datamodule=data)
    (result,) = trainer.test(model, datamodule=data, verbose=False)
    assert result["test_acc"] > 0.9
