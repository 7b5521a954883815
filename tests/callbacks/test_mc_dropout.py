from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import Tensor
from torch.distributions import Categorical
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_calibration_error

from lightning_reg import MCDropoutEvaluation
from lightning_reg.forward import batch_inputs
from lightning_reg.functional.mc_dropout import mc_dropout_predict
from tests.helpers import TinyMLP, UserClassifier, fast_trainer, make_classification, make_images, make_loader
from tests.helpers.ddp import ddp_fork_trainer, scrubbed_ddp_env, skip_on_windows
from tests.helpers.mc import callback_generator, naive_mc

METRICS = ("acc", "nll", "brier", "ece", "entropy")


def _model(seed: int = 0) -> UserClassifier:
    torch.manual_seed(seed)
    return UserClassifier(TinyMLP(batch_norm=True, dropout=0.3))


def _loader(n: int = 48, **kwargs: Any) -> Any:
    return make_loader(*make_classification(n), batch_size=16, **kwargs)


class _ModeRecorder(UserClassifier):
    """Records the training flags of every submodule when its own steps run."""

    def __init__(self) -> None:
        super().__init__(TinyMLP(batch_norm=True, dropout=0.3))
        self.step_modes: list[bool] = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.step_modes += [m.training for m in self.modules()]
        super().validation_step(batch, batch_idx)


def _reference_metrics(mean: Tensor, info: Tensor, targets: Tensor) -> dict[str, float]:
    """The MC metrics of the mean prediction, with torch and torchmetrics (15 equal-width bins for the ECE)."""
    k = mean.shape[1]
    return {
        "acc": float(multiclass_accuracy(mean, targets, num_classes=k, average="micro")),
        "nll": float(F.nll_loss(mean.log(), targets)),
        "brier": float(((mean - F.one_hot(targets, k)) ** 2).sum(1).mean()),
        "ece": float(multiclass_calibration_error(mean, targets, num_classes=k, n_bins=15, norm="l1")),
        "entropy": float(Categorical(probs=mean).entropy().mean()),
        "mutual_info": float(info.mean()),
    }


def test_validate_logs_mc_and_deterministic_metrics(tmp_path: Path) -> None:
    model = _model()
    (results,) = fast_trainer(tmp_path, callbacks=[MCDropoutEvaluation(8, plot=False)]).validate(model, _loader())
    expected = {f"mc/val/{m}" for m in (*METRICS, "mutual_info")} | {f"mc/val/det_{m}" for m in METRICS}
    assert expected <= results.keys()
    # The deterministic metrics are those of the model in eval mode on the whole set, computed independently.
    inputs, targets = make_classification(48)
    with torch.no_grad():
        logits = model.eval()(inputs)
    assert results["mc/val/det_acc"] == pytest.approx(float((logits.argmax(1) == targets).float().mean()))
    assert results["mc/val/det_nll"] == pytest.approx(float(F.cross_entropy(logits, targets)), rel=1e-5)
    # The MC metrics are those of the naive loop with the callback's generator, computed independently.
    reference = _reference_metrics(*naive_mc(model, _loader(), 8, callback_generator()))
    for name, value in reference.items():
        assert results[f"mc/val/{name}"] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert results["mc/val/mutual_info"] > 0


def test_validation_step_runs_in_plain_eval_and_modes_are_restored(tmp_path: Path) -> None:
    model = _ModeRecorder()
    model.train()
    fast_trainer(tmp_path, callbacks=[MCDropoutEvaluation(4, plot=False)]).validate(model, _loader())
    assert model.step_modes
    assert not any(model.step_modes)
    assert all(m.training for m in model.modules())


def test_training_is_unchanged(tmp_path: Path) -> None:
    weights = []
    for callbacks in ([], [MCDropoutEvaluation(4, plot=False)]):
        L.seed_everything(0)
        model = _model()
        trainer = fast_trainer(tmp_path, max_epochs=2, callbacks=callbacks)
        trainer.fit(model, _loader(shuffle=True), _loader())
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_metrics_are_reproducible_under_seed_everything(tmp_path: Path) -> None:
    runs = []
    for _ in range(2):
        L.seed_everything(3)
        trainer = fast_trainer(tmp_path, callbacks=[MCDropoutEvaluation(6, plot=False)])
        runs.append(trainer.validate(_model(), _loader())[0])
    assert runs[0] == runs[1]


