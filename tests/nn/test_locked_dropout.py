import pytest
import torch

from lightning_reg.functional import locked_dropout
from lightning_reg.nn import LockedDropout


def test_locked_dropout_mask_is_constant_over_time_batch_first():
    y = locked_dropout(torch.ones(4, 7, 5), 0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(y, y[:, :1].expand_as(y))
    assert set(y.unique().tolist()) <= {0.0, 2.0}


def test_locked_dropout_mask_is_constant_over_time_time_first():
    y = locked_dropout(torch.ones(7, 4, 5), 0.5, batch_first=False, generator=torch.Generator().manual_seed(1))
    assert torch.equal(y, y[:1].expand_as(y))


def test_locked_dropout_keeps_the_expectation():
    y = locked_dropout(torch.ones(2000, 3, 50), 0.3, generator=torch.Generator().manual_seed(0))
    assert y.mean().item() == pytest.approx(1.0, abs=0.02)


def test_locked_dropout_is_identity_outside_training_and_at_zero():
    x = torch.randn(2, 3, 4)
    assert locked_dropout(x, 0.5, training=False) is x
    assert locked_dropout(x, 0.0) is x


def test_locked_dropout_is_reproducible_with_a_generator():
    x = torch.randn(3, 5, 6)
    a = locked_dropout(x, 0.4, generator=torch.Generator().manual_seed(3))
    b = locked_dropout(x, 0.4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_locked_dropout_module_follows_its_training_flag():
    drop = LockedDropout(0.5)
    x = torch.ones(3, 6, 4)
    y = drop(x)
    assert torch.equal(y, y[:, :1].expand_as(y))
    assert torch.equal(drop.eval()(x), x)
    assert isinstance(drop, torch.nn.modules.dropout._DropoutNd)


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_locked_dropout_rejects_bad_p(p):
    with pytest.raises(ValueError, match=r"Expected `p` in \[0, 1\)"):
        locked_dropout(torch.ones(1, 2, 3), p)
    with pytest.raises(ValueError, match=r"Expected `p` in \[0, 1\)"):
        LockedDropout(p)


def test_locked_dropout_rejects_inputs_without_a_time_dimension():
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        locked_dropout(torch.ones(4, 5), 0.5)


@pytest.mark.parametrize("shape", [(4, 7, 5), (3, 2, 6)])
def test_a_generator_on_another_device_draws_the_mask_there_and_copies_it(shape):
    # A CPU generator with inputs elsewhere (CUDA in practice; the meta device here): torch's bernoulli_ would
    # refuse (CUDA) or ignore (meta) the generator. The mask is drawn from the generator on its own device.
    generator = torch.Generator().manual_seed(3)
    reference = torch.Generator().manual_seed(3)
    y = locked_dropout(torch.ones(shape, device="meta"), 0.5, generator=generator)
    assert y.device.type == "meta"
    assert y.shape == shape
    torch.empty(shape[0], 1, shape[2]).bernoulli_(0.5, generator=reference)  # the same draw on the CPU
    assert torch.equal(generator.get_state(), reference.get_state())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_locked_dropout_keeps_a_half_precision_dtype(dtype):
    x = torch.randn(2, 5, 4)
    y = locked_dropout(x.to(dtype), 0.5, generator=torch.Generator().manual_seed(0))
    assert y.dtype == dtype  # a float32 mask would promote the activations
    kept = y != 0
    torch.testing.assert_close(y[kept], (x.to(dtype) * 2)[kept])
