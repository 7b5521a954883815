"""The deterministic prefix run once (issue 19): timm models, traced graphs that must follow flags and hooks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from lightning_reg.functional.mc_dropout import MCDropoutPrediction, mc_dropout_predict
from tests.helpers.mc import assert_prefix_once_with_the_loops_draws


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _timm_resnet() -> nn.Module:
    # timm's own head dropout: `F.dropout(x, self.drop_rate, self.training)` in `forward_head`.
    return timm.create_model("test_resnet", num_classes=3, in_chans=1, drop_rate=0.5)


def _timm_vit() -> nn.Module:
    # `drop_rate` is the head's `nn.Dropout` only (pos_drop_rate, proj_drop_rate, attn_drop_rate stay 0).
    return VisionTransformer(
        img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=1, num_heads=2, drop_rate=0.5
    )


@pytest.mark.parametrize("make", [_timm_resnet, _timm_vit], ids=["timm test_resnet", "timm vit"])
@pytest.mark.parametrize("masks", ["torch", "threshold"])
def test_a_timm_model_samples_its_head_once_per_sample_with_the_naive_loops_draws(
    make: Callable[[], nn.Module], masks: str
) -> None:
    torch.manual_seed(0)
    model = make()
    with torch.no_grad():
        model.train()(torch.randn(4, 1, 8, 8))
    model.eval()
    # Threshold masks: the default, 6 samples of 4 rows in one head call, with the loop's words. torch's masks (one
    # seed per call) give the loop's draws one sample per call: what batches of 256 rows or more take.
    chunk_size = 4 if masks == "torch" else None
    assert_prefix_once_with_the_loops_draws(model, (4, 1, 8, 8), masks=masks, chunk_size=chunk_size)


class _Flagged(nn.Module):
    """A plain attribute decides the computation: torch.fx bakes its value into the graph when it traces."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.drop, self.head = nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 3)
        self.negate = False

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        if self.negate:
            h = -h
        return self.head(self.drop(h))


def test_the_traced_graph_follows_a_changed_attribute() -> None:
    torch.manual_seed(0)
    model = _Flagged().eval()
    inputs = torch.randn(5, 8)
    for negate in (False, True, False):
        model.negate = negate
        ours = mc_dropout_predict(model, inputs, 4, generator=_seeded())
        naive = mc_dropout_predict(model, inputs, 4, method="naive", generator=_seeded())
        assert ours.method == "cached"
        torch.testing.assert_close(ours.probs, naive.probs, rtol=0, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(
                mc_dropout_predict(model, inputs, 1, deterministic=True).deterministic_probs,
                model(inputs).softmax(-1),
            )


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x).relu()


class _WithBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block, self.drop, self.head = _Block(), nn.Dropout(0.5), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(self.block(x)))


def test_a_hook_on_a_module_fx_traces_through_refuses_the_split_and_a_hook_on_a_leaf_is_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    torch.manual_seed(0)
    model = _WithBlock().eval()
    inputs = torch.randn(5, 8)
    mc_dropout_predict(model, inputs, 2)  # traced and cached before the hook exists
    handle = model.block.register_forward_hook(lambda module, args, out: out * 3)
    with caplog.at_level("DEBUG", logger="lightning_reg.functional.mc_dropout"):
        ours = mc_dropout_predict(model, inputs, 4, generator=_seeded())
    assert ours.method == "batched"
    assert "`block` has forward hooks, which torch.fx drops" in caplog.text
    naive = mc_dropout_predict(model, inputs, 4, method="naive", generator=_seeded())
    torch.testing.assert_close(ours.probs, naive.probs, rtol=0, atol=1e-6)  # the hook is applied
    handle.remove()
    # A hook on a module the graph calls (a torch.nn leaf) runs in the traced prefix: the split stays.
    leaf = model.block.linear.register_forward_hook(lambda module, args, out: out * 3)
    ours = mc_dropout_predict(model, inputs, 4, generator=_seeded())
    naive = mc_dropout_predict(model, inputs, 4, method="naive", generator=_seeded())
    assert ours.method == "cached"
    torch.testing.assert_close(ours.probs, naive.probs, rtol=0, atol=1e-6)
    leaf.remove()


# --- in-place operations on the values the sampled part reads, and the reasons for no prefix --------------------