def test_test_stage_logs_under_mc_test_and_stages_choose_where(tmp_path: Path) -> None:
    trainer = fast_trainer(tmp_path, callbacks=[MCDropoutEvaluation(4, stages=("test",), plot=False)])
    (validated,) = trainer.validate(_model(), _loader())
    (tested,) = trainer.test(_model(), _loader())
    assert not any(key.startswith("mc/") for key in validated)
    assert {"mc/test/acc", "mc/test/det_ece", "mc/test/mutual_info"} <= tested.keys()


def test_dict_batches_with_named_keys(tmp_path: Path) -> None:
    callback = MCDropoutEvaluation(4, plot=False, input_key="inputs", target_key="targets")
    (results,) = fast_trainer(tmp_path, callbacks=[callback]).validate(_model(), _loader(as_dict=True))
    assert "mc/val/ece" in results


class _DictPredictor(UserClassifier):
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        return {"probs": super().predict_step(batch, batch_idx, dataloader_idx)}


def test_predict_adds_mc_outputs_to_dict_predictions_and_stores_every_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _DictPredictor(TinyMLP(batch_norm=True, dropout=0.3))
    callback = MCDropoutEvaluation(5)
    predictions = fast_trainer(tmp_path, callbacks=[callback]).predict(model, _loader())
    assert predictions is not None
    assert len(predictions) == len(callback.predictions) == 3
    for returned, stored in zip(predictions, callback.predictions, strict=True):
        assert isinstance(returned, dict)
        assert returned["mc_mean_probs"].shape == (16, 3)
        assert returned["mc_predictive_entropy"].shape == returned["mc_mutual_information"].shape == (16,)
        assert torch.equal(returned["mc_mean_probs"], stored["mc_mean_probs"])
        assert not torch.equal(returned["mc_mean_probs"], returned["probs"])
        torch.testing.assert_close(returned["mc_mean_probs"].sum(1), torch.ones(16))


def test_predict_with_tensor_predictions_stores_them_in_the_callback(tmp_path: Path) -> None:
    callback = MCDropoutEvaluation(5)
    predictions = fast_trainer(tmp_path, callbacks=[callback]).predict(_model(), _loader())
    assert predictions is not None
    assert isinstance(predictions[0], Tensor)
    assert [p["mc_mutual_information"].shape for p in callback.predictions] == [(16,)] * 3


def test_reliability_diagram_is_written_and_sent_to_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = fast_trainer(tmp_path, logger=logger, callbacks=[MCDropoutEvaluation(4)])
    trainer.validate(_model(), _loader())
    logger.finalize("success")
    assert (Path(logger.log_dir) / "mc_dropout" / "reliability_validate_epoch0.png").stat().st_size > 1000
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert "mc/val/reliability" in events.Tags()["images"]


def test_plot_without_logger_writes_nothing_and_warns_never_into_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    trainer = fast_trainer(None, callbacks=[MCDropoutEvaluation(4, stages=("test",))])  # default_root_dir: the cwd
    with pytest.warns(UserWarning, match=r"no logger and `default_root_dir` is the working directory: none is"):
        trainer.test(_model(), _loader())
    assert list(tmp_path.iterdir()) == []
    # An explicit default_root_dir is where Lightning writes without a logger: the plot goes there.
    fast_trainer(tmp_path / "root", callbacks=[MCDropoutEvaluation(4, stages=("test",))]).test(_model(), _loader())
    assert (tmp_path / "root" / "mc_dropout" / "reliability_test_epoch0.png").exists()


def test_plot_goes_to_the_loggers_directory(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path / "logs", name="csv")
    fast_trainer(tmp_path, logger=logger, callbacks=[MCDropoutEvaluation(4, stages=("test",))]).test(
        _model(), _loader()
    )
    assert (Path(logger.log_dir) / "mc_dropout" / "reliability_test_epoch0.png").stat().st_size > 1000
    assert not (tmp_path / "mc_dropout").exists()


