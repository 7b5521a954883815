"""VariationalLSTM / VariationalGRU: Keras's dropout and recurrent_dropout, checked against torch's own RNNs,
a naive per-sample step-by-step reference, and Monte-Carlo dropout."""

from __future__ import annotations

import pickle
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lightning_reg.functional import mc_dropout_predict
from lightning_reg.functional.recurrent_dropout import (
    RecurrentDropoutMasks,
    RecurrentWeights,
    sample_recurrent_masks,
    variational_gru,
    variational_lstm,
)
from lightning_reg.nn import VariationalGRU, VariationalLSTM, WeightDrop

TORCH = {"lstm": nn.LSTM, "gru": nn.GRU}
OURS = {"lstm": VariationalLSTM, "gru": VariationalGRU}
I, H = 5, 6  # noqa: E741  (input and hidden sizes, as in torch's docs)
LENGTHS = torch.tensor([7, 3, 5, 1])  # unsorted, with a length-1 sequence
N, T = len(LENGTHS), int(LENGTHS.max())


def pair(cell, **kwargs):
    """(torch's RNN, ours) with the same weights, float64."""
    torch.manual_seed(0)
    ref = TORCH[cell](I, H, **kwargs).double()
    ours = OURS[cell](I, H, **kwargs).double()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def ones_masks(module, batch):
    """Masks of all ones: force the step loop (not the fused kernel) while dropping nothing."""
    shapes = sample_recurrent_masks(
        batch,
        I,
        H,
        num_layers=module.num_layers,
        bidirectional=module.bidirectional,
        dropout=0.5,
        recurrent_dropout=0.5,
    )
    return RecurrentDropoutMasks(
        tuple(torch.ones_like(m, dtype=torch.float64) for m in shapes.inputs),
        tuple(torch.ones_like(m, dtype=torch.float64) for m in shapes.hidden),
    )


def unpack(out):
    return pad_packed_sequence(out, batch_first=True)[0]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize(("num_layers", "bidirectional"), [(1, False), (2, True), (3, False)])
