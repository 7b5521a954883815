"""`sync_batchnorm=True` with `BNRecalibration` under 2-process DDP (ddp_fork, CPU, gloo).

torch refuses SyncBatchNorm on CPU twice: DistributedDataParallel raises "SyncBatchNorm layers only work with GPU
modules", and the layer's training forward "expected input tensor to be on GPU" (its kernels, `batch_norm_stats`,
are CUDA-only). So, for the forked ranks, the test lifts DDP's check and swaps in a CPU forward that does what
SyncBatchNorm does on GPUs: normalize with the statistics of the global batch, all-reduced in the forward
(autograd-aware). The point under test: recalibration must not reduce the statistics twice (once in the layer's
forward and once in its own pooling), and the ranks end with identical statistics, those one process computes on
the union of their batches.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from lightning_reg import BNRecalibration
from tests.helpers import UserClassifier, make_images, make_loader
from tests.helpers.bn import norm_input_statistics
from tests.helpers.ddp import ddp_fork_trainer, scrubbed_ddp_env, skip_on_windows

N_SAMPLES, BATCH = 36, 8  # 18 samples a rank: batches of 8, 8 and 2 (unequal sizes on purpose)


def _cpu_sync_batchnorm_forward(self: nn.SyncBatchNorm, x: Tensor) -> Tensor:
    """SyncBatchNorm's training forward (torch/nn/modules/_functions.py) with gloo-capable ops, for CPU tests."""
    if not (self.training and dist.is_available() and dist.is_initialized()):
        return _BatchNorm.forward(self, x)
    assert self.running_mean is not None
    assert self.running_var is not None
    assert self.num_batches_tracked is not None
    channels = x.shape[1]
    dims = [0, *range(2, x.dim())]
    count = torch.full((1,), x.numel() / channels, dtype=x.dtype)
    totals = dist_nn.all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))  # (2C + 1,)
    n = totals[-1]
    mean = totals[:channels] / n
    var = totals[channels : 2 * channels] / n - mean * mean  # biased, as used to normalize
    with torch.no_grad():
        momentum = 0.1 if self.momentum is None else self.momentum
        self.num_batches_tracked.add_(1)
        self.running_mean.lerp_(mean.detach(), momentum)
        self.running_var.lerp_(var.detach() * n / (n - 1), momentum)
    shape = [1, channels] + [1] * (x.dim() - 2)
    y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
    return y * self.weight.view(shape) + self.bias.view(shape)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


def _stats(module: nn.Module) -> dict[str, Any]:
    return {
        name: {
            "type": type(m).__name__,
            "mean": m.running_mean.tolist(),
            "var": m.running_var.tolist(),
            "batches": int(m.num_batches_tracked),
        }
        for name, m in module.named_modules()
        if isinstance(m, _BatchNorm)
    }


class _WriteStats(L.Callback):
    """Each rank writes its BN statistics: at the last training batch (before recalibration) and after fit."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.training_stats: dict[str, Any] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.training_stats = _stats(pl_module)  # listed before BNRecalibration: runs before it

    def on_fit_end(self, trainer, pl_module):
        indices = list(trainer.train_dataloader.sampler)  # this rank's shard, in the order recalibration saw it
        record = {"training": self.training_stats, "recalibrated": _stats(pl_module), "indices": indices}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def _rank_batches(inputs: Tensor, indices: list[int]) -> list[Tensor]:
    """The batches a rank's sampler gave, from the indices it recorded."""
    return list(inputs[torch.tensor(indices)].split(BATCH))


@skip_on_windows
def test_recalibrated_sync_batchnorm_statistics_are_identical_on_every_rank_and_equal_the_union(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # both inherited by the forked ranks
    monkeypatch.setattr(DistributedDataParallel, "_passing_sync_batchnorm_handle", lambda self, module: None)
    monkeypatch.setattr(nn.SyncBatchNorm, "forward", _cpu_sync_batchnorm_forward)
    inputs, targets = make_images(N_SAMPLES, seed=0)
    model = UserClassifier(_net(), num_classes=3)
    with scrubbed_ddp_env():
        trainer = ddp_fork_trainer(
            tmp_path, sync_batchnorm=True, callbacks=[_WriteStats(tmp_path), BNRecalibration(num_batches=None)]
        )
        trainer.fit(model, make_loader(inputs, targets, batch_size=BATCH))
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))

    # The layers were SyncBatchNorm and synchronized in training: equal statistics before recalibration too.
    assert {layer["type"] for layer in rank0["training"].values()} == {"SyncBatchNorm"}
    assert rank0["training"] == rank1["training"]
    # After recalibration (Lightning has reverted the layers to BatchNorm by `on_fit_end`): identical on both
    # ranks, and no longer the moving averages of training.
    assert rank0["recalibrated"] == rank1["recalibrated"]
    assert rank0["recalibrated"] != rank0["training"]

    # One process on the union of the two ranks' batches (the weights came back from rank 0).
    net = copy.deepcopy(model.net)
    assert sorted(rank0["indices"] + rank1["indices"]) == list(range(N_SAMPLES))  # two disjoint shards
    batches = _rank_batches(inputs, rank0["indices"]) + _rank_batches(inputs, rank1["indices"])
    expected = {f"net.{name}": stats for name, stats in norm_input_statistics(net, batches).items()}
    assert expected.keys() == rank0["recalibrated"].keys()
    for name, layer in rank0["recalibrated"].items():
        mean, var = expected[name]  # the BN inputs of all 6 batches, captured by hooks, pooled by torch.var_mean
        torch.testing.assert_close(torch.tensor(layer["mean"], dtype=torch.float64), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(layer["var"], dtype=torch.float64), var, rtol=1e-5, atol=1e-6)
        assert layer["batches"] == len(batches) == 6  # calls summed over ranks once, not twice

    # Independent reference for the first layer: its inputs are the first conv's outputs on all 36 samples.
    with torch.no_grad():
        h = model.net[0](inputs).transpose(0, 1).flatten(1)  # (C, N*H*W)
    var, mean = torch.var_mean(h, dim=1)
    torch.testing.assert_close(torch.tensor(rank1["recalibrated"]["net.1"]["mean"]), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(rank1["recalibrated"]["net.1"]["var"]), var, rtol=1e-5, atol=1e-6)
