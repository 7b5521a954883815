from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest
import timm
import torch
from timm.layers import DropPath
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

import zoo
from lightning_reg import functional as LF
from lightning_reg.functional.mc_dropout import (
    MCDropoutPrediction,
    check_running_statistics,
    mc_dropout_predict,
    mc_dropout_sampling,
    running_statistics,
)
from lightning_reg.nn import LockedDropout, WeightDrop
from tests.helpers import TinyMLP
from tests.helpers.mc import assert_prefix_once_with_the_loops_draws

# --- small models, each with BatchNorm and exactly one kind of dropout -------------------------------


class _Seq(nn.Module):
    """(N, T, F) sequences -> BN over features -> ``layer`` -> mean over time -> logits."""

    def __init__(self, layer: nn.Module, features: int = 8, *, returns_tuple: bool = False) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(features)
        self.layer = layer
        self.returns_tuple = returns_tuple
        self.head = nn.Linear(features, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(x.transpose(1, 2)).transpose(1, 2)
        out = self.layer(x)
        if self.returns_tuple:
            out = out[0]
        return self.head(out.mean(dim=1))


class _Attention(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, dropout=dropout, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


def _conv(drop: nn.Module, dims: int = 2) -> nn.Module:
    conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
    return nn.Sequential(conv(1, 4, 3, padding=1), bn(4), nn.ReLU(), drop, nn.Flatten(), nn.LazyLinear(3))


def _encoder(dropout: float = 0.5) -> nn.Module:
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=dropout, batch_first=True)
    return _Seq(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))


def _vit(attn_drop: float = 0.5) -> nn.Module:
    # Only attention dropout: proves timm's fused-SDPA gate is opened (the attn_drop module never runs there).
    return VisionTransformer(
        img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=1, num_heads=2,
        drop_rate=0.0, proj_drop_rate=0.0, attn_drop_rate=attn_drop,
    )  # fmt: skip


_IMAGES = (4, 1, 8, 8)
_SEQUENCES = (4, 5, 8)

KINDS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "Dropout": (lambda: TinyMLP(batch_norm=True, dropout=0.5), (4, 8)),
    "Dropout1d": (lambda: _Seq(nn.Dropout1d(0.5)), _SEQUENCES),
    "Dropout2d": (lambda: _conv(nn.Dropout2d(0.5)), _IMAGES),
    "Dropout3d": (lambda: _conv(nn.Dropout3d(0.5), dims=3), (4, 1, 4, 4, 4)),
    "AlphaDropout": (lambda: _alpha(), (4, 8)),
    "FeatureAlphaDropout": (lambda: _conv(nn.FeatureAlphaDropout(0.5)), _IMAGES),
    "MultiheadAttention": (lambda: _Seq(_Attention(0.5)), _SEQUENCES),
    "TransformerEncoderLayer": (lambda: _encoder(0.5), _SEQUENCES),
    "LSTM": (lambda: _Seq(nn.LSTM(8, 8, 2, dropout=0.5, batch_first=True), returns_tuple=True), _SEQUENCES),
    "GRU": (lambda: _Seq(nn.GRU(8, 8, 2, dropout=0.5, batch_first=True), returns_tuple=True), _SEQUENCES),
    "RNN": (lambda: _Seq(nn.RNN(8, 8, 2, dropout=0.5, batch_first=True), returns_tuple=True), _SEQUENCES),
    "timm fused Attention": (lambda: _vit(0.5), _IMAGES),
    "timm drop_rate head": (
        lambda: timm.create_model("test_resnet", num_classes=3, in_chans=1, drop_rate=0.5),
        _IMAGES,
    ),
    "LockedDropout": (lambda: _Seq(LockedDropout(0.5)), _SEQUENCES),
    "WeightDrop": (lambda: _Seq(WeightDrop(nn.LSTM(8, 8, batch_first=True), p=0.5), returns_tuple=True), _SEQUENCES),
}


def _alpha() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.SELU(), nn.AlphaDropout(0.5), nn.Linear(16, 3))


def _build(kind: str) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    make, shape = KINDS[kind]
    model = make()
    inputs = torch.randn(*shape)
    model.train()
    with torch.no_grad():
        model(inputs)  # initialize lazy layers and give BN non-trivial running statistics
    return model.eval(), inputs


