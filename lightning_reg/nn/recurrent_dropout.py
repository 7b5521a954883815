"""``nn.LSTM``/``nn.GRU`` with Keras's ``dropout`` and ``recurrent_dropout``: one mask per sequence, fixed in time."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from lightning_reg.functional.recurrent_dropout import (
    RecurrentDropoutMasks,
    RecurrentWeights,
    sample_recurrent_masks,
    variational_gru,
    variational_lstm,
)

__all__ = ["VariationalGRU", "VariationalLSTM"]

_Mode = Literal["lstm", "gru"]


def _check_rate(name: str, p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p < 1.0:
        raise ValueError(f"Expected `{name}` to be a float in [0, 1), but got {p!r}.")
    return float(p)


class _VariationalRNN:
    """What the two classes share: the rates, the masks, and the conversion of ``nn.LSTM``'s input forms."""

    # Monte-Carlo dropout (lightning_reg.functional.mc_dropout_sampling) switches this module to sampling mode.
    mc_dropout_kind: ClassVar[str] = "dropout"
    _mode: ClassVar[_Mode]

    # Provided by nn.RNNBase.
    input_size: int
    hidden_size: int
    num_layers: int
    bias: bool
    batch_first: bool
    bidirectional: bool
    training: bool
    dropout: float
    recurrent_dropout: float
    generator: torch.Generator | None

    def _init_dropout(self, dropout: float, recurrent_dropout: float, generator: torch.Generator | None) -> None:
        self.dropout = _check_rate("dropout", dropout)
        self.recurrent_dropout = _check_rate("recurrent_dropout", recurrent_dropout)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"Expected `generator` to be a torch.Generator or None, but got {type(generator).__name__}."
            )
        self.generator = generator

    @property
    def p(self) -> float:
        """The larger of the two rates: what Monte-Carlo dropout reads to know that this layer samples."""
        return max(self.dropout, self.recurrent_dropout)

    def sample_masks(self, batch_size: int, *, device: Any = "cpu", dtype: torch.dtype = torch.float32) -> Any:
        """Draw the masks of one forward pass (what ``forward`` does in training mode) from ``generator``.

        Pass the result to ``forward(..., masks=...)`` to run the layer with these masks fixed.
        """
        return sample_recurrent_masks(
            batch_size,
            self.input_size,
            self.hidden_size,
            num_layers=self.num_layers,
            bidirectional=self.bidirectional,
            dropout=self.dropout,
            recurrent_dropout=self.recurrent_dropout,
            generator=self.generator,
            device=device,
            dtype=dtype,
        )

    def _weights(self) -> list[RecurrentWeights]:
        weights = []
        for layer in range(self.num_layers):
            for suffix in ("", "_reverse")[: 2 if self.bidirectional else 1]:
                name = f"l{layer}{suffix}"
                weights.append(
                    RecurrentWeights(
                        getattr(self, f"weight_ih_{name}"),
                        getattr(self, f"weight_hh_{name}"),
                        getattr(self, f"bias_ih_{name}") if self.bias else None,
                        getattr(self, f"bias_hh_{name}") if self.bias else None,
                    )
                )
        return weights

    def _variational_forward(self, input: Tensor | PackedSequence, hx: Any, masks: RecurrentDropoutMasks | None) -> Any:
        lengths = None
        unbatched = False
        if isinstance(input, PackedSequence):
            x, lengths = pad_packed_sequence(input, batch_first=True)  # (N, T, I), the user's batch order
        else:
            if input.ndim not in (2, 3):
                raise ValueError(
                    f"Expected the input to be (T, N, {self.input_size}) (or batch first, or unbatched (T, "
                    f"{self.input_size})) or a PackedSequence, but got shape {tuple(input.shape)}."
                )
            unbatched = input.ndim == 2
            x = input.unsqueeze(0) if unbatched else (input if self.batch_first else input.transpose(0, 1))
            if unbatched and hx is not None:
                hx = tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(1)
        if x.shape[-1] != self.input_size:
            raise ValueError(f"Expected {self.input_size} input features, but got {x.shape[-1]}.")
        if masks is None:
            masks = self.sample_masks(x.shape[0], device=x.device, dtype=x.dtype)
        else:
            self._check_masks(masks, x.shape[0])
        run: Any = variational_lstm if self._mode == "lstm" else variational_gru
        state: Any
        out, state = run(
            x,
            self._weights(),
            hx,
            num_layers=self.num_layers,
            bidirectional=self.bidirectional,
            masks=masks,
            lengths=lengths,
        )
        if isinstance(input, PackedSequence):
            assert lengths is not None
            order = input.sorted_indices
            if order is not None:
                out, lengths = out.index_select(0, order), lengths[order.cpu()]
            packed = pack_padded_sequence(out, lengths, batch_first=True, enforce_sorted=True)
            return PackedSequence(packed.data, packed.batch_sizes, input.sorted_indices, input.unsorted_indices), state
        if unbatched:
            out = out.squeeze(0)
            state = tuple(s.squeeze(1) for s in state) if isinstance(state, tuple) else state.squeeze(1)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, state

    def _check_masks(self, masks: RecurrentDropoutMasks, batch: int) -> None:
        directions = 2 if self.bidirectional else 1
        count = self.num_layers * directions
        for kind, given in (("inputs", masks.inputs), ("hidden", masks.hidden)):
            if len(given) != count:
                raise ValueError(
                    f"Expected {count} `masks.{kind}` (layers x directions), but got {len(given)}; draw them with "
                    "`sample_masks`."
                )
            for k, mask in enumerate(given):
                if kind == "hidden":
                    features = self.hidden_size
                else:
                    features = self.input_size if k < directions else self.hidden_size * directions
                if mask is not None and tuple(mask.shape) != (batch, features):
                    raise ValueError(
                        f"Expected `masks.{kind}[{k}]` of shape ({batch}, {features}) or None, but got "
                        f"{tuple(mask.shape)}."
                    )

    def _uses_loop(self, masks: RecurrentDropoutMasks | None) -> bool:
        return masks is not None or (self.training and (self.dropout > 0 or self.recurrent_dropout > 0))


