"""One contract for every callback: each one's canonical setup drives the same checks.

Trains; resumes from an epoch-boundary checkpoint to the same weights as an uninterrupted run; pickles;
saves a state that loads with ``torch.load(weights_only=True)``; leaves evaluation batches alone; runs
under 2-process DDP. (The shape of mosaicml/composer's algorithm_settings table.)
"""

from __future__ import annotations

import copy
import json
import pickle
from collections.abc import Callable

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_reg import (
    BNRecalibration,
    BNStatsMonitor,
    CutMix,
    LabelSmoothing,
    MCDropoutEvaluation,
    MixUp,
    MixUpCutMix,
    RegMixup,
    TemperatureScaling,
)
from tests.helpers import (
    ReseedEachEpoch,
    TinyCNN,
    UserClassifier,
    ddp_fork_trainer,
    fast_trainer,
    make_images,
    make_loader,
    scrubbed_ddp_env,
)
from tests.helpers.ddp import skip_on_windows

SETUPS: dict[str, Callable[[], L.Callback]] = {
    "mixup": lambda: MixUp(0.4),
    "cutmix": lambda: CutMix(1.0),
    "mixup_cutmix": lambda: MixUpCutMix(mixup_alpha=0.4, cutmix_alpha=1.0),
    "label_smoothing": lambda: LabelSmoothing(0.1),
    "bn_recalibration": lambda: BNRecalibration(num_batches=2),
    "bn_stats_monitor": lambda: BNStatsMonitor(log_every_n_steps=1),
    "mc_dropout": lambda: MCDropoutEvaluation(n_samples=4, plot=False),
    "regmixup": lambda: RegMixup(20.0),
    "temperature_scaling": lambda: TemperatureScaling(),
}
NAMES = list(SETUPS)


def _model() -> UserClassifier:
    return UserClassifier(TinyCNN(num_classes=3, batch_norm=True, dropout=0.2), num_classes=3)


def _loaders() -> tuple:
    train = make_loader(*make_images(32, seed=0), batch_size=8)
    val = make_loader(*make_images(16, seed=1), batch_size=8)
    return train, val


def _fit(tmp_path, callback: L.Callback, epochs: int, ckpt_path=None, **kwargs) -> UserClassifier:
    L.seed_everything(0, verbose=False)
    model = _model()
    train, val = _loaders()
    trainer = fast_trainer(tmp_path, max_epochs=epochs, callbacks=[callback, ReseedEachEpoch()], **kwargs)
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("name", NAMES)
def test_callback_trains_with_finite_loss(tmp_path, name):
    model = _fit(tmp_path, SETUPS[name](), epochs=2)
    assert len(model.train_losses) == 8
    assert all(torch.isfinite(torch.tensor(model.train_losses)))


@pytest.mark.parametrize("name", NAMES)
def test_callback_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, name):
    straight = _fit(tmp_path / "straight", SETUPS[name](), epochs=3)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    L.seed_everything(0, verbose=False)
    train, val = _loaders()
    first = fast_trainer(
        tmp_path / "first", max_epochs=2, enable_checkpointing=True, callbacks=[SETUPS[name](), ReseedEachEpoch(), ckpt]
    )
    first.fit(_model(), train, val)
    resumed = _fit(tmp_path / "resumed", SETUPS[name](), epochs=3, ckpt_path=ckpt.last_model_path)

    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{key} differs after resume"


@pytest.mark.parametrize("name", NAMES)
def test_callback_state_loads_with_weights_only(tmp_path, name):
    callback = SETUPS[name]()
    _fit(tmp_path, callback, epochs=1)
    path = tmp_path / "state.pt"
    torch.save(callback.state_dict(), path)
    state = torch.load(path, weights_only=True)
    fresh = SETUPS[name]()
    fresh.load_state_dict(state)
    assert fresh.state_dict().keys() == callback.state_dict().keys()


@pytest.mark.parametrize("name", NAMES)
def test_callback_pickles_and_deep_copies(name):
    callback = SETUPS[name]()
    assert type(pickle.loads(pickle.dumps(callback))) is type(callback)
    assert type(copy.deepcopy(callback)) is type(callback)


@pytest.mark.parametrize("name", NAMES)
def test_callback_leaves_evaluation_batches_alone(tmp_path, name):
    model = _fit(tmp_path, SETUPS[name](), epochs=1)
    trainer = fast_trainer(tmp_path, callbacks=[SETUPS[name]()])
    _, val = _loaders()
    trainer.validate(model, val, verbose=False)
    trainer.test(model, val, verbose=False)
    expected = torch.cat([y for _, y in val])
    for stage in ("val", "test"):
        seen = torch.cat(model.seen_targets[stage][-len(val) :])
        assert torch.equal(seen, expected), f"{stage} targets changed"


class _WriteState(L.Callback):
    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        losses = getattr(pl_module, "train_losses", [])
        record = {"steps": trainer.global_step, "finite": bool(torch.isfinite(torch.tensor(losses)).all())}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@skip_on_windows
@pytest.mark.parametrize("name", NAMES)
def test_callback_trains_under_two_process_ddp(tmp_path, name):
    train, val = _loaders()
    with scrubbed_ddp_env():
        trainer = ddp_fork_trainer(tmp_path, max_epochs=1, callbacks=[SETUPS[name](), _WriteState(tmp_path)])
        trainer.fit(_model(), train, val)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert records == [{"steps": 2, "finite": True}] * 2
