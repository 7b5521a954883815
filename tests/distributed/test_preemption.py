"""Preemption: SLURM auto-requeue, SIGTERM mid-epoch, and epoch-boundary resume with every callback active."""

from __future__ import annotations

import os
import signal
import stat
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_reg import (
    BNRecalibration,
    BNStatsMonitor,
    LabelSmoothing,
    MCDropoutEvaluation,
    MixUpCutMix,
)
from tests.helpers import ReseedEachEpoch, TinyCNN, UserClassifier, fast_trainer, make_images, make_loader

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def all_callbacks() -> list[L.Callback]:
    return [
        MixUpCutMix(mixup_alpha=0.4, cutmix_alpha=1.0, switch_prob=0.5),
        LabelSmoothing(0.1),
        BNRecalibration(num_batches=2),
        BNStatsMonitor(log_every_n_steps=1),
        MCDropoutEvaluation(n_samples=4, plot=False),
    ]


def _model() -> UserClassifier:
    return UserClassifier(TinyCNN(num_classes=3, batch_norm=True, dropout=0.2), num_classes=3)


def _loaders():
    return make_loader(*make_images(32, seed=0), batch_size=8), make_loader(*make_images(16, seed=1), batch_size=8)


class SignalAt(L.Callback):
    """Sends ``signum`` to this process once, after optimizer step ``step``."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum, self.sent = step, signum, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class RecordStart(L.Callback):
    """Records the step a (resumed) fit starts from and the callbacks' restored states."""

    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step
        self.states = {cb.state_key: cb.state_dict() for cb in trainer.callbacks if cb is not self}


def _same_state(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """A SLURM job environment and an `scontrol` on the PATH that logs its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in {
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_JOB_NAME": "train",
        "SLURM_NODELIST": "localhost",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }.items():
        monkeypatch.setenv(key, value)
    return log


def test_slurm_requeue_saves_hpc_checkpoint_requeues_once_and_resumes_every_callback(tmp_path, fake_slurm):
    L.seed_everything(0, verbose=False)
    train, val = _loaders()
    root = tmp_path / "job"
    first = fast_trainer(
        root,
        max_epochs=2,
        plugins=[SLURMEnvironment(auto_requeue=True)],
        callbacks=[*all_callbacks(), SignalAt(step=3, signum=signal.SIGUSR1)],
    )
    first.fit(_model(), train, val)

    assert fake_slurm.read_text().splitlines() == ["requeue 4242"]
    hpc = root / "hpc_ckpt_1.ckpt"
    assert hpc.exists()
    saved = torch.load(hpc, weights_only=True)

    # The requeued job: same command, same folder; Lightning finds the HPC checkpoint by itself.
    record = RecordStart()
    second = fast_trainer(
        root, max_epochs=2, plugins=[SLURMEnvironment(auto_requeue=True)], callbacks=[*all_callbacks(), record]
    )
    second.fit(_model(), train, val)
    assert record.start_step == 3
    # Lightning stores only non-empty callback states; the mixing callback's generator must be among them.
    stateful = {key for key, state in record.states.items() if state}
    assert any(key.startswith("MixUpCutMix") for key in stateful)
    assert stateful <= set(saved["callbacks"])
    for key in stateful:
        assert _same_state(saved["callbacks"][key], record.states[key]), f"{key} not restored"
    assert second.global_step == 8


def test_sigterm_mid_epoch_writes_a_checkpoint_that_resumes_to_the_same_step_count(tmp_path):
    L.seed_everything(0, verbose=False)
    train, val = _loaders()
    on_exception = OnExceptionCheckpoint(dirpath=tmp_path, filename="on_exception")
    first = fast_trainer(
        tmp_path,
        max_epochs=2,
        enable_checkpointing=True,
        callbacks=[*all_callbacks(), on_exception, SignalAt(step=3, signum=signal.SIGTERM)],
    )
    with pytest.raises(SIGTERMException):
        first.fit(_model(), train, val)
    path = tmp_path / "on_exception.ckpt"
    assert path.exists()

    resumed = fast_trainer(tmp_path, max_epochs=2, callbacks=all_callbacks())
    resumed.fit(_model(), train, val, ckpt_path=path)
    assert resumed.global_step == 8  # what an uninterrupted run of 2 epochs x 4 batches reaches


def test_epoch_boundary_resume_with_all_callbacks_is_bit_identical(tmp_path):
    def fit(root, epochs, callbacks, ckpt_path=None):
        L.seed_everything(0, verbose=False)
        model = _model()
        train, val = _loaders()
        trainer = fast_trainer(root, max_epochs=epochs, enable_checkpointing=True, callbacks=callbacks)
        trainer.fit(model, train, val, ckpt_path=ckpt_path)
        return model

    straight = fit(tmp_path / "straight", 3, [*all_callbacks(), ReseedEachEpoch()])
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path / "first", 2, [*all_callbacks(), ReseedEachEpoch(), ckpt])
    resumed = fit(tmp_path / "resumed", 3, [*all_callbacks(), ReseedEachEpoch()], ckpt_path=ckpt.last_model_path)
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{key} differs after resume"