class VariationalLSTM(_VariationalRNN, nn.LSTM):
    """``nn.LSTM`` with Keras's ``dropout`` and ``recurrent_dropout`` (`Gal & Ghahramani, 2016 <https://arxiv.org/abs/1512.05287>`_).

    In training mode each sequence gets one dropout mask on every layer's inputs and one on its recurrent
    state, the same at every time step (``keras.layers.LSTM(units, dropout=, recurrent_dropout=)``). Note that
    ``dropout`` is Keras's, not ``nn.LSTM``'s (between layers, a new mask per step): here it drops each layer's
    input, the first layer's included. The parameters are ``nn.LSTM``'s (a ``state_dict`` loads either way); in
    eval mode, or with both rates 0, the fused ``nn.LSTM`` kernel runs. Inputs as ``nn.LSTM``'s: ``(T, N, I)``,
    batch first, unbatched ``(T, I)`` or a ``PackedSequence``.

    Args:
        input_size: features of the input.
        hidden_size: features of the state.
        num_layers: stacked layers.
        bias: whether the layers have biases.
        batch_first: inputs and outputs are ``(N, T, features)``.
        dropout: Keras's input dropout rate, in ``[0, 1)``.
        bidirectional: each layer runs both ways (each direction draws its own masks).
        proj_size: must be 0 (LSTM projections are not supported).
        device: where the parameters live.
        dtype: the parameters' dtype.
        recurrent_dropout: Keras's rate on the recurrent state, in ``[0, 1)``.
        generator: the random stream of the masks; the global one when ``None``.

    Example:
        >>> lstm = VariationalLSTM(8, 16, batch_first=True, dropout=0.2, recurrent_dropout=0.2)
        >>> out, (h, c) = lstm(torch.randn(4, 10, 8))
        >>> tuple(out.shape), tuple(h.shape)
        ((4, 10, 16), (1, 4, 16))
        >>> nn.LSTM(8, 16, batch_first=True).load_state_dict(lstm.state_dict())
        <All keys matched successfully>
    """

    _mode = "lstm"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: Any = None,
        dtype: Any = None,
        *,
        recurrent_dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        if proj_size != 0:
            raise ValueError(
                f"Expected `proj_size=0`: VariationalLSTM does not support LSTM projections, but got {proj_size!r}."
            )
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, 0.0, bidirectional, 0, device, dtype)
        self._init_dropout(dropout, recurrent_dropout, generator)

    def forward(  # type: ignore[override]
        self,
        input: Tensor | PackedSequence,
        hx: tuple[Tensor, Tensor] | None = None,
        *,
        masks: RecurrentDropoutMasks | None = None,
    ) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
        """``(output, (h_n, c_n))`` as ``nn.LSTM``; ``masks`` (from :meth:`sample_masks`) fixes the masks."""
        if not self._uses_loop(masks):
            return super().forward(input, hx)  # the fused kernel: no dropout to apply
        return self._variational_forward(input, hx, masks)

    def extra_repr(self) -> str:
        """Arguments shown in the module's repr."""
        return f"{super().extra_repr()}, recurrent_dropout={self.recurrent_dropout}"


