"""The guard rails: the regularization inventory, each check (a model that triggers it, the same model fixed),
the callback's contract (hooks removed, training unchanged, strict, ignore, DDP), and no finding on the zoo, its
configs, the demo and the examples."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch.callbacks import Callback, EarlyStopping, RichProgressBar
from torch import Tensor, nn

import zoo
from lightning_reg import (
    CutMix,
    LabelSmoothing,
    MCDropoutEvaluation,
    MixUp,
    MixUpCutMix,
    RegularizationCheck,
    RegularizationWarning,
    TemperatureScaling,
    regularization_summary,
)
from lightning_reg.nn import LockedDropout, WeightDrop
from lightning_reg.regularization_check import (
    CODES,
    ForwardTrace,
    regularization_findings,
)
from tests.helpers import fast_trainer, make_classification, make_images, make_loader
from tests.helpers.ddp import ddp_fork_trainer, scrubbed_ddp_env, skip_on_windows

ROOT = Path(__file__).resolve().parents[1]


class Module(L.LightningModule):
    """A user's module: any network, cross-entropy, an optimizer built by ``optimizer(params)``."""

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[[Any], torch.optim.Optimizer] | None = None,
        num_classes: int = 3,
    ) -> None:
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        self.optimizer = optimizer or (lambda params: torch.optim.SGD(params, lr=0.1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer(self.parameters())


def fit(
    module: L.LightningModule,
    *,
    images: bool = False,
    batch_size: int = 16,
    callbacks: Sequence[Callback] = (),
    check: RegularizationCheck | None = None,
    **trainer_kwargs: Any,
) -> RegularizationCheck:
    """One training batch with a RegularizationCheck; returns the check (its findings)."""
    check = check or RegularizationCheck(summary="off")
    x, y = make_images(n=32, channels=1) if images else make_classification(n=32)
    trainer = fast_trainer(limit_train_batches=1, callbacks=[*callbacks, check], **trainer_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RegularizationWarning)
        trainer.fit(module, make_loader(x, y, batch_size=batch_size))
    return check


def codes(check: RegularizationCheck) -> list[str]:
    return [f.code for f in check.findings]


def mlp(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), *layers, nn.Linear(16, 3))


def split_groups(params: Any, weight_decay: float = 0.05) -> list[dict[str, Any]]:
    params = list(params)
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(split_groups(params), lr=1e-3)


# --- 1. dropout feeding BatchNorm ---------------------------------------------------------------------------
def test_dropout_feeding_batchnorm_is_found_and_the_fixed_order_is_not() -> None:
    wrong = mlp(nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU())
    check = fit(Module(wrong, adamw))
    assert codes(check) == ["dropout-before-bn"]
    assert check.findings[0].modules == ("net.2", "net.4")
    assert "Li et al., CVPR 2019" in check.findings[0].reference
    fixed = mlp(nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5))
    assert codes(fit(Module(fixed, adamw))) == []


class Branches(nn.Module):
    """An auxiliary dropout branch computed before the BN branch, which it does not feed."""

    def __init__(self, feed: bool) -> None:
        super().__init__()
        self.feed = feed
        self.stem = nn.Linear(8, 16)
        self.drop = nn.Dropout(0.5)
        self.aux = nn.Linear(16, 3)
        self.bn = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.stem(x))
        dropped = self.drop(h)
        aux = self.aux(dropped)
        source = dropped.view(-1, 4, 4).flatten(1) * 2.0 if self.feed else h  # functional ops in between
        return self.head(self.bn(source)) + aux


def test_dropout_to_batchnorm_follows_the_data_not_the_call_order() -> None:
    assert codes(fit(Module(Branches(feed=False), adamw))) == []
    check = fit(Module(Branches(feed=True), adamw))
    assert codes(check) == ["dropout-before-bn"]
    assert check.findings[0].modules == ("net.drop", "net.bn")


def test_dropout_before_batchnorm_without_running_statistics_or_in_eval_mode_is_no_variance_shift() -> None:
    # No running statistics: normalizes by the batch in eval too. Zero rate: nothing dropped.
    untracked = mlp(nn.Dropout(0.5), nn.Linear(16, 16), nn.BatchNorm1d(16, track_running_stats=False))
    assert codes(fit(Module(untracked, adamw))) == []
    zero = mlp(nn.Dropout(0.0), nn.Linear(16, 16), nn.BatchNorm1d(16))
    assert codes(fit(Module(zero, adamw))) == []


