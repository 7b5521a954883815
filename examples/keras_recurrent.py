"""Keras's LSTM(64, dropout=0.2, recurrent_dropout=0.2) in PyTorch: `python examples/keras_recurrent.py`."""

from __future__ import annotations

import torch
from torch import nn

import zoo
from lightning_reg.functional import mc_dropout_predict
from lightning_reg.nn import VariationalGRU, VariationalLSTM


def main() -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(32, 20, 8)  # (N, T, features): Keras's layout with batch_first=True

    # --8<-- [start:lstm]
    # Keras: layers.LSTM(64, dropout=0.2, recurrent_dropout=0.2)  (return_sequences=False)
    lstm = VariationalLSTM(8, 64, batch_first=True, dropout=0.2, recurrent_dropout=0.2)
    out, (h, c) = lstm(x)  # out: (N, T, 64), every step (Keras's return_sequences=True)
    last = out[:, -1]  # Keras's default output: the last step, (N, 64)
    # nn.LSTM(dropout=0.2) is something else: dropout *between* stacked layers, a new mask at every step.
    plain = nn.LSTM(8, 64, batch_first=True)
    plain.load_state_dict(lstm.state_dict())  # the same parameters: checkpoints load both ways
    lstm.eval()  # no dropout in eval mode: exactly nn.LSTM, with its fused kernel
    torch.testing.assert_close(lstm(x)[0], plain(x)[0])
    # --8<-- [end:lstm]

    # --8<-- [start:gru]
    # Keras: layers.Bidirectional(layers.GRU(32, dropout=0.1, recurrent_dropout=0.3, return_sequences=True))
    gru = VariationalGRU(8, 32, batch_first=True, bidirectional=True, dropout=0.1, recurrent_dropout=0.3)
    seq, _ = gru(x)  # (N, T, 64): both directions; each direction draws its own masks, as Keras's two layers
    # --8<-- [end:gru]

    # --8<-- [start:zoo]
    # A whole classifier: the zoo RNN with locked input dropout (Keras's `dropout`) and `recurrent_dropout`
    model = zoo.create("lstm", num_classes=10, input_size=8, hidden_size=64, input_dropout=0.2, recurrent_dropout=0.2)
    model.eval()
    samples = mc_dropout_predict(model, x[:4], 20)  # Monte-Carlo dropout samples the recurrent masks too
    # --8<-- [end:zoo]
    assert last.shape == h[0].shape == c[0].shape == (32, 64)
    assert seq.shape == (32, 20, 64)
    return {"mc_mutual_information": float(samples.mutual_information.mean())}


if __name__ == "__main__":
    print(main())
