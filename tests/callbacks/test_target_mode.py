"""``target_mode="dominant"`` of MixUp, CutMix and MixUpCutMix: mixed inputs, the dominant sample's label (MixupIO)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_reg import CutMix, MixUp, MixUpCutMix
from lightning_reg.functional.mixup import sample_mixup
from tests.helpers import TinyCNN, TinyMLP, UserClassifier, fast_trainer, make_classification, make_loader


class _Recorder(UserClassifier):
    def __init__(self, net: Any) -> None:
        super().__init__(net, num_classes=3)
        self.batches: list[tuple[Tensor, Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.batches.append((batch[0].detach().clone(), batch[1].detach().clone()))
        return F.cross_entropy(self(batch[0]), batch[1])


class _State(L.Callback):
    def __init__(self, mixer: MixUp) -> None:
        self.mixer = mixer
        self.states: list[Tensor] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.states.append(self.mixer.generator.get_state())


@pytest.mark.parametrize("per_sample", [False, True])
def test_mixup_dominant_keeps_the_label_of_the_larger_weight(tmp_path: Path, per_sample: bool) -> None:
    x, y = make_classification(48, num_classes=3)
    mixer = MixUp(1.0, per_sample=per_sample, target_mode="dominant")
    state = _State(mixer)
    model = _Recorder(TinyMLP(num_classes=3))
    fast_trainer(tmp_path, callbacks=[state, mixer]).fit(model, make_loader(x, y, batch_size=16))
    g = torch.Generator()
    for i, (inputs, targets) in enumerate(model.batches):
        clean_x, clean_y = x[16 * i : 16 * (i + 1)], y[16 * i : 16 * (i + 1)]
        g.set_state(state.states[i])
        params = sample_mixup(16, 1.0, per_sample=per_sample, generator=g)
        lam = params.lam if isinstance(params.lam, Tensor) else torch.full((16,), params.lam)
        # torch-uncertainty's MixupIO: one_hot(y) if lam > 0.5 else one_hot(y[index])
        expected = torch.where(lam[:, None] > 0.5, F.one_hot(clean_y, 3), F.one_hot(clean_y[params.index], 3))
        torch.testing.assert_close(targets, expected.float())
        torch.testing.assert_close(inputs, lam[:, None] * clean_x + (1 - lam[:, None]) * clean_x[params.index])


@pytest.mark.parametrize(
    "make",
    [
        lambda: CutMix(1.0, target_mode="dominant"),
        lambda: MixUpCutMix(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=1.0, target_mode="dominant"),
    ],
)
def test_cutmix_dominant_is_the_label_of_the_larger_area(tmp_path: Path, make: Any) -> None:
    y = torch.arange(48) % 3
    x = y.float().view(-1, 1, 1, 1).expand(48, 1, 8, 8).clone()  # every pixel holds its image's label
    model = _Recorder(TinyCNN(num_classes=3))
    fast_trainer(tmp_path, callbacks=[make()]).fit(model, make_loader(x, y, batch_size=16))
    for inputs, targets in model.batches:
        assert torch.equal(targets.sum(1), torch.ones(16))
        assert torch.equal(targets.max(1).values, torch.ones(16))  # one-hot rows
        majority = inputs.flatten(1).round().long().mode(dim=1).values  # the label covering most pixels
        assert torch.equal(targets.argmax(1), majority)


def test_dominant_with_label_smoothing_and_bad_modes(tmp_path: Path) -> None:
    x, y = make_classification(32, num_classes=3)
    model = _Recorder(TinyMLP(num_classes=3))
    fast_trainer(tmp_path, callbacks=[MixUp(1.0, target_mode="dominant", label_smoothing=0.3)]).fit(
        model, make_loader(x, y, batch_size=16)
    )
    for _, targets in model.batches:
        assert torch.allclose(targets.max(1).values, torch.full((16,), 0.7 + 0.1))
        assert torch.allclose(targets.min(1).values, torch.full((16,), 0.1))
    with pytest.raises(ValueError, match="target_mode"):
        MixUp(target_mode="hard")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="target_mode"):
        CutMix(target_mode="soft")  # type: ignore[arg-type]