# --- 2. element-wise dropout on convolution maps ------------------------------------------------------------
def cnn(dropout: nn.Module) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        dropout,
        nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def test_elementwise_dropout_on_feature_maps_is_found_and_spatial_dropout_is_not() -> None:
    check = fit(Module(cnn(nn.Dropout(0.2)), adamw), images=True)
    assert codes(check) == ["elementwise-dropout-on-maps"]
    assert check.findings[0].modules == ("net.3",)
    assert "Dropout2d" in check.findings[0].fix
    assert codes(fit(Module(cnn(nn.Dropout2d(0.2)), adamw), images=True)) == []


def test_dropout_on_pooled_or_attention_tensors_is_not_a_feature_map() -> None:
    # (N, C, 1, 1) after global pooling: element-wise and channel dropout are the same thing.
    pooled = nn.Sequential(nn.Conv2d(1, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Dropout(0.3), nn.Flatten(), nn.Linear(8, 3))
    assert codes(fit(Module(pooled, adamw), images=True)) == []
    assert codes(fit(Module(cnn(nn.Dropout(0.0)), adamw), images=True)) == []  # timm's default: rate 0
    # A ViT: conv patch embedding, then nn.Dropout on the 4-D (N, heads, T, T) attention weights.
    vit = zoo.TransformerClassifier(
        num_classes=3, image_size=8, patch_size=2, in_channels=1, dim=16, depth=1, num_heads=2, attn_dropout=0.1
    )
    assert codes(fit(vit, images=True)) == []


def test_elementwise_dropout_on_maps_in_a_torchvision_model_and_not_on_channels_last_maps() -> None:
    # torchvision's SqueezeNet drops elements of the (N, 512, H, W) maps before its final 1x1 convolution.
    squeezenet = torchvision.models.squeezenet1_1(num_classes=3).train()
    with ForwardTrace(squeezenet) as trace:
        squeezenet(torch.randn(2, 3, 64, 64))
    assert [(f.code, f.modules) for f in trace.findings(squeezenet)] == [
        ("elementwise-dropout-on-maps", ("classifier.0",))
    ]

    class ChannelsLast(nn.Module):  # ConvNeXt's MLP: Linear layers over a permuted (N, H, W, C) map
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc, self.drop = nn.Conv2d(1, 8, 3), nn.Linear(8, 8), nn.Dropout(0.1)

        def forward(self, x: Tensor) -> Tensor:
            return self.drop(self.fc(self.conv(x).permute(0, 2, 3, 1)))

    net = ChannelsLast()
    with ForwardTrace(net) as trace:
        net(torch.randn(2, 1, 8, 8))
    assert trace.findings(net) == []


# --- 3. L2 through an adaptive optimizer --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("optimizer", "expected"),
    [
        (lambda p: torch.optim.Adam(split_groups(p, 1e-4)), ["coupled-weight-decay"]),
        (lambda p: torch.optim.RMSprop(split_groups(p, 1e-4)), ["coupled-weight-decay"]),
        (lambda p: torch.optim.AdamW(split_groups(p, 1e-2)), []),
        (lambda p: torch.optim.Adam(split_groups(p, 1e-2), decoupled_weight_decay=True), []),
        (lambda p: torch.optim.SGD(split_groups(p, 1e-4), lr=0.1), []),
        (lambda p: torch.optim.Adam(p), []),
        (lambda p: torch.optim.NAdam(split_groups(p, 1e-4)), ["coupled-weight-decay"]),
        (lambda p: torch.optim.NAdam(split_groups(p, 1e-2), decoupled_weight_decay=True), []),
    ],
    ids=["Adam", "RMSprop", "AdamW", "Adam-decoupled", "SGD", "Adam-no-decay", "NAdam", "NAdam-decoupled"],
)
def test_coupled_weight_decay_of_adaptive_optimizers(optimizer: Any, expected: list[str]) -> None:
    assert codes(fit(Module(mlp(nn.ReLU()), optimizer))) == expected


# --- 4. weight decay on norm parameters and biases ----------------------------------------------------------
def test_decay_on_norm_weights_and_biases_lists_them_and_split_groups_do_not() -> None:
    net = mlp(nn.LayerNorm(16), nn.ReLU())
    check = fit(Module(net, lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05)))
    assert codes(check) == ["decay-on-norm-or-bias"]
    # Independent reference: the 1-D parameters (biases and LayerNorm gain/shift) of the network.
    assert set(check.findings[0].modules) == {f"net.{n}" for n, p in net.named_parameters() if p.ndim == 1}
    assert codes(fit(Module(mlp(nn.LayerNorm(16), nn.ReLU()), adamw))) == []