def _running_stats(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


# --- each kind is reached ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_dropout_kind_is_sampled_under_inference_mode_and_bn_stats_stay(kind: str) -> None:
    model, inputs = _build(kind)
    stats = _running_stats(model)
    with torch.inference_mode():
        out = mc_dropout_predict(model, inputs, 8, generator=torch.Generator().manual_seed(0))
    assert out.probs.std(dim=0).max() > 1e-4, f"{kind}: samples are identical"
    after = _running_stats(model)
    assert stats.keys() == after.keys()
    assert all(torch.equal(stats[k], after[k]) for k in stats)
    assert not any(m.training for m in model.modules())


def test_switching_only_dropout_modules_of_a_transformer_gives_zero_spread_under_inference_mode() -> None:
    # The naive approach (what most MC-dropout snippets do): the encoder's fast path ignores the Dropout modules.
    model, inputs = _build("TransformerEncoderLayer")
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.train()
    with torch.inference_mode():
        naive = torch.stack([model(inputs) for _ in range(4)])
        ours = mc_dropout_predict(model, inputs, 4).probs
    assert naive.std(dim=0).max() == 0
    assert ours.std(dim=0).max() > 1e-4


def test_drop_path_is_sampled_only_when_asked() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), DropPath(0.5), nn.Dropout(0.0), nn.Linear(8, 3)).eval()
    inputs = torch.randn(6, 8)
    with pytest.raises(ValueError, match=r"every dropout layer .* has rate 0.*pass `include_drop_path=True`"):
        mc_dropout_predict(model, inputs, 8)
    with_drop_path = mc_dropout_predict(model, inputs, 8, include_drop_path=True)
    assert with_drop_path.probs.std(dim=0).max() > 1e-4


def test_timm_vit_with_only_drop_path_raises_naming_include_drop_path() -> None:
    # timm builds nn.Dropout(p=0) everywhere by default; only stochastic depth is random.
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=2, num_heads=2, drop_path_rate=0.3
    ).eval()
    inputs = torch.randn(4, 1, 8, 8)
    with pytest.raises(ValueError, match=r"rate 0 .*2 drop-path layers with a rate above 0.*include_drop_path=True"):
        mc_dropout_predict(vit, inputs, 4)
    with pytest.raises(ValueError, match="include_drop_path=True"):
        LF.find_mc_dropout_sites(vit)
    assert mc_dropout_predict(vit, inputs, 4, include_drop_path=True).probs.std(dim=0).max() > 1e-4


def test_torchvision_stochastic_depth_is_drop_path() -> None:
    from torchvision.models import efficientnet_b0
    from torchvision.ops import StochasticDepth

    torch.manual_seed(0)
    model = efficientnet_b0(num_classes=3, dropout=0.0, stochastic_depth_prob=0.2).eval()
    depth = [m for m in model.modules() if isinstance(m, StochasticDepth)]
    assert len(depth) == 16
    # Off by default, with the hint (the first block's rate is 0); on with include_drop_path, all of them.
    with pytest.raises(ValueError, match=r"15 drop-path layers .*StochasticDepth.*include_drop_path=True"):
        LF.find_mc_dropout_sites(model)
    found = LF.find_mc_dropout_sites(model, include_drop_path=True)
    assert set(depth) <= set(found.sites)
    inputs = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        model.train()(inputs)  # non-trivial BN statistics
    model.eval()
    out = mc_dropout_predict(model, inputs, 3, include_drop_path=True, generator=torch.Generator().manual_seed(0))
    assert out.probs.std(dim=0).max() > 1e-6  # small at initialization, but the samples differ


def test_stochastic_depth_in_batch_mode_shares_one_draw_per_call_and_takes_the_naive_loop() -> None:
    from torchvision.ops import StochasticDepth

    torch.manual_seed(0)
    inputs = torch.randn(6, 8)
    for mode, taken in (("row", "cached"), ("batch", "naive")):
        model = nn.Sequential(nn.Linear(8, 8), StochasticDepth(0.5, mode), nn.Linear(8, 3)).eval()
        out = mc_dropout_predict(model, inputs, 8, include_drop_path=True, generator=torch.Generator().manual_seed(0))
        assert out.method == taken
        if mode == "batch":  # one draw per pass: every row of a sample is dropped or kept together
            naive = mc_dropout_predict(
                model, inputs, 8, include_drop_path=True, method="naive", generator=torch.Generator().manual_seed(0)
            )
            assert torch.equal(out.probs, naive.probs)


def test_zoo_cnn_shows_spread_under_inference_mode_and_no_grad() -> None:
    torch.manual_seed(0)
    model = zoo.create("cnn_small", num_classes=10, spatial_dropout=0.1).eval()
    inputs = torch.randn(4, 1, 8, 8)
    for context in (torch.inference_mode, torch.no_grad):
        with context():
            out = mc_dropout_predict(model, inputs, 6)
        assert out.probs.std(dim=0).max() > 1e-4


# Dropout for the zoo models whose defaults have none: the timm backbone's head dropout is off by default.
_ZOO_KWARGS: dict[str, dict[str, object]] = {"resnet18": {"drop_rate": 0.2}}


