"""The cheaper Monte-Carlo dropout masks (32-bit integers against a threshold): distribution, shapes, state."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import Tensor, nn

from lightning_reg.functional import mc_masks
from lightning_reg.functional.mc_dropout import mc_dropout_predict
from lightning_reg.functional.mc_masks import threshold_dropout, threshold_masks
from lightning_reg.nn import LockedDropout


def _keep_probability(p: float) -> float:
    """The keep probability the threshold realizes: ``1 - p`` rounded to a multiple of ``2**-32``."""
    return min(round((1 - p) * 2**32), 2**32 - 1) / 2**32


def _count_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = mc_masks._threshold_dropout

    def counting(*args: object, **kwargs: object) -> Tensor:
        calls.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(mc_masks, "_threshold_dropout", counting)
    return calls


# --- the distribution ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_mean_and_variance_of_the_output_match_the_closed_form(p: float) -> None:
    # y = x * B / (1 - p), B ~ Bernoulli(q): E[y] = x s q, Var[y] = x^2 s^2 q (1 - q), with s = 1 / (1 - p).
    draws, x = 20_000, torch.linspace(-2.0, 3.0, 16, dtype=torch.float64)
    y = threshold_dropout(x.expand(draws, -1).clone(), p, generator=torch.Generator().manual_seed(0))
    q, s = _keep_probability(p), 1 / (1 - p)
    mean, var = x * s * q, x**2 * s**2 * q * (1 - q)
    # Standard errors of the sample mean and of the unbiased sample variance, Var(s^2) = mu4 / n - sigma^4 (n - 3) /
    # (n (n - 1)), with the 4th central moment of a Bernoulli q(1-q)(1-3q+3q^2) (at q = 1/2, s^2 barely varies).
    mu4 = x**4 * s**4 * q * (1 - q) * (1 - 3 * q + 3 * q**2)
    var_of_var = mu4 / draws - var**2 * (draws - 3) / (draws * (draws - 1))
    assert ((y.mean(0) - mean).abs() <= 5 * (var / draws).sqrt()).all()
    assert ((y.var(0) - var).abs() <= 5 * var_of_var.sqrt() + 1e-12).all()
    # Unbiased: the mean is x itself up to the 2**-32 quantization of the keep probability.
    assert abs(s * q - 1) < 2**-31 / (1 - p)


def _kept_fractions(masks: Tensor) -> Tensor:
    return (masks != 0).double().mean(dim=1)  # (rows,)


def _binomial_ks_pvalue(fractions: Tensor, width: int, keep: float) -> float:
    """KS test of kept counts against Binomial(width, keep), by the randomized probability integral transform.

    For a discrete X, ``F(X - 1) + V P(X)`` with ``V ~ U(0, 1)`` is exactly uniform: the KS test then has its
    nominal level (scipy's ``kstest`` against a discrete cdf does not: every tie counts as a jump).
    """
    counts = (fractions * width).round().numpy()
    binomial = stats.binom(width, keep)
    jitter = torch.rand(len(counts), generator=torch.Generator().manual_seed(5), dtype=torch.float64).numpy()
    return float(stats.kstest(binomial.cdf(counts - 1) + jitter * binomial.pmf(counts), "uniform").pvalue)


def test_kept_fraction_passes_a_ks_test_against_the_binomial_and_against_torchs_dropout() -> None:
    rows, width, p = 4000, 256, 0.3
    ones = torch.ones(rows, width)
    ours = _kept_fractions(threshold_dropout(ones, p, generator=torch.Generator().manual_seed(0)))
    torch.manual_seed(0)
    theirs = _kept_fractions(F.dropout(ones, p, training=True))
    assert _binomial_ks_pvalue(ours, width, 1 - p) > 0.01
    assert stats.ks_2samp(ours.numpy(), theirs.numpy()).pvalue > 0.01
    # The same tests have the power to see a keep probability off by 0.02.
    biased = _kept_fractions(threshold_dropout(ones, p + 0.02, generator=torch.Generator().manual_seed(0)))
    assert _binomial_ks_pvalue(biased, width, 1 - p) < 1e-6
    assert stats.ks_2samp(biased.numpy(), theirs.numpy()).pvalue < 1e-6


def test_every_word_is_uniform_over_32_bits() -> None:
    # `random_()` without a range leaves the top bit of an int64 at 0: every second word would be non-negative.
    words = mc_masks._random_words((100_001,), torch.device("cpu"), torch.Generator().manual_seed(0))
    assert words.dtype == torch.int32
    for half in (words[0::2], words[1::2]):
        negative = float((half < 0).double().mean())
        assert abs(negative - 0.5) < 5 * math.sqrt(0.25 / half.numel())
        assert stats.kstest(half.double().numpy(), stats.uniform(-(2**31), 2**32).cdf).pvalue > 0.01


# --- shapes, dtypes, edge rates -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "shape", "per"),
    [
        (nn.Dropout1d, (64, 16, 5), 2),
        (nn.Dropout1d, (16, 5), 1),  # unbatched (C, L)
        (nn.Dropout2d, (64, 16, 3, 3), 2),
        (nn.Dropout3d, (64, 16, 2, 2, 2), 2),
        (nn.Dropout3d, (16, 2, 2, 2), 1),  # unbatched (C, D, H, W)
    ],
)
def test_channel_wise_layers_drop_whole_channels_like_torch(layer: type[nn.Module], shape: tuple, per: int) -> None:
    torch.manual_seed(0)
    x = torch.rand(*shape) + 0.5  # no zeros of its own
    module = layer(0.5).train()
    with threshold_masks([module]) as replaced:
        assert replaced == [module]
        ours = module(x)
    reference = module(x)  # torch's own, after the block
    for out in (ours, reference):
        kept = out != 0  # every channel all kept or all dropped
        flat = kept.flatten(per)
        assert torch.equal(flat.all(-1), flat.any(-1))
        torch.testing.assert_close(out[kept], (x * 2)[kept])
    channels = ours.flatten(per)[..., 0] != 0
    assert 0.3 < float(channels.float().mean()) < 0.7
    assert not torch.equal(ours, reference)


def test_dropout2d_on_a_3d_input_keeps_torchs_behaviour_and_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_calls(monkeypatch)
    module = nn.Dropout2d(0.5).train()
    with threshold_masks([module]), pytest.warns(UserWarning, match="dropout2d"):
        module(torch.ones(4, 8, 5))
    assert calls == []


@pytest.mark.parametrize("p", [0.1, 0.3, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_kept_values_equal_torchs_in_each_dtype(dtype: torch.dtype, p: float) -> None:
    x = torch.randn(512, 64, dtype=dtype)
    ours = threshold_dropout(x, p, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    theirs = F.dropout(x, p, training=True)
    assert ours.dtype == dtype
    both = (ours != 0) & (theirs != 0)
    assert both.sum() > 0.5 * (1 - p) ** 2 * x.numel()
    assert torch.equal(ours[both], theirs[both])  # torch's order: x * (keep / (1 - p)), rounded in the dtype
    assert abs(float((ours != 0).float().mean()) - (1 - p)) < 0.05


def test_rates_zero_and_one_and_in_place() -> None:
    x = torch.randn(8, 4)
    assert threshold_dropout(x, 0.0) is x
    assert torch.equal(threshold_dropout(x, 1.0), torch.zeros_like(x))
    y = x.clone()
    out = threshold_dropout(y, 0.5, inplace=True, generator=torch.Generator().manual_seed(0))
    assert out is y
    assert torch.equal(out, threshold_dropout(x, 0.5, generator=torch.Generator().manual_seed(0)))


def test_a_seeded_generator_makes_the_mask_reproducible() -> None:
    x = torch.ones(64, 32)
    a, b = (threshold_dropout(x, 0.5, generator=torch.Generator().manual_seed(3)) for _ in range(2))
    c = threshold_dropout(x, 0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match=r"Expected the dropout probability `p` to be a float in \[0, 1\]"):
        threshold_dropout(torch.ones(2), 1.5)
    with pytest.raises(ValueError, match=r"Expected `mask_dims` to be None .* in \[1, 2\]"):
        threshold_dropout(torch.ones(2, 2), 0.5, mask_dims=3)
    with pytest.raises(ValueError, match=r"Expected `masks` to be one of \('auto', 'torch', 'threshold'\)"):
        mc_dropout_predict(nn.Sequential(nn.Dropout(0.5), nn.Linear(4, 2)), torch.ones(2, 4), 2, masks="fast")  # type: ignore[arg-type]


# --- in the sampler -------------------------------------------------------------------------------------------------


class _SkipAroundDropout(nn.Module):
    """Not a Sequential, no forward_features: the torch.fx prefix path; a skip connection around the dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        return self.head(h + self.drop(h))


def _trained(model: nn.Module, inputs: Tensor) -> nn.Module:
    with torch.no_grad():
        model.train()(inputs)  # non-trivial BN statistics
    return model.eval()


@pytest.mark.parametrize(("method", "taken"), [("auto", "cached"), ("batched", "batched"), ("naive", "naive")])
def test_the_sampler_draws_threshold_masks_on_every_path_and_cached_equals_the_loop(
    method: str, taken: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_calls(monkeypatch)
    torch.manual_seed(0)
    inputs = torch.randn(6, 8)
    model = _trained(_SkipAroundDropout(), inputs)

    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(1)

    out = mc_dropout_predict(model, inputs, 5, method=method, chunk_size=6, generator=seeded(), masks="threshold")  # type: ignore[arg-type]
    assert out.method == taken
    assert len(calls) == 5  # one call of the dropout per sample of 6 rows
    naive = mc_dropout_predict(model, inputs, 5, method="naive", generator=seeded(), masks="threshold")
    torch.testing.assert_close(out.probs, naive.probs, rtol=0, atol=1e-6)  # the same draws as the loop
    with_torch = mc_dropout_predict(model, inputs, 5, method=method, chunk_size=6, generator=seeded(), masks="torch")  # type: ignore[arg-type]
    assert len(calls) == 10  # torch's masks: not called
    assert not torch.equal(with_torch.probs, out.probs)


def test_auto_is_threshold_on_the_cpu_from_4096_elements_and_torchs_below(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_calls(monkeypatch)
    model = nn.Sequential(nn.Linear(4, 64), nn.Dropout(0.5), nn.Linear(64, 2)).eval()
    mc_dropout_predict(model, torch.randn(64, 4), 4)  # the head: 4 x 64 rows of 64 features in one call
    assert len(calls) == 1
    mc_dropout_predict(model, torch.randn(3, 4), 4)  # 12 rows x 64: 768 elements, where torch's is faster
    assert len(calls) == 1
    mc_dropout_predict(model, torch.randn(3, 4), 4, masks="threshold")
    assert len(calls) == 2


def test_min_elements_counts_one_samples_share_of_a_call_that_stacks_several(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_calls(monkeypatch)
    module = nn.Dropout(0.5).train()
    with threshold_masks([module], min_elements=64):
        with mc_masks.samples_per_call(4.0):
            module(torch.randn(16, 8))  # 128 elements, 32 a sample: torch's, as a call of one sample takes
            assert len(calls) == 0
            module(torch.randn(64, 8))  # 512 elements, 128 a sample
            assert len(calls) == 1
        with mc_masks.samples_per_call(0.5):
            module(torch.randn(4, 8))  # half a sample's rows: 32 elements, 64 a sample
            assert len(calls) == 2
        module(torch.randn(4, 8))  # outside: one sample a call
        assert len(calls) == 2


@pytest.mark.parametrize("method", ["auto", "batched"])
@pytest.mark.parametrize("batch", [16, 128])  # 1024 and 8192 head elements a sample: torch's and threshold masks
def test_auto_masks_give_the_naive_loops_draws_however_many_samples_a_call_stacks(method: str, batch: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 10)).eval()
    inputs = torch.randn(batch, 8)
    ours = mc_dropout_predict(model, inputs, 30, method=method, generator=torch.Generator().manual_seed(0))  # type: ignore[arg-type]
    assert ours.method == ("cached" if method == "auto" else "batched")  # several samples a call either way
    naive = mc_dropout_predict(model, inputs, 30, method="naive", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours.probs, naive.probs, rtol=0, atol=1e-6)


def test_torchvision_resnet18_prefix_with_threshold_masks_is_the_loop_draw_for_draw() -> None:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=3)
    model.fc = nn.Sequential(nn.Dropout(0.5), model.fc)
    inputs = torch.randn(2, 3, 32, 32)
    model = _trained(model, inputs)
    ours = mc_dropout_predict(model, inputs, 4, generator=torch.Generator().manual_seed(0), masks="threshold")
    naive = mc_dropout_predict(
        model, inputs, 4, method="naive", generator=torch.Generator().manual_seed(0), masks="threshold"
    )
    assert ours.method == "cached"
    torch.testing.assert_close(ours.probs, naive.probs, rtol=0, atol=1e-6)
    assert ours.probs.std(dim=0).max() > 1e-5


def test_large_sample_mean_probabilities_agree_with_torchs_masks() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)).eval()
    inputs = 3 * torch.randn(6, 8)
    n = 4000
    ours = mc_dropout_predict(model, inputs, n, generator=torch.Generator().manual_seed(1), masks="threshold")
    theirs = mc_dropout_predict(model, inputs, n, generator=torch.Generator().manual_seed(2), masks="torch")
    tolerance = 5 * (2 * theirs.probs.var(dim=0) / n).sqrt() + 1e-6  # difference of two independent means
    assert ((ours.mean_probs - theirs.mean_probs).abs() <= tolerance).all()
    assert ((ours.probs.var(0) - theirs.probs.var(0)).abs() <= 0.1 * theirs.probs.var(0) + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_sampler_works_in_each_cpu_dtype(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = _trained(_SkipAroundDropout(), torch.randn(6, 8)).to(dtype)
    inputs = torch.randn(6, 8, dtype=dtype)
    out = mc_dropout_predict(model, inputs, 6, generator=torch.Generator().manual_seed(0), masks="threshold")
    naive = mc_dropout_predict(
        model, inputs, 6, method="naive", generator=torch.Generator().manual_seed(0), masks="threshold"
    )
    assert out.method == "cached"
    assert out.probs.dtype == torch.float32  # probabilities in float32 whatever the logits' dtype
    torch.testing.assert_close(out.probs, naive.probs, rtol=0, atol=1e-6)
    assert out.probs.std(dim=0).max() > 1e-4


def test_alpha_dropout_and_layers_with_their_own_forward_keep_their_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_calls(monkeypatch)
    torch.manual_seed(0)
    locked = LockedDropout(0.5)
    modules = [nn.AlphaDropout(0.5), nn.FeatureAlphaDropout(0.5), locked]
    with threshold_masks(modules) as replaced:
        assert replaced == []
    model = nn.Sequential(nn.Linear(8, 16), nn.SELU(), nn.AlphaDropout(0.5), nn.Linear(16, 3)).eval()
    inputs = torch.randn(5, 8)
    generator = torch.Generator
    ours = mc_dropout_predict(model, inputs, 6, generator=generator().manual_seed(0), masks="threshold")
    theirs = mc_dropout_predict(model, inputs, 6, generator=generator().manual_seed(0), masks="torch")
    assert torch.equal(ours.probs, theirs.probs)
    assert calls == []


class _Boom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
        self.fail = False

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        if self.fail:
            raise KeyError("boom")
        return out


def test_modes_forwards_and_the_global_rng_are_restored_also_when_the_model_raises() -> None:
    torch.manual_seed(0)
    model = _Boom().train()
    model.net[3].eval()
    modes = {name: m.training for name, m in model.named_modules()}
    inputs = torch.randn(4, 8)
    state = torch.get_rng_state()
    for fail in (False, True):
        model.fail = fail
        if fail:
            with pytest.raises(KeyError, match="boom"):
                mc_dropout_predict(model, inputs, 3, generator=torch.Generator().manual_seed(0), masks="threshold")
        else:
            mc_dropout_predict(model, inputs, 3, generator=torch.Generator().manual_seed(0), masks="threshold")
        assert {name: m.training for name, m in model.named_modules()} == modes
        assert not any("forward" in vars(m) for m in model.modules())
        assert torch.equal(torch.get_rng_state(), state)


def test_training_after_sampling_keeps_torchs_dropout() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 3))
    untouched = copy.deepcopy(model)
    inputs = torch.randn(4, 8)
    mc_dropout_predict(model.eval(), inputs, 3, masks="threshold")
    outputs = []
    for net in (model, untouched):
        torch.manual_seed(7)
        outputs.append(net.train()(inputs))
    assert torch.equal(outputs[0], outputs[1])
    torch.manual_seed(7)
    h = F.dropout(model[0](inputs), 0.5, training=True)  # torch's own mask, drawn from the global RNG
    torch.testing.assert_close(outputs[0], model[2](h))


