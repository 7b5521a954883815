import pytest
import torch
from torch import nn

from lightning_reg.functional import weight_drop
from lightning_reg.nn import WeightDrop


def test_weight_drop_zeroes_and_rescales_weights():
    w = torch.ones(100, 100)
    dropped = weight_drop(w, 0.25, generator=torch.Generator().manual_seed(0))
    assert dropped.unique().tolist() == pytest.approx([0.0, 4 / 3])
    assert (dropped == 0).float().mean().item() == pytest.approx(0.25, abs=0.02)


def test_weight_drop_is_identity_outside_training():
    w = torch.randn(3, 3)
    assert weight_drop(w, 0.5, training=False) is w
    assert weight_drop(w, 0.0) is w


def test_weight_drop_rejects_bad_p():
    with pytest.raises(ValueError, match=r"Expected `p` in \[0, 1\)"):
        weight_drop(torch.ones(2), 1.0)
    with pytest.raises(ValueError, match=r"Expected `p` in \[0, 1\)"):
        WeightDrop(nn.LSTM(2, 2), p=-0.5)


def test_weight_drop_defaults_to_the_recurrent_matrices():
    wrapped = WeightDrop(nn.GRU(3, 4, num_layers=2, bidirectional=True))
    assert wrapped.weights == ("weight_hh_l0", "weight_hh_l0_reverse", "weight_hh_l1", "weight_hh_l1_reverse")


def test_weight_drop_changes_training_output_and_matches_the_plain_lstm_in_eval():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 5, batch_first=True)
    wrapped = WeightDrop(lstm, p=0.5)
    x = torch.randn(2, 4, 3)
    plain, _ = lstm(x)
    dropped, _ = wrapped(x)
    assert not torch.allclose(dropped, plain)
    # The parameters were not replaced: eval mode (and the plain module) sees the original weights.
    assert isinstance(lstm.weight_hh_l0, nn.Parameter)
    evaluated, _ = wrapped.eval()(x)
    torch.testing.assert_close(evaluated, plain)


def test_weight_drop_equals_the_lstm_run_with_the_masked_matrix():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 5, batch_first=True)
    x = torch.randn(2, 4, 3)
    torch.manual_seed(7)
    out, _ = WeightDrop(lstm, p=0.3)(x)
    torch.manual_seed(7)
    masked = weight_drop(lstm.weight_hh_l0.detach(), 0.3)
    reference = nn.LSTM(3, 5, batch_first=True)
    reference.load_state_dict({**lstm.state_dict(), "weight_hh_l0": masked})
    torch.testing.assert_close(out, reference(x)[0])


def test_weight_drop_gradients_reach_only_kept_recurrent_weights():
    lstm = nn.LSTM(3, 5, batch_first=True)
    torch.manual_seed(1)
    out, _ = WeightDrop(lstm, p=0.5)(torch.randn(2, 4, 3))
    out.sum().backward()
    grad = lstm.weight_hh_l0.grad
    assert grad is not None
    assert 0.3 < (grad == 0).float().mean().item() < 0.7


def test_weight_drop_runs_on_packed_sequences():
    wrapped = WeightDrop(nn.LSTM(3, 5, batch_first=True), p=0.5)
    packed = nn.utils.rnn.pack_padded_sequence(
        torch.randn(2, 4, 3), torch.tensor([4, 2]), batch_first=True, enforce_sorted=False
    )
    _, (h, _) = wrapped(packed)
    assert h.shape == (1, 2, 5)


def test_weight_drop_rejects_unknown_weight_names():
    with pytest.raises(ValueError, match=r"Expected `weights` to name parameters of the module"):
        WeightDrop(nn.LSTM(2, 2), weights=["weight_hh"])
    with pytest.raises(ValueError, match="has no `weight_hh_\\*` parameters"):
        WeightDrop(nn.Linear(2, 2))


def test_a_generator_on_another_device_draws_the_mask_there_and_copies_it():
    # A CPU generator with weights elsewhere (CUDA in practice; the meta device here).
    generator = torch.Generator().manual_seed(3)
    reference = torch.Generator().manual_seed(3)
    dropped = weight_drop(torch.ones(4, 6, device="meta"), 0.5, generator=generator)
    assert dropped.device.type == "meta"
    torch.empty(4, 6).bernoulli_(0.5, generator=reference)
    assert torch.equal(generator.get_state(), reference.get_state())
    # On one device, the same generator state gives the same mask as before the change.
    cpu = weight_drop(torch.ones(4, 6), 0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(cpu, torch.empty(4, 6).bernoulli_(0.5, generator=torch.Generator().manual_seed(3)) * 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_drop_keeps_a_half_precision_dtype(dtype):
    w = torch.randn(8, 8)
    dropped = weight_drop(w.to(dtype), 0.5, generator=torch.Generator().manual_seed(0))
    assert dropped.dtype == dtype  # a float32 mask would promote the weight
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], (w.to(dtype) * 2)[kept])
