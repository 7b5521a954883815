from __future__ import annotations

import importlib.util
import itertools
import json
import random
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, WeightAveraging

from lightning_reg import BNRecalibration
from lightning_reg._batch import get_entry, set_entry
from tests.helpers import TinyCNN, UserClassifier, fast_trainer, make_images, make_loader
from tests.helpers.ddp import ddp_fork_trainer, scrubbed_ddp_env, skip_on_windows
from tests.helpers.loggers import MemoryLogger


def _model() -> UserClassifier:
    torch.manual_seed(0)
    return UserClassifier(net=TinyCNN(), lr=0.5)


def _loader(as_dict: bool = False, n: int = 48, batch_size: int = 16) -> Any:
    inputs, targets = make_images(n=n)
    return make_loader(inputs, targets, batch_size=batch_size, as_dict=as_dict)


def _bn(model: UserClassifier) -> torch.nn.BatchNorm2d:
    return model.net.body[1]


def _expected(
    model: UserClassifier, loader: Any, num_batches: int | None = None, input_key: Any = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact statistics of the BN layer's inputs, in closed form: TinyCNN's BN normalizes its first conv's output,
    so they are the per-channel mean and unbiased variance of ``conv(all clean inputs)`` over (N, H, W)."""
    batches = list(itertools.islice(loader, num_batches))
    inputs = torch.cat([b if isinstance(b, torch.Tensor) else get_entry(b, input_key) for b in batches])
    return _conv_stats(model.net.body[0], inputs)


def _conv_stats(conv: torch.nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        h = conv(inputs)  # (N, C, H, W)
    var, mean = torch.var_mean(h.transpose(0, 1).reshape(h.shape[1], -1), dim=1)
    return mean, var


class _CorruptBatch(L.Callback):
    """Stands in for a mixing callback: changes the training batch in place in ``on_train_batch_start``."""

    def __init__(self, key: Any = 0) -> None:
        self.key = key

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        set_entry(batch, self.key, get_entry(batch, self.key) * 3.0 + 5.0)


class _Probe(L.Callback):
    """Records the BN running mean and the recalibration count when validation starts."""

    def __init__(self, recal: BNRecalibration) -> None:
        self.recal = recal
        self.at_validation: list[tuple[int, torch.Tensor]] = []

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.at_validation.append((self.recal.num_recalibrations, _bn(pl_module).running_mean.clone()))


def test_end_of_fit_checkpoint_and_final_validation_hold_the_recalibrated_statistics(tmp_path: Path) -> None:
    model, loader = _model(), _loader()
    recal = BNRecalibration(num_batches=None)
    probe = _Probe(recal)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last-epoch")
    trainer = fast_trainer(tmp_path, max_epochs=2, callbacks=[ckpt, recal, probe], enable_checkpointing=True)
    trainer.fit(model, loader, val_dataloaders=_loader(n=16))
    mean, var = _expected(model, loader)
    torch.testing.assert_close(_bn(model).running_mean, mean)
    torch.testing.assert_close(_bn(model).running_var, var)
    assert recal.num_recalibrations == 1
    # the final validation ran after the recalibration, the first one before it
    assert [count for count, _ in probe.at_validation] == [0, 1]
    torch.testing.assert_close(probe.at_validation[-1][1], mean)
    saved = torch.load(ckpt.best_model_path, weights_only=True)["state_dict"]
    torch.testing.assert_close(saved["net.body.1.running_mean"], mean)
    torch.testing.assert_close(saved["net.body.1.running_var"], var)


def test_without_validation_the_checkpoint_saved_at_epoch_end_is_recalibrated(tmp_path: Path) -> None:
    model, loader = _model(), _loader()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="end")
    trainer = fast_trainer(tmp_path, max_epochs=1, callbacks=[BNRecalibration(None), ckpt], enable_checkpointing=True)
    trainer.fit(model, loader)
    saved = torch.load(ckpt.best_model_path, weights_only=True)["state_dict"]
    torch.testing.assert_close(saved["net.body.1.running_var"], _expected(model, loader)[1])


@pytest.mark.parametrize("as_dict", [False, True], ids=["list", "dict"])
def test_recalibrates_on_clean_batches_not_on_the_batches_a_callback_mixed(tmp_path: Path, as_dict: bool) -> None:
    key = "inputs" if as_dict else 0
    model, loader = _model(), _loader(as_dict=as_dict)
    trainer = fast_trainer(tmp_path, callbacks=[_CorruptBatch(key), BNRecalibration(2, input_key=key)])
    trainer.fit(model, loader)
    mean, var = _expected(model, loader, num_batches=2, input_key=key)
    torch.testing.assert_close(_bn(model).running_mean, mean)
    torch.testing.assert_close(_bn(model).running_var, var)


def test_every_n_epochs_recalibrates_before_each_validation(tmp_path: Path) -> None:
    recal = BNRecalibration(None, when=None, every_n_epochs=1)
    probe = _Probe(recal)
    trainer = fast_trainer(tmp_path, max_epochs=3, callbacks=[recal, probe])
    trainer.fit(_model(), _loader(), val_dataloaders=_loader(n=16))
    assert [count for count, _ in probe.at_validation] == [1, 2, 3]


def test_fit_end_with_max_steps_recalibrates_once_at_the_last_step(tmp_path: Path) -> None:
    recal = BNRecalibration(None)
    logger = MemoryLogger()
    trainer = fast_trainer(tmp_path, max_epochs=-1, max_steps=4, callbacks=[recal], logger=logger)
    model = _model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, _loader())
    # at the planned last step, not as the late fallback of an early stop
    assert not [w for w in caught if "fit stopped before its planned last batch" in str(w.message)]
    assert recal.num_recalibrations == 1
    steps = [step for step, _ in logger.values("bn_recalibration/mean_abs_change_var")]
    assert steps == [4]
    assert recal.last_report is not None
    assert logger.values("bn_recalibration/mean_abs_change_mean")[0][1] == recal.last_report.mean_abs_change_mean


class _StopAfterFirstEpoch(L.Callback):
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.should_stop = True


def test_an_early_stop_recalibrates_at_train_end_with_a_warning(tmp_path: Path) -> None:
    recal = BNRecalibration(None)
    model, loader = _model(), _loader()
    trainer = fast_trainer(tmp_path, max_epochs=5, callbacks=[recal, _StopAfterFirstEpoch()])
    with pytest.warns(UserWarning, match="fit stopped before its planned last batch"):
        trainer.fit(model, loader)
    assert recal.num_recalibrations == 1
    torch.testing.assert_close(_bn(model).running_var, _expected(model, loader)[1])


class _FreezeBN(L.Callback):
    """The frozen-BN idiom of fine-tuning: the BN layer stays in eval mode while the rest trains."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _bn(pl_module).eval()


def test_a_bn_layer_frozen_during_training_keeps_its_statistics(tmp_path: Path) -> None:
    model = _model()
    _bn(model).running_mean.fill_(0.25)
    recal = BNRecalibration(None, when="test_start", dataloader="test")
    trainer = fast_trainer(tmp_path, callbacks=[_FreezeBN(), recal])
    trainer.fit(model, _loader())
    with pytest.warns(UserWarning, match="found no normalization layer"):
        trainer.test(model, _loader(n=16))
    assert recal.last_report is not None
    assert recal.last_report.frozen == ["net.body.1"]
    assert torch.equal(_bn(model).running_mean, torch.full((8,), 0.25))


def test_test_start_adapts_the_statistics_to_the_test_data(tmp_path: Path) -> None:
    model = _model()
    test_inputs, test_targets = make_images(n=20, seed=3)
    test_loader = make_loader(test_inputs + 2.0, test_targets, batch_size=8)  # shifted test distribution
    recal = BNRecalibration(None, when="test_start", dataloader="test")
    trainer = fast_trainer(tmp_path, callbacks=[recal])
    trainer.fit(model, _loader())
    assert recal.num_recalibrations == 0
    expected = _expected(model, test_loader)
    trainer.test(model, test_loader)
    assert recal.num_recalibrations == 1
    torch.testing.assert_close(_bn(model).running_mean, expected[0])


class _Standardizer(L.LightningModule):
    """A module of buffers only: a BatchNorm without affine parameters that standardizes its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(1, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)

    def test_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self(batch[0])


def test_test_start_adapts_a_module_of_buffers_only(tmp_path: Path) -> None:
    inputs, targets = make_images(n=24, seed=3)
    model, recal = _Standardizer(), BNRecalibration(None, when="test_start", dataloader="test")
    fast_trainer(tmp_path, callbacks=[recal]).test(model, make_loader(inputs + 2.0, targets, batch_size=8))
    var, mean = torch.var_mean(inputs.flatten() + 2.0)  # one channel: over every pixel of every image
    torch.testing.assert_close(model.bn.running_mean, mean.reshape(1))
    torch.testing.assert_close(model.bn.running_var, var.reshape(1))


def test_a_model_without_norm_layers_trains_as_without_the_callback_with_a_warning(tmp_path: Path) -> None:
    def train(callbacks: list[L.Callback]) -> UserClassifier:
        torch.manual_seed(0)
        model = UserClassifier(net=TinyCNN(batch_norm=False), lr=0.5)  # parameters, no buffers
        fast_trainer(tmp_path, callbacks=callbacks).fit(model, _loader())
        return model

    recal = BNRecalibration(None)
    with pytest.warns(UserWarning, match="found no normalization layer"):
        with_callback = train([recal])
    assert recal.num_recalibrations == 1
    without = train([])
    for (name, a), (_, b) in zip(with_callback.named_parameters(), without.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_repr_names_a_loader_passed_by_the_user_by_its_type() -> None:
    recal = BNRecalibration(None, dataloader=_loader(), every_n_epochs=2)
    expected = "BNRecalibration(num_batches=None, dataloader='DataLoader', when='fit_end', every_n_epochs=2)"
    assert repr(recal) == expected


class _Stream(torch.utils.data.IterableDataset):
    """The images as a stream with no length: Lightning counts its batches as infinite."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __iter__(self) -> Any:
        return iter(zip(self.inputs, self.targets, strict=True))


def test_a_training_loader_without_length_is_taken_whole(tmp_path: Path) -> None:
    model = _model()
    loader = torch.utils.data.DataLoader(_Stream(*make_images(n=48)), batch_size=16)  # 3 batches, no len()
    recal = BNRecalibration(None)
    fast_trainer(tmp_path, callbacks=[recal]).fit(model, loader)
    assert recal.last_report is not None
    assert recal.last_report.num_batches == 3
    torch.testing.assert_close(_bn(model).running_var, _expected(model, loader)[1])


def test_a_loader_passed_by_the_user_is_not_capped_by_the_trainers_val_or_test_loaders(tmp_path: Path) -> None:
    model, mine = _model(), _loader(n=32, batch_size=8)  # 4 batches
    at_fit_end = BNRecalibration(None, dataloader=mine)
    trainer = fast_trainer(tmp_path, callbacks=[at_fit_end])
    trainer.fit(model, _loader(), val_dataloaders=_loader(n=8, batch_size=8))  # 1 val batch
    assert at_fit_end.last_report is not None
    assert at_fit_end.last_report.num_batches == 4
    at_test = BNRecalibration(None, dataloader=mine, when="test_start")
    fast_trainer(tmp_path, callbacks=[at_test]).test(model, _loader(n=8, batch_size=8))  # 1 test batch
    assert at_test.last_report is not None
    assert at_test.last_report.num_batches == 4


def test_limit_test_batches_caps_the_test_loader(tmp_path: Path) -> None:
    model, test = _model(), _loader(n=24, batch_size=8)
    recal = BNRecalibration(None, dataloader="test", when="test_start")
    fast_trainer(tmp_path, callbacks=[recal], limit_test_batches=2).test(model, test)
    assert recal.last_report is not None
    assert recal.last_report.num_batches == 2
    torch.testing.assert_close(_bn(model).running_var, _expected(model, test, num_batches=2)[1])


@pytest.mark.parametrize("wrap", ["list", "dict"])
def test_one_val_loader_in_a_list_or_dict_is_the_one_used(tmp_path: Path, wrap: str) -> None:
    model, val = _model(), _loader(n=16, batch_size=8)
    wrapped = [val] if wrap == "list" else {"held_out": val}
    recal = BNRecalibration(None, dataloader="val")
    fast_trainer(tmp_path, callbacks=[recal]).fit(model, _loader(), val_dataloaders=wrapped)
    torch.testing.assert_close(_bn(model).running_var, _expected(model, val)[1])


def test_two_val_loaders_are_refused_with_the_fix(tmp_path: Path) -> None:
    val = _loader(n=16, batch_size=8)
    trainer = fast_trainer(tmp_path, callbacks=[BNRecalibration(None, dataloader="val")])
    match = (
        r"found 2 val dataloaders and cannot tell which to use\. Pass one: `BNRecalibration\(dataloader=my_loader\)`"
    )
    with pytest.raises(ValueError, match=match):
        trainer.fit(_model(), _loader(), val_dataloaders=[val, val])


def test_a_dataloader_passed_by_the_user_is_used(tmp_path: Path) -> None:
    model, mine = _model(), _loader(n=24, batch_size=6)
    trainer = fast_trainer(tmp_path, callbacks=[BNRecalibration(None, dataloader=mine)])
    trainer.fit(model, _loader())
    torch.testing.assert_close(_bn(model).running_var, _expected(model, mine)[1])


def test_val_dataloader_from_the_trainer(tmp_path: Path) -> None:
    model, val = _model(), _loader(n=16, batch_size=8)
    trainer = fast_trainer(tmp_path, callbacks=[BNRecalibration(None, dataloader="val")], limit_val_batches=0)
    with pytest.raises(RuntimeError, match="found no val dataloader"):
        trainer.fit(model, _loader())  # no val loader anywhere
    trainer = fast_trainer(tmp_path, callbacks=[BNRecalibration(None, dataloader="val", every_n_epochs=1)])
    trainer.fit(model, _loader(), val_dataloaders=val)
    torch.testing.assert_close(_bn(model).running_var, _expected(model, val)[1])


class _ValData(L.LightningDataModule):
    def __init__(self, val: Any) -> None:
        super().__init__()
        self.val = val

    def train_dataloader(self) -> Any:
        return _loader()

    def val_dataloader(self) -> Any:
        return self.val


@pytest.mark.parametrize("source", ["fit-argument", "datamodule"])
def test_val_dataloader_is_found_when_limit_val_batches_is_zero(tmp_path: Path, source: str) -> None:
    """`limit_val_batches=0` turns validation off; the val loader still exists and is the one recalibrated on."""
    model, val = _model(), _loader(n=24, batch_size=8)
    recal = BNRecalibration(None, dataloader="val")
    trainer = fast_trainer(tmp_path, callbacks=[recal], limit_val_batches=0)
    if source == "datamodule":
        trainer.fit(model, datamodule=_ValData(val))
    else:
        trainer.fit(model, _loader(), val_dataloaders=val)
    mean, var = _expected(model, val)
    torch.testing.assert_close(_bn(model).running_mean, mean)
    torch.testing.assert_close(_bn(model).running_var, var)
    assert recal.last_report is not None
    assert recal.last_report.num_batches == 3


def test_limit_val_batches_caps_the_val_loader(tmp_path: Path) -> None:
    model, val = _model(), _loader(n=24, batch_size=8)
    recal = BNRecalibration(100, dataloader="val")
    fast_trainer(tmp_path, callbacks=[recal], limit_val_batches=2).fit(model, _loader(), val_dataloaders=val)
    assert recal.last_report is not None
    assert recal.last_report.num_batches == 2
    torch.testing.assert_close(_bn(model).running_var, _expected(model, val, num_batches=2)[1])


# --- the batches the trainer runs: limit_train_batches, fast_dev_run ------------------------------


@pytest.mark.parametrize(
    ("flags", "expected"),
    [({"limit_train_batches": 2}, 2), ({"limit_train_batches": 0.5}, 3), ({"fast_dev_run": True}, 1)],
    ids=["limit-int", "limit-fraction", "fast-dev-run"],
)
def test_the_pass_takes_no_more_batches_than_the_trainer_runs(tmp_path: Path, flags: dict, expected: int) -> None:
    model, loader = _model(), _loader(n=48, batch_size=8)  # 6 batches
    recal = BNRecalibration(num_batches=100)
    fast_trainer(tmp_path, callbacks=[recal], **flags).fit(model, loader)
    assert recal.num_recalibrations == 1
    assert recal.last_report is not None
    assert recal.last_report.num_batches == expected
    assert int(_bn(model).num_batches_tracked) == expected
    torch.testing.assert_close(_bn(model).running_var, _expected(model, loader, num_batches=expected)[1])


def test_fast_dev_run_also_caps_a_loader_passed_by_the_user(tmp_path: Path) -> None:
    model, mine = _model(), _loader(n=48, batch_size=8)
    recal = BNRecalibration(None, dataloader=mine)
    fast_trainer(tmp_path, callbacks=[recal], fast_dev_run=2).fit(model, _loader())
    assert recal.last_report is not None
    assert recal.last_report.num_batches == 2


def test_the_frozen_layers_seen_in_training_come_back_from_the_checkpoint(tmp_path: Path) -> None:
    # Trained with a frozen BN layer, then tested with test-time adaptation in a new process: only the checkpoint
    # knows that layer was frozen (the restored model is in eval mode throughout), and the layer keeps its statistics.
    model = _model()
    _bn(model).running_mean.fill_(0.25)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="frozen")
    adapt = BNRecalibration(None, when="test_start", dataloader="test")
    trainer = fast_trainer(tmp_path, callbacks=[_FreezeBN(), adapt, ckpt], enable_checkpointing=True)
    trainer.fit(model, _loader())
    assert adapt.state_dict() == {"frozen": ["net.body.1"], "num_recalibrations": 0}

    restored, fresh = _model(), BNRecalibration(None, when="test_start", dataloader="test")
    with pytest.warns(UserWarning, match="found no normalization layer"):
        fast_trainer(tmp_path, callbacks=[fresh]).test(restored, _loader(n=16), ckpt_path=ckpt.best_model_path)
    assert fresh.state_dict()["frozen"] == ["net.body.1"]
    assert torch.equal(_bn(restored).running_mean, torch.full((8,), 0.25))

    # Without that state (a checkpoint from before these fields), the same test adapts the layer to the test data.
    older, plain = _model(), BNRecalibration(None, when="test_start", dataloader="test")
    plain.load_state_dict({})
    assert plain.state_dict() == {"frozen": [], "num_recalibrations": 0}
    older.load_state_dict(torch.load(ckpt.best_model_path, weights_only=True)["state_dict"])
    expected = _expected(older, _loader(n=16))
    fast_trainer(tmp_path, callbacks=[plain]).test(older, _loader(n=16))
    torch.testing.assert_close(_bn(older).running_mean, expected[0])