def test_the_words_of_a_row_do_not_depend_on_how_many_rows_are_drawn_together() -> None:
    # 5 words a row (odd): each row takes 3 int64 draws, so 3 calls of 2 rows give the words of 1 call of 6 rows.
    generator = torch.Generator().manual_seed(0)
    together = mc_masks._random_words((6, 5), torch.device("cpu"), torch.Generator().manual_seed(0))
    apart = torch.cat([mc_masks._random_words((2, 5), torch.device("cpu"), generator) for _ in range(3)])
    assert torch.equal(together, apart)


def test_several_samples_per_head_call_give_the_naive_loops_draws_with_an_odd_width() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 7), nn.ReLU(), nn.Dropout(0.5), nn.Linear(7, 3)).eval()
    inputs = torch.randn(5, 8)  # 5 rows x 7 features: odd
    ours = mc_dropout_predict(model, inputs, 6, generator=torch.Generator().manual_seed(0), masks="threshold")
    naive = mc_dropout_predict(
        model, inputs, 6, method="naive", generator=torch.Generator().manual_seed(0), masks="threshold"
    )
    assert ours.method == "cached"  # 30 rows in one head call (fewer than 256)
    torch.testing.assert_close(ours.probs, naive.probs, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("width", "rows_per_call"), [(64, 2048), (512, 256)])
