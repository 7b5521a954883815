"""The test harness itself: DDP helpers reach two ranks and clean up after themselves."""

import json
import os

import lightning as L
import torch
import torch.distributed as dist

from tests.helpers import (
    UserClassifier,
    ddp_fork_trainer,
    fast_trainer,
    make_classification,
    make_loader,
    scrubbed_ddp_env,
)
from tests.helpers.ddp import skip_on_windows


def _all_reduce_rank(rank: int, world_size: int) -> float:
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return float(t)


def test_process_group_pool_runs_both_ranks(process_group_pool):
    assert process_group_pool(_all_reduce_rank) == [3.0, 3.0]


class _WriteRank(L.Callback):
    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@skip_on_windows
def test_ddp_fork_trainer_runs_two_ranks_and_leaves_no_env(tmp_path):
    loader = make_loader(*make_classification(32), batch_size=8)
    with scrubbed_ddp_env():
        trainer = ddp_fork_trainer(tmp_path, callbacks=[_WriteRank(tmp_path)], max_steps=2)
        trainer.fit(UserClassifier(), loader)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert records == [{"rank": 0, "world_size": 2}, {"rank": 1, "world_size": 2}]
    assert "MASTER_PORT" not in os.environ


def test_fast_trainer_fits_user_module(tmp_path):
    L.seed_everything(0, verbose=False)
    model = UserClassifier()
    fast_trainer(tmp_path, max_epochs=5).fit(model, make_loader(*make_classification(64), batch_size=16))
    assert model.train_losses[-1] < model.train_losses[0]