@pytest.mark.parametrize("name", zoo.list_models())
def test_every_zoo_model_shows_spread_under_inference_mode(name: str) -> None:
    torch.manual_seed(0)
    model = zoo.create(name, num_classes=4, **_ZOO_KWARGS.get(name, {})).eval()
    shapes = {"lstm": (8, 8), "gru": (8, 8), "transformer": (8, 8), "vit_tiny": (3, 32, 32), "resnet18": (3, 32, 32)}
    inputs = torch.randn(2, *shapes.get(name, (1, 8, 8)))
    with torch.inference_mode():
        out = mc_dropout_predict(model, inputs, 4, generator=torch.Generator().manual_seed(0), deterministic=True)
        naive = mc_dropout_predict(model, inputs, 4, generator=torch.Generator().manual_seed(0), method="naive")
        plain = model(inputs).softmax(-1)
    # The cached path (trunk once, head sampled) draws what the reference loop of 4 forward passes draws; the
    # batched one (dropout in the trunk, below 256 rows) only the same distribution (tested on a large sample above).
    assert out.method in ("cached", "batched")
    if out.method == "cached":
        torch.testing.assert_close(out.probs, naive.probs)
    else:
        assert ((naive.probs - plain).abs().amax(-1) > 1e-6).all(), naive.probs
    # ... and the passes are sampled: for every input the samples disagree, and none is the eval-mode output.
    assert (out.probs.std(dim=0).amax(-1) > 1e-4).all(), out.probs
    assert ((out.probs - plain).abs().amax(-1) > 1e-6).all(), out.probs
    torch.testing.assert_close(out.deterministic_probs, plain)


# --- modes, statistics, paths -----------------------------------------------------------------------------


def test_sampling_context_keeps_bn_in_eval_and_restores_every_mode() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    model.train()
    model[3].eval()
    before = {name: m.training for name, m in model.named_modules()}
    with mc_dropout_sampling(model) as found:
        assert found.sites == [model[2]]
        assert [m.training for m in model] == [False, False, True, False]
    assert {name: m.training for name, m in model.named_modules()} == before


def test_sampling_context_restores_modes_when_the_block_raises() -> None:
    model = TinyMLP(batch_norm=True, dropout=0.5).train()
    with pytest.raises(KeyError), mc_dropout_sampling(model):
        raise KeyError("boom")
    assert all(m.training for m in model.modules())