def test_the_cached_head_takes_up_to_2_17_feature_elements_per_call_with_the_loops_draws(
    width: int, rows_per_call: int
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Dropout(0.3), nn.Linear(width, 10)).eval()
    inputs = torch.randn(256, 8)
    rows: list[int] = []
    model[3].register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[0]))
    ours = mc_dropout_predict(model, inputs, 30, generator=torch.Generator().manual_seed(0), masks="threshold")
    assert ours.method == "cached"
    assert rows[0] == rows_per_call  # 2**17 elements of 64 features; 512 features keep one sample of 256 rows
    assert sum(rows) == 30 * 256
    rows.clear()
    naive = mc_dropout_predict(
        model, inputs, 30, method="naive", generator=torch.Generator().manual_seed(0), masks="threshold"
    )
    assert rows == [256] * 30
    torch.testing.assert_close(ours.probs, naive.probs, rtol=0, atol=1e-6)


def _seeded(fn, seed: int = 7) -> Tensor:
    torch.manual_seed(seed)
    return fn()


@pytest.mark.parametrize(
    ("layer", "shape", "mask_dims"),
    [
        (nn.Dropout, (4, 6, 5), None),
        (nn.Dropout1d, (4, 6, 5), 2),
        (nn.Dropout1d, (6, 5), 1),
        (nn.Dropout2d, (4, 6, 5, 5), 2),
        (nn.Dropout3d, (4, 6, 3, 3, 3), 2),
        (nn.Dropout3d, (6, 3, 3, 3), 1),
    ],
)
def test_each_layer_under_threshold_masks_draws_the_functional_mask_of_its_rank(layer, shape, mask_dims) -> None:
    # The words come from the global RNG: the same seed gives threshold_dropout's mask with the layer's mask_dims.
    module, x = layer(0.5).train(), torch.randn(shape)
    with threshold_masks([module]):
        ours = _seeded(lambda: module(x))
    torch.testing.assert_close(ours, _seeded(lambda: threshold_dropout(x, 0.5, mask_dims=mask_dims)), rtol=0, atol=0)