@pytest.mark.parametrize("packed", [False, True])
def test_step_loop_without_dropout_equals_torch_on_the_same_weights(cell, num_layers, bidirectional, packed):
    ref, ours = pair(cell, num_layers=num_layers, bidirectional=bidirectional, batch_first=True)
    x = torch.randn(N, T, I, dtype=torch.float64, requires_grad=True)
    inp = pack_padded_sequence(x, LENGTHS, batch_first=True, enforce_sorted=False) if packed else x
    ours.train()
    out, state = ours(inp, masks=ones_masks(ours, N))  # the Python step loop
    ref_out, ref_state = ref(inp)
    if packed:
        assert torch.equal(out.sorted_indices, ref_out.sorted_indices)
        torch.testing.assert_close(out.batch_sizes, ref_out.batch_sizes)
        out, ref_out = unpack(out), unpack(ref_out)
    torch.testing.assert_close(out, ref_out)
    for s, r in zip(state if cell == "lstm" else (state,), ref_state if cell == "lstm" else (ref_state,), strict=True):
        torch.testing.assert_close(s, r)
    # the gradients of the step loop are torch's too
    grads = torch.autograd.grad(out.square().sum(), [x, *ours.parameters()], retain_graph=True)
    ref_grads = torch.autograd.grad(ref_out.square().sum(), [x, *ref.parameters()])
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_time_major_unbatched_initial_state_and_no_bias_match_torch(cell):
    ref, ours = pair(cell, num_layers=2, bias=False)
    x = torch.randn(T, N, I, dtype=torch.float64)
    h0 = torch.randn(2, N, H, dtype=torch.float64)
    hx = (h0, torch.randn_like(h0)) if cell == "lstm" else h0
    out, _ = ours(x, hx, masks=ones_masks(ours, N))
    torch.testing.assert_close(out, ref(x, hx)[0])
    # unbatched (T, I) input and (layers, H) state
    hx1 = tuple(h[:, 0] for h in hx) if cell == "lstm" else h0[:, 0]
    out1, state1 = ours(x[:, 0], hx1, masks=ones_masks(ours, 1))
    ref1, ref_state1 = ref(x[:, 0], hx1)
    torch.testing.assert_close(out1, ref1)
    torch.testing.assert_close(state1, ref_state1)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_state_dict_loads_both_ways_and_eval_runs_the_fused_kernel(cell):
    torch.manual_seed(1)
    ours = OURS[cell](I, H, num_layers=2, bidirectional=True, dropout=0.3, recurrent_dropout=0.4)
    ref = TORCH[cell](I, H, num_layers=2, bidirectional=True)
    assert ref.load_state_dict(ours.state_dict()).missing_keys == []
    back = OURS[cell](I, H, num_layers=2, bidirectional=True, recurrent_dropout=0.1)
    assert back.load_state_dict(ref.state_dict()).unexpected_keys == []
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(T, N, I)
    ours.eval()
    torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=0, atol=0)  # eval: exactly nn.LSTM / nn.GRU
    # same initialisation as torch's own class under the same seed
    torch.manual_seed(3)
    a = OURS[cell](I, H, dropout=0.2)
    torch.manual_seed(3)
    b = TORCH[cell](I, H)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def lstm_reference(x, lengths, weights, num_layers, directions, masks):
    """Naive: one sequence at a time, cut to its length, one nn.LSTMCell step at a time, masks applied."""
    outputs, h_n, c_n = [], [], []
    for n in range(x.shape[0]):
        seq = x[n, : lengths[n]]  # (L, I)
        finals_h, finals_c = [], []
        for layer in range(num_layers):
            per_direction = []
            for d in range(directions):
                k = layer * directions + d
                w = weights[k]
                cell = nn.LSTMCell(w.w_ih.shape[1], H).double()
                with torch.no_grad():
                    cell.weight_ih.copy_(w.w_ih)
                    cell.weight_hh.copy_(w.w_hh)
                    cell.bias_ih.copy_(w.b_ih)
                    cell.bias_hh.copy_(w.b_hh)
                h = torch.zeros(1, H, dtype=torch.float64)
                c = torch.zeros(1, H, dtype=torch.float64)
                steps = range(len(seq)) if d == 0 else reversed(range(len(seq)))
                outs = [None] * len(seq)
                for t in steps:
                    x_t = seq[t : t + 1] * masks.inputs[k][n]
                    h, c = cell(x_t, (h * masks.hidden[k][n], c))
                    outs[t] = h[0]
                per_direction.append(torch.stack(outs))
                finals_h.append(h[0])
                finals_c.append(c[0])
            seq = torch.cat(per_direction, dim=-1)
        padded = torch.zeros(x.shape[1], seq.shape[-1], dtype=torch.float64)
        padded[: lengths[n]] = seq
        outputs.append(padded)
        h_n.append(torch.stack(finals_h))
        c_n.append(torch.stack(finals_c))
    return torch.stack(outputs), torch.stack(h_n, dim=1), torch.stack(c_n, dim=1)


def gru_reference(x, lengths, weights, num_layers, directions, masks):
    """Naive GRU from torch's documented equations; the masked state enters W_hh only."""
    outputs, h_n = [], []
    for n in range(x.shape[0]):
        seq = x[n, : lengths[n]]
        finals = []
        for layer in range(num_layers):
            per_direction = []
            for d in range(directions):
                k = layer * directions + d
                w = weights[k]
                w_ir, w_iz, w_in = w.w_ih.chunk(3)
                w_hr, w_hz, w_hn = w.w_hh.chunk(3)
                b_ir, b_iz, b_in = w.b_ih.chunk(3)
                b_hr, b_hz, b_hn = w.b_hh.chunk(3)
                h = torch.zeros(H, dtype=torch.float64)
                outs = [None] * len(seq)
                for t in range(len(seq)) if d == 0 else reversed(range(len(seq))):
                    x_t = seq[t] * masks.inputs[k][n]
                    hm = h * masks.hidden[k][n]
                    r = torch.sigmoid(w_ir @ x_t + b_ir + w_hr @ hm + b_hr)
                    z = torch.sigmoid(w_iz @ x_t + b_iz + w_hz @ hm + b_hz)
                    cand = torch.tanh(w_in @ x_t + b_in + r * (w_hn @ hm + b_hn))
                    h = (1 - z) * cand + z * h
                    outs[t] = h
                per_direction.append(torch.stack(outs))
                finals.append(h)
            seq = torch.cat(per_direction, dim=-1)
        padded = torch.zeros(x.shape[1], seq.shape[-1], dtype=torch.float64)
        padded[: lengths[n]] = seq
        outputs.append(padded)
        h_n.append(torch.stack(finals))
    return torch.stack(outputs), torch.stack(h_n, dim=1)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize(("num_layers", "bidirectional"), [(1, False), (2, True)])