class _SneakyBN(nn.Module):
    """Switches its BatchNorm to training mode inside forward: what corrupts statistics in lightning-uq-box."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyMLP(batch_norm=True, dropout=0.5)

    def forward(self, x: Tensor) -> Tensor:
        self.net.body[1].train()
        return self.net(x)


def test_changed_running_statistics_raise() -> None:
    with pytest.raises(RuntimeError, match="Running statistics changed during Monte-Carlo dropout sampling"):
        mc_dropout_predict(_SneakyBN(), torch.randn(4, 8), 2)


@pytest.mark.parametrize("method", ["auto", "batched", "naive"])
def test_every_dropout_rate_zero_raises_on_every_path(method: str) -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.0), nn.Linear(16, 3)).eval()
    with pytest.raises(ValueError, match=r"every dropout layer of Sequential has rate 0 \(1 layer: `3`\)"):
        mc_dropout_predict(model, torch.randn(5, 8), 4, method=method)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("method", "chunk_size", "taken"),
    [
        ("auto", None, "cached"),
        ("auto", 37, "cached"),
        ("batched", None, "batched"),
        ("batched", 37, "batched"),
        ("batched", 6, "batched"),  # one sample per pass
    ],
)
def test_large_sample_mean_matches_the_naive_loop(method: str, chunk_size: int | None, taken: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)).eval()
    inputs = 3 * torch.randn(6, 8)
    n = 4000
    naive = mc_dropout_predict(model, inputs, n, method="naive", generator=torch.Generator().manual_seed(1))
    ours = mc_dropout_predict(
        model, inputs, n, method=method, chunk_size=chunk_size, generator=torch.Generator().manual_seed(2)
    )  # type: ignore[arg-type]
    assert ours.method == taken
    assert naive.method == "naive"
    # Difference of two independent means: standard error sqrt(2 var / n); 5 standard errors.
    tolerance = 5 * (2 * naive.probs.var(dim=0) / n).sqrt() + 1e-6
    assert ((ours.mean_probs - naive.mean_probs).abs() <= tolerance).all()
    assert not torch.equal(ours.mean_probs, naive.mean_probs)


def test_batched_path_on_batches_of_256_or_more_is_the_naive_loop_draw_for_draw() -> None:
    # From 256 rows on, `chunk_size=None` forwards one sample per pass (larger chunks measured slower on CPU).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)).eval()
    inputs = torch.randn(256, 8)
    naive = mc_dropout_predict(model, inputs, 5, method="naive", generator=torch.Generator().manual_seed(1))
    batched = mc_dropout_predict(model, inputs, 5, method="batched", generator=torch.Generator().manual_seed(1))
    assert batched.method == "batched"
    assert torch.equal(batched.probs, naive.probs)
    assert not torch.equal(batched.probs[0], batched.probs[1])


def test_cached_path_for_head_dropout_batched_when_dropout_is_in_the_trunk() -> None:
    torch.manual_seed(0)
    inputs = torch.randn(4, 1, 8, 8)
    head_only = zoo.create("cnn_small", num_classes=3).eval()
    spatial = zoo.create("cnn_small", num_classes=3, spatial_dropout=0.2).eval()
    assert mc_dropout_predict(head_only, inputs, 3).method == "cached"
    assert mc_dropout_predict(spatial, inputs, 3).method == "batched"
    assert mc_dropout_predict(_vit(0.5), inputs, 3).method == "batched"
    assert mc_dropout_predict(_build("WeightDrop")[0], torch.randn(*_SEQUENCES), 3).method == "naive"


def test_deterministic_probs_are_the_eval_output_on_both_paths() -> None:
    torch.manual_seed(0)
    inputs = torch.randn(4, 1, 8, 8)
    for model in (zoo.create("cnn_small", num_classes=3), zoo.create("cnn_small", num_classes=3, spatial_dropout=0.2)):
        model.eval()
        out = mc_dropout_predict(model, inputs, 3, deterministic=True)
        assert out.deterministic_probs is not None
        torch.testing.assert_close(out.deterministic_probs, model(inputs).softmax(-1))


def _h(*probs: float) -> float:
    return -sum(p * math.log(p) for p in probs if p > 0)


def test_uncertainty_decomposition_in_closed_form() -> None:
    # Samples that disagree completely: the mean is uniform (PE = ln 2), each sample certain (EE = 0): all is MI.
    # Samples that agree: no epistemic part. A mixture of both, row by row.
    probs = torch.tensor(
        [
            [[1.0, 0.0], [0.7, 0.3], [0.9, 0.1]],
            [[0.0, 1.0], [0.7, 0.3], [0.1, 0.9]],
            [[1.0, 0.0], [0.7, 0.3], [0.5, 0.5]],
            [[0.0, 1.0], [0.7, 0.3], [0.5, 0.5]],
        ],
        dtype=torch.float64,
    )  # (S=4, N=3, K=2)
    out = MCDropoutPrediction(probs, method="naive")
    predictive = torch.tensor([math.log(2), _h(0.7, 0.3), math.log(2)], dtype=torch.float64)
    expected = torch.tensor([0.0, _h(0.7, 0.3), (2 * _h(0.9, 0.1) + 2 * math.log(2)) / 4], dtype=torch.float64)
    torch.testing.assert_close(out.mean_probs[:, 0], torch.tensor([0.5, 0.7, 0.5], dtype=torch.float64))
    torch.testing.assert_close(out.predictive_entropy, predictive)
    torch.testing.assert_close(out.expected_entropy, expected)
    torch.testing.assert_close(out.mutual_information, predictive - expected)


def test_uncertainty_of_a_model_with_two_possible_passes_in_closed_form() -> None:
    # x = 1 through Dropout(0.5) and logits (a x, -a x): a pass keeps x (x = 2, probabilities s = softmax(2a, -2a))
    # or drops it (uniform). With k of S passes dropped the mean is (k/S) u + (1 - k/S) s, and
    # EE = (k ln 2 + (S - k) H(s)) / S: the decomposition in closed form for whatever k the generator drew.
    a, n_samples = 1.5, 40
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(1, 2, bias=False)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[a], [-a]]))
    out = mc_dropout_predict(model, torch.ones(1, 1), n_samples, generator=torch.Generator().manual_seed(0))
    kept = torch.tensor([2 * a, -2 * a]).softmax(-1)
    dropped = (out.probs[:, 0] - 0.5).abs().amax(-1) < 1e-7  # (S,)
    for sample, is_dropped in zip(out.probs[:, 0], dropped, strict=True):
        torch.testing.assert_close(sample, torch.full((2,), 0.5) if is_dropped else kept)
    k = int(dropped.sum())
    assert 0 < k < n_samples  # both passes drawn (probability 1 - 2**-39)
    mean = (k * 0.5 + (n_samples - k) * kept) / n_samples
    s0, s1 = float(kept[0]), float(kept[1])
    assert float(out.predictive_entropy) == pytest.approx(_h(float(mean[0]), float(mean[1])), rel=1e-5)
    assert float(out.expected_entropy) == pytest.approx(
        (k * math.log(2) + (n_samples - k) * _h(s0, s1)) / n_samples, rel=1e-5
    )
    assert float(out.mutual_information) == pytest.approx(
        _h(float(mean[0]), float(mean[1])) - (k * math.log(2) + (n_samples - k) * _h(s0, s1)) / n_samples, abs=1e-6
    )


def test_generator_makes_samples_reproducible_and_leaves_the_global_rng_alone() -> None:
    model, inputs = _build("Dropout")
    state = torch.get_rng_state()
    a = mc_dropout_predict(model, inputs, 5, generator=torch.Generator().manual_seed(3))
    b = mc_dropout_predict(model, inputs, 5, generator=torch.Generator().manual_seed(3))
    c = mc_dropout_predict(model, inputs, 5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.probs, b.probs)
    assert not torch.equal(a.probs, c.probs)
    assert torch.equal(torch.get_rng_state(), state)


def test_public_names() -> None:
    assert LF.mc_dropout_predict is mc_dropout_predict
    assert LF.mc_dropout_sampling is mc_dropout_sampling


# --- errors --------------------------------------------------------------------------------------------------


def test_model_without_dropout_raises() -> None:
    with pytest.raises(ValueError, match=r"has no dropout layer.*Add dropout"):
        mc_dropout_predict(TinyMLP(batch_norm=True), torch.randn(2, 8), 3)


def test_model_with_only_drop_path_raises_with_a_hint() -> None:
    with pytest.raises(ValueError, match="include_drop_path=True"):
        mc_dropout_predict(nn.Sequential(nn.Linear(8, 3), DropPath(0.2)), torch.randn(2, 8), 3)


@pytest.mark.parametrize("n_samples", [0, -1, 2.0, True])
def test_bad_n_samples_raise(n_samples: object) -> None:
    with pytest.raises(ValueError, match="Expected `n_samples` to be an int >= 1"):
        mc_dropout_predict(TinyMLP(dropout=0.5), torch.randn(2, 8), n_samples)  # type: ignore[arg-type]


@pytest.mark.parametrize("chunk_size", [0, -4, 1.5])
def test_bad_chunk_size_raises(chunk_size: object) -> None:
    with pytest.raises(ValueError, match=r"Expected `chunk_size` to be None .* or an int >= 1"):
        mc_dropout_predict(TinyMLP(dropout=0.5), torch.randn(2, 8), 3, chunk_size=chunk_size)  # type: ignore[arg-type]


def test_bad_method_and_inputs_and_outputs_raise() -> None:
    model = TinyMLP(dropout=0.5)
    with pytest.raises(ValueError, match="Expected `method` to be one of"):
        mc_dropout_predict(model, torch.randn(2, 8), 3, method="loop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Expected `inputs` to hold a non-empty tensor"):
        mc_dropout_predict(model, torch.randn(0, 8), 3)
    with pytest.raises(ValueError, match=r"Expected the model to return logits of shape \(6, num_classes\)"):
        mc_dropout_predict(nn.Sequential(nn.Dropout(0.5), nn.Unflatten(1, (2, 4))), torch.randn(2, 8), 3)


# --- layers that mix rows in eval mode, (N, 1) logits, NaN statistics, MPS, forward inputs --------------------


def _batch_stat_bn(where: str) -> nn.Module:
    """A BatchNorm that normalizes with the batch's statistics in eval mode, after (head) or around (trunk) dropout."""
    bn = nn.BatchNorm1d(16, track_running_stats=False)
    if where == "head":  # a Sequential: split before the dropout, so the cached path samples the head with the BN
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 16), bn, nn.Linear(16, 3))
    return nn.Sequential(nn.Dropout(0.5), nn.Linear(8, 16), bn, nn.Linear(16, 3))  # no split: dropout comes first


