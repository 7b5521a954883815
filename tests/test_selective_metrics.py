from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from torch import Tensor

from lightning_reg.functional.selective import aurc, fpr_at_tpr, risk_coverage, uncertainty_score
from lightning_reg.selective_metrics import MisclassificationDetection, OODDetection, plot_risk_coverage


def _scores(n: int = 500, seed: int = 0, ties: bool = False) -> tuple[Tensor, Tensor]:
    """Uncertainties that are informative about the errors, optionally rounded to force ties."""
    g = torch.Generator().manual_seed(seed)
    errors = torch.rand(n, generator=g) < 0.3
    u = torch.rand(n, generator=g) + 0.5 * errors.float()
    return (u * 10).round() / 10 if ties else u, errors


def _naive_aurc(u: Tensor, errors: Tensor, draws: int = 0, seed: int = 0) -> float:
    """The mean risk over coverages k/N, by a Python loop over sorted samples (random tie order, averaged)."""
    n = len(u)
    rng = np.random.default_rng(seed)
    orders = (
        [np.argsort(u.numpy(), kind="stable")]
        if draws == 0
        else [np.lexsort((rng.random(n), u.numpy())) for _ in range(draws)]
    )
    values = []
    for order in orders:
        e = errors.numpy()[order].astype(float)
        values.append(np.mean([e[: k + 1].mean() for k in range(n)]))
    return float(np.mean(values))


def test_misclassification_auroc_and_aupr_match_scikit_learn() -> None:
    for ties in (False, True):
        u, errors = _scores(ties=ties)
        metric = MisclassificationDetection()
        metric.update(u[:200], ~errors[:200])
        metric.update(u[200:], ~errors[200:])
        values = metric.compute()
        assert float(values["misclassification_auroc"]) == pytest.approx(
            roc_auc_score(errors.numpy(), u.numpy()), abs=1e-6
        )
        assert float(values["misclassification_aupr"]) == pytest.approx(
            average_precision_score(errors.numpy(), u.numpy()), abs=1e-6
        )


def test_aurc_matches_a_naive_loop_and_ties_are_their_expectation() -> None:
    u, errors = _scores(n=300)
    assert float(aurc(u, errors)) == pytest.approx(_naive_aurc(u, errors), abs=1e-12)
    tied, errors = _scores(n=300, ties=True)
    assert float(aurc(tied, errors)) == pytest.approx(_naive_aurc(tied, errors, draws=400), abs=2e-3)
    # order never matters, ties included
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(1))
    assert float(aurc(tied[perm], errors[perm])) == float(aurc(tied, errors))


def test_aurc_closed_forms() -> None:
    errors = torch.tensor([False] * 8 + [True] * 2)
    perfect = torch.arange(10.0)  # the errors are the most uncertain
    # risk is 0 up to coverage 8/10, then 1/9 and 2/10
    assert float(aurc(perfect, errors)) == pytest.approx((1 / 9 + 2 / 10) / 10)
    constant = torch.zeros(10)  # no ranking at all: every coverage has the expected risk 0.2
    assert float(aurc(constant, errors)) == pytest.approx(0.2)
    coverage, risk = risk_coverage(constant, errors)
    torch.testing.assert_close(risk, torch.full((10,), 0.2, dtype=torch.float64))
    torch.testing.assert_close(coverage, torch.arange(1, 11, dtype=torch.float64) / 10)


def _sklearn_fpr95(in_u: np.ndarray, ood_u: np.ndarray) -> float:
    labels = np.r_[np.ones(len(in_u)), np.zeros(len(ood_u))]  # in-distribution positive
    fpr, tpr, _ = roc_curve(labels, -np.r_[in_u, ood_u], drop_intermediate=False)
    return float(fpr[np.searchsorted(tpr, 0.95, side="left")])


def test_ood_auroc_and_fpr95_match_scikit_learn() -> None:
    g = torch.Generator().manual_seed(0)
    for ties in (False, True):
        in_u = torch.rand(400, generator=g)
        ood_u = torch.rand(150, generator=g) + 0.4
        if ties:
            in_u, ood_u = (in_u * 10).round() / 10, (ood_u * 10).round() / 10
        metric = OODDetection()
        metric.update(in_u, torch.zeros(400, dtype=torch.bool))
        metric.update(ood_u, torch.ones(150, dtype=torch.bool))
        values = metric.compute()
        labels = np.r_[np.zeros(400), np.ones(150)]
        assert float(values["ood_auroc"]) == pytest.approx(
            roc_auc_score(labels, np.r_[in_u.numpy(), ood_u.numpy()]), abs=1e-6
        )
        assert float(values["ood_fpr95"]) == pytest.approx(_sklearn_fpr95(in_u.numpy(), ood_u.numpy()), abs=1e-6)


def test_fpr_at_tpr_closed_form() -> None:
    confidence = torch.arange(20.0, 0.0, -1.0)  # 20, 19, ..., 1: positives at the even values
    positive = torch.tensor([True, False] * 10)
    # keeping 95% of 10 positives needs all 10: the threshold is the lowest positive (confidence 2),
    # above which all 9 negatives but the last lie
    assert float(fpr_at_tpr(confidence, positive, 0.95)) == pytest.approx(9 / 10)
    assert float(fpr_at_tpr(confidence, positive, 0.5)) == pytest.approx(4 / 10)


