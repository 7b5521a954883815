from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_reg import BNStatsMonitor
from lightning_reg.callbacks.bn_stats_monitor import batch_vs_running
from tests.helpers import TinyCNN, TinyMLP, UserClassifier, fast_trainer, make_classification, make_images, make_loader
from tests.helpers.loggers import MemoryLogger


def _model() -> UserClassifier:
    torch.manual_seed(0)
    return UserClassifier(net=TinyCNN(), lr=0.5)


def _loader(n: int = 48) -> torch.utils.data.DataLoader:
    return make_loader(*make_images(n=n), batch_size=8)


def test_batch_vs_running_matches_the_closed_form() -> None:
    bn = nn.BatchNorm2d(3)
    bn.running_mean.copy_(torch.tensor([0.0, 1.0, -1.0]))
    bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.25]))
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    shift, ratio = batch_vs_running(x, bn, eps=0.0)
    var, mean = torch.var_mean(x.transpose(0, 1).reshape(3, -1), dim=1)
    torch.testing.assert_close(shift, (mean - bn.running_mean).abs() / bn.running_var.sqrt())
    torch.testing.assert_close(ratio, (var / bn.running_var).log().abs())


def test_logs_each_bn_layer_every_n_steps(tmp_path: Path) -> None:
    logger = MemoryLogger()
    monitor = BNStatsMonitor(log_every_n_steps=2)
    trainer = fast_trainer(tmp_path, max_epochs=1, callbacks=[monitor], logger=logger)
    trainer.fit(_model(), _loader())  # 6 steps
    assert [step for step, _ in logger.values("bn_stats/net.body.1/mean_shift")] == [0, 2, 4]
    assert [step for step, _ in logger.values("bn_stats/net.body.1/var_log_ratio")] == [0, 2, 4]
    # at step 0 the running statistics are the initial 0/1, far from the first batch
    assert logger.values("bn_stats/net.body.1/mean_shift")[0][1] > 0
    assert set(monitor.last_stats) == {"bn_stats/net.body.1/mean_shift", "bn_stats/net.body.1/var_log_ratio"}
    assert all(not m._forward_pre_hooks for m in trainer.lightning_module.modules())


def test_no_discrepancy_when_the_running_statistics_are_those_of_the_batch(tmp_path: Path) -> None:
    """With momentum 1 and the same batch every step, running statistics equal the next batch's statistics."""
    model = UserClassifier(net=TinyCNN(), lr=0.0)
    model.net.body[1].momentum = 1.0
    inputs, targets = make_images(n=8)
    loader = make_loader(inputs.repeat(4, 1, 1, 1), targets.repeat(4), batch_size=8)
    monitor = BNStatsMonitor(log_every_n_steps=1)
    logger = MemoryLogger()
    fast_trainer(tmp_path, callbacks=[monitor], logger=logger).fit(model, loader)
    shifts = [v for _, v in logger.values("bn_stats/net.body.1/mean_shift")]
    ratios = [v for _, v in logger.values("bn_stats/net.body.1/var_log_ratio")]
    assert len(shifts) == 4
    assert shifts[0] > 0.01
    assert max(shifts[1:]) < 1e-5
    assert max(ratios[1:]) < 1e-5


def test_writes_histograms_to_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer = fast_trainer(tmp_path, callbacks=[BNStatsMonitor(log_every_n_steps=3)], logger=logger)
    trainer.fit(_model(), _loader())
    logger.finalize("success")
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"histograms": 0}).Reload()
    tags = set(events.Tags()["histograms"])
    assert {f"bn_stats/net.body.1/{k}" for k in ("running_mean", "running_var", "mean_shift")} == tags
    assert [e.step for e in events.Histograms("bn_stats/net.body.1/running_var")] == [0, 3]
    # step 0 shows the running statistics the batch met (the initial 0 and 1), not those after the layer's update
    first_mean = events.Histograms("bn_stats/net.body.1/running_mean")[0].histogram_value
    first_var = events.Histograms("bn_stats/net.body.1/running_var")[0].histogram_value
    assert (first_mean.min, first_mean.max) == (0.0, 0.0)
    assert (first_var.min, first_var.max) == (1.0, 1.0)
    assert "bn_stats/net.body.1/mean_shift" in events.Tags()["scalars"]


@pytest.mark.parametrize("value", [0, -3, 1.5, True])
def test_invalid_log_every_n_steps_raises(value: object) -> None:
    with pytest.raises(ValueError, match="`log_every_n_steps` to be a positive int"):
        BNStatsMonitor(log_every_n_steps=value)  # type: ignore[arg-type]


def test_under_gradient_accumulation_it_logs_once_per_optimizer_step(tmp_path: Path) -> None:
    """8 micro-batches, `accumulate_grad_batches=4`: 2 optimizer steps, 2 logs (the first micro-batch of each)."""
    model, loader = _model(), _loader(n=64)
    conv = copy.deepcopy(model.net.body[0])  # the initial weights, which the first micro-batch sees
    logger = MemoryLogger()
    trainer = fast_trainer(
        tmp_path, callbacks=[BNStatsMonitor(log_every_n_steps=1)], logger=logger, accumulate_grad_batches=4
    )
    trainer.fit(model, loader)
    assert trainer.global_step == 2
    assert [step for step, _ in logger.values("bn_stats/net.body.1/mean_shift")] == [0, 1]
    assert [step for step, _ in logger.values("bn_stats/net.body.1/var_log_ratio")] == [0, 1]
    # step 0 measured micro-batch 0 against the initial running statistics (mean 0, variance 1), in closed form
    with torch.no_grad():
        h = conv(next(iter(loader))[0])  # (8, C, 8, 8)
    var, mean = torch.var_mean(h.transpose(0, 1).reshape(h.shape[1], -1), dim=1)
    eps = model.net.body[1].eps
    expected_shift = float((mean.abs() / (1 + eps) ** 0.5).mean())
    expected_ratio = float(((var + eps) / (1 + eps)).log().abs().mean())
    assert logger.values("bn_stats/net.body.1/mean_shift")[0][1] == pytest.approx(expected_shift, rel=1e-5)
    assert logger.values("bn_stats/net.body.1/var_log_ratio")[0][1] == pytest.approx(expected_ratio, rel=1e-5)