@pytest.mark.parametrize(("where", "taken"), [("head", "cached"), ("trunk", "naive")])
def test_batch_statistics_in_eval_are_sampled_as_the_naive_loop_draw_for_draw(where: str, taken: str) -> None:
    torch.manual_seed(0)
    model = _batch_stat_bn(where).eval()
    inputs = torch.randn(6, 8)
    naive = mc_dropout_predict(model, inputs, 20, method="naive", generator=torch.Generator().manual_seed(1))
    ours = mc_dropout_predict(model, inputs, 20, generator=torch.Generator().manual_seed(1), deterministic=True)
    assert ours.method == taken
    # Each pass sees exactly the 6 rows the naive loop sees: the same draws give the same probabilities.
    torch.testing.assert_close(ours.probs, naive.probs, rtol=0, atol=1e-6)
    assert ours.deterministic_probs is not None
    torch.testing.assert_close(ours.deterministic_probs, model(inputs).softmax(-1))


def test_a_frozen_batch_norm_keeps_its_running_statistics_and_the_batched_path() -> None:
    # Lightning's BaseFinetuning.freeze sets track_running_stats=False but keeps the buffers: eval uses them.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 3)).eval()
    model[2].track_running_stats = False
    assert mc_dropout_predict(model, torch.randn(6, 8), 4).method == "batched"


def test_a_layer_of_your_own_that_mixes_rows_opts_in() -> None:
    class BatchCentering(nn.Module):
        mc_dropout_mixes_rows = True

        def forward(self, x: Tensor) -> Tensor:
            return x - x.mean(dim=0, keepdim=True)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), BatchCentering(), nn.Linear(16, 3)).eval()
    inputs = torch.randn(6, 8)
    naive = mc_dropout_predict(model, inputs, 10, method="naive", generator=torch.Generator().manual_seed(1))
    ours = mc_dropout_predict(model, inputs, 10, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours.probs, naive.probs, rtol=0, atol=1e-6)


