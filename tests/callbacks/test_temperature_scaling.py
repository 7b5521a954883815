from __future__ import annotations

import copy
import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from torch import Tensor, nn

import zoo
from lightning_reg import BNRecalibration, MCDropoutEvaluation, TemperatureScaling
from lightning_reg.functional.calibration import fit_temperature, temperature_nll
from lightning_reg.nn import TemperatureScaled
from tests.helpers import TinyCNN, UserClassifier, ddp_fork_trainer, fast_trainer, make_loader
from tests.helpers.ddp import scrubbed_ddp_env, skip_on_windows
from tests.helpers.loggers import MemoryLogger


def _images(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """(n, 1, 8, 8) images whose brightness tells the class, with noise: learnable, not separable."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.arange(n) % 3
    offset = (targets.float() - 1).view(-1, 1, 1, 1) * 0.8 + 0.4 * torch.randn(n, 1, 1, 1, generator=g)
    return offset + torch.randn(n, 1, 8, 8, generator=g), targets


def _loaders(n_train: int = 48, n_val: int = 32, batch_size: int = 8) -> tuple[Any, Any]:
    train = make_loader(*_images(n_train, seed=0), batch_size=batch_size, shuffle=True)
    val = make_loader(*_images(n_val, seed=1), batch_size=batch_size)
    return train, val


def _user_model(dropout: float = 0.2) -> UserClassifier:
    torch.manual_seed(0)  # the same initial weights wherever it is called
    return UserClassifier(TinyCNN(num_classes=3, batch_norm=True, dropout=dropout), num_classes=3, lr=0.5)


def _zoo_model() -> zoo.CNNClassifier:
    torch.manual_seed(0)
    return zoo.CNNClassifier(num_classes=3, widths=(8,), dropout=0.3, lr=3e-2, scheduler="none")


def _raw(model: nn.Module, loader: Any) -> tuple[Tensor, Tensor]:
    """Unscaled eval-mode logits from the plain network inside the LightningModule (never patched)."""
    net = model.net
    was = net.training
    net.eval()
    with torch.no_grad():
        logits = torch.cat([net(x) for x, _ in loader])
    net.train(was)
    return logits, torch.cat([y for _, y in loader])


def _fit(tmp_path: Path, callbacks: list[L.Callback], model: L.LightningModule | None = None, **kwargs: Any) -> Any:
    L.seed_everything(0, verbose=False)
    model = model if model is not None else _user_model()
    train, val = _loaders()
    kwargs.setdefault("max_epochs", 3)
    trainer = fast_trainer(tmp_path, callbacks=callbacks, **kwargs)
    trainer.fit(model, train, val)
    return trainer, model, val


def test_fit_end_fits_t_on_the_final_weights_and_the_final_validation_is_calibrated(tmp_path: Path) -> None:
    logger = MemoryLogger()
    callback = TemperatureScaling()
    trainer, model, val = _fit(tmp_path, [callback], logger=logger)
    logits, targets = _raw(model, val)
    expected = fit_temperature(logits, targets)
    assert callback.temperature == pytest.approx(expected, rel=1e-6)
    # the module's own final validation loss is the NLL of the scaled logits
    assert float(trainer.callback_metrics["val_loss"]) == pytest.approx(
        float(F.cross_entropy(logits / expected, targets)), rel=1e-5
    )
    report = callback.report
    assert report is not None
    assert report.nll_after <= report.nll_before
    assert report.nll_before == pytest.approx(float(F.cross_entropy(logits, targets)), rel=1e-5)
    logged = {key for _, metrics in logger.logged for key in metrics}
    names = ("temperature", "nll_before", "nll_after", "ece_before", "ece_after")
    assert {f"calibration/{name}" for name in names} <= logged
    assert logger.values("calibration/temperature")[-1][1] == pytest.approx(expected, rel=1e-6)


def test_training_is_never_scaled_and_eval_mode_always_is_after_the_fit(tmp_path: Path) -> None:
    callback = TemperatureScaling()
    _, model, val = _fit(tmp_path, [callback], max_epochs=1)
    x = next(iter(val))[0]
    t = callback.temperature
    assert isinstance(t, float)
    assert t != pytest.approx(1.0, abs=1e-3)
    model.train()
    torch.manual_seed(0)
    train_mode = model(x)
    torch.manual_seed(0)
    torch.testing.assert_close(train_mode, model.net(x))
    model.eval()
    torch.testing.assert_close(model(x), model.net(x) / t)


def test_a_second_fit_trains_and_validates_unscaled_until_its_own_t(tmp_path: Path) -> None:
    callback = TemperatureScaling()
    trainer, model, _ = _fit(tmp_path, [callback], max_epochs=1)
    first = callback.temperature
    seen: list[float] = []

    class Probe(L.Callback):
        def on_validation_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any, **kwargs: Any) -> None:
            x = args[1][0]
            seen.append(float((pl_module(x) - pl_module.net(x)).abs().max()))

    trainer = fast_trainer(tmp_path, max_epochs=2, callbacks=[callback, Probe()])
    train, val = _loaders()
    trainer.fit(model, train, val)
    assert callback.temperature != first
    n_val = len(val)
    assert seen[:n_val] == [0.0] * n_val  # epoch 1: the stale T of the first fit is not applied
    assert min(seen[n_val:]) > 0  # final validation: the new T


def test_the_checkpoint_round_trip_reproduces_the_calibrated_test_metrics(tmp_path: Path) -> None:
    callback = TemperatureScaling()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer, model, _val = _fit(tmp_path, [callback, checkpoint], enable_checkpointing=True)
    test = make_loader(*_images(24, 2), batch_size=8)
    expected = trainer.test(model, test, verbose=False)[0]["test_loss"]
    last = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(last, weights_only=True)["callbacks"]["TemperatureScaling"]
    assert state["temperature"] == callback.temperature

    fresh_callback = TemperatureScaling()
    fresh = fast_trainer(tmp_path, callbacks=[fresh_callback])
    result = fresh.test(_user_model(), test, ckpt_path=str(last), verbose=False)[0]["test_loss"]
    assert fresh_callback.temperature == callback.temperature
    assert result == pytest.approx(expected, rel=1e-6)
    plain = fast_trainer(tmp_path).test(_user_model(), test, ckpt_path=str(last), verbose=False)[0]["test_loss"]
    assert plain != pytest.approx(expected, rel=1e-3)  # without the callback: uncalibrated


@pytest.mark.parametrize("order", ["ts_first", "ts_last"])
def test_order_with_bn_recalibration_weight_averaging_and_mc_dropout_does_not_matter(
    tmp_path: Path, order: str
) -> None:
    def run(order: str) -> tuple[float, dict[str, float], zoo.CNNClassifier, Any]:
        ts = TemperatureScaling()
        # (MCDropoutEvaluation before EMAWeightAveraging: listed after it, the merged MC callback's statistics
        # check sees EMA's swap-back at validation end as a change, with or without TemperatureScaling)
        others: list[L.Callback] = [
            BNRecalibration(num_batches=None),
            MCDropoutEvaluation(n_samples=4, plot=False, stages=("validate",)),
            EMAWeightAveraging(decay=0.5),
        ]
        callbacks = [ts, *others] if order == "ts_first" else [*others, ts]
        trainer, model, val = _fit(tmp_path / order, callbacks, model=_zoo_model(), max_epochs=2)
        assert isinstance(ts.temperature, float)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        return ts.temperature, metrics, model, val

    t, metrics, model, val = run(order)
    other_t, other_metrics, _, _ = run("ts_last" if order == "ts_first" else "ts_first")
    assert t == other_t
    assert metrics["mc/val/det_nll"] == pytest.approx(other_metrics["mc/val/det_nll"], rel=1e-6)
    # T was fitted on the weights the model ends with (EMA average, then BN statistics of it) ...
    logits, targets = _raw(model, val)
    assert t == pytest.approx(fit_temperature(logits, targets), rel=1e-5)
    # ... and the final validation, MC dropout's deterministic pass and its trunk-once samples are all scaled
    calibrated = temperature_nll(logits, targets, t)
    assert metrics["val_loss"] == pytest.approx(calibrated, rel=1e-4)
    assert metrics["mc/val/det_nll"] == pytest.approx(calibrated, rel=1e-4)


def test_mc_dropout_samples_are_divided_by_t_on_the_trunk_once_path(tmp_path: Path) -> None:
    from lightning_reg.functional.mc_dropout import mc_dropout_predict

    callback = TemperatureScaling()
    _, model, val = _fit(tmp_path, [callback], model=_zoo_model(), max_epochs=1)
    t = callback.temperature
    assert isinstance(t, float)
    x = next(iter(val))[0]
    model.eval()
    scaled = mc_dropout_predict(model, x, 5, generator=torch.Generator().manual_seed(0))
    raw = mc_dropout_predict(model.net, x, 5, generator=torch.Generator().manual_seed(0))
    assert scaled.method == raw.method == "cached"
    torch.testing.assert_close(scaled.probs, (raw.probs.log() / t).softmax(-1), rtol=1e-4, atol=1e-6)
    naive = mc_dropout_predict(model, x, 5, generator=torch.Generator().manual_seed(0), method="naive")
    raw_naive = mc_dropout_predict(model.net, x, 5, generator=torch.Generator().manual_seed(0), method="naive")
    torch.testing.assert_close(naive.probs, (raw_naive.probs.log() / t).softmax(-1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16-mixed", "64-true"])
def test_precision_plugins(tmp_path: Path, precision: str) -> None:
    callback = TemperatureScaling()
    _, model, val = _fit(tmp_path, [callback], precision=precision, max_epochs=1)
    assert isinstance(callback.temperature, float)
    assert callback.report is not None
    assert callback.report.nll_after <= callback.report.nll_before + 1e-9
    x = next(iter(val))[0].to(torch.float64 if precision == "64-true" else torch.float32)
    model.eval()
    assert model(x).dtype == model.net(x).dtype


def test_inference_mode_off_gives_the_same_t(tmp_path: Path) -> None:
    on, off = TemperatureScaling(), TemperatureScaling()
    _fit(tmp_path / "on", [on], max_epochs=1)
    _fit(tmp_path / "off", [off], max_epochs=1, inference_mode=False)
    assert on.temperature == off.temperature


def test_without_a_following_validation_t_is_fitted_at_fit_end_with_a_warning(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    train, val = _loaders()
    callback = TemperatureScaling(dataloader=val)
    trainer = fast_trainer(
        tmp_path,
        max_epochs=1,
        callbacks=[callback, ModelCheckpoint(dirpath=tmp_path)],
        enable_checkpointing=True,
    )
    model = _user_model()
    with pytest.warns(UserWarning, match="no validation ran after the last training batch") as caught:
        trainer.fit(model, train)
    logits, targets = _raw(model, val)
    assert callback.temperature == pytest.approx(fit_temperature(logits, targets), rel=1e-6)
    assert [str(w.message) for w in caught if "TemperatureScaling" in str(w.message)] == [
        "`TemperatureScaling`: no validation ran after the last training batch (early stopping, `max_time`, "
        "`limit_val_batches=0`, `check_val_every_n_epoch`), so T is fitted now, in `on_fit_end`, after the last "
        "checkpoint was saved: the checkpoints of this fit do not hold this T. Save one now with "
        "`trainer.save_checkpoint(path)`."
    ]


def test_test_start_fits_on_the_validation_loader_of_a_datamodule(tmp_path: Path) -> None:
    train, val = _loaders()
    test = make_loader(*_images(16, 2), batch_size=8)
    data = L.LightningDataModule.from_datasets(train.dataset, val.dataset, test.dataset, batch_size=8)
    L.seed_everything(0, verbose=False)
    model = _user_model()
    fast_trainer(tmp_path, max_epochs=1).fit(model, train)
    callback = TemperatureScaling(when="test_start")
    fast_trainer(tmp_path, callbacks=[callback]).test(model, datamodule=data, verbose=False)
    logits, targets = _raw(model, val)
    assert callback.temperature == pytest.approx(fit_temperature(logits, targets), rel=1e-6)
    assert callback.report is not None
    assert callback.report.num_samples == len(targets)
    del test


def test_dict_batches_and_forward_fn(tmp_path: Path) -> None:
    calls: list[int] = []

    def forward_fn(module: nn.Module, batch: Any) -> Tensor:
        calls.append(len(batch["targets"]))
        return module(batch["inputs"])

    inputs, targets = _images(16, 1)
    val = make_loader(inputs, targets, batch_size=8, as_dict=True)
    callback = TemperatureScaling(dataloader=val, forward_fn=forward_fn, target_key="targets")
    train, _ = _loaders()
    L.seed_everything(0, verbose=False)
    model = _user_model()
    fast_trainer(tmp_path, max_epochs=1, callbacks=[callback]).fit(model, train)
    assert calls == [8, 8]
    assert callback.temperature == pytest.approx(fit_temperature(*_raw(model, make_loader(inputs, targets))), rel=1e-6)


def test_calibrated_gives_a_plain_module_and_the_wrapper_scales_in_every_mode(tmp_path: Path) -> None:
    callback = TemperatureScaling()
    _, model, val = _fit(tmp_path, [callback], model=_zoo_model(), max_epochs=1)
    x = next(iter(val))[0]
    wrapper = callback.calibrated(model)
    assert isinstance(wrapper, TemperatureScaled)
    wrapper.eval()
    torch.testing.assert_close(wrapper(x), model.net(x) / callback.temperature)  # scaled once, not twice
    torch.testing.assert_close(wrapper.forward_head(wrapper.forward_features(x)), wrapper(x))
    assert float(wrapper.state_dict()["temperature"]) == pytest.approx(callback.temperature)
    with pytest.raises(AttributeError, match="forward_head"):
        _ = TemperatureScaled(nn.Linear(2, 2), 2.0).forward_head
    with pytest.raises(ValueError, match="positive finite"):
        TemperatureScaled(nn.Linear(2, 2), -1.0)
    with pytest.raises(RuntimeError, match="No temperature yet"):
        TemperatureScaling().calibrated(model)


def test_a_patched_module_pickles_and_deep_copies_to_a_scaled_copy_with_its_own_weights(tmp_path: Path) -> None:
    callback = TemperatureScaling()
    _, model, val = _fit(tmp_path, [callback], max_epochs=1)
    x = next(iter(val))[0]
    model.eval()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with torch.no_grad():
            clone.net.head.weight.mul_(2.0)
        torch.testing.assert_close(clone(x), clone.net(x) / callback.temperature)


@pytest.mark.filterwarnings("ignore:The NLL-optimal temperature lies outside")  # 32 samples: one T_k may run off
def test_per_class_temperatures(tmp_path: Path) -> None:
    callback = TemperatureScaling(per_class=True)
    _, model, val = _fit(tmp_path, [callback], max_epochs=1)
    t = callback.temperature
    assert isinstance(t, Tensor)
    assert t.shape == (3,)
    logits, targets = _raw(model, val)
    torch.testing.assert_close(t, fit_temperature(logits, targets, per_class=True), rtol=1e-6, atol=0.0)
    restored = TemperatureScaling(per_class=True)
    restored.load_state_dict(callback.state_dict())
    assert isinstance(restored.temperature, Tensor)
    torch.testing.assert_close(restored.temperature, t)


def test_forward_fn_is_checked_and_dataloader_idx_picks_one_of_several_val_loaders(tmp_path: Path) -> None:
    # (the other argument and loader errors are compared whole below)
    with pytest.raises(TypeError, match="forward_fn"):
        TemperatureScaling(forward_fn=3)  # type: ignore[arg-type]
    train, val = _loaders()
    callback = TemperatureScaling(dataloader_idx=1)
    model = _TwoLoaders(TinyCNN(num_classes=3))
    fast_trainer(tmp_path, callbacks=[callback]).fit(model, train, [train, val])  # index 1 is held out
    assert callback.temperature == pytest.approx(fit_temperature(*_raw(model, val)), rel=1e-6)


class _TwoLoaders(UserClassifier):
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self(batch[0])


class _TupleOutput(UserClassifier):
    def forward(self, x: Tensor) -> Any:
        return self.net(x), None

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0])[0], batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self(batch[0])


# --- DDP --------------------------------------------------------------------------------------------


class _Recorder(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        callback = next(c for c in trainer.callbacks if isinstance(c, TemperatureScaling))
        _, val = _loaders()
        sampler_loader = trainer.val_dataloaders
        logits, targets = _raw(pl_module, sampler_loader)
        record = {"t": callback.temperature, "logits": logits.tolist(), "targets": targets.tolist()}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
        del val


@skip_on_windows
def test_two_ranks_get_one_t_equal_to_one_process_on_the_union(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    train, val = _loaders()
    model = _user_model(dropout=0.0)
    with scrubbed_ddp_env():
        trainer = ddp_fork_trainer(tmp_path, max_epochs=1, callbacks=[TemperatureScaling(), _Recorder(tmp_path)])
        trainer.fit(model, train, val)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["t"] == ranks[1]["t"]
    logits = torch.tensor(ranks[0]["logits"] + ranks[1]["logits"])
    targets = torch.tensor(ranks[0]["targets"] + ranks[1]["targets"])
    assert len(targets) == 32  # each rank held half of the validation set
    assert ranks[0]["t"] == pytest.approx(fit_temperature(logits, targets), rel=1e-6)


def test_mc_dropout_on_a_module_without_forward_head_is_scaled_too(tmp_path: Path) -> None:
    """A plain user module: MC dropout's traced-prefix path must not drop the patched forward."""
    ts = TemperatureScaling()
    mc = MCDropoutEvaluation(n_samples=4, plot=False, stages=("validate",))
    trainer, model, val = _fit(tmp_path, [ts, mc], max_epochs=1)
    logits, targets = _raw(model, val)
    assert float(trainer.callback_metrics["mc/val/det_nll"]) == pytest.approx(
        temperature_nll(logits, targets, ts.temperature), rel=1e-5
    )


def test_repr_names_a_loader_passed_by_the_user_by_its_type() -> None:
    _, val = _loaders()
    expected = "TemperatureScaling(dataloader='DataLoader', when='test_start', per_class=True)"
    assert repr(TemperatureScaling(val, when="test_start", per_class=True)) == expected


_TRAIN_REFUSED = (
    "`TemperatureScaling(dataloader='train')` would fit T on the training batches, whose logits are "
    "over-confident by construction (the model was fitted to them): T comes out too low. Use "
    "`dataloader='val'`, or pass a held-out loader itself. If you really mean the training data, "
    "pass its DataLoader explicitly."
)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"dataloader": "train"}, ValueError, _TRAIN_REFUSED),
        (
            {"dataloader": "validation"},
            ValueError,
            "Expected `dataloader` to be one of ('val', 'test') or an iterable of batches, but got 'validation'.",
        ),
        (
            {"dataloader": 3},
            TypeError,
            "Expected `dataloader` to be one of ('val', 'test') or an iterable of batches (a DataLoader), but got int.",
        ),
        (
            {"when": "epoch_end"},
            ValueError,
            "Expected `when` to be one of ('fit_end', 'test_start'), but got 'epoch_end'.",
        ),
        (
            {"dataloader": "test"},
            ValueError,
            "`dataloader='test'` exists only at test time: use it with `when='test_start'`.",
        ),
        ({"num_batches": 0}, ValueError, "Expected `num_batches` to be None or an int >= 1, but got 0."),
        ({"num_batches": 1.5}, ValueError, "Expected `num_batches` to be None or an int >= 1, but got 1.5."),
        ({"num_batches": True}, ValueError, "Expected `num_batches` to be None or an int >= 1, but got True."),
        ({"dataloader_idx": -1}, ValueError, "Expected `dataloader_idx` to be None or an int >= 0, but got -1."),
        ({"max_iter": 0}, ValueError, "Expected `max_iter` to be an int >= 1, but got 0."),
        ({"max_iter": 1.5}, ValueError, "Expected `max_iter` to be an int >= 1, but got 1.5."),
        ({"max_iter": True}, ValueError, "Expected `max_iter` to be an int >= 1, but got True."),
        (
            {"input_key": 1.5},
            TypeError,
            "Expected `input_key` to be an int (position in a list batch) or a str (key of a dict batch), "
            "but got 1.5 of type float.",
        ),
        (
            {"target_key": 1.5},
            TypeError,
            "Expected `target_key` to be an int (position in a list batch) or a str (key of a dict batch), "
            "but got 1.5 of type float.",
        ),
    ],
)
def test_invalid_arguments_raise_with_the_whole_message(kwargs: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error) as raised:
        TemperatureScaling(**kwargs)
    assert str(raised.value) == message