# --- 5. BatchNorm on a small batch --------------------------------------------------------------------------
def test_small_batchnorm_batch_is_found_below_the_threshold_and_groupnorm_is_not() -> None:
    bn = lambda: mlp(nn.BatchNorm1d(16), nn.ReLU())  # noqa: E731
    check = fit(Module(bn(), adamw), batch_size=8)
    assert codes(check) == ["small-bn-batch"]
    assert "8 samples" in check.findings[0].message
    assert "GroupNorm" in check.findings[0].fix
    assert codes(fit(Module(bn(), adamw), batch_size=16)) == []
    assert codes(fit(Module(mlp(nn.GroupNorm(4, 16), nn.ReLU()), adamw), batch_size=8)) == []
    # The threshold is an argument.
    assert codes(fit(Module(bn(), adamw), batch_size=8, check=RegularizationCheck(min_bn_batch=8, summary="off"))) == []


class _WriteFindings(Callback):
    def __init__(self, out: Path, check: RegularizationCheck) -> None:
        self.out, self.check = out, check

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        data = {"codes": codes(self.check), "fixes": [f.fix for f in self.check.findings]}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(data))


@skip_on_windows
def test_two_processes_with_8_samples_each_are_told_to_sync_batchnorm(tmp_path: Path) -> None:
    check = RegularizationCheck(summary="off")
    x, y = make_classification(n=32)
    with scrubbed_ddp_env(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RegularizationWarning)
        trainer = ddp_fork_trainer(tmp_path, limit_train_batches=1, callbacks=[check, _WriteFindings(tmp_path, check)])
        trainer.fit(Module(mlp(nn.BatchNorm1d(16), nn.ReLU()), adamw), make_loader(x, y, batch_size=8))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["codes"] == ["small-bn-batch"]
    assert "sync_batchnorm=True" in ranks[0]["fixes"][0]


def test_sync_batchnorm_counts_the_samples_of_every_process() -> None:
    # torch runs SyncBatchNorm on GPUs only; outside a process group its forward is BatchNorm's, so the trace runs
    # here and the world size is passed as DDP would give it.
    net = nn.SyncBatchNorm.convert_sync_batchnorm(mlp(nn.BatchNorm1d(16), nn.ReLU()))
    with ForwardTrace(net) as trace:
        net(torch.randn(8, 8))
    assert [f.code for f in trace.findings(net, world_size=2)] == []  # 2 x 8 samples per statistic
    assert [f.code for f in trace.findings(net, world_size=1)] == ["small-bn-batch"]
    assert [f.code for f in trace.findings(net, world_size=4, min_bn_batch=64)] == ["small-bn-batch"]


# --- 6. two smoothing sources, stacked mixing ---------------------------------------------------------------
class LossModule(Module):
    def __init__(self, smoothing: float) -> None:
        super().__init__(mlp(nn.ReLU()), adamw)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=smoothing)


def test_two_smoothing_sources_are_found_one_is_not() -> None:
    # Pure checks: the mixing callbacks refuse double smoothing themselves at setup; this lists it with the rest.
    found = regularization_findings(LossModule(0.1), callbacks=[LabelSmoothing(0.1)])
    assert [f.code for f in found] == ["double-smoothing"]
    assert set(found[0].modules) == {"LabelSmoothing(0.1)", "`criterion` nn.CrossEntropyLoss(label_smoothing=0.1)"}
    assert regularization_findings(LossModule(0.0), callbacks=[LabelSmoothing(0.1)]) == []
    assert regularization_findings(LossModule(0.1)) == []
    # The zoo's `label_smoothing` hyperparameter and a mixing callback's own smoothing are sources too.
    model = zoo.create("cnn_small", label_smoothing=0.1)
    found = regularization_findings(model, callbacks=[MixUp(label_smoothing=0.1)])
    assert [f.code for f in found] == ["double-smoothing"]
    assert regularization_findings(zoo.create("cnn_small"), callbacks=[MixUp(label_smoothing=0.1)]) == []


def test_mixup_and_cutmix_stacked_are_found_mixupcutmix_is_not() -> None:
    model = zoo.create("cnn_small")
    found = regularization_findings(model, callbacks=[MixUp(), CutMix()])
    assert [f.code for f in found] == ["stacked-mixing"]
    assert found[0].modules == ("MixUp", "CutMix")
    assert "MixUpCutMix" in found[0].fix
    assert regularization_findings(model, callbacks=[MixUpCutMix(), LabelSmoothing(0.1)]) == []