def test_a_single_logit_per_row_raises_and_names_the_two_logit_fix() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    for method in ("auto", "batched", "naive"):
        with pytest.raises(ValueError, match=r"got shape \(\d+, 1\).*torch.cat\(\[torch.zeros_like\(z\), z\], dim=1\)"):
            mc_dropout_predict(model, torch.randn(4, 8), 3, method=method)  # type: ignore[arg-type]
    # The fix the message names: softmax of [0, z] is [1 - sigmoid(z), sigmoid(z)].
    z = torch.randn(4, 1)
    torch.testing.assert_close(torch.cat([torch.zeros_like(z), z], 1).softmax(1)[:, 1:], z.sigmoid())


def test_nan_running_statistics_are_not_a_change_and_are_reported_as_nan() -> None:
    torch.manual_seed(0)
    model = TinyMLP(batch_norm=True, dropout=0.5).eval()
    model.body[1].running_var[0] = float("nan")  # what fp16 overflow leaves behind under precision="16-true"
    with pytest.warns(RuntimeWarning, match=r"Running statistics of TinyMLP are NaN: \['body.1.running_var'\]"):
        out = mc_dropout_predict(model, torch.randn(4, 8), 3)
    assert out.probs.isnan().any()


def test_check_running_statistics_compares_nan_with_nan_and_still_sees_changes() -> None:
    bn = nn.BatchNorm1d(3)
    bn.running_mean[0] = float("nan")
    from lightning_reg.functional.mc_dropout import check_running_statistics, running_statistics

    before = running_statistics(bn)
    with pytest.warns(RuntimeWarning, match="NaN"):
        check_running_statistics(bn, before, during="a test")
    bn.running_mean[1] = 5.0
    with pytest.raises(RuntimeError, match=r"changed during a test: \['running_mean'\]"):
        check_running_statistics(bn, before, during="a test")


def _two_batch_norms() -> nn.Module:
    return nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda m: m[1].running_var.add_(1e-6), "1.running_var"),  # one float among several of one dtype
        (lambda m: m[0].num_batches_tracked.add_(1), "0.num_batches_tracked"),  # an int64 buffer
        (lambda m: setattr(m[1], "running_mean", torch.zeros(4)), "1.running_mean"),  # another shape
        (lambda m: setattr(m[0], "running_mean", None), "0.running_mean"),  # a buffer that vanished
    ],
    ids=["value", "count", "shape", "vanished"],
)
def test_check_running_statistics_names_exactly_the_buffer_that_changed(change, named) -> None:
    model = _two_batch_norms()
    before = running_statistics(model)
    change(model)
    with pytest.raises(RuntimeError, match=rf"changed during a test: \['{re.escape(named)}'\]\."):
        check_running_statistics(model, before, during="a test")


def test_check_running_statistics_accepts_the_same_values_in_another_dtype() -> None:
    model = _two_batch_norms()
    before = running_statistics(model)
    model.double()  # the values are unchanged
    check_running_statistics(model, before, during="a test")


class _RecordsModes(nn.Module):
    """A user's module with its own ``train`` and ``__setattr__``, as some freeze layers in ``train``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 3))
        self.calls: list[object] = []

    def train(self, mode: bool = True) -> _RecordsModes:
        self.calls.append(("train", mode))
        return super().train(mode)

    def __setattr__(self, name: str, value: object) -> None:
        if name == "training" and "calls" in self.__dict__:
            self.calls.append(("training", value))
        super().__setattr__(name, value)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def test_sampling_calls_a_modules_own_train_and_setattr_and_restores_every_mode() -> None:
    model = _RecordsModes().train()
    model.calls.clear()
    with mc_dropout_sampling(model, check_statistics=False):
        assert [m.training for m in model.modules()] == [False, False, False, True, False]
    assert model.calls[0] == ("train", False)  # its own train() put it in eval mode
    assert model.calls[-1] == ("training", True)  # its own __setattr__ restored its mode
    assert all(m.training for m in model.modules())


def test_generator_on_mps_uses_the_mps_rng_functions(monkeypatch: pytest.MonkeyPatch) -> None:
    # No MPS here: record what `_rng_from` asks of torch.mps (which has no `device` or `current_device`).
    from lightning_reg.functional.mc_dropout import _rng_from

    calls: list[tuple[str, object]] = []
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: calls.append(("get", None)) or torch.tensor([7]))
    monkeypatch.setattr(torch.mps, "manual_seed", lambda seed: calls.append(("seed", seed)))
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda state: calls.append(("set", int(state))))
    cpu_state = torch.get_rng_state()
    with _rng_from(torch.Generator().manual_seed(0), torch.device("mps")):
        torch.rand(3)  # the CPU RNG is forked too
    assert [c[0] for c in calls] == ["get", "seed", "set"]
    assert calls[2] == ("set", 7)
    assert torch.equal(torch.get_rng_state(), cpu_state)
    expected_seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(0)))
    assert calls[1] == ("seed", expected_seed)


class _Masked(nn.Module):
    """``forward(x, mask)``: mean over the unmasked steps; a model that needs its second argument."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor, mask: Tensor, *, scale: Tensor | None = None) -> Tensor:
        h = self.drop(self.proj(x)) * mask[..., None]  # (N, T, 8)
        h = h.sum(1) / mask.sum(1, keepdim=True)
        return self.head(h if scale is None else h * scale)