def test_the_smallest_valid_arguments_are_accepted() -> None:
    callback = TemperatureScaling("test", "test_start", num_batches=1, dataloader_idx=0, max_iter=1)
    assert (callback.num_batches, callback.dataloader_idx, callback.max_iter) == (1, 0, 1)


@pytest.mark.parametrize(("flags", "samples"), [({"fast_dev_run": True}, 8), ({}, 16)], ids=["fast-dev-run", "two"])
def test_num_batches_and_fast_dev_run_limit_the_held_out_batches(tmp_path: Path, flags: dict, samples: int) -> None:
    callback = TemperatureScaling(num_batches=None if flags else 2)
    _, model, val = _fit(tmp_path, [callback], **flags)
    assert callback.report is not None
    assert callback.report.num_samples == samples
    logits, targets = _raw(model, val)
    assert callback.temperature == pytest.approx(fit_temperature(logits[:samples], targets[:samples]), rel=1e-6)


def test_the_report_measures_the_held_out_logits_and_is_logged_once_at_the_fit_step(tmp_path: Path) -> None:
    from torchmetrics.functional.classification import multiclass_calibration_error

    logger, callback = MemoryLogger(), TemperatureScaling()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="final")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, model, val = _fit(tmp_path, [callback, checkpoint], logger=logger, enable_checkpointing=True)
    # T was fitted at the final validation, before the checkpoint: no late refit at fit end
    assert not [w for w in caught if "T is fitted now" in str(w.message)]
    assert [step for step, _ in logger.values("calibration/temperature")] == [trainer.global_step]
    logits, targets = _raw(model, val)
    t, report = callback.temperature, callback.report
    assert isinstance(t, float)
    assert report is not None
    assert report.num_samples == 32
    assert report.temperature == pytest.approx(t, rel=1e-12, abs=0.0)  # the fitted T, in float64
    assert report.nll_after == pytest.approx(float(F.cross_entropy(logits / t, targets)), rel=1e-5)
    for ece, scaled in ((report.ece_before, logits), (report.ece_after, logits / t)):
        expected = multiclass_calibration_error(scaled.softmax(1), targets, num_classes=3, n_bins=15)
        assert ece == pytest.approx(float(expected), abs=1e-6)


