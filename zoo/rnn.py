"""Recurrent classifiers: LSTM/GRU with input, locked, recurrent and DropConnect dropout, LayerNorm, lengths."""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lightning_reg.nn import LockedDropout, VariationalGRU, VariationalLSTM, WeightDrop
from zoo.classifier import ClassifierModule

__all__ = ["RNN", "Cell", "Pooling", "RNNClassifier"]

Cell = Literal["lstm", "gru"]
Pooling = Literal["last", "mean"]
_CELLS: tuple[str, ...] = get_args(Cell)
_POOLINGS: tuple[str, ...] = get_args(Pooling)


def _check_probability(name: str, p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"Expected `{name}` in [0, 1), but got {p!r}.")


class RNN(nn.Module):
    """A stacked LSTM/GRU classifier with the AWD-LSTM regularizers, for vectors or token ids.

    Each recurrent layer is its own ``nn.LSTM``/``nn.GRU`` so that locked dropout and LayerNorm can sit between
    layers: ``[embedding] -> locked input dropout -> (rnn -> [LayerNorm]) x num_layers`` with locked dropout
    between layers, then pooling over time and a dropout + linear head.

    Two regularizers of the recurrence, usable alone or together:

    - ``recurrent_dropout`` is Keras's (``LSTM(recurrent_dropout=q)``; :class:`lightning_reg.nn.VariationalLSTM`):
      each sequence draws one mask on the recurrent state, kept for all its time steps, at every forward pass.
      Sequences of a batch get different masks, so Monte-Carlo dropout samples it exactly, batched; it needs a
      step loop in Python (``benchmarks/results/recurrent_dropout.md``) instead of the fused kernel.
    - ``weight_drop`` is AWD-LSTM's DropConnect (:class:`lightning_reg.nn.WeightDrop`): entries of the
      hidden-to-hidden *matrices* are dropped, one mask per forward pass shared by the whole batch; the fused
      (cuDNN) kernel still runs.

    ``input_dropout`` (and ``hidden_dropout`` between layers) is locked dropout on the layer inputs, which is
    Keras's ``dropout``: one mask per sequence, fixed over time.

    The output dropout is applied to the pooled features in the head. That is exactly variational (locked)
    dropout on the output sequence: a mask that is constant over time commutes with taking the last step and
    with the mean over time. Keeping it in the head lets Monte-Carlo dropout re-sample it without re-running
    the recurrence.

    Args:
        num_classes: output classes.
        input_size: features per time step: of the input vectors, or of the embedding when ``vocab_size`` is set.
        vocab_size: when set, inputs are token ids ``(N, T)`` embedded by an ``nn.Embedding``; else inputs are
            float vectors ``(N, T, input_size)``.
        padding_idx: the embedding's padding token (its vector stays zero), if any.
        cell: ``"lstm"`` or ``"gru"``.
        hidden_size: hidden units per direction.
        num_layers: stacked recurrent layers.
        bidirectional: run each layer in both directions (features double).
        input_dropout: locked dropout on the (embedded) inputs.
        hidden_dropout: locked dropout between recurrent layers.
        weight_drop: DropConnect rate on the hidden-to-hidden weights.
        recurrent_dropout: Keras's recurrent dropout rate on the state (one mask per sequence, fixed in time).
        dropout: dropout on the pooled output, before the classifier.
        layer_norm: LayerNorm after each recurrent layer.
        pooling: ``"last"`` (the state after each sequence's last real step; for the backward direction, after
            its first step) or ``"mean"`` (over the real steps).

    Variable-length batches pass ``lengths`` ``(N,)``: the layers then run on packed sequences and padding
    never enters the features.

    Example:
        >>> net = RNN(10, input_size=8, hidden_size=16, num_layers=2, bidirectional=True, weight_drop=0.2)
        >>> net(torch.randn(4, 8, 8)).shape
        torch.Size([4, 10])
        >>> keras_like = RNN(10, input_size=8, hidden_size=16, input_dropout=0.2, recurrent_dropout=0.2)
        >>> type(keras_like.layers[0]).__name__
        'VariationalLSTM'
        >>> tokens = RNN(3, vocab_size=100, input_size=12, hidden_size=16, cell="gru")
        >>> tokens(torch.randint(100, (2, 5)), torch.tensor([5, 2])).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        num_classes: int,
        *,
        input_size: int = 8,
        vocab_size: int | None = None,
        padding_idx: int | None = None,
        cell: Cell = "lstm",
        hidden_size: int = 128,
        num_layers: int = 1,
        bidirectional: bool = False,
        input_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
        weight_drop: float = 0.0,
        recurrent_dropout: float = 0.0,
        dropout: float = 0.0,
        layer_norm: bool = False,
        pooling: Pooling = "last",
    ) -> None:
        super().__init__()
        if cell not in _CELLS:
            raise ValueError(f"Expected `cell` to be one of {_CELLS}, but got {cell!r}.")
        if pooling not in _POOLINGS:
            raise ValueError(f"Expected `pooling` to be one of {_POOLINGS}, but got {pooling!r}.")
        for name, size in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if size < 1:
                raise ValueError(f"Expected `{name}` >= 1, but got {size!r}.")
        if vocab_size is not None and vocab_size < 1:
            raise ValueError(f"Expected `vocab_size` to be None (float vectors) or >= 1, but got {vocab_size!r}.")
        for name, p in (
            ("input_dropout", input_dropout),
            ("hidden_dropout", hidden_dropout),
            ("weight_drop", weight_drop),
            ("recurrent_dropout", recurrent_dropout),
            ("dropout", dropout),
        ):
            _check_probability(name, p)
        self.input_size = input_size
        self.vocab_size = vocab_size
        self.bidirectional = bidirectional
        self.pooling = pooling
        self.hidden_size = hidden_size
        self.embedding = nn.Embedding(vocab_size, input_size, padding_idx=padding_idx) if vocab_size else None
        self.input_drop = LockedDropout(input_dropout)
        self.hidden_drop = LockedDropout(hidden_dropout)
        directions = 2 if bidirectional else 1
        self.layers = nn.ModuleList()
        self.norms = nn.ModuleList()
        size = input_size
        for _ in range(num_layers):
            rnn: nn.Module
            if recurrent_dropout > 0:  # the same parameters as nn.LSTM/nn.GRU: checkpoints load either way
                variational = VariationalLSTM if cell == "lstm" else VariationalGRU
                rnn = variational(
                    size,
                    hidden_size,
                    batch_first=True,
                    bidirectional=bidirectional,
                    recurrent_dropout=recurrent_dropout,
                )
            else:
                rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(
                    size, hidden_size, batch_first=True, bidirectional=bidirectional
                )
            self.layers.append(WeightDrop(rnn, p=weight_drop) if weight_drop > 0 else rnn)
            size = hidden_size * directions
            self.norms.append(nn.LayerNorm(size) if layer_norm else nn.Identity())
        self.num_features = size
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(size, num_classes))

    def _embed(self, x: Tensor) -> Tensor:
        if self.embedding is not None:
            if x.ndim != 2 or x.is_floating_point():
                raise ValueError(
                    f"Expected token ids of shape (N, T) and an integer dtype (the model has `vocab_size` set), but "
                    f"got shape {tuple(x.shape)} and dtype {x.dtype}."
                )
            return self.embedding(x)  # (N, T, input_size)
        if x.ndim != 3 or x.shape[-1] != self.input_size or not x.is_floating_point():
            raise ValueError(
                f"Expected float vectors of shape (N, T, {self.input_size}) (`input_size`={self.input_size}), but got "
                f"shape {tuple(x.shape)} and dtype {x.dtype}; pass `vocab_size` for token ids."
            )
        return x

    @staticmethod
    def _check_lengths(lengths: Tensor, batch: int, steps: int) -> Tensor:
        lengths = torch.as_tensor(lengths).to(device="cpu", dtype=torch.int64)
        if lengths.shape != (batch,) or bool((lengths < 1).any()) or bool((lengths > steps).any()):
            raise ValueError(
                f"Expected `lengths` of shape ({batch},) with values in [1, {steps}], but got shape "
                f"{tuple(lengths.shape)} and values {lengths.tolist()}."
            )
        return lengths

    def forward_features(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Pooled features ``(N, hidden_size * directions)`` of a batch ``(N, T, ...)`` with optional lengths."""
        x = self.input_drop(self._embed(x))  # (N, T, input_size)
        batch, steps = x.shape[0], x.shape[1]
        cpu_lengths = None if lengths is None else self._check_lengths(lengths, batch, steps)
        for i, (rnn, norm) in enumerate(zip(self.layers, self.norms, strict=True)):
            if i > 0:
                x = self.hidden_drop(x)
            if cpu_lengths is None:
                x, _ = rnn(x)  # (N, T, H * directions)
            else:
                packed = pack_padded_sequence(x, cpu_lengths, batch_first=True, enforce_sorted=False)
                out, _ = rnn(packed)
                x, _ = pad_packed_sequence(out, batch_first=True, total_length=steps)  # zeros after each length
            x = norm(x)
        return self._pool(x, cpu_lengths)

    def _pool(self, x: Tensor, lengths: Tensor | None) -> Tensor:
        if self.pooling == "mean":
            if lengths is None:
                return x.mean(dim=1)
            valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths.to(x.device)[:, None]  # (N, T)
            return (x * valid[..., None]).sum(dim=1) / lengths.to(x.device, x.dtype)[:, None]
        if lengths is None:
            forward_last = x[:, -1, : self.hidden_size]  # (N, H), no index tensor built on the host every forward
        else:
            rows = torch.arange(x.shape[0], device=x.device)
            forward_last = x[rows, (lengths - 1).to(x.device), : self.hidden_size]  # (N, H): ends at each length
        if not self.bidirectional:
            return forward_last
        return torch.cat([forward_last, x[:, 0, self.hidden_size :]], dim=-1)  # the backward pass ends at step 0

    def forward_head(self, features: Tensor) -> Tensor:
        """Logits ``(N, num_classes)``: output dropout, then the classifier."""
        return self.head(features)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Logits ``(N, num_classes)``."""
        return self.forward_head(self.forward_features(x, lengths))


class RNNClassifier(ClassifierModule):
    """The zoo LSTM/GRU as a LightningModule (see :class:`RNN` for the architecture arguments).

    ``**optim`` are :class:`~zoo.classifier.ClassifierModule`'s optimization arguments (``lr`` here defaults to 3e-3).

    Batches are ``[inputs, targets]`` or, for variable-length sequences, ``[inputs, targets, lengths]``.

    Example:
        >>> model = RNNClassifier(num_classes=10, cell="gru", hidden_size=16)
        >>> model(torch.randn(4, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        input_size: int = 8,
        vocab_size: int | None = None,
        padding_idx: int | None = None,
        cell: Cell = "lstm",
        hidden_size: int = 128,
        num_layers: int = 1,
        bidirectional: bool = False,
        input_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
        weight_drop: float = 0.0,
        recurrent_dropout: float = 0.0,
        dropout: float = 0.1,
        layer_norm: bool = True,
        pooling: Pooling = "last",
        lr: float = 3e-3,
        **optim: Any,
    ) -> None:
        super().__init__(num_classes, lr=lr, **optim)
        self.save_hyperparameters()
        self.net = RNN(
            num_classes,
            input_size=input_size,
            vocab_size=vocab_size,
            padding_idx=padding_idx,
            cell=cell,
            hidden_size=hidden_size,
            num_layers=num_layers,
            bidirectional=bidirectional,
            input_dropout=input_dropout,
            hidden_dropout=hidden_dropout,
            weight_drop=weight_drop,
            recurrent_dropout=recurrent_dropout,
            dropout=dropout,
            layer_norm=layer_norm,
            pooling=pooling,
        )

    def forward_features(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Pooled features; ``args`` (or ``lengths=``) may hold the batch's ``lengths``."""
        return self.net.forward_features(x, *args, **kwargs)

    def forward_head(self, features: Tensor) -> Tensor:
        """Logits ``(N, num_classes)``."""
        return self.net.forward_head(features)