def test_uncertainty_scores() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    torch.testing.assert_close(uncertainty_score(probs, "max_prob"), torch.tensor([0.3, 2 / 3]))
    expected = -(probs * probs.log()).sum(1)
    torch.testing.assert_close(uncertainty_score(probs), expected)
    mi = torch.tensor([0.1, 0.2])
    assert uncertainty_score(probs, "mutual_information", mi) is mi
    with pytest.raises(ValueError, match="deterministic prediction has none"):
        uncertainty_score(probs, "mutual_information")
    with pytest.raises(ValueError, match="one of"):
        uncertainty_score(probs, "variance")  # type: ignore[arg-type]


def test_undefined_cases_and_errors() -> None:
    metric = MisclassificationDetection()
    metric.update(torch.tensor([0.1, 0.5]), torch.tensor([True, True]))  # no error at all
    values = metric.compute()
    assert torch.isnan(values["misclassification_auroc"])
    assert float(values["aurc"]) == 0.0
    ood = OODDetection()
    ood.update(torch.tensor([0.1]), torch.tensor([False]))
    assert torch.isnan(ood.compute()["ood_auroc"])
    with pytest.raises(ValueError, match="same length"):
        aurc(torch.zeros(3), torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="both positive and negative"):
        fpr_at_tpr(torch.zeros(3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="1-D scores"):
        metric.update(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bool))


def test_plot_risk_coverage_writes_a_png(tmp_path: Any) -> None:
    u, errors = _scores(n=50)
    value = plot_risk_coverage(u, ~errors, tmp_path / "sub" / "rc.png")
    assert (tmp_path / "sub" / "rc.png").stat().st_size > 1000
    assert float(value) == pytest.approx(float(aurc(u, errors)))


# --- DDP: 2 ranks equal one process on the union ------------------------------------------------


def _ddp_metrics(rank: int, world_size: int) -> dict[str, float]:
    u, errors = _scores(n=301, ties=True)
    g = torch.Generator().manual_seed(5)
    ood_u = torch.rand(101, generator=g).mul(10).round().div(10) + 0.3
    cut, ood_cut = (120, 40) if rank == 0 else (301, 101)
    start, ood_start = (0, 0) if rank == 0 else (120, 40)
    mis = MisclassificationDetection()
    mis.update(u[start:cut], ~errors[start:cut])
    ood = OODDetection()
    ood.update(u[start:cut], torch.zeros(cut - start, dtype=torch.bool))
    ood.update(ood_u[ood_start:ood_cut], torch.ones(ood_cut - ood_start, dtype=torch.bool))
    return {k: float(v) for k, v in {**mis.compute(), **ood.compute()}.items()}


def test_two_ranks_give_the_metrics_of_the_union(process_group_pool: Any) -> None:
    rank0, rank1 = process_group_pool(_ddp_metrics)
    u, errors = _scores(n=301, ties=True)
    g = torch.Generator().manual_seed(5)
    ood_u = torch.rand(101, generator=g).mul(10).round().div(10) + 0.3
    mis = MisclassificationDetection()
    mis.update(u, ~errors)
    ood = OODDetection()
    ood.update(u, torch.zeros(301, dtype=torch.bool))
    ood.update(ood_u, torch.ones(101, dtype=torch.bool))
    expected = {k: float(v) for k, v in {**mis.compute(), **ood.compute()}.items()}
    assert rank0 == rank1
    assert rank0 == pytest.approx(expected, abs=1e-7)


def test_fpr_at_tpr_bounds_of_tpr_a_single_positive_and_the_messages() -> None:
    confidence = torch.arange(20.0, 0.0, -1.0)
    positive = torch.tensor([True, False] * 10)
    # tpr = 1 is allowed: every positive kept, the threshold is the lowest positive
    assert float(fpr_at_tpr(confidence, positive, 1.0)) == pytest.approx(9 / 10)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=rf"^Expected `tpr` in \(0, 1\], but got {bad}\.$"):
            fpr_at_tpr(confidence, positive, bad)
    # one positive (the third-highest score): reaching it keeps the two negatives above
    one = torch.zeros(20, dtype=torch.bool)
    one[2] = True
    assert float(fpr_at_tpr(confidence, one, 0.95)) == pytest.approx(2 / 19)
    with pytest.raises(ValueError, match=r"^Expected 1-D `scores` and `positive` of the same length, but got shapes"):
        fpr_at_tpr(confidence, positive[:3])
    message = (
        r"^`score='mutual_information'` needs the mutual information of Monte-Carlo samples; a deterministic "
        r"prediction has none\. Use `score='entropy'` or `'max_prob'`\.$"
    )
    with pytest.raises(ValueError, match=message):
        uncertainty_score(torch.tensor([[0.5, 0.5]]), "mutual_information")


def test_risk_coverage_names_the_errors_argument() -> None:
    with pytest.raises(ValueError, match=r"^Expected 1-D `scores` and `errors` of the same length, but got shapes"):
        risk_coverage(torch.zeros(3), torch.zeros(2, dtype=torch.bool))


def test_one_sample_is_enough_and_none_is_an_error() -> None:
    assert float(aurc(torch.tensor([0.3]), torch.tensor([True]))) == 1.0
    for function in (aurc, fpr_at_tpr):
        with pytest.raises(ValueError, match=r"^Expected at least one sample, but got none\.$"):
            function(torch.zeros(0), torch.zeros(0, dtype=torch.bool))