def test_forward_inputs_repeat_every_batched_argument_and_pass_shared_ones_as_they_are() -> None:
    from lightning_reg.forward import ForwardInputs

    torch.manual_seed(0)
    model = _Masked().eval()
    x, mask = torch.randn(4, 6, 8), (torch.arange(6)[None] < torch.tensor([6, 3, 2, 1])[:, None]).float()
    inputs = ForwardInputs((x, mask), {"scale": torch.tensor(2.0)})  # the scalar is shared, not repeated
    generator = torch.Generator
    naive = mc_dropout_predict(model, inputs, 5, method="naive", generator=generator().manual_seed(1))
    per_sample = mc_dropout_predict(
        model, inputs, 5, method="batched", chunk_size=4, generator=generator().manual_seed(1)
    )
    assert torch.equal(per_sample.probs, naive.probs)
    batched = mc_dropout_predict(model, inputs, 5, method="batched", deterministic=True)  # 20 rows in one pass
    assert batched.method == "batched"
    assert batched.probs.shape == (5, 4, 3)
    assert batched.deterministic_probs is not None
    torch.testing.assert_close(batched.deterministic_probs, model(x, mask, scale=torch.tensor(2.0)).softmax(-1))
    # A function of the model is sampled with the naive loop, draw for draw.
    opaque = mc_dropout_predict(
        model, lambda m: m(x, mask, scale=torch.tensor(2.0)), 5, generator=generator().manual_seed(1)
    )
    assert opaque.method == "naive"
    assert torch.equal(opaque.probs, naive.probs)


# --- the deterministic prefix of any traceable module, once (issue 19) ---------------------------------------------


class _SkipAroundDropout(nn.Module):
    """No forward_features, not a Sequential: a skip connection around the dropout reads the prefix twice."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.branch = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        return self.head(h + self.drop(self.branch(h)))


class _InPlaceOnThePrefix(_SkipAroundDropout):
    """The stochastic part adds into a prefix value in place: each sample must start from the prefix's value."""

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        h.add_(self.drop(self.branch(h)))  # (torch.fx records `h += ...` as an out-of-place add; `add_` stays)
        return self.head(h)


class _TimmBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = timm.create_model("test_resnet", num_classes=0, in_chans=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.LazyLinear(3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(self.backbone(x)))


def _resnet18_head_dropout() -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(num_classes=3)
    model.fc = nn.Sequential(nn.Dropout(0.5), model.fc)
    return model


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (_resnet18_head_dropout, (3, 3, 32, 32)),
        (_SkipAroundDropout, (6, 8)),
        (_TimmBackbone, (3, 1, 16, 16)),
    ],
    ids=["torchvision resnet18", "skip connection", "timm backbone"],
)
def test_any_traceable_module_runs_its_deterministic_prefix_once_with_the_naive_loops_draws(
    make: Callable[[], nn.Module], shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    model = make()
    with torch.no_grad():
        model.train()(torch.randn(*shape))  # lazy layers, BN statistics
    model.eval()
    assert_prefix_once_with_the_loops_draws(model, shape)


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj, self.drop, self.head = nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x)
        if h.sum() > 0:  # control flow on a tensor: torch.fx cannot trace it
            h = -h
        return self.head(self.drop(h))


def test_an_untraceable_module_falls_back_with_the_reason_logged(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = _DataDependent().eval()
    with caplog.at_level("DEBUG", logger="lightning_reg.functional.mc_dropout"):
        out = mc_dropout_predict(model, torch.randn(4, 8), 5)
    assert out.method == "batched"
    assert "torch.fx could not trace _DataDependent" in caplog.text
    # A sampled value added in place into a prefix value: the graph does not show the dependence, so no prefix.
    caplog.clear()
    with caplog.at_level("DEBUG", logger="lightning_reg.functional.mc_dropout"):
        out = mc_dropout_predict(_InPlaceOnThePrefix().eval(), torch.randn(6, 8), 5)
    assert out.method == "batched"
    assert "the in-place operation `add_` changes `body_2`, which the sampled part reads" in caplog.text


@pytest.mark.parametrize("num_classes", [2, 10, 15, 16, 40])
def test_probabilities_are_torch_softmax_of_the_logits_for_any_number_of_classes(num_classes: int) -> None:
    # Few classes take another softmax layout on the CPU (faster there); the values must be torch's softmax.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, num_classes))
    inputs = torch.randn(6, 4) * 3
    out = mc_dropout_predict(model, inputs, 3, deterministic=True, generator=torch.Generator().manual_seed(0))
    naive = mc_dropout_predict(model, inputs, 3, method="naive", generator=torch.Generator().manual_seed(0))
    assert out.probs.shape == (3, 6, num_classes)
    assert out.probs.is_contiguous()
    torch.testing.assert_close(out.deterministic_probs, model.eval()(inputs).softmax(-1))
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(3, 6))
    torch.testing.assert_close(out.probs, naive.probs)