class _Prefixed(nn.Module):
    """``body`` is the deterministic prefix; ``sampled(h)`` is what each subclass does after it."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.drop, self.head = nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.sampled(self.body(x))

    def sampled(self, h: Tensor) -> Tensor:
        return self.head(self.drop(h))


def _sampled_as_the_loop(
    make: Callable[[], nn.Module], caplog: pytest.LogCaptureFixture
) -> tuple[MCDropoutPrediction, list[str]]:
    """5 samples of 6 rows, one sample per pass, checked to be the naive loop's draws; and the logged reasons for no
    deterministic prefix."""
    torch.manual_seed(0)
    model = make().eval()
    inputs = torch.randn(6, 8)
    with caplog.at_level("DEBUG", logger="lightning_reg.functional.mc_dropout"):
        ours = mc_dropout_predict(model, inputs, 5, generator=_seeded(), chunk_size=6)
    naive = mc_dropout_predict(model, inputs, 5, method="naive", generator=_seeded())
    torch.testing.assert_close(ours.probs, naive.probs, rtol=0, atol=1e-6)
    return ours, [r.getMessage() for r in caplog.records if "no deterministic prefix" in r.getMessage()]


class _ReluInPlaceAfterTheDraw(_Prefixed):
    def sampled(self, h: Tensor) -> Tensor:
        d = self.drop(h)
        return self.head(d + torch.nn.functional.relu(h, inplace=True))  # changes the dropout's input afterwards


class _InPlaceModuleAfterTheDraw(_Prefixed):
    def sampled(self, h: Tensor) -> Tensor:
        d = self.drop(h)
        return self.head(d + self.act(h))


class _InPlaceOnAViewOfAView(_Prefixed):
    def sampled(self, h: Tensor) -> Tensor:
        d = self.drop(h)
        h.view(-1, 8)[:, :4].mul_(2)  # a view of a view of the dropout's input: its memory
        return self.head(d + h)


class _InPlaceOnACopy(_Prefixed):
    def sampled(self, h: Tensor) -> Tensor:
        d = self.drop(h)
        c = h * 1  # new memory: changing it leaves the dropout's input alone
        c.mul_(2)
        return self.head(d + (c + 1))


class _SetItemAfterTheDraw(_Prefixed):
    def sampled(self, h: Tensor) -> Tensor:
        d = self.drop(h)
        h[:, 0] = 0.0  # torch.fx cannot trace an assignment to a proxy's items
        return self.head(d + h)


class _InPlaceBeforeTheDraw(_Prefixed):
    def sampled(self, h: Tensor) -> Tensor:
        h = torch.nn.functional.relu(h, inplace=True)  # inside the prefix, before anything reads it
        return self.head(self.drop(h))


@pytest.mark.parametrize(
    ("make", "taken", "reason"),
    [
        (
            _ReluInPlaceAfterTheDraw,
            "batched",
            "the in-place operation `relu` changes `body`, which the sampled part reads",
        ),
        (
            _InPlaceModuleAfterTheDraw,
            "batched",
            "the in-place operation `act` changes `body`, which the sampled part reads",
        ),
        (
            _InPlaceOnAViewOfAView,
            "batched",
            "the in-place operation `mul_` changes `getitem`, which the sampled part reads",
        ),
        (
            _SetItemAfterTheDraw,
            "batched",
            "torch.fx could not trace _SetItemAfterTheDraw "
            "(TypeError: 'Proxy' object does not support item assignment)",
        ),
        (_InPlaceOnACopy, "cached", None),
        (_InPlaceBeforeTheDraw, "cached", None),
    ],
    ids=["F.relu(inplace=True)", "nn.ReLU(inplace=True)", "view of a view", "setitem", "a copy", "before the draw"],
)
def test_an_in_place_change_of_what_the_sampled_part_reads_refuses_the_prefix_and_the_draws_stay_the_loops(
    make: Callable[[], nn.Module], taken: str, reason: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    ours, logged = _sampled_as_the_loop(make, caplog)
    assert ours.method == taken
    assert ours.probs.std(dim=0).max() > 1e-4
    expected = [] if reason is None else [f"Monte-Carlo dropout: no deterministic prefix for {make.__name__}: {reason}"]
    assert logged == expected


class _UnusedDropout(_Prefixed):
    def sampled(self, h: Tensor) -> Tensor:
        return self.head(h)  # `drop` exists and is never called


class _DropsTheInput(_Prefixed):
    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(self.drop(x)))


class _DropsAWeight(_Prefixed):
    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.linear(x, self.drop(self.body.weight))


def _with_instance_forward() -> nn.Module:
    model = _Prefixed()
    forward = model.forward
    model.forward = lambda x: forward(x) / 2.0  # what TemperatureScaling does to a model
    return model


def _with_a_root_hook() -> nn.Module:
    model = _Prefixed()
    model.register_forward_hook(lambda module, args, out: out * 2.0)
    return model


def _with_a_root_pre_hook() -> nn.Module:
    model = _Prefixed()
    model.register_forward_pre_hook(lambda module, args: (args[0] * 2.0,))
    return model


_ROOT = "_Prefixed has an instance-level `forward` or forward hooks, which torch.fx does not trace"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_UnusedDropout, "_UnusedDropout: no sampled dropout in the traced graph"),
        (
            _DropsTheInput,
            "_DropsTheInput: the first sampled node, `drop` (Dropout), reads the inputs directly: nothing to run once",
        ),
        (
            _DropsAWeight,
            "_DropsAWeight: the first sampled node, `drop` (Dropout), reads the inputs directly: nothing to run once",
        ),
        (_with_instance_forward, f"_Prefixed: {_ROOT}"),
        (_with_a_root_hook, f"_Prefixed: {_ROOT}"),
        (_with_a_root_pre_hook, f"_Prefixed: {_ROOT}"),
    ],
    ids=["unused dropout", "dropout of the input", "dropout of a weight", "instance forward", "hook", "pre-hook"],
)
def test_each_reason_for_no_prefix_is_logged_and_the_model_is_still_sampled_as_the_loop(
    make: Callable[[], nn.Module], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    ours, logged = _sampled_as_the_loop(make, caplog)
    assert ours.method == "batched"
    assert logged == [f"Monte-Carlo dropout: no deterministic prefix for {reason}"]


class _MethodCopy(_Prefixed):
    def sampled(self, h: Tensor) -> Tensor:
        d = self.drop(h)
        c = h.mul(1)  # a method that returns new memory, not a view
        c.mul_(2)
        return self.head(d + (c + 1))


class _NoiseAfterTheDraw(_Prefixed):
    def sampled(self, h: Tensor) -> Tensor:
        return self.head(self.drop(h)) + 0.1 * torch.randn_like(h[:, :3])  # drawn per pass: no prefix value


class _DropoutInABlock(_Prefixed):
    """The dropout sits inside a block with the layers before it: fx traces into the block."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.5))
        del self.drop, self.body

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(x))