def test_with_masks_fixed_it_equals_a_step_by_step_reference(cell, num_layers, bidirectional):
    _, ours = pair(cell, num_layers=num_layers, bidirectional=bidirectional, batch_first=True)
    ours.dropout, ours.recurrent_dropout = 0.4, 0.5
    masks = ours.sample_masks(N, dtype=torch.float64)
    assert all(m is not None and set(m.unique().tolist()) == {0.0, 1 / 0.6} for m in masks.inputs)
    assert all(m is not None and set(m.unique().tolist()) == {0.0, 2.0} for m in masks.hidden)
    x = torch.randn(N, T, I, dtype=torch.float64)
    packed = pack_padded_sequence(x, LENGTHS, batch_first=True, enforce_sorted=False)
    out, state = ours(packed, masks=masks)
    directions = 2 if bidirectional else 1
    reference = lstm_reference if cell == "lstm" else gru_reference
    expected = reference(x, LENGTHS, ours._weights(), num_layers, directions, masks)
    torch.testing.assert_close(unpack(out), expected[0][:, : int(LENGTHS.max())])
    torch.testing.assert_close(state, expected[1:] if cell == "lstm" else expected[1])
    # padded input of full length: the same reference with every length T
    full = torch.full((N,), T)
    out, _ = ours(x, masks=masks)
    torch.testing.assert_close(out, reference(x, full, ours._weights(), num_layers, directions, masks)[0])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_input_mask_is_one_mask_per_sequence_fixed_across_time(cell):
    """With only `dropout`, the layer is torch's RNN on the inputs times one (N, 1, I) mask."""
    generator = torch.Generator().manual_seed(5)
    ref, ours = pair(cell, batch_first=True)
    ours.dropout, ours.generator = 0.5, generator
    ours.train()
    x = torch.randn(N, T, I, dtype=torch.float64)
    state = generator.get_state()
    out, _ = ours(x)
    generator.set_state(state)
    mask = ours.sample_masks(N, dtype=torch.float64).inputs[0]  # the draw the forward pass made
    assert mask is not None
    torch.testing.assert_close(out, ref(x * mask[:, None, :])[0])
    assert len({tuple(row.tolist()) for row in mask}) > 1  # one mask per sequence, not one per batch


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_generator_makes_training_draws_reproducible(cell):
    def run(seed):
        torch.manual_seed(0)
        module = OURS[cell](I, H, recurrent_dropout=0.5, dropout=0.2, generator=torch.Generator().manual_seed(seed))
        x = torch.randn(T, N, I)
        return module(x)[0], module(x)[0]

    a1, a2 = run(1)
    b1, _ = run(1)
    c1, _ = run(2)
    assert torch.equal(a1, b1)
    assert not torch.equal(a1, a2)  # a new draw at every forward pass
    assert not torch.equal(a1, c1)
    module = OURS[cell](I, H, recurrent_dropout=0.5, generator=torch.Generator().manual_seed(0))
    clone = pickle.loads(pickle.dumps(module))  # checkpoints and DDP spawn pickle modules
    x = torch.randn(T, N, I)
    assert torch.equal(module(x)[0], clone(x)[0])


class SequenceClassifier(nn.Module):
    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(H, 3)

    def forward_features(self, x):
        return self.rnn(x)[0][:, -1]

    def forward_head(self, features):
        return self.head(features)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("method", ["auto", "naive"])
def test_mc_dropout_samples_the_recurrent_masks(cell, method):
    torch.manual_seed(0)
    # recurrent dropout only: the one dropout of the model sits inside the trunk, so no cached features
    model = SequenceClassifier(OURS[cell](I, H, batch_first=True, recurrent_dropout=0.3)).eval()
    x = torch.randn(8, T, I)
    out = mc_dropout_predict(model, x, 20, method=method, generator=torch.Generator().manual_seed(0))
    assert out.method == ("batched" if method == "auto" else "naive")
    assert float(out.probs.std(dim=0).mean()) > 1e-3
    assert float(out.mutual_information.mean()) > 0
    assert not model.training  # modes restored
    assert not model.rnn.training
    again = mc_dropout_predict(model, x, 20, method=method, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.probs, again.probs)  # the generator makes the samples reproducible
    with torch.no_grad():
        plain = model(x).softmax(-1)
    assert not torch.allclose(out.mean_probs, plain)