def test_inside_the_block_eval_mode_is_the_identity_and_rates_zero_and_one_are_torchs() -> None:
    x = torch.randn(8, 16)
    module = nn.Dropout(0.5)
    with threshold_masks([module]):
        assert torch.equal(module.eval()(x), x)
        module.train()
        module.p = 0.0
        assert torch.equal(module(x), x)
        module.p = 1.0
        assert torch.equal(module(x), torch.zeros_like(x))


def test_inputs_of_exactly_min_elements_take_threshold_masks_and_in_place_layers_stay_in_place() -> None:
    x = torch.randn(4, 4)
    module = nn.Dropout(0.5, inplace=True).train()
    with threshold_masks([module], min_elements=16):
        y = x.clone()
        ours = _seeded(lambda: module(y))
    assert ours.data_ptr() == y.data_ptr()
    torch.testing.assert_close(ours, _seeded(lambda: threshold_dropout(x, 0.5)), rtol=0, atol=0)


def test_a_tiny_rate_keeps_every_element_and_a_scalar_input_works() -> None:
    # (1 - 1e-12) * 2**32 rounds to 2**32, which is no int32: the threshold is clamped to keep (almost) everything.
    x = torch.randn(1000)
    torch.testing.assert_close(threshold_dropout(x, 1e-12, generator=torch.Generator().manual_seed(0)), x)
    y = threshold_dropout(torch.tensor(3.0), 0.5, generator=torch.Generator().manual_seed(0))
    assert y.shape == ()
    assert float(y) in (0.0, 6.0)