def test_a_model_without_batchnorm_gets_one_warning(tmp_path: Path) -> None:
    monitor = BNStatsMonitor(log_every_n_steps=1)
    logger = MemoryLogger()
    model = UserClassifier(net=TinyMLP(batch_norm=False))
    loader = make_loader(*make_classification(n=32), batch_size=8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fast_trainer(tmp_path, max_epochs=2, callbacks=[monitor], logger=logger).fit(model, loader)
        fast_trainer(tmp_path, max_epochs=1, callbacks=[monitor], logger=logger).fit(model, loader)  # a second fit
    assert sum("found no BatchNorm layer" in str(w.message) for w in record) == 1
    assert not any(key.startswith("bn_stats/") for _, metrics in logger.logged for key in metrics)


_HOST_SYNCS = {"cpu", "item", "tolist", "numpy", "__float__", "__int__", "__bool__"}


class _HostSyncCounter(TorchFunctionMode):
    """Counts calls of tensor methods that copy a device tensor to the host (each a CUDA stream sync on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in _HOST_SYNCS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


class _ThreeBN(UserClassifier):
    """Three BatchNorm layers; the forward runs under a host-sync counter."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.Flatten(),
            nn.Linear(256, 6),
            nn.BatchNorm1d(6),
            nn.Linear(6, 3),
        )
        super().__init__(net=net, lr=0.1)
        self.forward_syncs = _HostSyncCounter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.forward_syncs:
            return super().forward(x)


class _CountedMonitor(BNStatsMonitor):
    """Counts the host copies the monitor makes when it logs."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.logging_syncs: list[list[str]] = []

    def on_train_batch_end(self, *args: Any) -> None:
        with _HostSyncCounter() as counter:
            super().on_train_batch_end(*args)
        self.logging_syncs.append(counter.calls)


def test_no_host_copy_inside_the_forward_and_one_per_logged_step(tmp_path: Path) -> None:
    model = _ThreeBN()
    monitor = _CountedMonitor(log_every_n_steps=2)
    logger = MemoryLogger()
    fast_trainer(tmp_path, callbacks=[monitor], logger=logger).fit(model, _loader())  # 6 steps, logs at 0, 2, 4
    assert model.forward_syncs.calls == []
    assert [len(calls) for calls in monitor.logging_syncs] == [1, 0, 1, 0, 1, 0]
    assert len(logger.values("bn_stats/net.6/mean_shift")) == 3
    # the values are those of the hooks' measurement: step 0 against the initial statistics is positive
    assert all(v > 0 for _, v in logger.values("bn_stats/net.1/var_log_ratio"))


class _CalledTwice(nn.Module):
    """One BatchNorm1d called on the inputs, then on ``3 x + 5``: two calls with different statistics per step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(x) + self.bn(3.0 * x + 5.0))


def test_a_layer_called_twice_in_a_step_is_measured_by_its_first_call(tmp_path: Path) -> None:
    inputs, targets = make_classification(n=8)  # one step of one batch
    model = UserClassifier(net=_CalledTwice())
    monitor, logger = BNStatsMonitor(log_every_n_steps=1), MemoryLogger()
    fast_trainer(tmp_path, callbacks=[monitor], logger=logger).fit(model, make_loader(inputs, targets, batch_size=8))
    # the first call meets the initial running statistics (mean 0, variance 1) with the raw inputs, in closed form
    var, mean = torch.var_mean(inputs, dim=0)
    eps = model.net.bn.eps
    expected = {
        "bn_stats/net.bn/mean_shift": float((mean.abs() / (1 + eps) ** 0.5).mean()),
        "bn_stats/net.bn/var_log_ratio": float(((var + eps) / (1 + eps)).log().abs().mean()),
    }
    assert logger.logged == [(0, pytest.approx(expected, rel=1e-5))]
    assert monitor.last_stats == pytest.approx(expected, rel=1e-5)


def test_by_default_it_logs_every_50_steps_from_step_0(tmp_path: Path) -> None:
    monitor, logger = BNStatsMonitor(), MemoryLogger()
    loader = make_loader(*make_classification(n=104), batch_size=2)  # 52 steps: 0 to 51
    model = UserClassifier(net=TinyMLP(batch_norm=True))
    fast_trainer(tmp_path, callbacks=[monitor], logger=logger).fit(model, loader)
    assert [step for step, _ in logger.values("bn_stats/net.body.1/mean_shift")] == [0, 50]


def test_last_stats_is_an_empty_dict_before_the_first_measurement() -> None:
    assert BNStatsMonitor().last_stats == {}


def test_a_second_fit_with_the_same_monitor_measures_its_own_step_0(tmp_path: Path) -> None:
    monitor = BNStatsMonitor(log_every_n_steps=2)
    for _ in range(2):  # each fit a new Trainer of 2 steps, starting at step 0
        logger = MemoryLogger()
        model = UserClassifier(net=TinyMLP(batch_norm=True))
        fast_trainer(tmp_path, callbacks=[monitor], logger=logger).fit(
            model, make_loader(*make_classification(n=8), batch_size=4)
        )
        assert [step for step, _ in logger.values("bn_stats/net.body.1/mean_shift")] == [0]
