import pytest
import torch
from torch import nn

import zoo
from lightning_reg.nn import LockedDropout, WeightDrop
from zoo.rnn import RNN


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_padded_batch_with_lengths_equals_each_sequence_alone(cell, bidirectional, pooling):
    torch.manual_seed(0)
    net = RNN(3, input_size=4, hidden_size=6, num_layers=2, cell=cell, bidirectional=bidirectional, pooling=pooling)
    net.eval()
    short, long = torch.randn(1, 3, 4), torch.randn(1, 5, 4)
    padded = torch.cat([torch.cat([short, torch.full((1, 2, 4), 9.0)], dim=1), long])  # garbage in the padding
    batched = net(padded, torch.tensor([3, 5]))
    torch.testing.assert_close(batched[0], net(short)[0])
    torch.testing.assert_close(batched[1], net(long)[0])


def test_token_ids_go_through_an_embedding():
    net = RNN(4, vocab_size=50, input_size=6, hidden_size=8, padding_idx=0)
    assert isinstance(net.embedding, nn.Embedding)
    assert net.embedding.padding_idx == 0
    assert net(torch.randint(1, 50, (3, 7)), torch.tensor([7, 4, 1])).shape == (3, 4)


def test_regularizers_are_where_they_belong():
    net = RNN(3, hidden_size=8, num_layers=2, input_dropout=0.1, hidden_dropout=0.2, weight_drop=0.3, layer_norm=True)
    assert isinstance(net.input_drop, LockedDropout)
    assert net.hidden_drop.p == 0.2
    assert all(isinstance(layer, WeightDrop) and layer.p == 0.3 for layer in net.layers)
    assert all(isinstance(norm, nn.LayerNorm) for norm in net.norms)


def test_dropconnect_is_random_in_training_and_off_in_eval():
    torch.manual_seed(0)
    net = RNN(3, hidden_size=8, weight_drop=0.5, dropout=0.0, layer_norm=False)
    x = torch.randn(2, 8, 8)
    assert not torch.allclose(net(x), net(x))
    net.eval()
    torch.testing.assert_close(net(x), net(x))


def test_classifier_training_step_reads_lengths_from_the_batch():
    model = zoo.RNNClassifier(num_classes=3, hidden_size=8)
    x, y, lengths = torch.randn(4, 6, 8), torch.tensor([0, 1, 2, 0]), torch.tensor([6, 2, 4, 1])
    logits, targets = model.forward_batch([x, y, lengths])
    x_changed = x.clone()
    x_changed[1, 2:] = 100.0  # beyond sample 1's length: must not matter
    model.eval()
    torch.testing.assert_close(model.forward_batch([x_changed, y, lengths])[0], model.eval()(x, lengths))
    assert logits.shape == (4, 3)
    assert targets is y


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cell": "rnn"}, r"one of \('lstm', 'gru'\)"),
        ({"pooling": "max"}, r"one of \('last', 'mean'\)"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"weight_drop": 1.0}, "weight_drop"),
        ({"input_dropout": -0.1}, "input_dropout"),
    ],
)
def test_rnn_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RNN(3, **kwargs)


def test_rnn_input_errors_say_what_was_expected():
    vectors = RNN(3, input_size=8, hidden_size=4)
    with pytest.raises(ValueError, match=r"Expected float vectors of shape \(N, T, 8\)"):
        vectors(torch.randn(2, 5, 7))
    tokens = RNN(3, vocab_size=10, hidden_size=4)
    with pytest.raises(ValueError, match=r"Expected token ids of shape \(N, T\)"):
        tokens(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"Expected `lengths` of shape \(2,\) with values in \[1, 5\]"):
        vectors(torch.randn(2, 5, 8), torch.tensor([6, 2]))


def test_mc_dropout_prediction_samples_the_rnn_dropconnect():
    from lightning_reg.functional import mc_dropout_predict

    torch.manual_seed(0)
    model = zoo.RNNClassifier(hidden_size=8, weight_drop=0.5, dropout=0.0).eval()
    prediction = mc_dropout_predict(model, torch.randn(3, 6, 8), n_samples=6, method="naive")
    assert prediction.probs.std(dim=0).max() > 0
    assert not model.net.layers[0].training
