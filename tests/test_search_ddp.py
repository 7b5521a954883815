"""A search trial under real `strategy="ddp"` (2 CPU ranks, gloo): one set of values on every rank, one report.

`strategy="ddp"` re-runs the command for rank 1 (and hangs inside pytest), so the search runs as its own
process, exactly as a user types it; each rank writes what it trained to a JSON file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

from tests.helpers.ddp import DDP_ENV_VARS, free_port

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402

ROOT = Path(__file__).parents[1]
CLI = Path(sys.executable).with_name("lightning-reg")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="DDP subprocess launch on POSIX")


class RecordRank(L.Callback):
    """Each rank writes the dropout it trained with and how many validations it ran."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.validations = 0

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validations += 1

    def on_fit_end(self, trainer, pl_module):
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "dropout": pl_module.hparams.dropout,
            "validations": self.validations,
            "pid": os.getpid(),
        }
        path = self.folder / f"dropout{pl_module.hparams.dropout}_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(record))


def test_ddp_trials_train_one_set_of_values_on_both_ranks_and_report_once(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in DDP_ENV_VARS}
    env["MASTER_PORT"] = str(free_port())
    env["PYTHONPATH"] = str(ROOT)
    space = tmp_path / "space.yaml"
    # 2 trials: the first reaches rank 1 through the environment, the second by a broadcast.
    space.write_text("model.dropout: [0.1, 0.4]\n")
    records = tmp_path / "records"
    records.mkdir()
    cmd = [
        str(CLI),
        "search",
        "--config",
        str(ROOT / "examples/configs/cnn_small_digits.yaml"),
        "--space",
        str(space),
        "--sampler",
        "grid",
        "--pruner",
        "none",
        "--output-dir",
        str(tmp_path / "out"),
        "--figures=false",
        "--progress=false",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--model.widths=[4, 8]",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=2",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.callbacks+={__name__}.RecordRank",
        f"--trainer.callbacks.folder={records}",
    ]
    result = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]

    study = optuna.load_study(study_name="cnn_small_digits-space", storage=f"sqlite:///{tmp_path / 'out/study.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE]  # 2 trials, not 2 x 2 ranks
    for trial in study.trials:
        dropout = trial.params["model.dropout"]
        ranks = [json.loads((records / f"dropout{dropout}_rank{r}.json").read_text()) for r in (0, 1)]
        assert [r["world_size"] for r in ranks] == [2, 2]
        assert ranks[0]["pid"] != ranks[1]["pid"]
        assert [r["validations"] for r in ranks] == [2, 2]
        assert sorted(trial.intermediate_values) == [2, 4]  # one report per validation (global steps 2 and 4)
        assert trial.value == trial.intermediate_values[4]
    assert sorted(p.name for p in records.iterdir()) == [
        "dropout0.1_rank0.json",
        "dropout0.1_rank1.json",
        "dropout0.4_rank0.json",
        "dropout0.4_rank1.json",
    ]