# --- 7. softened labels with MC dropout and no temperature scaling ------------------------------------------
def test_mc_dropout_after_label_softening_needs_temperature_scaling() -> None:
    model = zoo.create("cnn_small")
    found = regularization_findings(model, callbacks=[MixUp(), MCDropoutEvaluation()])
    assert [f.code for f in found] == ["mc-dropout-uncalibrated"]
    assert "Wen et al., ICLR 2021" in found[0].reference
    assert "TemperatureScaling" in found[0].fix
    assert regularization_findings(model, callbacks=[MixUp(), MCDropoutEvaluation(), TemperatureScaling()]) == []
    assert regularization_findings(model, callbacks=[MCDropoutEvaluation()]) == []
    smoothed = zoo.create("cnn_small", label_smoothing=0.1)
    assert [f.code for f in regularization_findings(smoothed, callbacks=[MCDropoutEvaluation()])] == [
        "mc-dropout-uncalibrated"
    ]


# --- 8. dropout or BatchNorm in eval mode while the model trains --------------------------------------------
class EvalDropout(Module):
    def __init__(self, frozen: bool) -> None:
        super().__init__(mlp(nn.ReLU(), nn.Dropout(0.3)), adamw)
        self.backbone = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.2))
        self.backbone.eval()  # a pretrained part put in eval mode and never set back
        if frozen:
            self.backbone.requires_grad_(False)  # ... unless it is meant to be frozen

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.backbone(x))


def test_layers_left_in_eval_mode_are_found_unless_their_part_is_frozen() -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # Lightning's generic one
        check = fit(EvalDropout(frozen=False))
        assert codes(check) == ["eval-mode-in-training"]
        assert check.findings[0].modules == ("backbone.1", "backbone.2")
        assert "`backbone`" in check.findings[0].message
        assert codes(fit(EvalDropout(frozen=True))) == []


def test_a_whole_model_left_in_eval_mode_is_found() -> None:
    model = Module(mlp(nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3)), adamw).eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
        check = fit(model)
    assert codes(check) == ["eval-mode-in-training"]
    assert "<model>" in check.findings[0].message