def test_repr_of_the_defaults_and_nothing_reported_before_a_pass() -> None:
    recal = BNRecalibration()
    assert repr(recal) == "BNRecalibration(num_batches=100, dataloader='train', when='fit_end', every_n_epochs=None)"
    assert recal.last_report is None
    assert recal.num_recalibrations == 0


def test_the_smallest_valid_counts_are_accepted() -> None:
    recal = BNRecalibration(num_batches=1, every_n_epochs=1)
    assert (recal.num_batches, recal.every_n_epochs) == (1, 1)


_NEVER_RUNS = (
    "`BNRecalibration` would never run: `when=None` and `every_n_epochs=None`. "
    "Pass `when='fit_end'` (default), `when='test_start'` or `every_n_epochs=N`."
)
_TEST_ONLY = (
    "`dataloader='test'` is only available at test time: use it with `when='test_start'` and "
    "`every_n_epochs=None`, but got when='fit_end', every_n_epochs=None."
)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_batches": 0}, ValueError, "Expected `num_batches` to be a positive int or None, but got 0."),
        ({"num_batches": 1.5}, ValueError, "Expected `num_batches` to be a positive int or None, but got 1.5."),
        ({"num_batches": True}, ValueError, "Expected `num_batches` to be a positive int or None, but got True."),
        (
            {"dataloader": 3},
            TypeError,
            "Expected `dataloader` to be one of ('train', 'val', 'test') or an iterable of batches (a DataLoader), "
            "but got int.",
        ),
        ({"every_n_epochs": 1.5}, ValueError, "Expected `every_n_epochs` to be a positive int or None, but got 1.5."),
        ({"every_n_epochs": True}, ValueError, "Expected `every_n_epochs` to be a positive int or None, but got True."),
        ({"when": None}, ValueError, _NEVER_RUNS),
        ({"dataloader": "test"}, ValueError, _TEST_ONLY),
    ],
)
def test_invalid_arguments_raise_with_the_whole_message(kwargs: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error) as raised:
        BNRecalibration(**kwargs)
    assert str(raised.value) == message


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_batches": 0}, ValueError, "`num_batches` to be a positive int"),
        ({"dataloader": "holdout"}, ValueError, r"`dataloader` to be one of \('train', 'val', 'test'\)"),
        ({"dataloader": 3}, TypeError, "an iterable of batches"),
        ({"when": "epoch_end"}, ValueError, r"`when` to be one of \('fit_end', 'test_start'\)"),
        ({"every_n_epochs": 0}, ValueError, "`every_n_epochs` to be a positive int"),
        ({"when": None}, ValueError, "would never run"),
        ({"dataloader": "test"}, ValueError, "only available at test time"),
        ({"input_key": 1.5}, TypeError, "`input_key` to be an int"),
        ({"forward_fn": "forward"}, TypeError, "`forward_fn` to be None or a callable"),
    ],
)
def test_invalid_arguments_raise_with_the_fix(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        BNRecalibration(**kwargs)


# --- 2 processes ----------------------------------------------------------------------------------


class _WriteStats(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bn = _bn(pl_module)  # type: ignore[arg-type]
        stats = {"mean": bn.running_mean.tolist(), "var": bn.running_var.tolist()}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(stats))


@skip_on_windows
def test_two_ranks_get_the_statistics_of_the_union_of_their_shards(tmp_path: Path) -> None:
    model, loader = _model(), _loader(n=48, batch_size=8)
    with scrubbed_ddp_env():
        trainer = ddp_fork_trainer(tmp_path, callbacks=[BNRecalibration(None), _WriteStats(tmp_path)])
        trainer.fit(model, loader)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    # one BN layer: its exact statistics are those of the conv outputs of all 48 samples, however they are split
    inputs, _ = make_images(n=48)
    mean, var = _expected(model, [inputs])
    torch.testing.assert_close(torch.tensor(ranks[0]["mean"]), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(ranks[0]["var"]), var, rtol=1e-5, atol=1e-5)


class _WriteFinal(L.Callback):
    """Each rank writes its final BN statistics and conv weights."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        conv, bn = pl_module.net.body[0], _bn(pl_module)  # type: ignore[arg-type]
        stats = {
            "mean": bn.running_mean.tolist(),
            "var": bn.running_var.tolist(),
            "weight": conv.weight.tolist(),
            "bias": conv.bias.tolist(),
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(stats))


@skip_on_windows
def test_two_ranks_split_a_val_loader_lightning_did_not_load_and_recalibrate_the_averaged_weights(
    tmp_path: Path,
) -> None:
    """DDP, `limit_val_batches=0` (Lightning shards no val loader then) and EMA: the ranks split the val batches
    between them, and end with the exact statistics of the whole val set under the final averaged weights."""
    model, val = _model(), _loader(n=40, batch_size=8)  # 5 val batches: 3 on rank 0, 2 on rank 1
    callbacks = [BNRecalibration(None, dataloader="val"), EMAWeightAveraging(decay=0.5), _WriteFinal(tmp_path)]
    with scrubbed_ddp_env():
        trainer = ddp_fork_trainer(tmp_path, callbacks=callbacks, limit_val_batches=0, max_epochs=2)
        trainer.fit(model, _loader(n=48, batch_size=8), val_dataloaders=val)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    conv = TinyCNN().body[0]
    conv.load_state_dict({"weight": torch.tensor(ranks[0]["weight"]), "bias": torch.tensor(ranks[0]["bias"])})
    mean, var = _conv_stats(conv, torch.cat([x for x, _ in val]))  # each val sample counted once
    torch.testing.assert_close(torch.tensor(ranks[0]["mean"]), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(ranks[0]["var"]), var, rtol=1e-6, atol=1e-7)


class _Batches:
    """A plain iterable of batches with a length (not a DataLoader): nothing shards it."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _OwnShards(UserClassifier):
    """Builds its val loader on each rank: already sharded by a DistributedSampler (or a batch sampler over one)."""

    def __init__(self, how: str) -> None:
        super().__init__(net=TinyCNN())
        self.how = how

    def val_dataloader(self) -> Any:
        from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, TensorDataset

        inputs, targets = make_images(n=40)
        if self.how == "plain":
            return _Batches([list(b) for b in zip(inputs.split(8), targets.split(8), strict=True)])
        data = TensorDataset(inputs, targets)
        if self.how == "index_lists":  # a batch sampler that is a list of index lists: no `sampler` to look at
            return DataLoader(data, batch_sampler=[list(range(i, i + 8)) for i in range(0, 40, 8)])
        sampler = DistributedSampler(data, shuffle=False)
        if self.how == "sampler":
            return DataLoader(data, sampler=sampler, batch_size=8)
        return DataLoader(data, batch_sampler=BatchSampler(sampler, batch_size=8, drop_last=False))


@skip_on_windows
@pytest.mark.parametrize("how", ["sampler", "batch_sampler", "plain", "index_lists"])
def test_two_ranks_keep_a_val_loaders_own_shards_and_split_a_plain_iterable(tmp_path: Path, how: str) -> None:
    """`limit_val_batches=0`: Lightning shards no val loader. One already sharded by the user is kept as it is (split
    again, the ranks would see a quarter each); a plain iterable or a loader over index lists is split by batches (kept
    whole, every sample would count twice)."""
    torch.manual_seed(0)
    model = _OwnShards(how)
    callbacks = [BNRecalibration(None, dataloader="val"), _WriteFinal(tmp_path)]
    with scrubbed_ddp_env():
        trainer = ddp_fork_trainer(tmp_path, callbacks=callbacks, limit_val_batches=0, use_distributed_sampler=False)
        trainer.fit(model, _loader(n=32, batch_size=8))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    conv = TinyCNN().body[0]
    conv.load_state_dict({"weight": torch.tensor(ranks[0]["weight"]), "bias": torch.tensor(ranks[0]["bias"])})
    mean, var = _conv_stats(conv, make_images(n=40)[0])  # each val sample counted once
    torch.testing.assert_close(torch.tensor(ranks[0]["mean"]), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(ranks[0]["var"]), var, rtol=1e-6, atol=1e-7)


# --- the example ---------------------------------------------------------------------------------


def test_example_runs_and_recalibrates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the example's logs and checkpoints
    path = Path(__file__).resolve().parents[2] / "examples" / "bn_recalibration.py"
    spec = importlib.util.spec_from_file_location("example_bn_recalibration", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    metrics = module.main(epochs=1, fast=True)
    assert 0.0 <= metrics["test_acc"] <= 1.0
    assert metrics["bn_mean_abs_change_var"] > 0
    saved = torch.load(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    # `limit_train_batches=2` in the fast run: the recalibration took those 2 batches, not `num_batches=100`
    assert int(saved["state_dict"]["net.features.1.num_batches_tracked"]) == 2


@pytest.mark.parametrize(("precision", "dtype"), [("64-true", torch.float64), ("bf16-true", torch.bfloat16)])
def test_batches_go_through_the_precision_plugin(tmp_path: Path, precision: str, dtype: torch.dtype) -> None:
    # The module is cast to `dtype`; raw loader batches are float32 and would fail the first conv without it.
    model = _model()
    callback = BNRecalibration(num_batches=None)
    fast_trainer(tmp_path, precision=precision, callbacks=[callback]).fit(model, _loader())
    assert callback.num_recalibrations == 1
    assert _bn(model).running_mean.dtype == dtype
    assert int(_bn(model).num_batches_tracked) == 3  # every batch of the loader


# --- weight averaging: the statistics of the weights the model ends with ----------------------------


@pytest.mark.parametrize("validation", [True, False], ids=["with-val", "no-val"])
@pytest.mark.parametrize("order", ["recal-first", "averaging-first"])
def test_with_ema_weight_averaging_the_final_model_and_checkpoint_hold_the_averaged_weights_statistics(
    tmp_path: Path, order: str, validation: bool
) -> None:
    model, loader = _model(), _loader()
    recal = BNRecalibration(None)
    ema = EMAWeightAveraging(decay=0.5)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="final")
    callbacks = [recal, ema] if order == "recal-first" else [ema, recal]
    trainer = fast_trainer(tmp_path, max_epochs=2, callbacks=[*callbacks, ckpt], enable_checkpointing=True)
    trainer.fit(model, loader, val_dataloaders=_loader(n=16) if validation else None)
    # the final model: its (averaged) conv weights' exact statistics over the training batches
    mean, var = _expected(model, loader)
    torch.testing.assert_close(_bn(model).running_mean, mean)
    torch.testing.assert_close(_bn(model).running_var, var)
    assert int(_bn(model).num_batches_tracked) == 3
    # the final checkpoint: the same weights, and the statistics of those weights
    saved = torch.load(ckpt.best_model_path, weights_only=True)["state_dict"]
    torch.testing.assert_close(saved["net.body.0.weight"], model.net.body[0].weight)
    conv = TinyCNN().body[0]
    conv.load_state_dict({"weight": saved["net.body.0.weight"], "bias": saved["net.body.0.bias"]})
    inputs = torch.cat([x for x, _ in loader])
    saved_mean, saved_var = _conv_stats(conv, inputs)
    torch.testing.assert_close(saved["net.body.1.running_mean"], saved_mean)
    torch.testing.assert_close(saved["net.body.1.running_var"], saved_var)


def test_with_weight_averaging_without_buffer_averaging_the_final_statistics_are_recalibrated(tmp_path: Path) -> None:
    """`use_buffers=False` keeps the averaged copy's statistics from setup time: recalibration replaces them."""
    model, loader = _model(), _loader()
    trainer = fast_trainer(
        tmp_path, max_epochs=2, callbacks=[WeightAveraging(use_buffers=False), BNRecalibration(None)]
    )
    trainer.fit(model, loader)
    mean, var = _expected(model, loader)
    torch.testing.assert_close(_bn(model).running_mean, mean)
    torch.testing.assert_close(_bn(model).running_var, var)


class _ValidationStats(L.Callback):
    """The BN running mean that each validation batch sees (after WeightAveraging swapped its weights in)."""

    def __init__(self) -> None:
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.seen.append((pl_module.net.body[0].weight.detach().clone(), _bn(pl_module).running_var.clone()))


def test_with_weight_averaging_every_n_epochs_each_validation_sees_the_averaged_weights_statistics(
    tmp_path: Path,
) -> None:
    model, loader = _model(), _loader()
    probe = _ValidationStats()
    callbacks = [probe, BNRecalibration(None, when=None, every_n_epochs=1), EMAWeightAveraging(decay=0.5)]
    fast_trainer(tmp_path, max_epochs=2, callbacks=callbacks).fit(model, loader, val_dataloaders=_loader(n=8))
    inputs = torch.cat([x for x, _ in loader])
    assert len(probe.seen) == 2
    for weight, running_var in probe.seen:
        conv = TinyCNN().body[0]
        conv.load_state_dict({"weight": weight, "bias": model.net.body[0].bias.detach() * 0})
        # the bias shifts the mean only: the variance identifies the weights' statistics
        torch.testing.assert_close(running_var, _conv_stats(conv, inputs)[1])


def test_with_weight_averaging_a_bn_layer_frozen_during_training_keeps_its_statistics(tmp_path: Path) -> None:
    model = _model()
    _bn(model).running_mean.fill_(0.25)
    callbacks = [_FreezeBN(), BNRecalibration(None), EMAWeightAveraging(decay=0.5)]
    with pytest.warns(UserWarning, match="found no normalization layer"):
        fast_trainer(tmp_path, max_epochs=2, callbacks=callbacks).fit(model, _loader())
    assert torch.equal(_bn(model).running_mean, torch.full((8,), 0.25))


def test_with_weight_averaging_first_an_early_stop_hands_the_recalibrated_statistics_to_the_model(
    tmp_path: Path,
) -> None:
    """EMA's `on_train_end` copies the averaged weights with their old statistics first; the late recalibration
    (early stop) must still leave the model with the statistics of those weights."""
    model, loader = _model(), _loader()
    callbacks = [EMAWeightAveraging(decay=0.5), BNRecalibration(None), _StopAfterFirstEpoch()]
    with pytest.warns(UserWarning, match="fit stopped before its planned last batch"):
        fast_trainer(tmp_path, max_epochs=5, callbacks=callbacks).fit(model, loader)
    mean, var = _expected(model, loader)
    torch.testing.assert_close(_bn(model).running_mean, mean)
    torch.testing.assert_close(_bn(model).running_var, var)
    assert int(_bn(model).num_batches_tracked) == 3


def test_with_weight_averaging_the_sanity_check_recalibrates_nothing(tmp_path: Path) -> None:
    model, loader = _model(), _loader()
    recal = BNRecalibration(None)
    callbacks = [recal, EMAWeightAveraging(decay=0.5)]
    trainer = fast_trainer(tmp_path, num_sanity_val_steps=1, callbacks=callbacks)
    trainer.fit(model, loader, val_dataloaders=_loader(n=16))
    assert recal.num_recalibrations == 1  # once, at the end of fit
    mean, var = _expected(model, loader)
    torch.testing.assert_close(_bn(model).running_mean, mean)
    torch.testing.assert_close(_bn(model).running_var, var)


class _EpochAveraging(WeightAveraging):
    """Averages once per epoch, in its `on_train_epoch_end`: after `BNRecalibration`'s, when listed after it."""

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return epoch_idx is not None


def test_with_two_weight_averagers_the_one_updated_last_is_recalibrated_too(tmp_path: Path) -> None:
    """EMA is up to date at the epoch's end, the epoch averager moves after that: its copy, which the model ends
    with (its `on_train_end` runs last), must get the statistics of its own weights."""
    model, loader = _model(), _loader()
    callbacks = [BNRecalibration(None), EMAWeightAveraging(decay=0.5), _EpochAveraging()]
    fast_trainer(tmp_path, max_epochs=2, callbacks=callbacks).fit(model, loader)
    mean, var = _expected(model, loader)
    torch.testing.assert_close(_bn(model).running_mean, mean)
    torch.testing.assert_close(_bn(model).running_var, var)


class _AveragingElsewhere(WeightAveraging):
    """Stands in for a Lightning whose `WeightAveraging` keeps no `_average_model` (and, here, averages nothing)."""

    def __init__(self) -> None:
        super().__init__()
        del self._average_model

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pass

    def on_train_batch_end(self, *args: Any) -> None:
        pass

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass


def test_a_weight_averaging_without_a_reachable_averaged_model_is_refused_with_the_fix(tmp_path: Path) -> None:
    trainer = fast_trainer(tmp_path, callbacks=[BNRecalibration(None), _AveragingElsewhere()])
    with pytest.raises(RuntimeError) as raised:
        trainer.fit(_model(), _loader())
    assert str(raised.value) == (
        "`BNRecalibration` cannot reach the averaged weights of _AveragingElsewhere: this Lightning version has no "
        "`WeightAveraging._average_model`. Recalibrate after fit instead: "
        "`lightning_reg.functional.recalibrate_bn(model, loader)`."
    )


def test_lightning_weight_averaging_still_keeps_its_averaged_model_where_we_read_it() -> None:
    """`BNRecalibration` reads `WeightAveraging._average_model` (no public accessor in Lightning 2.6)."""
    callback = EMAWeightAveraging()
    assert hasattr(callback, "_average_model")


# --- the pass changes no random stream that training draws from ------------------------------------


class _DrawingDataset(torch.utils.data.Dataset):
    """Images whose `__getitem__` adds noise from torch's, Python's or NumPy's global RNG (as augmentations do)."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, rng: str) -> None:
        self.inputs, self.targets, self.rng = inputs, targets, rng

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rng == "torch":
            noise = float(torch.rand(()))
        else:
            noise = random.random() if self.rng == "python" else float(np.random.rand())
        return self.inputs[i] + noise, self.targets[i]


class _ShuffledBatchSampler:
    """A batch sampler that is no torch `Sampler` (found by its name) and draws from its own generator."""

    def __init__(self, n: int, batch_size: int) -> None:
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(1)

    def __iter__(self) -> Any:
        return (chunk.tolist() for chunk in torch.randperm(self.n, generator=self.generator).split(self.batch_size))

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


class _NestedGeneratorBatchSampler:
    """A batch sampler that keeps its generator in a dict of nested lists: five attributes deep from the loader."""

    def __init__(self, n: int, batch_size: int) -> None:
        self.n, self.batch_size = n, batch_size
        self.streams = {"order": [[torch.Generator().manual_seed(1)]]}

    def __iter__(self) -> Any:
        generator = self.streams["order"][0][0]
        return (chunk.tolist() for chunk in torch.randperm(self.n, generator=generator).split(self.batch_size))

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


class _SlottedBatchSampler:
    """A batch sampler with `__slots__`, so no `__dict__` to walk, and a fixed order."""

    __slots__ = ("batch_size", "n")

    def __init__(self, n: int, batch_size: int) -> None:
        self.n, self.batch_size = n, batch_size

    def __iter__(self) -> Any:
        return (list(range(i, min(i + self.batch_size, self.n))) for i in range(0, self.n, self.batch_size))

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


class _SlottedShuffledBatchSampler:
    """A batch sampler with `__slots__` that shuffles with its own generator, kept in a private slot."""

    __slots__ = ("__generator", "batch_size", "n")

    def __init__(self, n: int, batch_size: int) -> None:
        self.n, self.batch_size = n, batch_size
        self.__generator = torch.Generator().manual_seed(1)

    def __iter__(self) -> Any:
        order = torch.randperm(self.n, generator=self.__generator)
        return (chunk.tolist() for chunk in order.split(self.batch_size))

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


def _rng_loader(source: str) -> torch.utils.data.DataLoader:
    inputs, targets = make_images(n=48)
    dataset = torch.utils.data.TensorDataset(inputs, targets)
    if source == "loader-generator":
        return torch.utils.data.DataLoader(dataset, 8, shuffle=True, generator=torch.Generator().manual_seed(1))
    if source == "sampler-generator":
        sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(1))
        return torch.utils.data.DataLoader(dataset, 8, sampler=sampler)
    if source == "batch-sampler-generator":  # the generator three attributes deep
        random_sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(1))
        batches = torch.utils.data.BatchSampler(random_sampler, 8, drop_last=False)
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches)
    if source == "plain-batch-sampler":
        return torch.utils.data.DataLoader(dataset, batch_sampler=_ShuffledBatchSampler(48, 8))
    if source == "nested-generator":  # loader -> batch sampler -> dict -> list -> list -> generator
        return torch.utils.data.DataLoader(dataset, batch_sampler=_NestedGeneratorBatchSampler(48, 8))
    if source == "slotted-batch-sampler":
        return torch.utils.data.DataLoader(dataset, batch_sampler=_SlottedBatchSampler(48, 8))
    if source == "slotted-shuffled-batch-sampler":
        return torch.utils.data.DataLoader(dataset, batch_sampler=_SlottedShuffledBatchSampler(48, 8))
    if source == "persistent-workers":  # the noise is drawn in a worker process that outlives each epoch
        drawing = _DrawingDataset(inputs, targets, "torch")
        return torch.utils.data.DataLoader(drawing, 8, num_workers=1, persistent_workers=True)
    if source == "global":
        return torch.utils.data.DataLoader(dataset, 8, shuffle=True)  # order and base seed from the global RNG
    return torch.utils.data.DataLoader(_DrawingDataset(inputs, targets, source), 8)


def _train(tmp_path: Path, source: str, callbacks: list[L.Callback]) -> tuple[UserClassifier, Any]:
    L.seed_everything(0)
    random.seed(0)
    np.random.seed(0)
    model = UserClassifier(net=TinyCNN(dropout=0.3), lr=0.5)  # dropout draws from the global RNG
    loader = _rng_loader(source)
    fast_trainer(tmp_path, max_epochs=3, callbacks=callbacks).fit(model, loader)
    return model, loader


@pytest.mark.parametrize(
    "source",
    [
        "loader-generator",
        "sampler-generator",
        "batch-sampler-generator",
        "plain-batch-sampler",
        "nested-generator",
        "slotted-batch-sampler",
        "slotted-shuffled-batch-sampler",
        "persistent-workers",
        "global",
        "python",
        "numpy",
    ],
)
def test_training_draws_the_same_with_and_without_the_recalibration_pass(tmp_path: Path, source: str) -> None:
    """Running statistics do not enter a training-mode forward, so with the RNG untouched the weights are equal.

    Each epoch's pass iterates the shuffled training loader (drawing its order and base seed) and runs the dataset's
    transforms; after it, training must draw exactly what it would have drawn without the callback. A persistent
    worker draws from its own process's RNG, which no restore in this process reaches: the pass must not use it.
    """
    recal = BNRecalibration(None, when=None, every_n_epochs=1)
    with_pass, loader_a = _train(tmp_path / "a", source, [recal])
    without, loader_b = _train(tmp_path / "b", source, [])
    assert recal.num_recalibrations == 3
    # the same training batches, in the same order (targets and the inputs' sums identify them)
    assert len(with_pass.seen_targets["train"]) == 18
    for a, b in zip(with_pass.seen_targets["train"], without.seen_targets["train"], strict=True):
        assert torch.equal(a, b)
    for (name, a), (_, b) in zip(with_pass.named_parameters(), without.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    # and the loader's own generators are where training alone leaves them
    for gen_a, gen_b in zip(_loader_generators(loader_a), _loader_generators(loader_b), strict=True):
        assert torch.equal(gen_a.get_state(), gen_b.get_state())


def _loader_generators(loader: torch.utils.data.DataLoader) -> list[torch.Generator]:
    candidates = [loader.generator, getattr(loader.sampler, "generator", None)]
    return [g for g in candidates if isinstance(g, torch.Generator)]


def _doubled_plus_one(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """A collate function the batches depend on: the stacked inputs, doubled, plus one."""
    inputs, targets = torch.utils.data.default_collate(rows)
    return [2.0 * inputs + 1.0, targets]


def test_a_loader_with_persistent_workers_is_recalibrated_on_its_own_batches(tmp_path: Path) -> None:
    """The pass over a persistent-worker loader keeps the loader's batch size and collate function."""
    inputs, targets = make_images(n=48)
    dataset = torch.utils.data.TensorDataset(inputs, targets)
    loader = torch.utils.data.DataLoader(
        dataset, 16, num_workers=1, persistent_workers=True, collate_fn=_doubled_plus_one
    )
    model, recal = _model(), BNRecalibration(None)
    fast_trainer(tmp_path, callbacks=[recal]).fit(model, loader)
    assert recal.last_report is not None
    assert recal.last_report.num_batches == 3
    mean, var = _conv_stats(model.net.body[0], 2.0 * inputs + 1.0)
    torch.testing.assert_close(_bn(model).running_mean, mean)
    torch.testing.assert_close(_bn(model).running_var, var)


# --- batches through the forward protocol: forward_inputs, forward_fn ---------------------------------


class _SequenceClassifier(L.LightningModule):
    """Padded sequences with lengths, batches ``[x, y, lengths]``: mean over the valid steps, BatchNorm1d, a head.

    ``forward(x)`` alone reads every step (padding included); ``forward_inputs`` passes the lengths, as the zoo's
    RNN does.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(3, 4)
        self.bn = torch.nn.BatchNorm1d(4)
        self.head = torch.nn.Linear(4, 2)

    def features(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        h = self.proj(x)  # (N, T, 4)
        if lengths is None:
            return h.mean(1)
        valid = (torch.arange(x.shape[1])[None, :] < lengths[:, None]).to(h.dtype)  # (N, T)
        return (h * valid[..., None]).sum(1) / lengths[:, None].to(h.dtype)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.bn(self.features(x, lengths)))

    def forward_inputs(self, batch: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return batch[0], batch[2]

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y, lengths = batch
        return torch.nn.functional.cross_entropy(self(x, lengths), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _sequence_loader(as_dict: bool = False) -> Any:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 7, (24,), generator=g)
    x = torch.randn(24, 6, 3, generator=g)
    x[torch.arange(6)[None, :] >= lengths[:, None]] = 10.0  # padding far from the data
    y = torch.arange(24) % 2
    if as_dict:
        rows = [{"ids": x[i], "label": y[i], "lengths": lengths[i]} for i in range(24)]
        return torch.utils.data.DataLoader(rows, batch_size=8)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y, lengths), batch_size=8)


def _valid_step_stats(model: _SequenceClassifier, loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The BN layer's exact statistics, from a naive loop over each sample's valid steps."""
    with torch.no_grad():
        rows = [model.proj(x[i, : int(n[i])]).mean(0) for x, _, n in loader for i in range(len(x))]
    var, mean = torch.var_mean(torch.stack(rows), dim=0)
    return mean, var


def test_a_module_with_forward_inputs_is_recalibrated_with_its_lengths(tmp_path: Path) -> None:
    model, loader = _SequenceClassifier(), _sequence_loader()
    fast_trainer(tmp_path, callbacks=[BNRecalibration(None)]).fit(model, loader)
    mean, var = _valid_step_stats(model, loader)
    torch.testing.assert_close(model.bn.running_mean, mean)
    torch.testing.assert_close(model.bn.running_var, var)


class _DictSequenceClassifier(_SequenceClassifier):
    """The same network fed HuggingFace-style dict batches, with no `forward_inputs`: the user passes `forward_fn`."""

    forward_inputs = None  # type: ignore[assignment]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self(batch["ids"], batch["lengths"]), batch["label"])


def test_forward_fn_forwards_each_batch_on_the_module_device(tmp_path: Path) -> None:
    model, loader = _DictSequenceClassifier(), _sequence_loader(as_dict=True)
    calls: list[str] = []

    def forward_fn(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        calls.append(batch["ids"].device.type)
        return module(batch["ids"], batch["lengths"])

    fast_trainer(tmp_path, callbacks=[BNRecalibration(None, forward_fn=forward_fn)]).fit(model, loader)
    assert calls == ["cpu"] * 3
    mean, var = _valid_step_stats(model, [[b["ids"], b["label"], b["lengths"]] for b in loader])
    torch.testing.assert_close(model.bn.running_mean, mean)
    torch.testing.assert_close(model.bn.running_var, var)


def test_with_weight_averaging_a_second_fit_on_the_same_trainer_ends_recalibrated_again(tmp_path: Path) -> None:
    model, loader = _model(), _loader()
    recal = BNRecalibration(None)
    trainer = fast_trainer(tmp_path, max_epochs=1, callbacks=[recal, EMAWeightAveraging(decay=0.5)])
    trainer.fit(model, loader)
    trainer.fit_loop.max_epochs = 2
    trainer.fit(model, loader)  # continue to epoch 2
    assert recal.num_recalibrations == 2
    mean, var = _expected(model, loader)
    torch.testing.assert_close(_bn(model).running_mean, mean)
    torch.testing.assert_close(_bn(model).running_var, var)