def test_functional_mask_dims_accepts_one_to_ndim_and_drops_whole_channels() -> None:
    x = torch.ones(4, 6, 5, 5)
    g = torch.Generator().manual_seed(0)
    for dims in (1, 2, 3):  # one value per index of the first `dims` dimensions, shared by the rest
        y = threshold_dropout(x, 0.5, mask_dims=dims, generator=g)
        assert torch.equal(y.amax(tuple(range(dims, 4)), keepdim=True).expand_as(y), y)
    assert threshold_dropout(x, 0.5, mask_dims=4, generator=g).shape == x.shape  # ndim itself: elementwise
    channels = threshold_dropout(x, 0.5, mask_dims=2, generator=g)
    assert set(channels.amax((2, 3)).flatten().tolist()) == {0.0, 2.0}
    assert bool((channels.amax((2, 3)) == channels.amin((2, 3))).all())


@pytest.mark.parametrize("inplace", [False, True])
def test_rate_one_gives_zeros_in_place_only_when_asked(inplace: bool) -> None:
    x = torch.randn(5, 3)
    before = x.clone()
    y = threshold_dropout(x, 1.0, inplace=inplace)
    assert torch.equal(y, torch.zeros_like(x))
    assert (y.data_ptr() == x.data_ptr()) is inplace
    assert torch.equal(x, torch.zeros_like(x) if inplace else before)