def test_an_instance_level_forward_is_scaled_and_handed_back_by_calibrated(tmp_path: Path) -> None:
    """A forward set on the instance (a wrapper of another library) is the one scaled, and stays after."""
    model = _user_model()
    class_forward = model.forward

    def doubled(x: Tensor) -> Tensor:
        return 2.0 * class_forward(x)

    model.forward = doubled  # type: ignore[method-assign]
    callback = TemperatureScaling()
    _, model, val = _fit(tmp_path, [callback], model=model, max_epochs=1)
    x = next(iter(val))[0]
    t = callback.temperature
    assert isinstance(t, float)
    model.eval()
    with torch.no_grad():
        raw = 2.0 * model.net(x)
        torch.testing.assert_close(model(x), raw / t)
        calibrated = callback.calibrated(model)
        torch.testing.assert_close(model(x), raw)  # the module's own patch is gone, the wrapper stays
        torch.testing.assert_close(calibrated(x), raw / t)


# --- refits, the loaders it fits on, the forwards it scales -------------------------------------------


class _SetHeadBias(L.Callback):
    """Sets the head's bias to ``[b, -b/2, -b/2]``: to ``first`` when the (one) validation starts, to ``then`` when
    training ends, after that validation and its checkpoint. The sum stays 0, the sum of squares changes, and no
    entry is 0."""

    def __init__(self, first: float, then: float) -> None:
        self.first, self.then = first, then

    def _set(self, pl_module: Any, b: float) -> None:
        with torch.no_grad():
            pl_module.net.head.bias.copy_(torch.tensor([b, -b / 2, -b / 2]))

    def on_validation_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._set(pl_module, self.first)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._set(pl_module, self.then)


