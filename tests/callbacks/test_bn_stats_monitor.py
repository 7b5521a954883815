from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_reg import BNStatsMonitor
from lightning_reg.callbacks.bn_stats_monitor import batch_vs_running
from tests.helpers import TinyCNN, UserClassifier, fast_trainer, make_images, make_loader
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
    assert {f"bn_stats/net.body.1/{k}" for k in ("running_mean", "running_var", "mean_shift")} <= tags
    assert [e.step for e in events.Histograms("bn_stats/net.body.1/running_var")] == [0, 3]
    assert "bn_stats/net.body.1/mean_shift" in events.Tags()["scalars"]


@pytest.mark.parametrize("value", [0, -3, 1.5, True])
def test_invalid_log_every_n_steps_raises(value: object) -> None:
    with pytest.raises(ValueError, match="`log_every_n_steps` to be a positive int"):
        BNStatsMonitor(log_every_n_steps=value)  # type: ignore[arg-type]
