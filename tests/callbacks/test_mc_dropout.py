from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from lightning_reg import MCDropoutEvaluation, hard_targets
from lightning_reg.functional.mc_dropout import MCDropoutPrediction
from lightning_reg.metrics import UncertaintyMetrics
from tests.helpers import TinyMLP, UserClassifier, fast_trainer, make_classification, make_loader
from tests.helpers.ddp import ddp_fork_trainer, scrubbed_ddp_env, skip_on_windows

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
    assert results["mc/val/mutual_info"] > 0
    assert results["mc/val/nll"] != results["mc/val/det_nll"]


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


def test_plot_without_logger_goes_to_the_root_dir(tmp_path: Path) -> None:
    fast_trainer(tmp_path, callbacks=[MCDropoutEvaluation(4, stages=("test",))]).test(_model(), _loader())
    assert (tmp_path / "mc_dropout" / "reliability_test_epoch0.png").exists()


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


# --- DDP: the logged metrics are the single-process metrics on the union --------------------------------


class _Recording(MCDropoutEvaluation):
    """Keeps what each rank fed to its metrics, so the parent can recompute them on the union."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[Tensor, Tensor, Tensor]] = []

    def _update(self, stage: Any, prediction: MCDropoutPrediction, targets: Tensor) -> None:
        super()._update(stage, prediction, targets)
        self.seen.append((prediction.mean_probs, prediction.mutual_information, targets))


class _RankWriter(L.Callback):
    def __init__(self, path: Path, recorder: _Recording) -> None:
        self.path, self.recorder = path, recorder

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("mc/")}
        mean_probs, mutual_info, targets = (
            torch.cat(parts).tolist() for parts in zip(*self.recorder.seen, strict=True)
        )
        record = {"logged": logged, "mean_probs": mean_probs, "mutual_info": mutual_info, "targets": targets}
        (self.path / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@skip_on_windows
def test_ddp_metrics_equal_single_process_metrics_on_the_union(tmp_path: Path) -> None:
    model = _model()
    recorder = _Recording(4, plot=False)
    with scrubbed_ddp_env():
        trainer = ddp_fork_trainer(tmp_path, callbacks=[recorder, _RankWriter(tmp_path, recorder)])
        trainer.validate(model, _loader(64))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["logged"] == ranks[1]["logged"]
    assert len(ranks[0]["targets"]) == len(ranks[1]["targets"]) == 32
    logged = ranks[0]["logged"]

    # The deterministic metrics: one process on all the data.
    (single,) = fast_trainer(tmp_path, callbacks=[MCDropoutEvaluation(4, plot=False)]).validate(_model(), _loader(64))
    for name in METRICS:
        assert logged[f"mc/val/det_{name}"] == pytest.approx(single[f"mc/val/det_{name}"], abs=1e-6), name

    # The MC metrics: one process's metrics on the union of what the ranks sampled.
    union = UncertaintyMetrics(num_classes=3)
    union.update(
        torch.tensor(ranks[0]["mean_probs"] + ranks[1]["mean_probs"]),
        hard_targets(torch.tensor(ranks[0]["targets"] + ranks[1]["targets"])),
        torch.tensor(ranks[0]["mutual_info"] + ranks[1]["mutual_info"]),
    )
    for name, value in union.compute().items():
        assert logged[f"mc/val/{name}"] == pytest.approx(float(value), abs=1e-6), name


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