def test_weights_changed_after_the_final_validation_are_refitted_on_their_unscaled_logits(tmp_path: Path) -> None:
    """The refit at fit end runs with the first T installed: it must fit on the raw logits, not on logits / T."""
    logger, callback = MemoryLogger(), TemperatureScaling()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="final")
    callbacks = [callback, _SetHeadBias(1.0, 2.0), checkpoint]
    with pytest.warns(UserWarning, match="T is fitted now") as caught:
        trainer, model, val = _fit(tmp_path, callbacks, max_epochs=1, logger=logger, enable_checkpointing=True)
    messages = [str(w.message) for w in caught if "TemperatureScaling" in str(w.message)]
    assert messages == [
        "`TemperatureScaling`: the weights changed after the final validation, so T is fitted now, in `on_fit_end`, "
        "after the last checkpoint was saved: the checkpoints of this fit do not hold this T. Save one now with "
        "`trainer.save_checkpoint(path)`."
    ]
    steps = [step for step, _ in logger.values("calibration/temperature")]
    assert steps == [trainer.global_step, trainer.global_step]  # the fit at the validation, then the refit
    logits, targets = _raw(model, val)
    t = callback.temperature
    assert t == pytest.approx(fit_temperature(logits, targets), rel=1e-6)
    x = next(iter(val))[0]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net(x) / t)


