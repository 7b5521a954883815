"""Every callback and every zoo model under `strategy="ddp"` and `"ddp_spawn"` (2 CPU processes, gloo).

Both run as a subprocess (shared/testing.md: `ddp` inside pytest hangs, `ddp_spawn` costs ~30 s a fit), one launch
for many fits: tests/distributed/scripts/train_matrix.py. Its ranks write what they saw to JSON files; the tests
assert on them. The default run keeps one launch (each callback alone on cnn_small, plus a sequence model with
all callbacks, under `ddp`); the full model matrix under both strategies is marked slow.

Also here: the strategy audit's refusals. BNRecalibration and MCDropoutEvaluation forward the LightningModule
outside a step; strategies that shard parameters (FSDP, ModelParallel, DeepSpeed ZeRO-3) are refused at setup.
FSDP needs a GPU and DeepSpeed is not installed, so these use strategy objects without a Trainer.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from lightning_reg import BNRecalibration, MCDropoutEvaluation
from lightning_reg.callbacks._strategy import data_parallel_rank, sharding_strategy
from tests.helpers.ddp import DDP_ENV_VARS, free_port

SCRIPT = Path(__file__).parent / "scripts" / "train_matrix.py"
ROOT = Path(__file__).parents[2]
MIXERS = ("mixup", "cutmix", "mixup_cutmix")
MC_KEYS = {"mc/val/acc", "mc/val/nll", "mc/val/brier", "mc/val/ece", "mc/val/entropy", "mc/val/mutual_info"}
STEPS = 3
ALL_CALLBACKS = [
    "cnn_small+mixup",
    "cnn_small+cutmix",
    "cnn_small+mixup_cutmix",
    "cnn_small+label_smoothing",
    "cnn_small+bn_recalibration",
    "cnn_small+bn_stats_monitor",
    "cnn_small+mc_dropout",
]
ALL_MODELS = [f"{m}+all" for m in ("cnn_small", "cnn", "resnet18", "lstm", "gru", "transformer", "vit_tiny")]
HAS_BATCHNORM = {"cnn_small", "cnn", "resnet18"}

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="DDP subprocess launch on POSIX")


def _launch(tmp_path: Path, strategy: str, cases: list[str], timeout: float) -> dict[str, tuple[dict, dict]]:
    env = {k: v for k, v in os.environ.items() if k not in DDP_ENV_VARS}
    env.update(MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(SCRIPT), "--strategy", strategy, "--cases", ",".join(cases), "--out", str(tmp_path)]
    result = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    records = {}
    for case in cases:
        rank0, rank1 = (json.loads((tmp_path / case / f"rank{r}.json").read_text()) for r in range(2))
        records[case] = (rank0, rank1)
    return records


LAUNCHERS = {"ddp": "_SubprocessScriptLauncher", "ddp_spawn": "_MultiProcessingLauncher"}


def _check(case: str, rank0: dict[str, Any], rank1: dict[str, Any], strategy: str) -> None:
    model, _, what = case.partition("+")
    for rank, record in enumerate((rank0, rank1)):
        assert (record["rank"], record["world_size"], record["strategy"]) == (rank, 2, "DDPStrategy"), case
        assert record["launcher"] == LAUNCHERS[strategy], case
        assert record["steps"] == STEPS, f"{case}: rank {rank} stopped at step {record['steps']}"
        assert len(record["losses"]) == STEPS
        assert record["finite"], f"{case}: rank {rank} losses {record['losses']}"
    if what in MIXERS:
        # Both ranks were fed the same batch; each rank's own generator mixed it differently.
        assert rank0["before"] == rank1["before"], case
        assert rank0["after"] != rank1["after"], f"{case}: the ranks mixed identically"
    if what == "label_smoothing":
        assert rank0["after"] == rank1["after"], case  # deterministic: the same batch gives the same targets
        assert rank0["after"] != rank0["before"], case
    if what in ("bn_recalibration", "all"):
        assert rank0["recalibrations"] == rank1["recalibrations"] == 1, case
        assert rank0["bn"] == rank1["bn"], f"{case}: statistics differ between ranks after recalibration"
        assert bool(rank0["bn"]) == (model in HAS_BATCHNORM), case
    if what == "bn_stats_monitor" or (what == "all" and model in HAS_BATCHNORM):
        for record in (rank0, rank1):
            assert record["bn_stats"], case
            assert all(math.isfinite(v) for v in record["bn_stats"].values()), case
    if what in ("mc_dropout", "all"):
        assert rank0["mc"].keys() >= MC_KEYS, f"{case}: logged {sorted(rank0['mc'])}"
        assert rank0["mc"] == rank1["mc"], f"{case}: MC metrics differ between ranks"
        assert all(math.isfinite(v) for v in rank0["mc"].values()), case


def test_each_callback_on_cnn_small_and_a_sequence_model_with_all_callbacks_train_under_ddp(tmp_path: Path) -> None:
    cases = [*ALL_CALLBACKS, "gru+all"]
    records = _launch(tmp_path, "ddp", cases, timeout=240)
    for case, (rank0, rank1) in records.items():
        _check(case, rank0, rank1, "ddp")
    # Without recalibration each rank's last batch left its own running statistics: the check above has teeth.
    rank0, rank1 = records["cnn_small+bn_stats_monitor"]
    assert rank0["bn"] != rank1["bn"]


@pytest.mark.slow
def test_every_zoo_model_with_all_callbacks_trains_under_ddp(tmp_path: Path) -> None:
    for case, (rank0, rank1) in _launch(tmp_path, "ddp", ALL_MODELS, timeout=420).items():
        _check(case, rank0, rank1, "ddp")


@pytest.mark.slow
def test_every_callback_and_every_zoo_model_train_under_ddp_spawn(tmp_path: Path) -> None:
    records = _launch(tmp_path, "ddp_spawn", [*ALL_CALLBACKS, *ALL_MODELS], timeout=900)
    for case, (rank0, rank1) in records.items():
        _check(case, rank0, rank1, "ddp_spawn")


# --- strategy audit: refusals at setup -------------------------------------------------------------------------


def _deepspeed(stage: int) -> DeepSpeedStrategy:
    # DeepSpeedStrategy() needs the deepspeed package; the check only reads the ZeRO config.
    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    strategy.config = {"zero_optimization": {"stage": stage}}
    return strategy


SHARDING = {
    "fsdp": (lambda: FSDPStrategy(), "FSDPStrategy"),
    "model_parallel": (lambda: ModelParallelStrategy(), "ModelParallelStrategy"),
    "deepspeed_stage_3": (lambda: _deepspeed(3), r"DeepSpeedStrategy \(ZeRO stage 3\)"),
}


@pytest.mark.parametrize("name", list(SHARDING))
def test_bn_recalibration_refuses_a_sharding_strategy_at_fit_start_naming_the_alternative(name: str) -> None:
    make, label = SHARDING[name]
    trainer = SimpleNamespace(strategy=make())
    with pytest.raises(ValueError, match=rf"`BNRecalibration` does not support `{label}`.*strategy='ddp'"):
        BNRecalibration().setup(trainer, None, "fit")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(SHARDING))
def test_mc_dropout_refuses_a_sharding_strategy_where_it_samples(name: str) -> None:
    make, label = SHARDING[name]
    trainer = SimpleNamespace(strategy=make())
    for stage in ("fit", "validate", "test", "predict"):
        with pytest.raises(ValueError, match=rf"`MCDropoutEvaluation` does not support `{label}`.*strategy='ddp'"):
            MCDropoutEvaluation().setup(trainer, None, stage)  # type: ignore[arg-type]
    # Not sampled in fit or validate when only the test stage is evaluated: no reason to refuse.
    MCDropoutEvaluation(stages=["test"]).setup(trainer, None, "fit")  # type: ignore[arg-type]


def test_test_time_recalibration_is_refused_only_in_test() -> None:
    trainer = SimpleNamespace(strategy=FSDPStrategy())
    callback = BNRecalibration(dataloader="test", when="test_start")
    callback.setup(trainer, None, "validate")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="FSDPStrategy"):
        callback.setup(trainer, None, "test")  # type: ignore[arg-type]


@pytest.mark.parametrize("strategy", [DDPStrategy(), _deepspeed(2)], ids=["ddp", "deepspeed_stage_2"])
def test_strategies_with_whole_parameters_on_every_rank_are_accepted(strategy: Any) -> None:
    trainer = SimpleNamespace(strategy=strategy)
    assert sharding_strategy(trainer) is None  # type: ignore[arg-type]
    BNRecalibration().setup(trainer, None, "fit")  # type: ignore[arg-type]
    MCDropoutEvaluation().setup(trainer, None, "fit")  # type: ignore[arg-type]


def test_random_streams_follow_the_data_parallel_rank_not_the_global_rank() -> None:
    # Under tensor parallelism two global ranks of one model-parallel group share a data-parallel rank.
    strategy = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": 1})
    trainer = SimpleNamespace(strategy=strategy, global_rank=3)
    assert data_parallel_rank(trainer) == 1  # type: ignore[arg-type]
    assert data_parallel_rank(SimpleNamespace(strategy=object(), global_rank=3)) == 3  # type: ignore[arg-type]
