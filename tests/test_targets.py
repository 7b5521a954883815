import pytest
import torch

from lightning_reg import hard_targets
from lightning_reg.targets import is_soft


def test_hard_targets_returns_argmax_of_probabilities():
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
    assert hard_targets(probs).tolist() == [1, 0]


def test_hard_targets_keeps_indices():
    y = torch.tensor([2, 0, 1])
    assert hard_targets(y) is y


def test_hard_targets_rejects_other_shapes():
    with pytest.raises(ValueError, match=r"shape \(N,\).*\(N, K\).*\(2, 3, 4\)"):
        hard_targets(torch.zeros(2, 3, 4))


def test_is_soft_tells_probabilities_from_indices():
    assert is_soft(torch.zeros(2, 3))
    assert not is_soft(torch.zeros(2, dtype=torch.long))
    assert not is_soft(torch.zeros(2, 3, dtype=torch.long))


# --- issue 12, point 21: the claims of docs/training_step.md --------------------------------------------------
def _perfect_classifier_on_mixed_targets():
    import torch.nn.functional as F

    from lightning_reg import functional as LF

    y = torch.arange(8) % 4
    logits = F.one_hot(y, 4).float() * 10  # predicts every label right
    params = LF.sample_mixup(8, 1.0, generator=torch.Generator().manual_seed(0))
    _, soft = LF.mixup(torch.zeros(8, 1), LF.one_hot(y, 4), 0.7, params.index)  # own class keeps 0.7
    return y, logits, soft


def test_torchmetrics_accuracy_is_wrong_on_soft_targets_and_right_with_hard_targets():
    import torchmetrics

    y, logits, soft = _perfect_classifier_on_mixed_targets()
    wrong = torchmetrics.Accuracy(task="multiclass", num_classes=4)(logits, soft)
    assert float(wrong) < 1.0  # no error, a wrong number (0.5 here)
    right = torchmetrics.Accuracy(task="multiclass", num_classes=4)(logits, hard_targets(soft))
    assert float(right) == 1.0
    assert torch.equal(hard_targets(soft), y)


def test_nll_loss_ignore_index_and_argmax_comparisons_fail_on_soft_targets():
    import torch.nn.functional as F

    _, logits, soft = _perfect_classifier_on_mixed_targets()
    with pytest.raises(RuntimeError, match="multi-target not supported"):
        F.nll_loss(logits.log_softmax(1), soft)
    with pytest.raises(RuntimeError, match="ignore_index is not supported for floating point target"):
        F.cross_entropy(logits, soft, ignore_index=0)
    with pytest.raises(RuntimeError, match="must match the size"):
        _ = logits.argmax(1) == soft
    assert float((logits.argmax(1) == hard_targets(soft)).float().mean()) == 1.0


def test_class_weighted_cross_entropy_changes_scale_on_rows_and_mixed_cross_entropy_keeps_it():
    import torch.nn.functional as F

    from lightning_reg import functional as LF
    from lightning_reg.mixins import MixedTargets, mixed_cross_entropy

    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(8, 4, generator=g), torch.arange(8) % 4
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    by_index = F.cross_entropy(logits, y, weight=w)
    by_rows = F.cross_entropy(logits, LF.one_hot(y, 4), weight=w)
    assert float(by_rows / by_index) == pytest.approx(float(w[y].mean()))  # divided by N, not by sum w[y]
    assert torch.allclose(mixed_cross_entropy(logits, LF.one_hot(y, 4), weight=w), by_index)
    index, lam = torch.arange(8).roll(-1), torch.rand(8, generator=g)
    sparse = MixedTargets(y, y[index], lam, 0.0, 4)
    dense = sparse.to_dense()
    naive = -(dense * w * logits.log_softmax(1)).sum() / (dense * w).sum()  # the weighted mass of the blend
    assert torch.allclose(mixed_cross_entropy(logits, sparse, weight=w), naive)
    assert torch.allclose(mixed_cross_entropy(logits, dense, weight=w), naive)
    assert torch.allclose(mixed_cross_entropy(logits, y, weight=w), by_index)


def test_hard_targets_of_sparse_mixed_targets_is_the_heavier_class():
    from lightning_reg.mixins import MixedTargets

    sparse = MixedTargets(torch.tensor([0, 1]), torch.tensor([2, 0]), torch.tensor([0.7, 0.3]), 0.1, 3)
    assert hard_targets(sparse).tolist() == [0, 0]
    assert torch.equal(hard_targets(sparse), hard_targets(sparse.to_dense()))