def test_fit_end_by_max_steps_fits_at_the_final_validation_before_the_checkpoint(tmp_path: Path) -> None:
    logger, callback = MemoryLogger(), TemperatureScaling()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="final")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, model, val = _fit(
            tmp_path, [callback, checkpoint], max_epochs=-1, max_steps=6, logger=logger, enable_checkpointing=True
        )
    assert trainer.global_step == 6  # one epoch of 6 batches; no max_epochs to end it
    assert not [w for w in caught if "T is fitted now" in str(w.message)]
    assert [step for step, _ in logger.values("calibration/temperature")] == [6]
    assert callback.temperature == pytest.approx(fit_temperature(*_raw(model, val)), rel=1e-6)


def test_float64_logits_are_fitted_in_float64(tmp_path: Path) -> None:
    callback = TemperatureScaling()
    _, model, val = _fit(tmp_path, [callback], precision="64-true", max_epochs=1)
    model.net.eval()
    with torch.no_grad():
        logits = torch.cat([model.net(x.double()) for x, _ in val])
    targets = torch.cat([y for _, y in val])
    # float32 logits move T by about 3e-9 here: far outside this tolerance
    t = callback.temperature
    assert t == pytest.approx(fit_temperature(logits, targets), rel=1e-12, abs=0.0)
    assert callback.report is not None
    assert callback.report.temperature == pytest.approx(t, rel=1e-12, abs=0.0)
    x = next(iter(val))[0].double()
    model.eval()
    with torch.no_grad():  # divided by T in float64 (a float32 T is off by about 1e-8)
        torch.testing.assert_close(model(x), model.net(x) / t, rtol=1e-13, atol=0.0)