class VariationalGRU(_VariationalRNN, nn.GRU):
    """``nn.GRU`` with Keras's ``dropout`` and ``recurrent_dropout`` (`Gal & Ghahramani, 2016 <https://arxiv.org/abs/1512.05287>`_).

    As :class:`VariationalLSTM`, for the GRU (``nn.GRU``'s gates, Keras's ``reset_after=True``). The masked state
    enters only the recurrent product; the update ``z * h + (1 - z) * n`` uses the unmasked state.

    Args:
        input_size: features of the input.
        hidden_size: features of the state.
        num_layers: stacked layers.
        bias: whether the layers have biases.
        batch_first: inputs and outputs are ``(N, T, features)``.
        dropout: Keras's input dropout rate, in ``[0, 1)``.
        bidirectional: each layer runs both ways.
        device: where the parameters live.
        dtype: the parameters' dtype.
        recurrent_dropout: Keras's rate on the recurrent state, in ``[0, 1)``.
        generator: the random stream of the masks; the global one when ``None``.

    Example:
        >>> gru = VariationalGRU(8, 16, num_layers=2, bidirectional=True, dropout=0.1, recurrent_dropout=0.3)
        >>> out, h = gru(torch.randn(10, 4, 8))
        >>> tuple(out.shape), tuple(h.shape)
        ((10, 4, 32), (4, 4, 16))
    """

    _mode = "gru"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: Any = None,
        dtype: Any = None,
        *,
        recurrent_dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            bias=bias,
            batch_first=batch_first,
            dropout=0.0,
            bidirectional=bidirectional,
            device=device,
            dtype=dtype,
        )
        self._init_dropout(dropout, recurrent_dropout, generator)

    def forward(  # type: ignore[override]
        self,
        input: Tensor | PackedSequence,
        hx: Tensor | None = None,
        *,
        masks: RecurrentDropoutMasks | None = None,
    ) -> tuple[Tensor | PackedSequence, Tensor]:
        """``(output, h_n)`` as ``nn.GRU``; ``masks`` (from :meth:`sample_masks`) fixes the masks."""
        if not self._uses_loop(masks):
            return super().forward(input, hx)
        return self._variational_forward(input, hx, masks)

    def extra_repr(self) -> str:
        """Arguments shown in the module's repr."""
        return f"{super().extra_repr()}, recurrent_dropout={self.recurrent_dropout}"
