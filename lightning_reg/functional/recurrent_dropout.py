"""Keras-style recurrent dropout (Gal & Ghahramani, 2016, https://arxiv.org/abs/1512.05287) for LSTM and GRU.

Keras's ``LSTM(units, dropout=p, recurrent_dropout=q)`` draws, for every sequence of a batch, one mask on the
inputs of the layer and one mask on its recurrent state, and applies the same two masks at every time step.
This module holds the pure pieces:

- :func:`sample_recurrent_masks` draws those masks (from a ``torch.Generator`` when given);
- :func:`variational_lstm` and :func:`variational_gru` run a stacked, optionally bidirectional LSTM/GRU with
  ``nn.LSTM``'s/``nn.GRU``'s weights and gate order on a padded batch with optional lengths, given the masks.

Because the input mask is constant in time, the input projection ``(x * m) @ W_ih^T`` of all time steps is
one matrix product per layer and direction; only ``(h * m_h) @ W_hh^T`` is left inside the step loop. The
masked state enters only that product: the carried state (the LSTM's ``h`` and ``c``, the GRU's ``h`` in its
update ``z * h + (1 - z) * n``) is never masked, as in Keras.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "RecurrentDropoutMasks",
    "RecurrentWeights",
    "sample_recurrent_masks",
    "variational_gru",
    "variational_lstm",
]

Mode = Literal["lstm", "gru"]


@dataclass(frozen=True)
class RecurrentWeights:
    """The weights of one layer and direction, in ``nn.LSTM``/``nn.GRU``'s layout and gate order.

    Attributes:
        w_ih: ``(G * H, I)``: the input-to-hidden matrix (gates ``i, f, g, o`` for the LSTM, ``r, z, n`` for the
            GRU; ``G`` is 4 or 3).
        w_hh: ``(G * H, H)``: the hidden-to-hidden matrix.
        b_ih: ``(G * H,)`` or ``None`` (``bias=False``).
        b_hh: ``(G * H,)`` or ``None``.
    """

    w_ih: Tensor
    w_hh: Tensor
    b_ih: Tensor | None = None
    b_hh: Tensor | None = None


@dataclass(frozen=True)
class RecurrentDropoutMasks:
    """One input mask and one recurrent-state mask per layer and direction, fixed across time steps.

    Index ``layer * num_directions + direction`` (``nn.LSTM``'s order of ``h_n``). Each mask is ``(N, features)``,
    already scaled by ``1 / (1 - p)``; ``None`` where the rate is 0.

    Attributes:
        inputs: masks ``(N, input_features_of_the_layer)`` on each layer's input.
        hidden: masks ``(N, hidden_size)`` on the recurrent state where it enters ``W_hh``.
    """

    inputs: tuple[Tensor | None, ...]
    hidden: tuple[Tensor | None, ...]


def _check_rate(name: str, p: float) -> None:
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p < 1.0:
        raise ValueError(f"Expected `{name}` to be a float in [0, 1), but got {p!r}.")


def _mask(
    rows: int, features: int, p: float, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
) -> Tensor | None:
    if p == 0.0:
        return None
    # Drawn where the generator lives (a CPU generator cannot fill a CUDA tensor), then moved: the masks are a
    # function of the generator's state on every device.
    where = generator.device if generator is not None else device
    keep = torch.empty(rows, features, device=where, dtype=dtype).bernoulli_(1.0 - p, generator=generator)
    return (keep / (1.0 - p)).to(device)


def sample_recurrent_masks(
    batch_size: int,
    input_size: int,
    hidden_size: int,
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    dropout: float = 0.0,
    recurrent_dropout: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> RecurrentDropoutMasks:
    """Draw Keras's per-sequence masks for a stacked recurrent network.

    Layer 0's input mask covers ``input_size`` features, a deeper layer's the ``hidden_size * directions``
    outputs of the layer below (stacking Keras layers, each with ``dropout``, gives the same). Each direction of
    a bidirectional layer has its own masks, as Keras's ``Bidirectional`` wrapper, which holds two layers.

    Args:
        batch_size: sequences in the batch (one mask row each).
        input_size: features of the first layer's input.
        hidden_size: features of the recurrent state.
        num_layers: stacked layers.
        bidirectional: two directions per layer.
        dropout: rate on each layer's inputs, in ``[0, 1)``.
        recurrent_dropout: rate on the recurrent state, in ``[0, 1)``.
        generator: the random stream; the global one when ``None``.
        device: where the masks live.
        dtype: the masks' dtype (that of the inputs).

    Returns:
        A :class:`RecurrentDropoutMasks`.

    Example:
        >>> masks = sample_recurrent_masks(2, 3, 4, dropout=0.5, generator=torch.Generator().manual_seed(0))
        >>> tuple(masks.inputs[0].shape), masks.hidden[0]
        ((2, 3), None)
        >>> sorted(masks.inputs[0].unique().tolist())
        [0.0, 2.0]
    """
    _check_rate("dropout", dropout)
    _check_rate("recurrent_dropout", recurrent_dropout)
    for name, value in (("batch_size", batch_size), ("input_size", input_size), ("hidden_size", hidden_size)):
        if value < 1:
            raise ValueError(f"Expected `{name}` >= 1, but got {value!r}.")
    device = torch.device(device)
    directions = 2 if bidirectional else 1
    inputs: list[Tensor | None] = []
    hidden: list[Tensor | None] = []
    for layer in range(num_layers):
        features = input_size if layer == 0 else hidden_size * directions
        for _ in range(directions):
            inputs.append(_mask(batch_size, features, dropout, generator, device, dtype))
            hidden.append(_mask(batch_size, hidden_size, recurrent_dropout, generator, device, dtype))
    return RecurrentDropoutMasks(tuple(inputs), tuple(hidden))


def _reverse_index(lengths: Tensor, steps: int) -> Tensor:
    """``(N, T)`` index that reverses each sequence within its length and leaves the padding in place."""
    t = torch.arange(steps, device=lengths.device)[None, :]  # (1, T)
    flipped = lengths[:, None] - 1 - t  # (N, T)
    return torch.where(flipped >= 0, flipped, t)


def _lstm_steps(
    xp: Tensor, h: Tensor, c: Tensor, w_hh_t: Tensor, m_h: Tensor | None, valid: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """The LSTM recurrence over time-major projected inputs ``xp`` ``(T, N, 4H)``; returns ``(out, h, c)``."""
    outs = []
    # `unbind`, not `xp[t]`: the backward of one `select` per step would write a zero tensor of all of `xp`
    for t, x_t in enumerate(xp.unbind(0)):
        hm = h if m_h is None else h * m_h
        gates = torch.addmm(x_t, hm, w_hh_t)  # (N, 4H), gates i, f, g, o
        i, f, g, o = gates.chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if valid is not None:  # past a sequence's end its state stays and its output is 0 (as packed nn.LSTM)
            keep = valid[t]  # (N, 1)
            c = torch.where(keep, c_new, c)
            h = torch.where(keep, h_new, h)
            outs.append(h_new * keep)
        else:
            c, h = c_new, h_new
            outs.append(h)
    return torch.stack(outs, dim=1), h, c  # (N, T, H)


def _gru_steps(
    xp: Tensor, h: Tensor, w_hh_t: Tensor, b_hh: Tensor | None, m_h: Tensor | None, valid: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The GRU recurrence over time-major projected inputs ``xp`` ``(T, N, 3H)``; returns ``(out, h)``."""
    outs = []
    for t, x_t in enumerate(xp.unbind(0)):
        hm = h if m_h is None else h * m_h
        gh = hm @ w_hh_t if b_hh is None else torch.addmm(b_hh, hm, w_hh_t)  # (N, 3H), gates r, z, n
        i_r, i_z, i_n = x_t.chunk(3, dim=1)
        h_r, h_z, h_n = gh.chunk(3, dim=1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        h_new = n + z * (h - n)  # (1 - z) * n + z * h, with the unmasked state
        if valid is not None:
            keep = valid[t]
            h = torch.where(keep, h_new, h)
            outs.append(h_new * keep)
        else:
            h = h_new
            outs.append(h)
    return torch.stack(outs, dim=1), h


def _check_weights(weights: Sequence[RecurrentWeights], num_layers: int, directions: int, gates: int) -> int:
    if len(weights) != num_layers * directions:
        raise ValueError(
            f"Expected {num_layers * directions} weight sets (num_layers={num_layers} x {directions} directions), "
            f"but got {len(weights)}."
        )
    hidden = weights[0].w_hh.shape[1]
    for k, w in enumerate(weights):
        if w.w_hh.shape != (gates * hidden, hidden) or w.w_ih.shape[0] != gates * hidden:
            raise ValueError(
                f"Expected weight set {k} to hold w_ih ({gates * hidden}, I) and w_hh ({gates * hidden}, {hidden}), "
                f"but got {tuple(w.w_ih.shape)} and {tuple(w.w_hh.shape)}."
            )
    return hidden


def _run(
    mode: Mode,
    x: Tensor,
    h0: Tensor | None,
    c0: Tensor | None,
    weights: Sequence[RecurrentWeights],
    num_layers: int,
    bidirectional: bool,
    masks: RecurrentDropoutMasks | None,
    lengths: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    if x.ndim != 3:
        raise ValueError(f"Expected a batch-first input of shape (N, T, features), but got {tuple(x.shape)}.")
    directions = 2 if bidirectional else 1
    gates = 4 if mode == "lstm" else 3
    hidden = _check_weights(weights, num_layers, directions, gates)
    n, steps, _ = x.shape
    if masks is not None and (len(masks.inputs), len(masks.hidden)) != (len(weights), len(weights)):
        raise ValueError(
            f"Expected masks for {len(weights)} layers x directions, but got {len(masks.inputs)} input masks and "
            f"{len(masks.hidden)} recurrent masks; draw them with `sample_recurrent_masks` for this network."
        )
    valid = None
    reverse = None
    if lengths is not None:
        lengths = torch.as_tensor(lengths, device=x.device).long()
        if lengths.shape != (n,) or bool((lengths < 1).any()) or bool((lengths > steps).any()):
            raise ValueError(
                f"Expected `lengths` of shape ({n},) with values in [1, {steps}], but got shape "
                f"{tuple(lengths.shape)} and values {lengths.tolist()}."
            )
        if bool((lengths < steps).any()):
            valid = (torch.arange(steps, device=x.device)[:, None] < lengths[None, :])[..., None]  # (T, N, 1)
            reverse = _reverse_index(lengths, steps)  # (N, T)
    zeros = x.new_zeros(num_layers * directions, n, hidden)
    h0 = zeros if h0 is None else h0
    c0 = (zeros if c0 is None else c0) if mode == "lstm" else None
    h_n: list[Tensor] = []
    c_n: list[Tensor] = []
    layer_input = x  # (N, T, I)
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            k = layer * directions + direction
            w = weights[k]
            m_x = masks.inputs[k] if masks is not None else None
            m_h = masks.hidden[k] if masks is not None else None
            inp = layer_input if m_x is None else layer_input * m_x[:, None, :]  # the same mask at every step
            if direction == 1:  # the backward direction reads each sequence from its last real step
                inp = inp.flip(1) if reverse is None else inp.gather(1, reverse[..., None].expand_as(inp))
            # The input projection of all steps at once, time-major so that each step reads a contiguous block.
            bias = w.b_ih
            if mode == "lstm" and w.b_hh is not None:
                bias = w.b_hh if bias is None else bias + w.b_hh
            xp = inp.transpose(0, 1) @ w.w_ih.t()  # (T, N, G * H)
            if bias is not None:
                xp = xp + bias
            if mode == "lstm":
                assert c0 is not None
                out, h, c = _lstm_steps(xp, h0[k], c0[k], w.w_hh.t(), m_h, valid)
                c_n.append(c)
            else:
                out, h = _gru_steps(xp, h0[k], w.w_hh.t(), w.b_hh, m_h, valid)
            if direction == 1:
                out = out.flip(1) if reverse is None else out.gather(1, reverse[..., None].expand_as(out))
            outputs.append(out)
            h_n.append(h)
        layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)  # (N, T, H * directions)
    return layer_input, torch.stack(h_n), torch.stack(c_n) if mode == "lstm" else None


def variational_lstm(
    x: Tensor,
    weights: Sequence[RecurrentWeights],
    hx: tuple[Tensor, Tensor] | None = None,
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    masks: RecurrentDropoutMasks | None = None,
    lengths: Tensor | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """A stacked LSTM with fixed dropout masks on each layer's inputs and recurrent state.

    With ``masks=None`` it computes exactly ``nn.LSTM`` (gates ``i, f, g, o``; weights as its parameters).

    Args:
        x: the batch ``(N, T, input_size)``, batch first.
        weights: one :class:`RecurrentWeights` per layer and direction (``layer * directions + direction``).
        hx: the initial ``(h_0, c_0)``, each ``(num_layers * directions, N, H)``; zeros when ``None``.
        num_layers: stacked layers.
        bidirectional: whether each layer runs both ways.
        masks: from :func:`sample_recurrent_masks`; ``None`` for no dropout.
        lengths: ``(N,)`` real lengths of right-padded sequences; outputs past a length are 0 and the final
            state is the one at the last real step (the backward direction starts there).

    Returns:
        ``(output, (h_n, c_n))``: ``output`` ``(N, T, H * directions)``, the states ``(num_layers * directions, N, H)``.

    Example:
        >>> lstm = torch.nn.LSTM(3, 4, batch_first=True)
        >>> w = [RecurrentWeights(lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0)]
        >>> x = torch.randn(2, 5, 3)
        >>> out, (h, c) = variational_lstm(x, w)
        >>> torch.allclose(out, lstm(x)[0], atol=1e-6)
        True
    """
    h0, c0 = (None, None) if hx is None else hx
    out, h, c = _run("lstm", x, h0, c0, weights, num_layers, bidirectional, masks, lengths)
    assert c is not None
    return out, (h, c)


def variational_gru(
    x: Tensor,
    weights: Sequence[RecurrentWeights],
    hx: Tensor | None = None,
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    masks: RecurrentDropoutMasks | None = None,
    lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """A stacked GRU with fixed dropout masks on each layer's inputs and recurrent state.

    With ``masks=None`` it computes exactly ``nn.GRU`` (gates ``r, z, n``, the reset gate applied after the
    recurrent product: Keras's ``reset_after=True``). The masked state enters ``W_hh`` only; the update
    ``z * h + (1 - z) * n`` uses the unmasked one.

    Args:
        x: the batch ``(N, T, input_size)``, batch first.
        weights: one :class:`RecurrentWeights` per layer and direction.
        hx: the initial state ``(num_layers * directions, N, H)``; zeros when ``None``.
        num_layers: stacked layers.
        bidirectional: whether each layer runs both ways.
        masks: from :func:`sample_recurrent_masks`; ``None`` for no dropout.
        lengths: ``(N,)`` real lengths of right-padded sequences.

    Returns:
        ``(output, h_n)``.

    Example:
        >>> gru = torch.nn.GRU(3, 4, batch_first=True)
        >>> w = [RecurrentWeights(gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0)]
        >>> x = torch.randn(2, 5, 3)
        >>> torch.allclose(variational_gru(x, w)[0], gru(x)[0], atol=1e-6)
        True
    """
    out, h, _ = _run("gru", x, hx, None, weights, num_layers, bidirectional, masks, lengths)
    return out, h
