"""One contract for every callback: each one's canonical setup drives the same checks.

Trains; resumes from an epoch-boundary checkpoint to the same weights as an uninterrupted run; pickles;
saves a state that loads with ``torch.load(weights_only=True)``; leaves evaluation batches alone; runs
under 2-process DDP. (The shape of mosaicml/composer's algorithm_settings table.)
"""

from __future__ import annotations

import copy
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


# The callbacks that change what a training step sees; the others work outside training steps (evaluation,
# end of epoch, logging) and must leave training exactly as it is without them, the global RNG included.
CHANGES_TRAINING = {"mixup", "cutmix", "mixup_cutmix", "label_smoothing", "regmixup"}


def _plain_fit(tmp_path, callback: L.Callback | None, epochs: int = 2) -> UserClassifier:
    """A fit seeded once at the start (no per-epoch reseed): global RNG use by a callback shows in later epochs."""
    L.seed_everything(0, verbose=False)
    model = _model()
    train, val = _loaders()
    trainer = fast_trainer(tmp_path, max_epochs=epochs, callbacks=[] if callback is None else [callback])
    trainer.fit(model, train, val)
    return model


@pytest.fixture(scope="module")
def without_callback(tmp_path_factory) -> UserClassifier:
    return _plain_fit(tmp_path_factory.mktemp("plain"), None)


def _assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), f"{key} differs"


def _assert_same_state(a, b, where: str = "state") -> None:
    """Deep equality of two callback states (dicts, lists, tensors such as generator states, numbers)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            _assert_same_state(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where}: tensors differ"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("name", NAMES)
def test_callback_trains_with_a_finite_loss_and_touches_training_only_if_it_should(tmp_path, name, without_callback):
    model = _plain_fit(tmp_path, SETUPS[name]())
    assert len(model.train_losses) == len(without_callback.train_losses) == 8
    assert all(torch.isfinite(torch.tensor(model.train_losses)))
    if name in CHANGES_TRAINING:
        # The regularizer acted: every step saw other targets (soft or mixed) and so another loss.
        assert all(a != b for a, b in zip(model.train_losses, without_callback.train_losses, strict=True))
        assert not torch.equal(model.seen_targets["train"][0], without_callback.seen_targets["train"][0])
    else:
        # Bit for bit the run without the callback: the same losses, and the same weights after training.
        assert model.train_losses == without_callback.train_losses
        params = dict(model.named_parameters())
        for key, value in without_callback.named_parameters():
            assert torch.equal(params[key], value), f"{key} differs from the run without {name}"


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
def test_callback_state_loads_with_weights_only_and_continues_alike(tmp_path, name):
    callback = SETUPS[name]()
    _fit(tmp_path / "first", callback, epochs=1)
    path = tmp_path / "state.pt"
    torch.save(callback.state_dict(), path)
    fresh = SETUPS[name]()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    _assert_same_state(fresh.state_dict(), callback.state_dict())
    # The loaded state is the one that matters: the next fit draws (and trains) the same with either object.
    continued = _fit(tmp_path / "continued", callback, epochs=1)
    loaded = _fit(tmp_path / "loaded", fresh, epochs=1)
    _assert_same_parameters(continued, loaded)
    _assert_same_state(fresh.state_dict(), callback.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_callback_pickles_and_deep_copies_to_a_callback_that_behaves_the_same(tmp_path, name):
    callback = SETUPS[name]()
    _fit(tmp_path / "first", callback, epochs=1)  # a used callback: its generator has drawn, T is fitted
    pickled, copied = pickle.loads(pickle.dumps(callback)), copy.deepcopy(callback)
    assert type(pickled) is type(copied) is type(callback)
    _assert_same_state(pickled.state_dict(), callback.state_dict())
    _assert_same_state(copied.state_dict(), callback.state_dict())
    original = _fit(tmp_path / "original", callback, epochs=1)
    for clone, label in ((pickled, "pickled"), (copied, "copied")):
        again = _fit(tmp_path / label, clone, epochs=1)
        _assert_same_parameters(original, again)
        _assert_same_state(clone.state_dict(), callback.state_dict(), label)


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
        rank = trainer.global_rank
        params = {k: v.detach().clone() for k, v in pl_module.named_parameters()}
        torch.save(
            {"steps": trainer.global_step, "losses": pl_module.train_losses, "params": params},
            self.out_dir / f"rank{rank}.pt",
        )


def _ddp_fit(tmp_path, callback: L.Callback | None) -> list[dict]:
    L.seed_everything(0, verbose=False)
    train, val = _loaders()
    callbacks = ([] if callback is None else [callback]) + [_WriteState(tmp_path)]
    with scrubbed_ddp_env():
        trainer = ddp_fork_trainer(tmp_path, max_epochs=1, callbacks=callbacks)
        trainer.fit(_model(), train, val)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def ddp_without_callback(tmp_path_factory) -> list[dict]:
    return _ddp_fit(tmp_path_factory.mktemp("ddp_plain"), None)


@skip_on_windows
@pytest.mark.parametrize("name", NAMES)
def test_callback_trains_under_two_process_ddp(tmp_path, name, ddp_without_callback):
    ranks = _ddp_fit(tmp_path, SETUPS[name]())
    for rank in ranks:
        assert rank["steps"] == 2
        assert all(torch.isfinite(torch.tensor(rank["losses"])))
    # DDP averaged the gradients: both replicas hold the same weights, and each rank trained on its own shard.
    for key, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][key]), f"{key} differs between the ranks"
    assert ranks[0]["losses"] != ranks[1]["losses"]
    plain = ddp_without_callback[0]["params"]
    same = all(torch.equal(value, plain[key]) for key, value in ranks[0]["params"].items())
    # Training-time callbacks change the weights; the others leave the 2-process run as it is without them.
    assert same is (name not in CHANGES_TRAINING)
