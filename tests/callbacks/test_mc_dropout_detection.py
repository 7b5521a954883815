"""MCDropoutEvaluation's detection metrics (misclassification, AURC, OOD) against scikit-learn."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from lightning_reg import MCDropoutEvaluation
from lightning_reg.functional.uncertainty import entropy
from tests.helpers import (
    ThreeClassEvaluator,
    ddp_fork_trainer,
    fast_trainer,
    make_classification,
    make_loader,
)
from tests.helpers.ddp import scrubbed_ddp_env, skip_on_windows
from tests.helpers.mc import callback_generator, naive_mc


def _in_loader(n: int = 64) -> Any:
    x, y = make_classification(n, num_classes=3, seed=1)
    return make_loader(x + 0.8 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2)), y, batch_size=16)


def _ood_loader(n: int = 32) -> Any:
    x = 3.0 * torch.randn(n, 8, generator=torch.Generator().manual_seed(3))
    return make_loader(x, torch.full((n,), -1), batch_size=16)  # invalid labels: they must not be read


def _det(model: ThreeClassEvaluator, loader: Any) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic entropies and errors, computed here from the plain network."""
    model.eval()
    with torch.no_grad():
        probs = torch.cat([model.net(x).softmax(-1) for x, _ in loader])
    targets = torch.cat([y for _, y in loader])
    return entropy(probs).numpy(), (probs.argmax(-1) != targets).numpy()


def _naive_aurc(u: np.ndarray, errors: np.ndarray) -> float:
    e = errors[np.argsort(u, kind="stable")].astype(float)
    return float(np.mean([e[: k + 1].mean() for k in range(len(e))]))


def test_misclassification_metrics_match_scikit_learn(tmp_path: Path) -> None:
    model, loader = ThreeClassEvaluator(), _in_loader()
    trainer = fast_trainer(tmp_path, callbacks=[MCDropoutEvaluation(n_samples=8, plot=False)])
    trainer.validate(model, loader, verbose=False)
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    u, errors = _det(model, loader)
    assert 0 < errors.sum() < len(errors)
    assert m["mc/val/det_misclassification_auroc"] == pytest.approx(roc_auc_score(errors, u), abs=1e-5)
    assert m["mc/val/det_misclassification_aupr"] == pytest.approx(average_precision_score(errors, u), abs=1e-5)
    assert m["mc/val/det_aurc"] == pytest.approx(_naive_aurc(u, errors), abs=1e-6)
    for name in ("misclassification_auroc", "misclassification_aupr", "aurc"):
        assert 0.0 <= m[f"mc/val/{name}"] <= 1.0


def _score(probs: torch.Tensor, score: str, info: torch.Tensor | None = None) -> np.ndarray:
    """Per-sample uncertainty by its definition: entropy, 1 - max probability, or the mutual information."""
    if score == "entropy":
        return entropy(probs).numpy()
    if score == "max_prob":
        return (1 - probs.max(-1).values).numpy()
    assert info is not None
    return info.numpy()


@pytest.mark.parametrize("score", ["entropy", "max_prob", "mutual_information"])
def test_mc_and_deterministic_misclassification_metrics_match_scikit_learn_for_each_score(
    tmp_path: Path, score: str
) -> None:
    model, loader = ThreeClassEvaluator(), _in_loader()
    callback = MCDropoutEvaluation(n_samples=8, plot=False, uncertainty_score=score)  # type: ignore[arg-type]
    trainer = fast_trainer(tmp_path, callbacks=[callback])
    trainer.validate(model, loader, verbose=False)
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    mean, info, targets = naive_mc(model, loader, 8, callback_generator())  # the MC mean, by the naive loop
    model.eval()
    with torch.no_grad():
        det = torch.cat([model.net(x).softmax(-1) for x, _ in loader])
    passes = {"": (mean, info)} if score == "mutual_information" else {"": (mean, info), "det_": (det, None)}
    for tag, (probs, mutual) in passes.items():
        u, errors = _score(probs, score, mutual), (probs.argmax(-1) != targets).numpy()
        assert 0 < errors.sum() < len(errors)
        assert m[f"mc/val/{tag}misclassification_auroc"] == pytest.approx(roc_auc_score(errors, u), abs=1e-5)
        assert m[f"mc/val/{tag}misclassification_aupr"] == pytest.approx(average_precision_score(errors, u), abs=1e-5)
        assert m[f"mc/val/{tag}aurc"] == pytest.approx(_naive_aurc(u, errors), abs=1e-5)


def test_ood_auroc_and_fpr95_match_scikit_learn_and_the_ood_loader_is_kept_apart(tmp_path: Path) -> None:
    model = ThreeClassEvaluator()
    callback = MCDropoutEvaluation(n_samples=8, plot=False, ood_dataloader_idx=1)
    trainer = fast_trainer(tmp_path, callbacks=[callback])
    trainer.validate(model, [_in_loader(), _ood_loader()], verbose=False)
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    in_u, _ = _det(model, _in_loader())
    model.eval()
    with torch.no_grad():
        ood_u = entropy(torch.cat([model.net(x).softmax(-1) for x, _ in _ood_loader()])).numpy()
    labels = np.r_[np.zeros(len(in_u)), np.ones(len(ood_u))]
    assert m["mc/val/det_ood_auroc"] == pytest.approx(roc_auc_score(labels, np.r_[in_u, ood_u]), abs=1e-5)
    fpr, tpr, _ = roc_curve(1 - labels, -np.r_[in_u, ood_u], drop_intermediate=False)
    assert m["mc/val/det_ood_fpr95"] == pytest.approx(float(fpr[np.searchsorted(tpr, 0.95)]), abs=1e-6)
    assert 0.0 <= m["mc/val/ood_auroc"] <= 1.0
    # the OOD loader has no accuracy metrics; the in-distribution one keeps Lightning's suffix
    assert "mc/val/acc/dataloader_idx_0" in m
    assert not any(k.endswith("dataloader_idx_1") for k in m)


