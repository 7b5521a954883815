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