def test_fast_dev_run_writes_no_plot_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for logger in (True, CSVLogger(tmp_path / "logs")):
        trainer = L.Trainer(
            fast_dev_run=True, logger=logger, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[MCDropoutEvaluation(4)],
        )  # fmt: skip
        trainer.fit(_model(), _loader(), _loader())
        trainer.test(_model(), _loader())
    assert not list(tmp_path.rglob("*.png"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_samples": 0}, r"Expected `n_samples` to be an int >= 1, but got 0"),
        ({"stages": ("fit",)}, r"Expected `stages` to contain only \('validate', 'test'\), but got \['fit'\]"),
        ({"chunk_size": 0}, r"Expected `chunk_size` to be None or an int >= 1, but got 0"),
        ({"n_bins": 0}, r"Expected `n_bins` to be a positive int, but got 0"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MCDropoutEvaluation(**kwargs)


def test_bad_batch_key_raises() -> None:
    with pytest.raises(TypeError, match="Expected `input_key` to be an int"):
        MCDropoutEvaluation(input_key=1.5)  # type: ignore[arg-type]


def test_model_without_dropout_raises_at_validation(tmp_path: Path) -> None:
    trainer = fast_trainer(tmp_path, callbacks=[MCDropoutEvaluation(4, plot=False)])
    with pytest.raises(ValueError, match="has no dropout layer"):
        trainer.validate(UserClassifier(TinyMLP(batch_norm=True)), _loader())


class _CountingSteps(UserClassifier):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__(net)
        self.steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.steps += 1
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize(
    ("net", "match"),
    [
        (TinyMLP(batch_norm=True), "has no dropout layer"),
        (torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.0), torch.nn.Linear(8, 3)), "has rate 0"),
    ],
)
def test_pointless_sampling_raises_at_fit_start_before_any_training_step(
    tmp_path: Path, net: torch.nn.Module, match: str
) -> None:
    model = _CountingSteps(net)
    trainer = fast_trainer(tmp_path, max_epochs=2, callbacks=[MCDropoutEvaluation(4, plot=False)])
    with pytest.raises(ValueError, match=match):
        trainer.fit(model, _loader(), _loader())
    assert model.steps == 0


def test_training_without_validation_sampling_is_not_checked(tmp_path: Path) -> None:
    trainer = fast_trainer(tmp_path, callbacks=[MCDropoutEvaluation(4, stages=("test",), plot=False)])
    trainer.fit(UserClassifier(TinyMLP(batch_norm=True)), _loader(), _loader())  # no dropout, none sampled: fine


class _BadBN(UserClassifier):
    """Puts its BatchNorm in training mode inside forward: the statistics change during evaluation."""

    def forward(self, x: Tensor) -> Tensor:
        self.net.body[1].train()
        return super().forward(x)


def test_running_statistics_are_checked_once_per_evaluation_and_still_catch_a_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model()
    bn = model.net.body[1]
    reads = []
    original = bn.named_buffers

    def counting(*args: Any, **kwargs: Any) -> Any:
        reads.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(bn, "named_buffers", counting)
    fast_trainer(tmp_path, callbacks=[MCDropoutEvaluation(4, plot=False)]).validate(model, _loader())  # 3 batches
    assert len(reads) == 2  # one snapshot before the first sampled batch, one comparison after it: not per batch
    with pytest.raises(RuntimeError, match="Running statistics changed during validate with Monte-Carlo dropout"):
        fast_trainer(tmp_path, callbacks=[MCDropoutEvaluation(4, plot=False)]).validate(
            _BadBN(TinyMLP(batch_norm=True, dropout=0.3)), _loader()
        )


@pytest.mark.parametrize("ema_first", [True, False])
def test_weight_averaging_swapping_buffers_is_not_a_change_in_either_order(tmp_path: Path, ema_first: bool) -> None:
    from lightning.pytorch.callbacks import EMAWeightAveraging

    # EMAWeightAveraging swaps its averaged parameters and BN buffers in at validation start and out at validation
    # end: a legitimate change around the evaluation, not one made by sampling.
    mc = MCDropoutEvaluation(4, stages=("validate",), plot=False)
    ema = EMAWeightAveraging(decay=0.5)
    callbacks = [ema, mc] if ema_first else [mc, ema]
    trainer = fast_trainer(tmp_path, max_epochs=2, callbacks=callbacks)
    trainer.fit(_model(), _loader(), _loader())
    assert {"mc/val/acc", "mc/val/det_acc"} <= set(trainer.callback_metrics)  # and no "statistics changed" error


def test_nan_running_statistics_do_not_raise_and_are_reported(tmp_path: Path) -> None:
    model = _model()
    model.net.body[1].running_var[:] = float("nan")  # what fp16 overflow leaves behind under precision="16-true"
    trainer = fast_trainer(tmp_path, callbacks=[MCDropoutEvaluation(4, plot=False)])
    with pytest.warns(
        RuntimeWarning, match=r"Running statistics of UserClassifier are NaN: \['net.body.1.running_var'\]"
    ):
        (results,) = trainer.validate(model, _loader())
    assert results["mc/val/det_acc"] >= 0


# --- the batch-forward protocol: the deterministic pass is the module's own validation ------------------------


def _padded_sequences(n: int = 48, steps: int = 7, features: int = 8, seed: int = 0) -> tuple[Tensor, ...]:
    """Variable-length sequences whose padding is large noise: a model that reads it predicts differently."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.arange(n) % 3
    lengths = torch.randint(2, steps + 1, (n,), generator=g)
    x = torch.randn(n, steps, features, generator=g) + targets[:, None, None].float()
    padding = torch.arange(steps)[None, :] >= lengths[:, None]  # (N, T)
    x[padding] = 20 * torch.randn(int(padding.sum()), features, generator=g)
    return x, targets, lengths


def _sequence_loader(*tensors: Tensor) -> Any:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*tensors), batch_size=16)


def _zoo_case(name: str) -> tuple[L.LightningModule, Any]:
    import zoo

    torch.manual_seed(0)
    if name == "lstm":  # [x, y, lengths]
        x, y, lengths = _padded_sequences()
        return zoo.RNNClassifier(3, hidden_size=16, dropout=0.3), _sequence_loader(x, y, lengths)
    if name == "transformer":  # [x, y, attention_mask]
        x, y, lengths = _padded_sequences()
        mask = (torch.arange(7)[None, :] < lengths[:, None]).long()
        model = zoo.TransformerClassifier(3, dim=16, depth=1, num_heads=2, head_dropout=0.3)
        return model, _sequence_loader(x, y, mask)
    images, y = make_images(48)
    return zoo.create("cnn_small", num_classes=3), _sequence_loader(images, y)


@pytest.mark.parametrize(
    ("name", "method"),
    [
        ("lstm", "cached"),  # the trunk once, with the lengths
        ("transformer", "batched"),  # dropout in every block: x and its mask repeated along the batch
        ("cnn_small", "cached"),
    ],
)
def test_deterministic_pass_equals_the_zoo_modules_own_validation_metrics(
    tmp_path: Path, name: str, method: str
) -> None:
    model, loader = _zoo_case(name)
    (results,) = fast_trainer(tmp_path, callbacks=[MCDropoutEvaluation(8, plot=False)]).validate(model, loader)
    assert results["mc/val/det_acc"] == pytest.approx(results["val_acc"], abs=1e-6)
    assert results["mc/val/det_nll"] == pytest.approx(results["val_loss"], rel=1e-5)
    assert results["mc/val/mutual_info"] > 0
    # The path the callback's inputs take (the module's own forward arguments for a batch).
    batch = next(iter(loader))
    with torch.no_grad():
        assert mc_dropout_predict(model.eval(), batch_inputs(model, batch, 0), 8).method == method


class _MaskedTextModel(L.LightningModule):
    """HuggingFace-style: dict batches, `forward(input_ids, attention_mask)` that needs the mask."""

    def __init__(self, with_forward_inputs: bool = True) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.drop = torch.nn.Dropout(0.3)
        self.head = torch.nn.Linear(16, 3)
        self.with_forward_inputs = with_forward_inputs

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.embed(input_ids) * attention_mask[..., None]
        return self.head(self.drop(h.sum(1) / attention_mask.sum(1, keepdim=True)))

    def forward_inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        self.log("val_loss", F.cross_entropy(logits, batch["labels"]), batch_size=len(logits))
        self.log("val_acc", (logits.argmax(1) == batch["labels"]).float().mean(), batch_size=len(logits))


class _NoForwardInputs(L.LightningModule):
    """The same model without `forward_inputs`: the callback can only pass `batch[input_key]`."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _MaskedTextModel()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.inner(input_ids, attention_mask)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        return None


class _TextData(torch.utils.data.Dataset):
    def __init__(self, n: int = 48) -> None:
        g = torch.Generator().manual_seed(0)
        self.labels = torch.arange(n) % 3
        self.ids = torch.randint(1, 50, (n, 9), generator=g)
        lengths = torch.randint(2, 10, (n,), generator=g)
        self.mask = (torch.arange(9)[None, :] < lengths[:, None]).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def test_module_with_forward_inputs_and_an_attention_mask(tmp_path: Path) -> None:
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(_TextData(), batch_size=16)
    model = _MaskedTextModel()
    callback = MCDropoutEvaluation(8, plot=False, target_key="labels")
    (results,) = fast_trainer(tmp_path, callbacks=[callback]).validate(model, loader)
    assert results["mc/val/det_nll"] == pytest.approx(results["val_loss"], rel=1e-5)
    assert results["mc/val/det_acc"] == pytest.approx(results["val_acc"], abs=1e-6)
    # Both arguments reached every pass: the naive loop calling forward(input_ids, attention_mask) agrees.
    reference = _reference_metrics(*naive_mc(model, loader, 8, callback_generator()))
    for name, value in reference.items():
        assert results[f"mc/val/{name}"] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    with torch.no_grad():  # its traced deterministic prefix, fed both arguments, runs once
        assert mc_dropout_predict(model, batch_inputs(model, next(iter(loader)), 0), 8).method == "cached"


def test_a_forward_that_needs_more_of_the_batch_names_forward_inputs_and_forward_fn(tmp_path: Path) -> None:
    loader = torch.utils.data.DataLoader(_TextData(), batch_size=16)
    trainer = fast_trainer(
        tmp_path, callbacks=[MCDropoutEvaluation(4, plot=False, input_key="input_ids", target_key="labels")]
    )
    model = _NoForwardInputs()
    with pytest.raises(TypeError) as plain:  # what calling forward with `batch[input_key]` alone raises
        model(next(iter(loader))["input_ids"])
    with pytest.raises(TypeError) as raised:
        trainer.validate(model, loader)
    assert str(raised.value) == (
        f"{plain.value}. MCDropoutEvaluation called `_NoForwardInputs(batch['input_ids'])`: when `forward` needs more "
        "of the batch (lengths, an attention mask), define `forward_inputs(batch)` on the module (returning the "
        "arguments of `forward`) or pass `forward_fn=lambda module, batch: ...`."
    )


class _TypeErrorInForward(_MaskedTextModel):
    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        raise TypeError("a bug of the model's own")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        return None  # only the callback calls forward


@pytest.mark.parametrize("how", ["forward_inputs", "forward_fn"])
def test_a_type_error_of_a_model_called_its_own_way_passes_unchanged(tmp_path: Path, how: str) -> None:
    loader = torch.utils.data.DataLoader(_TextData(), batch_size=16)
    forward_fn = (
        (lambda module, batch: module(batch["input_ids"], batch["attention_mask"])) if how == "forward_fn" else None
    )
    callback = MCDropoutEvaluation(4, plot=False, target_key="labels", forward_fn=forward_fn)
    with pytest.raises(TypeError) as raised:
        fast_trainer(tmp_path, callbacks=[callback]).validate(_TypeErrorInForward(), loader)
    assert str(raised.value) == "a bug of the model's own"


def test_forward_fn_computes_the_logits_and_is_sampled_by_the_loop(tmp_path: Path) -> None:
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(_TextData(), batch_size=16)
    calls = []

    def forward_fn(module: L.LightningModule, batch: dict[str, Tensor]) -> Tensor:
        calls.append(1)
        return module(batch["input_ids"], attention_mask=batch["attention_mask"])

    callback = MCDropoutEvaluation(5, plot=False, target_key="labels", forward_fn=forward_fn)
    model = _MaskedTextModel()
    (results,) = fast_trainer(tmp_path, callbacks=[callback]).validate(model, loader)
    assert results["mc/val/det_nll"] == pytest.approx(results["val_loss"], rel=1e-5)
    assert len(calls) == 3 * (5 + 1)  # per batch: 5 samples and the deterministic pass, the naive loop
    reference = _reference_metrics(*naive_mc(model, loader, 5, callback_generator()))
    for name, value in reference.items():
        assert results[f"mc/val/{name}"] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    with pytest.raises(TypeError, match="Expected `forward_fn` to be None or a callable"):
        MCDropoutEvaluation(forward_fn=3)  # type: ignore[arg-type]


# --- several dataloaders ------------------------------------------------------------------------------------------


class _TwoLoaders(UserClassifier):
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = self._unpack(batch)
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = self._unpack(batch)
        self.log("test_loss", F.cross_entropy(self(x), y))


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_several_dataloaders_get_their_own_metrics_with_lightnings_suffix(tmp_path: Path, stage: str) -> None:
    torch.manual_seed(0)
    model = _TwoLoaders(TinyMLP(batch_norm=True, dropout=0.3))
    sets = [make_classification(48, seed=0), make_classification(32, seed=5)]
    loaders = [make_loader(*data, batch_size=16) for data in sets]
    trainer = fast_trainer(tmp_path, callbacks=[MCDropoutEvaluation(4, plot=False)])
    (results, _) = getattr(trainer, stage)(model, loaders)
    name = _LOG[stage]
    assert not any(key.startswith(f"mc/{name}/") and "dataloader_idx" not in key for key in results)
    for index, (inputs, targets) in enumerate(sets):
        with torch.no_grad():
            logits = model.eval()(inputs)
        suffix = f"/dataloader_idx_{index}"
        acc = float((logits.argmax(1) == targets).float().mean())
        assert results[f"mc/{name}/det_acc{suffix}"] == pytest.approx(acc)
        assert results[f"mc/{name}/det_nll{suffix}"] == pytest.approx(float(F.cross_entropy(logits, targets)), rel=1e-5)
        assert f"mc/{name}/mutual_info{suffix}" in results
    assert results[f"mc/{name}/det_nll/dataloader_idx_0"] != results[f"mc/{name}/det_nll/dataloader_idx_1"]


_LOG = {"validate": "val", "test": "test"}


# --- DDP: the logged metrics are the single-process metrics on the union --------------------------------


class _LoggedMC(L.Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("mc/")}
        (self.path / f"rank{trainer.global_rank}.json").write_text(json.dumps(logged))


@skip_on_windows
def test_ddp_metrics_equal_single_process_metrics_on_the_union(tmp_path: Path) -> None:
    model = _model()
    with scrubbed_ddp_env():
        trainer = ddp_fork_trainer(tmp_path, callbacks=[MCDropoutEvaluation(4, plot=False), _LoggedMC(tmp_path)])
        trainer.validate(model, _loader(64))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    logged = ranks[0]

    # The deterministic metrics: one process on all the data.
    (single,) = fast_trainer(tmp_path, callbacks=[MCDropoutEvaluation(4, plot=False)]).validate(_model(), _loader(64))
    for name in METRICS:
        assert logged[f"mc/val/det_{name}"] == pytest.approx(single[f"mc/val/det_{name}"], abs=1e-6), name

    # The MC metrics: the naive loop of each rank (its shard, samples r, r + 2, ... as DistributedSampler deals
    # them without shuffling, in batches of 16; its own stream), metrics computed once on the union.
    inputs, targets = make_classification(64)
    parts = [
        naive_mc(model, make_loader(inputs[r::2], targets[r::2], batch_size=16), 4, callback_generator(rank=r))
        for r in range(2)
    ]
    union = (torch.cat(tensors) for tensors in zip(*parts, strict=True))
    for name, value in _reference_metrics(*union).items():
        assert logged[f"mc/val/{name}"] == pytest.approx(value, rel=1e-4, abs=1e-6), name


class _AutocastRecorder(UserClassifier):
    """Records whether CPU autocast is on whenever it is called in eval mode (its step or the callback's passes)."""

    def __init__(self) -> None:
        super().__init__(TinyMLP(batch_norm=True, dropout=0.3))
        self.autocast_in_eval: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            self.autocast_in_eval.append(torch.is_autocast_enabled("cpu"))
        return super().forward(x)


def test_mc_passes_run_in_the_precision_context_of_the_evaluation_step(tmp_path: Path) -> None:
    model = _AutocastRecorder()
    trainer = fast_trainer(tmp_path, precision="bf16-mixed", callbacks=[MCDropoutEvaluation(4, plot=False)])
    (results,) = trainer.validate(model, _loader())
    # 3 batches: the step's forward, then the callback's deterministic and MC passes, each under autocast.
    assert len(model.autocast_in_eval) > 3
    assert all(model.autocast_in_eval)
    assert torch.isfinite(torch.tensor(results["mc/val/nll"]))


# --- DDP: a rank that sees no evaluation batch still takes part in the collectives ---------------------------------


class _RankZeroOnly(torch.utils.data.IterableDataset):
    """An uneven iterable dataset (shards, a stream): rank 0 yields every sample, rank 1 none."""

    def __init__(self, inputs: Tensor, targets: Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __iter__(self) -> Any:
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
            return iter(())
        return iter(zip(self.inputs, self.targets, strict=True))


class _QuietValidation(UserClassifier):
    """Logs nothing itself (its own `self.log(sync_dist=...)` would need every rank too)."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        return None


@skip_on_windows
def test_ddp_rank_without_batches_takes_part_and_both_ranks_log_the_union(tmp_path: Path) -> None:
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    torch.manual_seed(0)
    model = _QuietValidation(TinyMLP(batch_norm=True, dropout=0.3))
    data = make_classification(32)
    loader = torch.utils.data.DataLoader(_RankZeroOnly(*data), batch_size=16)
    strategy = DDPStrategy(start_method="fork", timeout=timedelta(seconds=60))  # a hang fails instead of waiting
    with scrubbed_ddp_env():
        trainer = ddp_fork_trainer(
            tmp_path, strategy=strategy, callbacks=[MCDropoutEvaluation(4, plot=False), _LoggedMC(tmp_path)]
        )
        trainer.validate(model, loader)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    assert "mc/val/mutual_info" in ranks[0]
    inputs, targets = data  # all of it seen by rank 0: the deterministic metrics of one process on it
    with torch.no_grad():
        logits = model.eval()(inputs)
    assert ranks[1]["mc/val/det_acc"] == pytest.approx(float((logits.argmax(1) == targets).float().mean()))
    assert ranks[1]["mc/val/det_nll"] == pytest.approx(float(F.cross_entropy(logits, targets)), rel=1e-5)


class _FewerClassesOnRank1(_QuietValidation):
    """Three classes on rank 0, two on rank 1: a model whose ranks disagree on the logits' width."""

    def forward(self, x: Tensor) -> Tensor:
        logits = super().forward(x)
        return logits[:, :2] if self.global_rank == 1 else logits


@skip_on_windows
def test_ddp_ranks_that_disagree_on_the_number_of_classes_are_named_with_each_ranks_count(tmp_path: Path) -> None:
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    torch.manual_seed(0)
    inputs, targets = make_classification(32)
    model = _FewerClassesOnRank1(TinyMLP(dropout=0.3))
    strategy = DDPStrategy(start_method="fork", timeout=timedelta(seconds=60))
    loader = make_loader(inputs, targets % 2, batch_size=16)
    with scrubbed_ddp_env():
        trainer = ddp_fork_trainer(tmp_path, strategy=strategy, callbacks=[MCDropoutEvaluation(4, plot=False)])
        with pytest.raises(Exception, match="same number of classes") as raised:
            trainer.validate(model, loader)
    assert (
        "Expected every rank to see the same number of classes in the validate logits, but got [[3], [2]] "
        "(rank x dataloader)." in str(raised.value)
    )


# --- what the mutation run found untested (issue 21) ------------------------------------------------------------------
class _FailsOnce(UserClassifier):
    """Its second validation batch raises once: an evaluation stopped half-way."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(TinyMLP(batch_norm=True, dropout=0.3))
        self.fail = True

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 1 and self.fail:
            self.fail = False
            raise RuntimeError("stopped half-way")
        super().validation_step(batch, batch_idx)


@pytest.mark.parametrize("ood", [False, True])
def test_an_evaluation_after_an_interrupted_one_starts_from_empty_metrics(tmp_path: Path, ood: bool) -> None:
    kwargs: dict[str, Any] = {"plot": False, "ood_dataloader_idx": 1 if ood else None}
    loaders = [_loader(), make_loader(*make_classification(32, seed=1), batch_size=16)] if ood else _loader()
    callback = MCDropoutEvaluation(4, **kwargs)
    model = _FailsOnce()
    trainer = fast_trainer(tmp_path, callbacks=[callback])
    with pytest.raises(RuntimeError, match="stopped half-way"):
        trainer.validate(model, loaders)  # one batch sampled, its metrics never computed
    (after, *_) = fast_trainer(tmp_path, callbacks=[callback]).validate(model, loaders)
    (fresh, *_) = fast_trainer(tmp_path, callbacks=[MCDropoutEvaluation(4, **kwargs)]).validate(model, loaders)
    assert after == fresh


def test_the_stream_is_that_of_the_stage_and_the_global_step(tmp_path: Path) -> None:
    model = _model()
    callback = MCDropoutEvaluation(4, stages=("validate", "test"), plot=False)
    trainer = fast_trainer(tmp_path, max_steps=2, callbacks=[callback])
    trainer.fit(model, _loader())  # 2 optimizer steps, no validation loader: global_step 2
    for stage, run in (("validate", trainer.validate), ("test", trainer.test)):
        (results,) = run(model, _loader(), verbose=False)
        reference = _reference_metrics(*naive_mc(model, _loader(), 4, callback_generator(stage, step=2)))
        name = _LOG[stage]
        for metric, value in reference.items():
            assert results[f"mc/{name}/{metric}"] == pytest.approx(value, rel=1e-4, abs=1e-6), (stage, metric)


def test_n_bins_is_the_ece_binning(tmp_path: Path) -> None:
    model = _model()
    (results,) = fast_trainer(tmp_path, callbacks=[MCDropoutEvaluation(6, n_bins=8, plot=False)]).validate(
        model, _loader()
    )
    mean, _, targets = naive_mc(model, _loader(), 6, callback_generator())
    expected = multiclass_calibration_error(mean, targets, num_classes=mean.shape[1], n_bins=8, norm="l1")
    assert results["mc/val/ece"] == pytest.approx(float(expected), abs=1e-6)
    assert float(expected) != pytest.approx(_reference_metrics(mean, torch.zeros(len(targets)), targets)["ece"])
    with torch.no_grad():  # the deterministic pass's ECE takes the same bins
        det = torch.cat([model.eval()(x).softmax(-1) for x, _ in _loader()])
    expected = multiclass_calibration_error(det, targets, num_classes=det.shape[1], n_bins=8, norm="l1")
    assert results["mc/val/det_ece"] == pytest.approx(float(expected), abs=1e-6)
    fifteen = multiclass_calibration_error(det, targets, num_classes=det.shape[1], n_bins=15, norm="l1")
    assert float(expected) != pytest.approx(float(fifteen))


def test_chunk_size_is_the_most_rows_per_pass(tmp_path: Path) -> None:
    # Dropout on the inputs: nothing to run once, the samples are stacked rows (the batched path)
    for chunk_size, rows in ((None, [64]), (16, [16] * 4)):  # 4 samples of 16 rows: one pass of 64, or 4 of 16
        torch.manual_seed(0)
        model = UserClassifier(torch.nn.Sequential(torch.nn.Dropout(0.3), torch.nn.Linear(8, 3)))
        seen: list[int] = []
        model.net[1].register_forward_hook(lambda module, args, output, seen=seen: seen.append(args[0].shape[0]))
        trainer = fast_trainer(tmp_path, callbacks=[MCDropoutEvaluation(4, chunk_size=chunk_size, plot=False)])
        trainer.validate(model, _loader(16))
        assert seen == [16, *rows, 16]  # the step's forward, the samples, the deterministic pass


class _DropPathOnly(UserClassifier):
    """Stochastic depth as its only randomness (a residual block with timm's DropPath)."""

    def __init__(self) -> None:
        from timm.layers import DropPath

        torch.manual_seed(0)
        super().__init__(TinyMLP())
        self.drop_path = DropPath(0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x + self.drop_path(x))


def test_include_drop_path_samples_a_model_whose_only_randomness_is_stochastic_depth(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no dropout"):
        fast_trainer(tmp_path, callbacks=[MCDropoutEvaluation(4, plot=False)]).validate(_DropPathOnly(), _loader())
    trainer = fast_trainer(tmp_path, callbacks=[MCDropoutEvaluation(4, plot=False, include_drop_path=True)])
    (results,) = trainer.validate(_DropPathOnly(), _loader())
    assert results["mc/val/mutual_info"] > 0


def test_a_missing_target_entry_is_named_whole(tmp_path: Path) -> None:
    loader = torch.utils.data.DataLoader(_TextData(), batch_size=16)  # dict batches: input_ids, attention_mask, labels
    callback = MCDropoutEvaluation(4, plot=False, target_key="label")
    with pytest.raises(KeyError, match="target_key") as raised:
        fast_trainer(tmp_path, callbacks=[callback]).validate(_MaskedTextModel(), loader)
    assert raised.value.args[0] == (
        "The batch is a dict with keys ['attention_mask', 'input_ids', 'labels'], but `target_key='label'` is not one "
        "of them. Pass `target_key` naming the right entry."
    )


class _BadBNTwoLoaders(_BadBN):
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        super().validation_step(batch, batch_idx)


def test_changed_statistics_on_an_ood_loader_first_name_the_stage(tmp_path: Path) -> None:
    callback = MCDropoutEvaluation(4, plot=False, ood_dataloader_idx=0)
    with pytest.raises(RuntimeError, match="Running statistics changed during validate with Monte-Carlo dropout"):
        fast_trainer(tmp_path, callbacks=[callback]).validate(
            _BadBNTwoLoaders(TinyMLP(batch_norm=True, dropout=0.3)), [_loader(), _loader()]
        )


class _QuietTwoLoaders(_QuietValidation):
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        return None


@skip_on_windows
def test_ddp_rank_without_batches_of_an_ood_loader_takes_part_in_the_ood_metrics(tmp_path: Path) -> None:
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    torch.manual_seed(0)
    model = _QuietTwoLoaders(TinyMLP(batch_norm=True, dropout=0.3))
    inputs, targets = make_classification(32)
    loaders = [
        torch.utils.data.DataLoader(_RankZeroOnly(inputs, targets), batch_size=16),
        torch.utils.data.DataLoader(_RankZeroOnly(3.0 * inputs, targets), batch_size=16),  # out of distribution
    ]
    strategy = DDPStrategy(start_method="fork", timeout=timedelta(seconds=60))
    callbacks = [MCDropoutEvaluation(4, plot=False, ood_dataloader_idx=1), _LoggedMC(tmp_path)]
    with scrubbed_ddp_env():
        ddp_fork_trainer(tmp_path, strategy=strategy, callbacks=callbacks).validate(model, loaders)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    assert 0.0 <= ranks[1]["mc/val/det_ood_auroc"] <= 1.0
