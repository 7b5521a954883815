"""The zoo RNN's `recurrent_dropout` (Keras's, through VariationalLSTM/GRU) beside WeightDrop's DropConnect."""

import pytest
import torch

import zoo
from lightning_reg import MCDropoutEvaluation
from lightning_reg.functional import mc_dropout_predict
from lightning_reg.nn import VariationalGRU, VariationalLSTM, WeightDrop
from tests.helpers import fast_trainer
from zoo.data import DigitsDataModule
from zoo.rnn import RNN

KW = {"input_size": 4, "hidden_size": 6, "num_layers": 2, "layer_norm": True}


@pytest.mark.parametrize(("cell", "layer_class"), [("lstm", VariationalLSTM), ("gru", VariationalGRU)])
def test_recurrent_dropout_builds_keras_style_layers_that_load_plain_checkpoints(cell, layer_class):
    torch.manual_seed(0)
    plain = RNN(3, cell=cell, bidirectional=True, **KW)
    keras = RNN(3, cell=cell, bidirectional=True, recurrent_dropout=0.3, **KW)
    assert all(type(layer) is layer_class and layer.recurrent_dropout == 0.3 for layer in keras.layers)
    keras.load_state_dict(plain.state_dict())  # the same parameter names, both ways
    plain.load_state_dict(keras.state_dict())
    x, lengths = torch.randn(5, 7, 4), torch.tensor([7, 2, 5, 1, 7])
    plain.eval(), keras.eval()
    torch.testing.assert_close(keras(x, lengths), plain(x, lengths))  # eval: no dropout, the fused kernel
    keras.train()
    torch.manual_seed(1)
    first = keras(x, lengths)
    assert not torch.allclose(first, keras(x, lengths))  # training: new masks at every forward pass
    assert not torch.allclose(first, plain(x, lengths))


def test_recurrent_dropout_and_weight_drop_compose():
    net = RNN(3, recurrent_dropout=0.2, weight_drop=0.3, **KW)
    assert all(isinstance(layer, WeightDrop) and isinstance(layer.module, VariationalLSTM) for layer in net.layers)
    net(torch.randn(2, 5, 4)).sum().backward()
    assert net.layers[0].module.weight_hh_l0.grad is not None


def test_rejects_a_bad_rate():
    with pytest.raises(ValueError, match=r"`recurrent_dropout` in \[0, 1\)"):
        RNN(3, recurrent_dropout=1.0)


def test_mc_dropout_samples_the_recurrent_masks_of_the_zoo_model():
    torch.manual_seed(0)
    model = zoo.create("lstm", num_classes=3, input_size=4, hidden_size=8, dropout=0.0, recurrent_dropout=0.3).eval()
    out = mc_dropout_predict(model, torch.randn(6, 5, 4), 16, generator=torch.Generator().manual_seed(0))
    assert out.method == "batched"  # the sampled dropout sits in the trunk: no cached features
    assert float(out.mutual_information.mean()) > 0


def test_fits_on_digit_rows_and_mc_dropout_evaluation_logs(tmp_path):
    torch.manual_seed(0)
    model = zoo.create("gru", num_classes=10, hidden_size=16, dropout=0.0, recurrent_dropout=0.25)
    data = DigitsDataModule(batch_size=64, as_sequence=True)
    trainer = fast_trainer(
        tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=1, callbacks=[MCDropoutEvaluation(4)]
    )
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 3
    assert "mc/val/mutual_info" in trainer.callback_metrics
    assert float(trainer.callback_metrics["mc/val/mutual_info"]) > 0


def test_checkpoint_reloads_and_loads_into_the_plain_model(tmp_path):
    torch.manual_seed(0)
    model = zoo.create("lstm", num_classes=3, input_size=4, hidden_size=8, num_layers=2, recurrent_dropout=0.3)
    trainer = fast_trainer(tmp_path, max_steps=1)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(8, 5, 4), torch.arange(8) % 3), batch_size=4
    )
    trainer.fit(model, train_dataloaders=loader)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = zoo.RNNClassifier.load_from_checkpoint(path)
    assert restored.hparams.recurrent_dropout == 0.3
    assert isinstance(restored.net.layers[0], VariationalLSTM)
    plain = zoo.create("lstm", num_classes=3, input_size=4, hidden_size=8, num_layers=2)
    plain.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    x = torch.randn(3, 5, 4)
    model.eval(), restored.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x))
        torch.testing.assert_close(plain(x), model(x))