class _EncoderLayerInTheHead(_Prefixed):
    """A transformer layer (a gate) after the prefix: one leaf of the graph, sampled whole."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.5, batch_first=True)
        del self.drop

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.body(x)[:, None])[:, 0])


@pytest.mark.parametrize(
    "make", [_MethodCopy, _NoiseAfterTheDraw, _DropoutInABlock, _EncoderLayerInTheHead],
    ids=["method copy", "noise after the draw", "dropout in a block", "encoder layer"],
)  # fmt: skip
def test_the_prefix_is_taken_through_blocks_gates_and_copies_and_random_functions_stay_per_sample(
    make: Callable[[], nn.Module],
) -> None:
    torch.manual_seed(0)
    model = make().eval()
    inputs = torch.randn(6, 8)
    calls: list[int] = []
    first = model.block[0] if isinstance(model, _DropoutInABlock) else model.body  # the layer that runs first
    handle = first.register_forward_hook(lambda *_: calls.append(1))
    ours = mc_dropout_predict(model, inputs, 5, generator=_seeded(), chunk_size=6)
    handle.remove()
    naive = mc_dropout_predict(model, inputs, 5, method="naive", generator=_seeded())
    assert ours.method == "cached"
    assert len(calls) == 1
    torch.testing.assert_close(ours.probs, naive.probs, rtol=0, atol=1e-6)
    assert ours.probs.std(dim=0).max() > 1e-4


def test_a_submodule_replaced_between_calls_is_traced_again() -> None:
    torch.manual_seed(0)
    model = _Prefixed().eval()
    inputs = torch.randn(6, 8)
    mc_dropout_predict(model, inputs, 2)  # traced with the first head
    model.head = nn.Linear(8, 3)  # the same class and attributes, other weights
    ours = mc_dropout_predict(model, inputs, 4, generator=_seeded(), chunk_size=6)
    naive = mc_dropout_predict(model, inputs, 4, method="naive", generator=_seeded())
    assert ours.method == "cached"
    torch.testing.assert_close(ours.probs, naive.probs, rtol=0, atol=1e-6)


class _FeaturesOnly(_Prefixed):
    def forward_features(self, x: Tensor) -> Tensor:  # no forward_head: not the timm convention
        return self.body(x)


class _OwnTrain(_Prefixed):
    """Overrides ``train``: the eval pass of ``deterministic=True`` goes through it."""

    def train(self, mode: bool = True) -> _OwnTrain:
        return super().train(mode)


@pytest.mark.parametrize("method", ["auto", "batched", "naive"])
@pytest.mark.parametrize("make", [_FeaturesOnly, _OwnTrain], ids=["forward_features only", "own train"])
def test_user_modules_with_features_only_or_their_own_train_give_the_eval_output(
    make: Callable[[], nn.Module], method: str
) -> None:
    torch.manual_seed(0)
    model = make().eval()
    inputs = torch.randn(6, 8)
    ours = mc_dropout_predict(model, inputs, 3, method=method, deterministic=True)  # type: ignore[arg-type]
    assert ours.method == ("cached" if method == "auto" else method)
    assert ours.deterministic_probs is not None
    torch.testing.assert_close(ours.deterministic_probs, model(inputs).softmax(-1))


class _ScalarPerRow(nn.Module):
    """Token ids ``(N,)`` in; ``forward_features`` gives one value per row ``(N,)``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.drop, self.head = nn.Embedding(10, 1), nn.Dropout(0.5), nn.Linear(1, 3)

    def forward_features(self, ids: Tensor) -> Tensor:
        return self.embed(ids)[:, 0]  # (N,)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(self.drop(features[:, None]))

    def forward(self, ids: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(ids))