def test_max_iter_bounds_the_fit(tmp_path: Path) -> None:
    callback = TemperatureScaling(max_iter=1)
    _, model, val = _fit(tmp_path, [callback], max_epochs=1)
    logits, targets = _raw(model, val)
    one_step = fit_temperature(logits, targets, max_iter=1)
    assert callback.temperature == pytest.approx(one_step, rel=1e-9)
    assert one_step != pytest.approx(fit_temperature(logits, targets), rel=1e-3)  # one LBFGS step is not the optimum


def test_nothing_is_reported_before_a_fit_and_a_named_loader_is_in_the_repr() -> None:
    callback = TemperatureScaling("test", "test_start")
    assert callback.temperature is None
    assert callback.report is None
    assert callback.state_dict() == {"temperature": None, "per_class": False, "fitted_step": None}
    assert repr(callback) == "TemperatureScaling(dataloader='test', when='test_start', per_class=False)"


def test_test_start_with_the_test_loader_fits_on_the_test_batches(tmp_path: Path) -> None:
    train, val = _loaders()
    test = make_loader(*_images(24, 2), batch_size=8)
    L.seed_everything(0, verbose=False)
    model = _user_model()
    fast_trainer(tmp_path).fit(model, train, val)
    callback = TemperatureScaling("test", "test_start")
    result = fast_trainer(tmp_path, callbacks=[callback]).test(model, test, verbose=False)[0]
    logits, targets = _raw(model, test)
    t = callback.temperature
    assert t == pytest.approx(fit_temperature(logits, targets), rel=1e-6)
    assert t != pytest.approx(fit_temperature(*_raw(model, val)), rel=1e-3)  # not the val loader's T
    assert result["test_loss"] == pytest.approx(float(F.cross_entropy(logits / t, targets)), rel=1e-5)


@pytest.mark.parametrize(
    ("wrap", "index"), [("list", None), ("dict", None), ("dict", 1)], ids=["list-of-one", "dict-of-one", "dict-idx-1"]
)
def test_the_val_loader_is_taken_from_a_list_or_dict(tmp_path: Path, wrap: str, index: int | None) -> None:
    train, val = _loaders()
    loaders: Any = [val] if wrap == "list" else ({"held_out": val} if index is None else {"train": train, "val": val})
    callback = TemperatureScaling(dataloader_idx=index)
    model = _TwoLoaders(TinyCNN(num_classes=3))
    fast_trainer(tmp_path, callbacks=[callback]).fit(model, train, loaders)
    assert callback.temperature == pytest.approx(fit_temperature(*_raw(model, val)), rel=1e-6)


def test_a_dataloader_idx_past_the_loaders_is_refused(tmp_path: Path) -> None:
    train, val = _loaders()
    trainer = fast_trainer(tmp_path, callbacks=[TemperatureScaling(dataloader_idx=2)])
    with pytest.raises(ValueError, match="dataloader_idx") as raised:
        trainer.fit(_TwoLoaders(TinyCNN(num_classes=3)), train, [train, val])
    assert str(raised.value) == "Expected `dataloader_idx` below 2, but got 2."


def test_the_loader_errors_give_the_whole_fix(tmp_path: Path) -> None:
    train, val = _loaders()
    with pytest.raises(RuntimeError) as raised:
        fast_trainer(tmp_path, callbacks=[TemperatureScaling()], limit_val_batches=0).fit(_user_model(), train, val)
    assert str(raised.value) == (
        "`TemperatureScaling(dataloader='val')` found no val dataloader on the trainer or its datamodule (with "
        "`limit_val_batches=0` Lightning does not load the loaders passed to `fit`). Pass the held-out loader itself: "
        "`TemperatureScaling(dataloader=my_loader)`."
    )
    with pytest.raises(ValueError, match="found 2 val dataloaders") as raised:
        fast_trainer(tmp_path, callbacks=[TemperatureScaling()]).fit(
            _TwoLoaders(TinyCNN(num_classes=3)), train, [val, val]
        )
    assert str(raised.value) == (
        "`TemperatureScaling(dataloader='val')` found 2 val dataloaders: say which one holds the in-distribution "
        "held-out data with `dataloader_idx=`."
    )
    with pytest.raises(ValueError, match="is the training dataloader") as raised:
        fast_trainer(tmp_path, callbacks=[TemperatureScaling()]).fit(_user_model(), train, train)
    assert str(raised.value) == (
        "The val dataloader is the training dataloader: T fitted on training logits comes out too low. Pass a "
        "held-out loader, or the training loader explicitly if you mean it."
    )
    with pytest.raises(RuntimeError) as raised:
        fast_trainer(tmp_path, callbacks=[TemperatureScaling(dataloader=[])]).fit(_user_model(), train)
    assert str(raised.value) == (
        "`TemperatureScaling` found no batch in its held-out loader (on this rank). Pass a non-empty loader: "
        "`TemperatureScaling(dataloader=my_loader)`."
    )
    with pytest.raises(RuntimeError) as raised:
        TemperatureScaling().calibrated(_user_model())
    assert str(raised.value) == "No temperature yet: fit the model with this callback first, or load its checkpoint."


class _ExtraDim(UserClassifier):
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[..., None]  # (N, K, 1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0])[..., 0], batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self(batch[0])