def test_frozen_batchnorm_fine_tuning_is_intended_and_listed_as_frozen() -> None:
    model = zoo.ImageClassifier(num_classes=3, backbone="test_resnet", in_channels=1, freeze_bn=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
        check = fit(model, images=True)
    assert codes(check) == []
    assert check.summary is not None
    states = {n.state for n in check.summary.norms if n.kind == "BatchNorm2d"}
    assert states == {"frozen"}


# --- 9. MC dropout with nothing to sample -------------------------------------------------------------------
def test_mc_dropout_on_zero_rate_or_drop_path_only_models() -> None:
    zero = zoo.create("cnn_small", dropout=0.0)
    found = regularization_findings(zero, callbacks=[MCDropoutEvaluation()])
    assert [f.code for f in found] == ["mc-dropout-no-dropout"]
    assert "every rate is 0" in found[0].message
    assert regularization_findings(zoo.create("cnn_small", dropout=0.2), callbacks=[MCDropoutEvaluation()]) == []
    # Only timm's DropPath: named, with the argument that samples it.
    vit = zoo.create("transformer", dropout=0.0, drop_path=0.2)
    found = regularization_findings(vit, callbacks=[MCDropoutEvaluation()])
    assert [f.code for f in found] == ["mc-dropout-no-dropout"]
    assert "include_drop_path=True" in found[0].fix
    assert regularization_findings(vit, callbacks=[MCDropoutEvaluation(include_drop_path=True)]) == []


def test_timm_functional_head_dropout_is_sampled_by_mc_dropout() -> None:
    # timm's ResNet drops with `F.dropout(x, self.drop_rate, self.training)` in `forward_head`: no module.
    model = zoo.ImageClassifier(num_classes=3, backbone="test_resnet", drop_rate=0.2)
    assert [(d.name, d.kind, d.rate) for d in regularization_summary(model).dropouts] == [
        ("net", "ResNet.drop_rate", 0.2)
    ]
    assert regularization_findings(model, callbacks=[MCDropoutEvaluation()]) == []
    plain = zoo.ImageClassifier(num_classes=3, backbone="test_resnet")
    assert [f.code for f in regularization_findings(plain, callbacks=[MCDropoutEvaluation()])] == [
        "mc-dropout-no-dropout"
    ]


def test_torchvision_stochastic_depth_counts_as_drop_path() -> None:
    net = nn.Sequential(nn.Linear(8, 8), torchvision.ops.StochasticDepth(0.2, "row"), nn.Linear(8, 3))
    found = regularization_findings(net, callbacks=[MCDropoutEvaluation()])
    assert [f.code for f in found] == ["mc-dropout-no-dropout"]
    assert found[0].modules == ("1",)
    assert regularization_findings(net, callbacks=[MCDropoutEvaluation(include_drop_path=True)]) == []


# --- 10. a dropout rate is the user's choice ----------------------------------------------------------------
@pytest.mark.parametrize("rate", [0.05, 0.9])
def test_dropout_rates_outside_the_usual_range_are_not_findings(rate: float) -> None:
    check = fit(Module(mlp(nn.ReLU(), nn.Dropout(rate)), adamw), callbacks=[MCDropoutEvaluation(plot=False)])
    assert codes(check) == []


# --- the inventory ------------------------------------------------------------------------------------------
class Zoo(nn.Module):
    """One of each dropout-like layer."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.1)
        self.spatial = nn.Dropout2d(0.2)
        self.locked = LockedDropout(0.3)
        self.rnn = WeightDrop(nn.LSTM(4, 4, batch_first=True), p=0.4)
        self.stacked = nn.GRU(4, 4, num_layers=2, dropout=0.25)
        self.attn = nn.MultiheadAttention(4, 2, dropout=0.15)
        self.path = timm.layers.DropPath(0.05)
        self.block = timm.layers.DropBlock2d(0.1)
        self.depth = torchvision.ops.StochasticDepth(0.3, "row")
        self.ln = nn.LayerNorm(4)
        self.bn = nn.BatchNorm2d(4, momentum=0.01, eps=1e-3)
        self.gn = nn.GroupNorm(2, 4)
        self.inorm = nn.InstanceNorm2d(4)
        self.frozen = torchvision.ops.FrozenBatchNorm2d(4)


def test_inventory_lists_every_dropout_like_and_norm_layer_with_its_settings() -> None:
    model = Zoo()
    model.bn.eval()
    summary = regularization_summary(model)
    assert [(d.name, d.family, d.rate) for d in summary.dropouts] == [
        ("drop", "dropout", 0.1),
        ("spatial", "channel dropout", 0.2),
        ("locked", "locked dropout", 0.3),
        ("rnn", "weight drop", 0.4),
        ("stacked", "rnn", 0.25),
        ("attn", "attention", 0.15),
        ("path", "drop path", 0.05),
        ("block", "drop path", 0.1),
        ("depth", "drop path", 0.3),
    ]
    norms = {n.name: n for n in summary.norms}
    assert list(norms) == ["ln", "bn", "gn", "inorm", "frozen"]
    assert (norms["bn"].momentum, norms["bn"].eps, norms["bn"].track_running_stats) == (0.01, 1e-3, True)
    assert norms["bn"].state == "statistics frozen (eval mode), affine trained"
    assert norms["ln"].state == "trained"
    assert norms["frozen"].state == "frozen"
    assert norms["inorm"].statistics == "per sample"
    assert summary.decay is None  # no optimizer yet
    text = str(summary)
    assert "DropPath" in text
    assert "StochasticDepth" in text


def test_inventory_weight_decay_as_each_optimizer_applies_it() -> None:
    net = mlp(nn.BatchNorm1d(16))
    adam = torch.optim.Adam(net.parameters(), weight_decay=1e-4)
    groups = torch.optim.AdamW(split_groups(net.parameters()), lr=2e-3)
    summary = regularization_summary(net, optimizers=[adam, groups])
    assert summary.decay is not None
    rows = [(g.optimizer, g.group, g.weight_decay, g.applied, len(g.norm_or_bias)) for g in summary.decay]
    one_d = sum(p.ndim == 1 for p in net.parameters())  # 2 biases, BN weight and bias
    assert rows == [
        ("0: Adam", 0, 1e-4, "L2 in the gradient, rescaled by the adaptive step", one_d),
        ("1: AdamW", 0, 0.05, "decoupled: p *= 1 - lr * wd", 0),
        ("1: AdamW", 1, 0.0, "none", 0),
    ]
    assert summary.decay[1].params == 2  # the two weight matrices


def test_inventory_lists_our_callbacks_and_groups_repeated_blocks() -> None:
    callbacks = [MixUpCutMix(), LabelSmoothing(0.1), RegularizationCheck(), EarlyStopping("val_loss")]
    trainer = fast_trainer(callbacks=callbacks)
    summary = regularization_summary(zoo.create("vit_tiny"), trainer)
    assert [name for name, _ in summary.callbacks] == ["MixUpCutMix", "LabelSmoothing", "EarlyStopping"]
    assert "smoothing=0.1" in dict(summary.callbacks)["LabelSmoothing"]
    text = str(summary)
    assert "net.blocks.*.norm1 (x12)" in text
    # A block's two drop paths (timm's drop_path1, drop_path2) share its rate (linear in depth); blocks are kept apart.
    blocks = {line.split()[0].rsplit(".", 1)[0] for line in text.splitlines() if "DropPath" in line}
    assert len(blocks) == 11  # block 0 has rate 0: an Identity


def test_lightnings_demo_transformer_is_listed_and_has_no_finding() -> None:
    from lightning.pytorch.demos import LightningTransformer
    from torch.utils.data import DataLoader, TensorDataset

    class Demo(LightningTransformer):
        def prepare_data(self) -> None:  # the demo downloads WikiText-2 here; random tokens are enough
            pass

    model = Demo(vocab_size=50)
    tokens = TensorDataset(torch.randint(50, (32, 12)), torch.randint(50, (32, 12)))
    check = RegularizationCheck(summary="off")
    fast_trainer(limit_train_batches=1, callbacks=[check]).fit(model, DataLoader(tokens, batch_size=16))
    assert check.findings == []
    assert check.summary is not None
    families = {d.family for d in check.summary.dropouts}
    assert families == {"dropout", "attention"}  # nn.Dropout modules and nn.MultiheadAttention(dropout=0.2)


# --- the callback -------------------------------------------------------------------------------------------
def _hook_counts(model: nn.Module) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


def test_the_trace_is_removed_after_the_first_step_and_training_is_unchanged() -> None:
    def trained(with_check: bool) -> tuple[dict[str, Tensor], list[int], list[int]]:
        L.seed_everything(0, verbose=False)
        model = zoo.create("cnn_small", num_classes=3, dropout=0.3, widths=(8, 16))
        before = _hook_counts(model)
        x, y = make_images(n=64)
        callbacks = [RegularizationCheck(summary="off")] if with_check else []
        trainer = fast_trainer(max_epochs=2, limit_train_batches=3, callbacks=callbacks)
        trainer.fit(model, make_loader(x, y, batch_size=16, shuffle=True))
        return {k: v.clone() for k, v in model.state_dict().items()}, before, _hook_counts(model)

    checked, before, after = trained(True)
    plain, _, _ = trained(False)
    assert before == after  # every hook removed
    assert checked.keys() == plain.keys()
    for key in plain:
        torch.testing.assert_close(checked[key], plain[key], rtol=0, atol=0)
    # No torch function mode left behind: a plain op runs without our trace.
    with ForwardTrace(nn.Identity()) as trace:
        assert trace.active
    assert not trace.active


def test_strict_raises_before_any_optimizer_step() -> None:
    net = mlp(nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 16), nn.BatchNorm1d(16))
    model = Module(net, adamw)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RegularizationWarning, match=r"\[dropout-before-bn\]") as info:
        fit(model, check=RegularizationCheck(strict=True, summary="off"))
    assert [f.code for f in info.value.findings] == ["dropout-before-bn"]
    for key, value in model.state_dict().items():
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            torch.testing.assert_close(value, start[key], rtol=0, atol=0)
    # Static findings raise at fit start, before the first batch.
    coupled = Module(mlp(nn.ReLU()), lambda p: torch.optim.Adam(split_groups(p, 1e-4)))
    with pytest.raises(RegularizationWarning, match="coupled-weight-decay"):
        fit(coupled, check=RegularizationCheck(strict=True, summary="off"))
    assert _hook_counts(net) == [0] * len(list(net.modules()))


def test_ignore_silences_by_code_and_warnings_carry_the_finding() -> None:
    net = lambda: mlp(nn.BatchNorm1d(16), nn.ReLU())  # noqa: E731
    check = RegularizationCheck(summary="off")
    x, y = make_classification(n=32)
    with pytest.warns(RegularizationWarning, match=r"\[small-bn-batch\].*Why: .*Wu & He.*Fix: ") as record:
        fast_trainer(limit_train_batches=1, callbacks=[check]).fit(Module(net(), adamw), make_loader(x, y, 8))
    assert [w.message.findings[0].code for w in record if isinstance(w.message, RegularizationWarning)] == [
        "small-bn-batch"
    ]
    assert codes(fit(Module(net(), adamw), batch_size=8, check=RegularizationCheck(["small-bn-batch"]))) == []


def test_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="Expected `ignore` to contain codes among"):
        RegularizationCheck(ignore=["dropout_before_bn"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="Expected `summary` to be one of"):
        RegularizationCheck(summary="fancy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Expected `min_bn_batch` to be a positive int"):
        RegularizationCheck(min_bn_batch=0)
    assert len(CODES) == len(set(CODES)) == 10


def test_the_summary_is_printed_once_per_fit_plain_or_rich(caplog: pytest.LogCaptureFixture, capsys: Any) -> None:
    model = Module(mlp(nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3)), adamw)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        fit(model, check=RegularizationCheck())
    assert sum("Regularization summary" in r.getMessage() for r in caplog.records) == 1
    assert "net.3  Dropout" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        fit(model, check=RegularizationCheck(), callbacks=[RichProgressBar()], enable_progress_bar=True)
    assert "Regularization summary" not in caplog.text
    out = capsys.readouterr().out
    assert out.count("Dropout-like layers") == 1
    assert "Weight decay per parameter group" in out


def test_a_second_fit_checks_and_traces_again() -> None:
    model = Module(mlp(nn.BatchNorm1d(16), nn.ReLU()), adamw)
    check = RegularizationCheck(summary="off")
    x, y = make_classification(n=32)
    trainer = fast_trainer(limit_train_batches=1, callbacks=[check])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RegularizationWarning)
        trainer.fit(model, make_loader(x, y, 8))
        assert codes(check) == ["small-bn-batch"]
        trainer.fit_loop.max_epochs = 2
        trainer.fit(model, make_loader(x, y, 8))
    assert codes(check) == ["small-bn-batch"]
    assert _hook_counts(model) == [0] * len(list(model.modules()))


def test_dict_batches_and_accumulation_are_traced_through_the_real_step() -> None:
    class DictModule(Module):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return F.cross_entropy(self(batch["inputs"]), batch["targets"])

    x, y = make_classification(n=32)
    check = RegularizationCheck(summary="off")
    trainer = fast_trainer(limit_train_batches=4, accumulate_grad_batches=2, callbacks=[check])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RegularizationWarning)
        trainer.fit(DictModule(mlp(nn.BatchNorm1d(16), nn.ReLU()), adamw), make_loader(x, y, 8, as_dict=True))
    assert codes(check) == ["small-bn-batch"]


@pytest.mark.parametrize(
    "flags", [{"precision": "bf16-mixed"}, {"fast_dev_run": True}], ids=["bf16-mixed", "fast_dev_run"]
)
def test_trainer_flags_keep_the_trace(flags: dict[str, Any]) -> None:
    net = mlp(nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 16), nn.BatchNorm1d(16))
    assert codes(fit(Module(net, adamw), batch_size=8, **flags)) == ["dropout-before-bn", "small-bn-batch"]
    assert _hook_counts(net) == [0] * len(list(net.modules()))


# --- no finding on the zoo, its configs, the demo and the examples ------------------------------------------
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*_digits*.yaml"))


@pytest.mark.parametrize("name", zoo.list_models())
def test_no_finding_on_any_zoo_model_with_its_defaults(name: str) -> None:
    kwargs: dict[str, Any] = {"num_classes": 10}
    if name in ("resnet18", "vit_tiny", "cnn", "cnn_small"):
        kwargs["in_channels"] = 1
    if name == "vit_tiny":
        kwargs.update(image_size=8, patch_size=2)
    sequence = name in ("lstm", "gru", "transformer")
    data = zoo.data.DigitsDataModule(batch_size=64, as_sequence=sequence)
    check = RegularizationCheck(strict=True, summary="off")
    fast_trainer(limit_train_batches=1, limit_val_batches=0, callbacks=[check]).fit(zoo.create(name, **kwargs), data)
    assert check.findings == []


@pytest.fixture
def no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-reg"])


@pytest.mark.usefixtures("no_pytest_argv")
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_no_finding_on_the_digits_configs_through_the_cli(config: Path, tmp_path: Path) -> None:
    from lightning_reg.cli import cli

    args = [
        f"--config={config}",
        "--trainer.logger=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.accelerator=cpu",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=0",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    result = cli(args, run=False)
    checks = [cb for cb in result.trainer.callbacks if isinstance(cb, RegularizationCheck)]
    assert len(checks) == 1  # the CLI adds the guard rails by default
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RegularizationWarning)
        result.trainer.fit(result.model, datamodule=result.datamodule)
    assert {f.code for f in checks[0].findings} == set()


@pytest.mark.usefixtures("no_pytest_argv")
def test_the_cli_keeps_a_configured_check_and_adds_none() -> None:
    from lightning_reg.cli import cli

    args = [
        "--model=CNNClassifier",
        "--data=DigitsDataModule",
        "--trainer.logger=false",
        "--trainer.callbacks+=RegularizationCheck",
        "--trainer.callbacks.ignore=[small-bn-batch]",
    ]
    checks = [cb for cb in cli(args, run=False).trainer.callbacks if isinstance(cb, RegularizationCheck)]
    assert [c.ignore for c in checks] == [("small-bn-batch",)]


@pytest.mark.parametrize("name", ["cnn_small", "lstm", "transformer"])
def test_no_finding_on_the_demo_recipes(name: str) -> None:
    from lightning_reg.demo import regularizers

    sequence = name != "cnn_small"
    for regularized in (False, True):
        model = zoo.create(name, num_classes=10)
        extra = regularizers(model, as_sequence=sequence, num_classes=10) if regularized else []
        callbacks = list(extra)  # the demo samples MC dropout with the functional core after fit, not a callback
        data = zoo.data.DigitsDataModule(batch_size=64, as_sequence=sequence)
        check = RegularizationCheck(summary="off")
        trainer = fast_trainer(limit_train_batches=1, limit_val_batches=0, callbacks=[*callbacks, check])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RegularizationWarning)
            trainer.fit(model, datamodule=data)
        assert {f.code for f in check.findings} == set()


EXAMPLES: list[Any] = [
    pytest.param("existing_trainer", {"epochs": 1, "limit_batches": 2}, id="existing_trainer"),
    pytest.param(
        "finetune_timm",
        {"backbone": "test_resnet", "image_size": 16, "epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1},
        id="finetune_timm",
    ),
    *(
        pytest.param(stem, {"epochs": 1, "fast": True}, id=stem, marks=pytest.mark.slow)
        for stem in ("mixup", "cutmix", "label_smoothing", "bn_recalibration", "mc_dropout")
    ),
]


@pytest.mark.parametrize(("stem", "kwargs"), EXAMPLES)
def test_no_finding_on_the_examples(
    stem: str, kwargs: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks: list[RegularizationCheck] = []

    class CheckedTrainer(L.Trainer):
        def __init__(self, *args: Any, callbacks: list[Any] | None = None, **kw: Any) -> None:
            check = RegularizationCheck(summary="off")
            checks.append(check)
            super().__init__(*args, callbacks=[*(callbacks or []), check], **kw)

    monkeypatch.setattr(L, "Trainer", CheckedTrainer)
    monkeypatch.chdir(tmp_path)
    if stem == "finetune_timm":
        kwargs = {**kwargs, "workdir": tmp_path}
    if stem == "mc_dropout":
        kwargs = {**kwargs, "root": tmp_path}
    spec = importlib.util.spec_from_file_location(f"example_{stem}", ROOT / "examples" / f"{stem}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RegularizationWarning)
        module.main(**kwargs)
    assert checks
    for check in checks:
        assert {f.code for f in check.findings} == set()


def test_min_bn_batch_accepts_one_and_refuses_bools_and_zero() -> None:
    assert RegularizationCheck(min_bn_batch=1).min_bn_batch == 1
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match=f"Expected `min_bn_batch` to be a positive int, but got {bad!r}."):
            RegularizationCheck(min_bn_batch=bad)  # type: ignore[arg-type]


def test_one_code_given_as_a_string_is_ignored_like_a_list_of_it() -> None:
    model = Module(mlp(nn.BatchNorm1d(16), nn.ReLU()), adamw)
    check = RegularizationCheck("small-bn-batch", summary="off")  # type: ignore[arg-type]
    assert check.ignore == ("small-bn-batch",)
    assert codes(fit(model, batch_size=8, check=check)) == []


def test_summary_off_prints_nothing(caplog: pytest.LogCaptureFixture, capsys: Any) -> None:
    model = Module(mlp(nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3)), adamw)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        fit(model, check=RegularizationCheck(summary="off"))
    assert "Regularization summary" not in caplog.text
    assert "Dropout-like layers" not in capsys.readouterr().out
