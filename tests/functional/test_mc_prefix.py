"""The deterministic prefix run once (issue 19): timm models, traced graphs that must follow flags and hooks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from lightning_reg.functional.mc_dropout import mc_dropout_predict
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