@pytest.mark.parametrize(
    ("module", "got"), [(_TupleOutput, "tuple"), (_ExtraDim, "shape (8, 3, 1)")], ids=["tuple", "3d"]
)
def test_held_out_logits_of_the_wrong_kind_are_refused_whole(tmp_path: Path, module: type, got: str) -> None:
    train, val = _loaders()
    with pytest.raises(ValueError, match="Expected logits of shape") as raised:
        fast_trainer(tmp_path, callbacks=[TemperatureScaling()]).fit(module(TinyCNN(num_classes=3)), train, val)
    assert str(raised.value) == f"Expected logits of shape (N, num_classes) for a batch, but got {got}."


def test_a_missing_target_key_is_named(tmp_path: Path) -> None:
    train, val = _loaders()
    with pytest.raises(KeyError) as raised:
        fast_trainer(tmp_path, callbacks=[TemperatureScaling(target_key=5)]).fit(_user_model(), train, val)
    assert raised.value.args[0] == (
        "The batch is a sequence of length 2, but `target_key=5` is not a valid position in it. "
        "Pass an int `target_key` below 2."
    )


def test_a_forward_that_returns_no_tensor_is_refused_with_the_whole_fix(tmp_path: Path) -> None:
    train, val = _loaders()
    callback = TemperatureScaling(forward_fn=lambda module, batch: module.net(batch[0]))
    with pytest.raises(TypeError) as raised:
        fast_trainer(tmp_path, max_epochs=1, callbacks=[callback]).fit(_TupleOutput(TinyCNN(num_classes=3)), train, val)
    assert str(raised.value) == (
        "`TemperatureScaling` divides the logits returned by the LightningModule's `forward` by T, but it returned "
        "tuple. Return the logits tensor from `forward` (e.g. `.logits` of a model output), or leave the callback "
        "out and divide by `callback.temperature` yourself."
    )


def _doubled_inputs(rows: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
    """A collate function the batches depend on: the stacked inputs, doubled."""
    inputs, targets = torch.utils.data.default_collate(rows)
    return [2.0 * inputs, targets]


def test_a_persistent_worker_val_loader_is_fitted_and_still_validated_whole(tmp_path: Path) -> None:
    """The fit at the first batch of the final validation must not reset that validation's own iterator, and
    fits on the loader's own batches (its batch size and collate function)."""
    train, _ = _loaders()
    dataset = torch.utils.data.TensorDataset(*_images(32, seed=1))
    val = torch.utils.data.DataLoader(
        dataset, batch_size=8, num_workers=1, persistent_workers=True, collate_fn=_doubled_inputs
    )
    callback = TemperatureScaling(num_batches=2)
    L.seed_everything(0, verbose=False)
    model = _user_model()
    trainer = fast_trainer(tmp_path, max_epochs=2, callbacks=[callback])
    trainer.fit(model, train, val)
    assert len(model.seen_targets["val"]) == 2 * 4  # two validations of 4 batches each
    logits, targets = _raw(model, torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=_doubled_inputs))
    t = callback.temperature
    assert t == pytest.approx(fit_temperature(logits[:16], targets[:16]), rel=1e-6)  # the first 2 batches of 8
    assert float(trainer.callback_metrics["val_loss"]) == pytest.approx(
        float(F.cross_entropy(logits / t, targets)), rel=1e-5
    )


class _HeadClassifier(UserClassifier):
    """A user module split as trunk and head (the timm convention), whose forward and head take a keyword."""

    def forward_features(self, x: Tensor) -> Tensor:
        return self.net.body(x)

    def forward_head(self, features: Tensor, *, shift: float = 0.0) -> Tensor:
        return self.net.head(self.net.dropout(features)) + shift

    def forward(self, x: Tensor, *, shift: float = 0.0) -> Tensor:
        return self.forward_head(self.forward_features(x), shift=shift)


def test_keyword_arguments_reach_the_scaled_forward_and_head(tmp_path: Path) -> None:
    callback = TemperatureScaling()
    model = _HeadClassifier(TinyCNN(num_classes=3, dropout=0.0), num_classes=3, lr=0.5)
    _, model, val = _fit(tmp_path, [callback], model=model, max_epochs=1)
    t = callback.temperature
    assert isinstance(t, float)
    x = next(iter(val))[0]
    with torch.no_grad():
        model.eval()
        features = model.net.body(x)
        torch.testing.assert_close(model(x, shift=1.0), (model.net(x) + 1.0) / t)
        torch.testing.assert_close(model.forward_head(features, shift=1.0), (model.net.head(features) + 1.0) / t)
        model.train()
        torch.testing.assert_close(model(x, shift=1.0), model.net(x) + 1.0)


def test_an_instance_level_forward_head_is_scaled_and_handed_back_by_calibrated(tmp_path: Path) -> None:
    model = _HeadClassifier(TinyCNN(num_classes=3, dropout=0.0), num_classes=3, lr=0.5)
    class_head = model.forward_head

    def doubled(features: Tensor, *, shift: float = 0.0) -> Tensor:
        return 2.0 * class_head(features, shift=shift)

    model.forward_head = doubled  # type: ignore[method-assign]
    callback = TemperatureScaling()
    _, model, val = _fit(tmp_path, [callback], model=model, max_epochs=1)
    logits, targets = _raw(model, val)
    t = callback.temperature
    assert t == pytest.approx(fit_temperature(2.0 * logits, targets), rel=1e-6)  # fitted on the doubled logits
    x = next(iter(val))[0]
    model.eval()
    with torch.no_grad():
        features = model.net.body(x)
        torch.testing.assert_close(model.forward_head(features), 2.0 * model.net.head(features) / t)
        torch.testing.assert_close(model(x), 2.0 * model.net(x) / t)
        calibrated = callback.calibrated(model)
        torch.testing.assert_close(model.forward_head(features), 2.0 * model.net.head(features))
        torch.testing.assert_close(calibrated(x), 2.0 * model.net(x) / t)