def test_mutual_information_score_has_no_deterministic_detection_metrics(tmp_path: Path) -> None:
    model = ThreeClassEvaluator()
    callback = MCDropoutEvaluation(n_samples=8, plot=False, uncertainty_score="mutual_information")
    trainer = fast_trainer(tmp_path, callbacks=[callback])
    trainer.validate(model, _in_loader(), verbose=False)
    keys = set(trainer.callback_metrics)
    assert "mc/val/misclassification_auroc" in keys
    assert "mc/val/aurc" in keys
    assert "mc/val/det_misclassification_auroc" not in keys
    with pytest.raises(ValueError, match="uncertainty_score"):
        MCDropoutEvaluation(uncertainty_score="variance")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ood_dataloader_idx"):
        MCDropoutEvaluation(ood_dataloader_idx=-1)


def test_a_risk_coverage_plot_is_written_beside_the_reliability_diagram(tmp_path: Path) -> None:
    model = ThreeClassEvaluator()
    logger = CSVLogger(tmp_path, name="logs")
    trainer = fast_trainer(tmp_path, callbacks=[MCDropoutEvaluation(n_samples=4)], logger=logger)
    trainer.validate(model, _in_loader(), verbose=False)
    folder = Path(logger.log_dir) / "mc_dropout"
    assert (folder / "reliability_validate_epoch0.png").exists()
    assert (folder / "risk_coverage_validate_epoch0.png").stat().st_size > 1000


class _Record(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if "det_" in k}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(metrics))


@skip_on_windows
def test_two_ranks_give_the_detection_metrics_of_one_process_on_the_union(tmp_path: Path) -> None:
    loaders = [_in_loader(), _ood_loader()]
    with scrubbed_ddp_env():
        trainer = ddp_fork_trainer(
            tmp_path, callbacks=[MCDropoutEvaluation(n_samples=4, plot=False, ood_dataloader_idx=1), _Record(tmp_path)]
        )
        trainer.validate(ThreeClassEvaluator(), loaders, verbose=False)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    single = fast_trainer(tmp_path, callbacks=[MCDropoutEvaluation(n_samples=4, plot=False, ood_dataloader_idx=1)])
    single.validate(ThreeClassEvaluator(), loaders, verbose=False)
    expected = {k: float(v) for k, v in single.callback_metrics.items() if "det_" in k}
    assert ranks[0] == ranks[1]
    names = ("det_misclassification_auroc", "det_misclassification_aupr", "det_aurc", "det_ood_auroc", "det_ood_fpr95")
    for name in names:
        key = next(k for k in expected if name in k)
        assert ranks[0][key] == pytest.approx(expected[key], abs=1e-6), key


def test_an_ood_or_empty_dataloader_before_the_others_leaves_their_metrics_logged(tmp_path: Path) -> None:
    empty = make_loader(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long), batch_size=16)
    alone = fast_trainer(tmp_path, callbacks=[MCDropoutEvaluation(n_samples=4, plot=False)])
    alone.validate(ThreeClassEvaluator(), _in_loader(), verbose=False)
    per_loader = {k: float(v) for k, v in alone.callback_metrics.items() if k.startswith("mc/")}
    callback = MCDropoutEvaluation(n_samples=4, plot=False, ood_dataloader_idx=0)
    trainer = fast_trainer(tmp_path, callbacks=[callback])
    with pytest.warns(UserWarning, match="Total length of `DataLoader` across ranks is zero"):
        trainer.validate(ThreeClassEvaluator(), [_ood_loader(), empty, _in_loader()], verbose=False)
    m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("mc/")}
    ood = {f"mc/val/{tag}ood_{name}" for tag in ("", "det_") for name in ("auroc", "fpr95")}
    assert set(m) == {f"{k}/dataloader_idx_2" for k in per_loader} | ood
    for name, value in per_loader.items():  # the deterministic pass does not depend on the draws
        if name.startswith("mc/val/det_"):
            assert m[f"{name}/dataloader_idx_2"] == pytest.approx(value, abs=1e-6), name


def test_mutual_information_with_an_ood_loader_has_no_deterministic_ood_metrics(tmp_path: Path) -> None:
    callback = MCDropoutEvaluation(
        n_samples=8, plot=False, ood_dataloader_idx=1, uncertainty_score="mutual_information"
    )
    trainer = fast_trainer(tmp_path, callbacks=[callback])
    trainer.validate(ThreeClassEvaluator(), [_in_loader(), _ood_loader()], verbose=False)
    ood = {k for k in trainer.callback_metrics if "ood_" in k}
    assert ood == {"mc/val/ood_auroc", "mc/val/ood_fpr95"}
    assert 0.0 <= float(trainer.callback_metrics["mc/val/ood_auroc"]) <= 1.0