def test_whole_copies_of_the_batch_are_the_rows_an_index_would_gather() -> None:
    from lightning_reg.forward import ForwardInputs
    from lightning_reg.functional.mc_dropout import _repeat_rows, _take_rows

    x, lengths, causal = torch.randn(4, 3, 2), torch.tensor([3, 1, 2, 2]), torch.ones(3, 3)
    inputs = ForwardInputs((x.transpose(1, 2), lengths), {"causal": causal, "scale": 2.0})
    stacked = _repeat_rows(inputs, 3, 4)
    gathered = _take_rows(inputs, torch.arange(12) % 4, 4)
    assert torch.equal(stacked.args[0], gathered.args[0])
    assert stacked.args[0].shape == (12, 2, 3)
    assert torch.equal(stacked.args[1], gathered.args[1])
    assert stacked.kwargs["causal"] is causal
    assert stacked.kwargs["scale"] == 2.0


def test_a_sparse_batch_argument_is_stacked_by_an_index() -> None:
    from lightning_reg.forward import ForwardInputs
    from lightning_reg.functional.mc_dropout import _repeat_rows

    dense = torch.randn(4, 3).relu()
    stacked = _repeat_rows(ForwardInputs((dense.to_sparse(),), {}), 2, 4).args[0]
    assert stacked.layout == torch.sparse_coo
    assert torch.equal(stacked.to_dense(), dense.repeat(2, 1))


@pytest.mark.parametrize("n", [300, 8])
def test_an_in_place_head_dropout_sees_the_cached_features_as_computed_in_every_sample(n: int) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 512), nn.ReLU(), nn.Dropout(0.5, inplace=True), nn.Linear(512, 3))
    x = torch.randn(n, 16)
    naive = mc_dropout_predict(net, x, 5, generator=torch.Generator().manual_seed(0), method="naive")
    cached = mc_dropout_predict(net, x, 5, generator=torch.Generator().manual_seed(0), chunk_size=n, deterministic=True)
    assert cached.method == "cached"
    torch.testing.assert_close(cached.probs, naive.probs)  # one sample per call: the loop's very draws
    torch.testing.assert_close(cached.deterministic_probs, net.eval()(x).softmax(-1))


@pytest.mark.parametrize("n_samples", [1, 3, 5])
def test_a_call_of_one_copy_of_the_batch_gets_its_own_copy(n_samples: int) -> None:
    # batch 128 of 1024 features: two samples per head call by default, so an odd count ends on one copy
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 1024), nn.ReLU(), nn.Dropout(0.5, inplace=True), nn.Linear(1024, 3))
    x = torch.randn(128, 16)
    out = mc_dropout_predict(net, x, n_samples, generator=torch.Generator().manual_seed(0), deterministic=True)
    assert out.method == "cached"
    torch.testing.assert_close(out.deterministic_probs, net.eval()(x).softmax(-1))


class _DoublesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop, self.fc = nn.Dropout(0.5), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(x.mul_(2)))


@pytest.mark.parametrize(("n_samples", "chunk_size"), [(1, None), (3, 14)])
def test_the_batched_path_never_writes_into_the_callers_batch(n_samples: int, chunk_size: int | None) -> None:
    x = torch.randn(7, 4)
    before = x.clone()
    out = mc_dropout_predict(
        _DoublesItsInput(), x, n_samples, generator=torch.Generator().manual_seed(0), chunk_size=chunk_size,
        method="batched",
    )  # fmt: skip
    assert out.method == "batched"
    assert torch.equal(x, before)


class _SparseInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w, self.drop, self.fc = nn.Parameter(torch.randn(6, 8)), nn.Dropout(0.5), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(x @ self.w if x.layout == torch.strided else torch.sparse.mm(x, self.w)))


@pytest.mark.parametrize("layout", ["to_sparse", "to_sparse_csr", "to_sparse_csc"])
@pytest.mark.parametrize("chunk_size", [10, 13])  # whole copies of the batch, and a chunk that is not
def test_a_sparse_input_of_any_layout_is_sampled_as_its_dense_twin(layout: str, chunk_size: int) -> None:
    torch.manual_seed(0)
    model, dense = _SparseInput(), torch.randn(5, 6).relu()
    sparse = getattr(dense, layout)()

    def probs(x: Tensor) -> Tensor:
        out = mc_dropout_predict(
            model, x, 4, generator=torch.Generator().manual_seed(0), method="batched", chunk_size=chunk_size
        )
        return out.probs

    torch.testing.assert_close(probs(sparse), probs(dense))