class _Stream(torch.utils.data.IterableDataset):
    """The images as a stream with no length: Lightning counts its batches as infinite."""

    def __init__(self, inputs: Tensor, targets: Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __iter__(self) -> Any:
        return iter(zip(self.inputs, self.targets, strict=True))


def test_a_training_loader_without_length_fits_at_the_final_validation(tmp_path: Path) -> None:
    """Its last batch is known only when the loader runs out (`trainer.is_last_batch`), not from a count."""
    logger, callback = MemoryLogger(), TemperatureScaling()
    train = torch.utils.data.DataLoader(_Stream(*_images(48, seed=0)), batch_size=8)
    _, val = _loaders()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="final")
    trainer = fast_trainer(
        tmp_path, max_epochs=2, callbacks=[callback, checkpoint], logger=logger, enable_checkpointing=True
    )
    L.seed_everything(0, verbose=False)
    model = _user_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, train, val)
    assert not [w for w in caught if "T is fitted now" in str(w.message)]
    assert [step for step, _ in logger.values("calibration/temperature")] == [trainer.global_step] == [12]
    assert callback.temperature == pytest.approx(fit_temperature(*_raw(model, val)), rel=1e-6)


def test_validate_alone_fits_no_t(tmp_path: Path) -> None:
    for when in ("fit_end", "test_start"):
        callback = TemperatureScaling(when=when)
        _, val = _loaders()
        fast_trainer(tmp_path, callbacks=[callback]).validate(_user_model(), val, verbose=False)
        assert callback.temperature is None
        assert callback.report is None


def test_a_validation_before_the_last_training_batch_fits_no_t(tmp_path: Path) -> None:
    """5 training batches, validation after the 4th only: T is fitted once, on the weights after the 5th."""
    logger, callback = MemoryLogger(), TemperatureScaling()
    L.seed_everything(0, verbose=False)
    train = make_loader(*_images(40, seed=0), batch_size=8, shuffle=True)
    _, val = _loaders()
    model = _user_model()
    fast_trainer(tmp_path, val_check_interval=4, callbacks=[callback], logger=logger).fit(model, train, val)
    assert len(model.seen_targets["val"]) == 4  # one validation of 4 batches
    assert [step for step, _ in logger.values("calibration/temperature")] == [5]
    assert callback.temperature == pytest.approx(fit_temperature(*_raw(model, val)), rel=1e-6)


def test_dict_batches_without_forward_fn_are_read_at_input_key(tmp_path: Path) -> None:
    inputs, targets = _images(16, 1)
    val = make_loader(inputs, targets, batch_size=8, as_dict=True)
    callback = TemperatureScaling(dataloader=val, input_key="inputs", target_key="targets")
    train, _ = _loaders()
    L.seed_everything(0, verbose=False)
    model = _user_model()
    fast_trainer(tmp_path, callbacks=[callback]).fit(model, train)
    assert callback.temperature == pytest.approx(fit_temperature(*_raw(model, make_loader(inputs, targets))), rel=1e-6)


class _FailAfterTraining(L.Callback):
    """Changes the weights when training ends (so T is fitted again at fit end) and makes that fit's pass fail."""

    def __init__(self) -> None:
        self.failing = False

    def forward_fn(self, module: nn.Module, batch: Any) -> Tensor:
        if self.failing:
            raise RuntimeError("the held-out pass failed")
        return module(batch[0])

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        with torch.no_grad():
            pl_module.net.head.bias.add_(torch.tensor([1.0, -0.5, -0.5]))
        self.failing = True


def test_a_failed_refit_leaves_the_module_scaled_by_the_last_t_and_in_its_modes(tmp_path: Path) -> None:
    failing = _FailAfterTraining()
    callback = TemperatureScaling(forward_fn=failing.forward_fn)
    L.seed_everything(0, verbose=False)
    train, val = _loaders()
    model = _user_model()
    trainer = fast_trainer(tmp_path, callbacks=[callback, failing])
    with pytest.raises(RuntimeError, match="the held-out pass failed"):
        trainer.fit(model, train, val)
    t = callback.temperature
    assert isinstance(t, float)
    assert model.training  # as it was when fit ended
    x = next(iter(val))[0]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net(x) / t)  # the T of the fit at the final validation


class _TupleHead(UserClassifier):
    """A trunk and head split whose head returns ``(logits, None)``: its forward takes the logits out."""

    def forward_features(self, x: Tensor) -> Tensor:
        return self.net.body(x)

    def forward_head(self, features: Tensor) -> Any:
        return self.net.head(features), None

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))[0]


def test_a_head_that_returns_no_tensor_is_refused_with_the_whole_fix(tmp_path: Path) -> None:
    train, val = _loaders()
    callback = TemperatureScaling(dataloader=val)
    model = _TupleHead(TinyCNN(num_classes=3), num_classes=3, lr=0.5)
    fast_trainer(tmp_path, callbacks=[callback]).fit(model, train)  # no validation: T is fitted at fit end
    model.eval()
    with pytest.raises(TypeError) as raised, torch.no_grad():
        model.forward_head(model.net.body(next(iter(val))[0]))
    assert str(raised.value) == (
        "`TemperatureScaling` divides the logits returned by the LightningModule's `forward_head` by T, but it "
        "returned tuple. Return the logits tensor from `forward_head` (e.g. `.logits` of a model output), or leave "
        "the callback out and divide by `callback.temperature` yourself."
    )
