"""What Monte-Carlo dropout switches on, layer by layer: the sites, the gates and the active ones, exactly."""

from __future__ import annotations

import warnings

import pytest
import timm
from timm.layers import DropPath
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from lightning_reg.functional.mc_dropout import MCDropoutSites, find_mc_dropout_sites, mc_dropout_sampling


def _names(model: nn.Module, modules: list[nn.Module]) -> list[str]:
    names = {id(m): name for name, m in model.named_modules()}
    return [names[id(m)] for m in modules]


def _found(model: nn.Module, **kwargs: bool) -> tuple[list[str], list[str], list[str]]:
    found = find_mc_dropout_sites(model, **kwargs)
    return _names(model, found.sites), _names(model, found.gates), _names(model, found.active)


def test_a_transformer_layer_is_a_gate_and_its_attention_and_dropouts_are_sites() -> None:
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.5, batch_first=True)
    sites, gates, active = _found(layer)
    assert sites == ["self_attn", "dropout", "dropout1", "dropout2"]
    assert gates == [""]  # the layer itself: in training mode it leaves the fused fast path
    assert active == ["self_attn", "dropout", "dropout1", "dropout2"]  # the gate draws nothing itself


def test_attention_without_dropout_is_no_site() -> None:
    model = nn.ModuleDict({"mha": nn.MultiheadAttention(8, 2, dropout=0.0), "drop": nn.Dropout(0.1)})
    assert _found(model) == (["drop"], [], ["drop"])
    model["mha"].dropout = 0.25
    assert _found(model) == (["mha", "drop"], [], ["mha", "drop"])


def test_recurrent_dropout_is_a_site_only_between_two_or_more_layers() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns about dropout on a single layer
        single = nn.LSTM(4, 4, num_layers=1, dropout=0.5)
    model = nn.ModuleDict({"single": single, "none": nn.GRU(4, 4, num_layers=2, dropout=0.0), "drop": nn.Dropout(0.1)})
    assert _found(model) == (["drop"], [], ["drop"])
    model["stacked"] = nn.RNN(4, 4, num_layers=2, dropout=0.3)
    assert _found(model) == (["drop", "stacked"], [], ["drop", "stacked"])


class _OwnDropout(nn.Module):
    mc_dropout_kind = "dropout"

    def __init__(self, **rate: object) -> None:
        super().__init__()
        for name, value in rate.items():
            setattr(self, name, value)

    def forward(self, x: Tensor) -> Tensor:
        return x


class _OwnDropPath(_OwnDropout):
    mc_dropout_kind = "drop_path"


@pytest.mark.parametrize(
    ("rate", "active"),
    [
        ({"p": 0.3}, True),
        ({"p": 0.0}, False),
        ({"drop_prob": 0.2}, True),
        ({"drop_prob": 0}, False),
        ({"dropout": 0.4}, True),
        ({"dropout": 0.0}, False),
        ({"p": True, "dropout": 0.0}, False),  # a flag is no rate: the next name is read
        ({}, True),  # no rate to read: treated as active
    ],
    ids=["p", "p=0", "drop_prob", "drop_prob=0", "dropout", "dropout=0", "bool p", "no rate"],
)
def test_a_layer_of_your_own_opts_in_and_its_rate_decides_whether_it_is_active(rate: dict, active: bool) -> None:
    model = nn.ModuleDict({"own": _OwnDropout(**rate), "drop": nn.Dropout(0.1)})
    assert _found(model) == (["own", "drop"], [], ["own", "drop"] if active else ["drop"])


def test_a_drop_path_layer_of_your_own_is_sampled_only_when_asked() -> None:
    model = nn.ModuleDict({"path": _OwnDropPath(drop_prob=0.2), "drop": nn.Dropout(0.1)})
    assert _found(model) == (["drop"], [], ["drop"])
    assert _found(model, include_drop_path=True) == (["path", "drop"], [], ["path", "drop"])
    timm_path = nn.ModuleDict({"path": DropPath(0.2), "drop": nn.Dropout(0.1)})
    assert _found(timm_path) == (["drop"], [], ["drop"])
    assert _found(timm_path, include_drop_path=True) == (["path", "drop"], [], ["path", "drop"])


def _vit(attn_drop: float) -> nn.Module:
    return VisionTransformer(
        img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=1, num_heads=2, attn_drop_rate=attn_drop
    )


def test_timms_fused_attention_is_a_gate_active_at_its_attention_dropout_rate() -> None:
    model = _vit(0.5)
    sites, gates, active = _found(model)
    assert gates == ["blocks.0.attn"]
    assert "blocks.0.attn.attn_drop" in sites
    assert active == ["blocks.0.attn", "blocks.0.attn.attn_drop"]
    with pytest.raises(ValueError, match="has rate 0"):
        find_mc_dropout_sites(_vit(0.0))  # the gate is no site, and every site has rate 0


def test_timms_functional_head_dropout_makes_the_model_a_site_at_its_drop_rate() -> None:
    model = timm.create_model("test_resnet", num_classes=3, in_chans=1, drop_rate=0.5)
    sites, gates, active = _found(model)
    assert (sites, gates, active) == ([""], [], [""])
    with pytest.raises(ValueError, match="has no dropout layer"):
        find_mc_dropout_sites(timm.create_model("test_resnet", num_classes=3, in_chans=1, drop_rate=0.0))


def test_sampling_switches_the_sites_and_gates_and_nothing_below_a_gate() -> None:
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.5, batch_first=True)
    with mc_dropout_sampling(layer, check_statistics=False) as found:
        assert isinstance(found, MCDropoutSites)
        switched = [name for name, m in layer.named_modules() if m.training]
    assert switched == ["", "self_attn", "dropout", "dropout1", "dropout2"]


class _AttentionWithoutFusedFlag(nn.Module):
    """An attention module with an ``attn_drop`` child but no ``fused_attn`` flag: it calls its dropout itself."""

    def __init__(self) -> None:
        super().__init__()
        self.attn_drop = nn.Dropout(0.3)

    def forward(self, x: Tensor) -> Tensor:
        return self.attn_drop(x)


def test_an_attention_dropout_child_without_the_fused_flag_is_a_site_not_a_gate() -> None:
    model = nn.ModuleDict({"attn": _AttentionWithoutFusedFlag()})
    assert _found(model) == (["attn.attn_drop"], [], ["attn.attn_drop"])


class _TimmParallelBlock(nn.Module):
    """Like timm's parallel blocks: SDPA with ``dropout_p=self.attn_drop_p if self.training else 0``."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.attn_drop_p = rate

    def forward(self, x: Tensor) -> Tensor:
        return x


_TimmParallelBlock.__module__ = "timm.models.vision_transformer"


def test_a_timm_module_with_a_functional_attention_dropout_rate_is_a_site() -> None:
    model = nn.ModuleDict({"block": _TimmParallelBlock(0.2)})
    assert _found(model) == (["block"], [], ["block"])
    with pytest.raises(ValueError, match="has no dropout layer"):
        find_mc_dropout_sites(nn.ModuleDict({"block": _TimmParallelBlock(0.0)}))