def test_one_dimensional_inputs_and_features_are_batches_of_rows() -> None:
    torch.manual_seed(0)
    model = _ScalarPerRow().eval()
    ids = torch.arange(6)
    ours = mc_dropout_predict(model, ids, 4, generator=_seeded(), chunk_size=6)
    naive = mc_dropout_predict(model, ids, 4, method="naive", generator=_seeded())
    assert ours.method == "cached"
    assert ours.probs.shape == (4, 6, 3)
    torch.testing.assert_close(ours.probs, naive.probs, rtol=0, atol=1e-6)


class _TwoRowsOut(_Prefixed):
    def sampled(self, h: Tensor) -> Tensor:
        return self.head(self.drop(h))[:2]


@pytest.mark.parametrize(("method", "chunk_size"), [("auto", None), ("batched", 6)])
def test_a_model_that_drops_rows_is_refused_on_the_prefix_and_one_sample_per_pass_paths(
    method: str, chunk_size: int | None
) -> None:
    with pytest.raises(ValueError, match=r"Expected the model to return logits of shape \(6, num_classes\), but got"):
        mc_dropout_predict(_TwoRowsOut().eval(), torch.randn(6, 8), 3, method=method, chunk_size=chunk_size)  # type: ignore[arg-type]


def test_large_batches_sample_one_batch_per_head_call_with_the_loops_draws() -> None:
    # 4096 rows of 64 features: more rows than the automatic chunk of 2**17 elements, so a chunk is the whole batch
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 3)).eval()
    inputs = torch.randn(4096, 8)
    ours = mc_dropout_predict(model, inputs, 2, generator=_seeded(), masks="torch")
    naive = mc_dropout_predict(model, inputs, 2, method="naive", generator=_seeded(), masks="torch")
    assert ours.method == "cached"
    torch.testing.assert_close(ours.probs, naive.probs, rtol=0, atol=1e-6)


class _LockedAfterTheProjection(nn.Module):
    """Our LockedDropout (not a torch.nn layer): a leaf of the graph, so its own draws stay inside it."""

    def __init__(self) -> None:
        super().__init__()
        from lightning_reg.nn import LockedDropout

        self.proj, self.drop, self.head = nn.Linear(8, 8), LockedDropout(0.5), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(self.proj(x)).mean(1))


def test_a_sampled_layer_of_our_own_stays_one_node_of_the_prefix_split() -> None:
    torch.manual_seed(0)
    model = _LockedAfterTheProjection().eval()
    inputs = torch.randn(6, 5, 8)
    ours = mc_dropout_predict(model, inputs, 4, generator=_seeded(), chunk_size=6)
    naive = mc_dropout_predict(model, inputs, 4, method="naive", generator=_seeded())
    assert ours.method == "cached"
    torch.testing.assert_close(ours.probs, naive.probs, rtol=0, atol=1e-6)