@pytest.mark.parametrize("kwargs", [{"p": True}, {"p": 0.5, "mask_dims": True}, {"p": 0.5, "mask_dims": 1.0}])
def test_bool_and_float_arguments_where_numbers_or_ints_are_expected_are_refused(kwargs) -> None:
    with pytest.raises(ValueError, match="Expected"):
        threshold_dropout(torch.ones(2, 3), **kwargs)


def test_auto_masks_are_torchs_off_the_cpu() -> None:
    assert mc_masks.resolve_masks("auto", torch.device("meta")) == "torch"
    assert mc_masks.resolve_masks("auto", torch.device("cpu")) == "threshold"


def test_a_rate_whose_float16_scale_overflows_drops_to_zero_as_torch_does() -> None:
    x = torch.ones(100_000, dtype=torch.float16)
    out = threshold_dropout(x, 0.99999, generator=torch.Generator().manual_seed(0))  # 1 / (1 - p) is inf in float16
    assert not out.isnan().any()
    assert int((out == 0).sum()) > 99_990
    assert torch.isinf(out[out != 0]).all()


def test_the_output_keeps_a_channels_last_input_in_channels_last_with_the_same_mask() -> None:
    x = torch.randn(4, 3, 5, 5)
    last = x.to(memory_format=torch.channels_last)
    out = threshold_dropout(last, 0.3, generator=torch.Generator().manual_seed(0))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, threshold_dropout(x, 0.3, generator=torch.Generator().manual_seed(0)))