def test_mc_dropout_with_both_rates_zero_is_refused_like_any_zero_rate_dropout():
    torch.manual_seed(0)
    model = SequenceClassifier(VariationalLSTM(I, H, batch_first=True)).eval()  # a site of rate 0, as nn.Dropout(0)
    # every sample would be the deterministic pass: refused (issue 12.14), naming the layer
    with pytest.raises(ValueError, match=r"every dropout layer of SequenceClassifier has rate 0 \(1 layer: `rnn`\)"):
        mc_dropout_predict(model, torch.randn(4, T, I), 5)


def test_weight_drop_composes_with_recurrent_dropout():
    torch.manual_seed(0)
    wrapped = WeightDrop(VariationalLSTM(I, H, recurrent_dropout=0.2), p=0.5)
    out, _ = wrapped(torch.randn(T, N, I))
    out.sum().backward()
    assert wrapped.module.weight_hh_l0.grad is not None


def test_trains_a_step_and_runs_in_float32():
    torch.manual_seed(0)
    model = VariationalLSTM(
        I, H, num_layers=2, bidirectional=True, batch_first=True, dropout=0.2, recurrent_dropout=0.2
    )
    head = nn.Linear(2 * H, 3)
    optimizer = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=0.02)
    x = torch.randn(16, T, I)
    y = x[:, -1, :3].argmax(dim=1)  # learnable: the largest of the last step's first three features
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(head(model(x)[0][:, -1]), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_errors_say_what_was_wrong():
    with pytest.raises(ValueError, match=r"`dropout` to be a float in \[0, 1\)"):
        VariationalLSTM(I, H, dropout=1.0)
    with pytest.raises(ValueError, match="`recurrent_dropout`"):
        VariationalGRU(I, H, recurrent_dropout=-0.1)
    with pytest.raises(ValueError, match="proj_size=0"):
        VariationalLSTM(I, H, proj_size=2)
    with pytest.raises(TypeError, match=r"torch\.Generator"):
        VariationalLSTM(I, H, generator=0)
    module = VariationalLSTM(I, H, recurrent_dropout=0.5)
    with pytest.raises(ValueError, match="input features"):
        module(torch.randn(T, N, I + 1))
    with pytest.raises(ValueError, match="Expected the input to be"):
        module(torch.randn(T, N, I, 1))
    masks = module.sample_masks(N)
    with pytest.raises(ValueError, match=r"masks.hidden\[0\]` of shape \(3, 6\)"):
        module(torch.randn(T, 3, I), masks=masks)
    with pytest.raises(ValueError, match=r"Expected 1 `masks\.inputs` \(layers x directions\), but got 2"):
        module(torch.randn(T, N, I), masks=RecurrentDropoutMasks((None, None), (None, None)))
    weights = module._weights()
    with pytest.raises(ValueError, match="Expected 2 weight sets"):
        variational_lstm(torch.randn(N, T, I), weights, num_layers=2)
    with pytest.raises(ValueError, match="`lengths` of shape"):
        variational_gru(
            torch.randn(N, T, I),
            [RecurrentWeights(torch.randn(3 * H, I), torch.randn(3 * H, H))],
            lengths=torch.tensor([T + 1] * N),
        )
    with pytest.raises(ValueError, match="`batch_size` >= 1"):
        sample_recurrent_masks(0, I, H, dropout=0.1)


def test_repr_shows_both_rates():
    text = repr(VariationalGRU(I, H, dropout=0.1, recurrent_dropout=0.25))
    assert "dropout=0.1" in text
    assert "recurrent_dropout=0.25" in text


def test_sample_recurrent_masks_defaults_are_one_unidirectional_layer_without_dropout() -> None:
    masks = sample_recurrent_masks(3, 4, 5)
    assert masks.inputs == (None,)
    assert masks.hidden == (None,)


@pytest.mark.parametrize("name", ["dropout", "recurrent_dropout"])
@pytest.mark.parametrize("p", [1.0, True, -0.1, "0.5"])
def test_a_rate_outside_zero_to_one_or_not_a_number_is_refused_by_name(name: str, p: object) -> None:
    with pytest.raises(ValueError, match=re.escape(f"Expected `{name}` to be a float in [0, 1), but got {p!r}.")):
        sample_recurrent_masks(3, 4, 5, **{name: p})


@pytest.mark.parametrize("name", ["batch_size", "input_size", "hidden_size"])
def test_a_size_below_one_is_refused_by_name(name: str) -> None:
    sizes = {"batch_size": 3, "input_size": 4, "hidden_size": 5, name: 0}
    with pytest.raises(ValueError, match=f"`{name}`"):
        sample_recurrent_masks(**sizes)


def test_masks_take_the_rate_dtype_and_scale_asked_for() -> None:
    g = torch.Generator().manual_seed(0)
    masks = sample_recurrent_masks(4000, 6, 5, dropout=0.2, recurrent_dropout=0.2, generator=g, dtype=torch.float64)
    for mask in (masks.inputs[0], masks.hidden[0]):
        assert mask.dtype == torch.float64
        assert set(mask.unique().tolist()) == {0.0, 1.25}
        kept = float((mask > 0).double().mean())
        assert abs(kept - 0.8) < 0.01  # 24000 or 20000 draws: the standard error is 0.003


def test_weights_of_the_wrong_shape_are_named_with_what_was_expected() -> None:
    lstm = nn.LSTM(4, 5, batch_first=True)
    good = RecurrentWeights(lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0)
    bad_ih = RecurrentWeights(lstm.weight_ih_l0[:12], lstm.weight_hh_l0, None, None)
    message = "Expected weight set 0 to hold w_ih (20, I) and w_hh (20, 5), but got (12, 4) and (20, 5)."
    with pytest.raises(ValueError, match=re.escape(message)):
        variational_lstm(torch.randn(2, 3, 4), [bad_ih])
    bad_hh = RecurrentWeights(lstm.weight_ih_l0, lstm.weight_hh_l0[:, :4], None, None)
    with pytest.raises(ValueError, match=re.escape("but got (20, 4) and (20, 4).")):
        variational_lstm(torch.randn(2, 3, 4), [bad_hh])
    with pytest.raises(ValueError, match=re.escape("but got (2, 3).")):
        variational_lstm(torch.randn(2, 3), [good])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_without_masks_the_functional_forms_are_torchs_rnns(cell):
    ref, _ = pair(cell, num_layers=2, bidirectional=True, batch_first=True)
    weights = [
        RecurrentWeights(
            *(getattr(ref, f"{name}_l{layer}{suffix}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        )
        for layer in range(2)
        for suffix in ("", "_reverse")
    ]
    x = torch.randn(N, T, I, dtype=torch.float64)
    fn = variational_lstm if cell == "lstm" else variational_gru
    out, state = fn(x, weights, num_layers=2, bidirectional=True)  # masks=None: no dropout
    expected, expected_state = ref(x)
    torch.testing.assert_close(out, expected)
    h, h_ref = (state[0], expected_state[0]) if cell == "lstm" else (state, expected_state)
    torch.testing.assert_close(h, h_ref)


def test_an_lstm_with_only_the_recurrent_bias_is_torchs_with_a_zero_input_bias():
    ref, _ = pair("lstm", batch_first=True)
    with torch.no_grad():
        ref.bias_ih_l0.zero_()
    weights = [RecurrentWeights(ref.weight_ih_l0, ref.weight_hh_l0, None, ref.bias_hh_l0)]
    x = torch.randn(N, T, I, dtype=torch.float64)
    out, _ = variational_lstm(x, weights)
    torch.testing.assert_close(out, ref(x)[0])


def _gru_weights():
    return [RecurrentWeights(torch.randn(3 * H, I), torch.randn(3 * H, H))]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"masks": RecurrentDropoutMasks((None, None), (None, None))},
            "Expected masks for 1 layers x directions, but got 2 input masks and 2 recurrent masks; draw them with "
            "`sample_recurrent_masks` for this network.",
        ),
        (
            {"lengths": torch.tensor([1, 2, 3, 4, 5])},  # valid values, one too many
            f"Expected `lengths` of shape ({N},) with values in [1, {T}], but got shape (5,) and values "
            "[1, 2, 3, 4, 5].",
        ),
        (
            {"lengths": torch.tensor([7, 0, 5, 1])},  # an empty sequence
            f"Expected `lengths` of shape ({N},) with values in [1, {T}], but got shape (4,) and values [7, 0, 5, 1].",
        ),
    ],
    ids=["masks", "lengths-shape", "lengths-zero"],
)
def test_bad_masks_or_lengths_get_the_whole_message(kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        variational_gru(torch.randn(N, T, I), _gru_weights(), **kwargs)
