from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_reg import LabelSmoothing, RegMixup
from lightning_reg import functional as LF
from lightning_reg.functional.mixup import sample_mixup
from lightning_reg.mixins import SparseMixingMixin
from tests.helpers import TinyMLP, UserClassifier, fast_trainer, make_classification, make_loader


class _Recorder(UserClassifier):
    """Keeps every training batch as the step received it."""

    def __init__(self) -> None:
        super().__init__(TinyMLP(num_classes=3), num_classes=3)
        self.batches: list[list[Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.batches.append([t.detach().clone() for t in batch])
        return F.cross_entropy(self(batch[0]), batch[1])


class _GeneratorState(L.Callback):
    """Listed before RegMixup: the state of its generator before each batch's draw."""

    def __init__(self, regmixup: RegMixup) -> None:
        self.regmixup = regmixup
        self.states: list[Tensor] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.states.append(self.regmixup.generator.get_state())


def _data(n: int = 48) -> tuple[Tensor, Tensor]:
    return make_classification(n, num_classes=3)


def test_the_step_gets_2n_rows_clean_first_and_then_the_mixup_of_the_same_draw(tmp_path: Path) -> None:
    x, y = _data()
    regmixup = RegMixup(20.0)
    probe = _GeneratorState(regmixup)
    model = _Recorder()
    fast_trainer(tmp_path, callbacks=[probe, regmixup]).fit(model, make_loader(x, y, batch_size=16))
    assert len(model.batches) == 3
    g = torch.Generator()
    for i, (inputs, targets) in enumerate(model.batches):
        clean_x, clean_y = x[16 * i : 16 * (i + 1)], y[16 * i : 16 * (i + 1)]
        assert inputs.shape == (32, 8)
        assert targets.shape == (32, 3)
        assert torch.equal(inputs[:16], clean_x)
        assert torch.equal(targets[:16], F.one_hot(clean_y, 3).float())
        g.set_state(probe.states[i])
        params = sample_mixup(16, 20.0, generator=g)  # the draw RegMixup made
        expected_x, expected_y = LF.regmixup(clean_x, F.one_hot(clean_y, 3).float(), params.lam, params.index)
        torch.testing.assert_close(inputs, expected_x)
        torch.testing.assert_close(targets, expected_y)
        assert 0.2 < params.lam < 0.8  # Beta(20, 20) lambdas sit near 1/2


def test_the_loss_is_the_regmixup_objective_up_to_one_half() -> None:
    x, y = _data(16)
    probs = F.one_hot(y, 3).float()
    index = torch.arange(16).roll(3)
    inputs, targets = LF.regmixup(x, probs, 0.4, index)
    logits = TinyMLP(num_classes=3)(inputs)
    clean = F.cross_entropy(logits[:16], probs)
    mixed_x, mixed_y = LF.mixup(x, probs, 0.4, index)
    torch.testing.assert_close(inputs[16:], mixed_x)
    mixed = F.cross_entropy(logits[16:], mixed_y)
    torch.testing.assert_close(F.cross_entropy(logits, targets), (clean + mixed) / 2)


@pytest.mark.parametrize("order", ["smoothing_first", "smoothing_last"])
def test_label_smoothing_applies_once_to_both_halves_in_either_order(tmp_path: Path, order: str) -> None:
    x, y = _data()
    results = []
    for callbacks in (
        lambda r: [r, LabelSmoothing(0.1)] if order == "smoothing_last" else [LabelSmoothing(0.1), r],
        lambda r: [r],
    ):
        L.seed_everything(0, verbose=False)
        regmixup = RegMixup(20.0)
        model = _Recorder()
        fast_trainer(tmp_path, callbacks=callbacks(regmixup)).fit(model, make_loader(x, y, batch_size=16))
        results.append(model.batches[0][1])
    smoothed, plain = results
    torch.testing.assert_close(smoothed, 0.9 * plain + 0.1 / 3)  # one smoothing of every row, clean and mixed
    torch.testing.assert_close(smoothed.sum(1), torch.ones(32))
    with pytest.raises(ValueError, match="smoothed more than once"):
        fast_trainer(tmp_path, callbacks=[RegMixup(label_smoothing=0.1), LabelSmoothing(0.1)]).fit(
            _Recorder(), make_loader(x, y, batch_size=16)
        )


def test_lengths_and_masks_are_repeated_with_the_rows(tmp_path: Path) -> None:
    x, y = _data(32)
    lengths = torch.arange(32) % 5 + 1
    loader = DataLoader(TensorDataset(x, y, lengths), batch_size=16)
    model = _Recorder()
    fast_trainer(tmp_path, callbacks=[RegMixup()]).fit(model, loader)
    for i, (inputs, targets, seen) in enumerate(model.batches):
        assert inputs.shape[0] == targets.shape[0] == seen.shape[0] == 32
        assert torch.equal(seen, lengths[16 * i : 16 * (i + 1)].repeat(2))


def test_dict_batches(tmp_path: Path) -> None:
    x, y = _data(32)
    seen: list[dict[str, Tensor]] = []

    class DictModel(UserClassifier):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            seen.append({k: v.clone() for k, v in batch.items()})
            return F.cross_entropy(self(batch["inputs"]), batch["targets"])

    loader = make_loader(x, y, batch_size=16, as_dict=True)
    callback = RegMixup(num_classes=3, input_key="inputs", target_key="targets")
    fast_trainer(tmp_path, callbacks=[callback]).fit(DictModel(TinyMLP(num_classes=3)), loader)
    assert seen[0]["inputs"].shape == (32, 8)
    assert torch.equal(seen[0]["inputs"][:16], x[:16])
    assert seen[0]["targets"].shape == (32, 3)


def test_a_batch_of_one_keeps_its_row_with_one_hot_targets(tmp_path: Path) -> None:
    x, y = _data(17)
    model = _Recorder()
    with pytest.warns(UserWarning, match="skips batches of size 1"):
        fast_trainer(tmp_path, callbacks=[RegMixup()]).fit(model, make_loader(x, y, batch_size=16))
    last_inputs, last_targets = model.batches[-1]
    assert torch.equal(last_inputs, x[16:])
    assert torch.equal(last_targets, F.one_hot(y[16:], 3).float())


def test_resume_is_exact_and_the_state_key_names_the_batch_entries(tmp_path: Path) -> None:
    # crash-and-resume equality of the weights runs in tests/callbacks/test_contract.py for RegMixup; here the
    # generator state itself: a fresh callback loaded from the state draws what the original draws next
    regmixup = RegMixup(20.0)
    x, y = _data()
    fast_trainer(tmp_path, callbacks=[regmixup]).fit(_Recorder(), make_loader(x, y, batch_size=16))
    fresh = RegMixup(20.0)
    fresh.load_state_dict(regmixup.state_dict())
    model_a, model_b = _Recorder(), _Recorder()
    trainer_a = fast_trainer(tmp_path, max_epochs=1, callbacks=[regmixup])
    trainer_b = fast_trainer(tmp_path, max_epochs=1, callbacks=[fresh])
    trainer_a.fit(model_a, make_loader(x, y, batch_size=16))
    trainer_b.fit(model_b, make_loader(x, y, batch_size=16))
    for (xa, ya), (xb, yb) in zip(model_a.batches, model_b.batches, strict=True):
        assert torch.equal(xa, xb)
        assert torch.equal(ya, yb)
    # The key names what tells two instances apart (the batch entries), not hyperparameters a resume may change.
    assert RegMixup(10.0).state_key == RegMixup(20.0, prob=0.5).state_key
    assert RegMixup(input_key="x", target_key="y").state_key != RegMixup().state_key


class _Sparse(SparseMixingMixin, UserClassifier):
    pass


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="alpha"):
        RegMixup(alpha=-1.0)
    x, y = _data(32)
    with pytest.raises(ValueError, match="sparse targets cannot hold"):
        fast_trainer(tmp_path, callbacks=[RegMixup()]).fit(_Sparse(TinyMLP(num_classes=3)), make_loader(x, y))
    ids = torch.randint(0, 50, (32, 8))
    with pytest.raises(TypeError, match="RegMixup cannot blend"):
        fast_trainer(tmp_path, callbacks=[RegMixup()]).fit(_Recorder(), make_loader(ids, y))


class _Layouts(UserClassifier):
    """Keeps the dtype, shape and memory address of every training batch's inputs, and their first rows."""

    def __init__(self) -> None:
        super().__init__(TinyMLP(num_classes=3).double(), num_classes=3)
        self.seen: list[tuple[torch.dtype, tuple[int, ...], int, Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, targets = batch
        self.seen.append((inputs.dtype, tuple(inputs.shape), inputs.data_ptr(), inputs.detach().clone()))
        return F.cross_entropy(self(inputs), targets.to(inputs.dtype))


def test_float64_batches_of_changing_sizes_keep_their_dtype_and_shape_and_reuse_memory_nobody_holds(
    tmp_path: Path,
) -> None:
    x, y = _data(40)
    x = x.double()
    model = _Layouts()
    fast_trainer(tmp_path, callbacks=[RegMixup(1.0)]).fit(model, make_loader(x, y, batch_size=16))
    assert [(dtype, shape) for dtype, shape, _, _ in model.seen] == [
        (torch.float64, (32, 8)),
        (torch.float64, (32, 8)),
        (torch.float64, (16, 8)),  # the last batch of 8 rows
    ]
    for i, (_, _, _, inputs) in enumerate(model.seen):
        assert torch.equal(inputs[: len(inputs) // 2], x[16 * i : 16 * i + len(inputs) // 2])  # clean rows first
    pointers = [pointer for _, _, pointer, _ in model.seen]
    assert pointers[1] == pointers[0]  # the first batch's rows were let go: its memory is reused


def _hooked(tmp_path: Path, callback: RegMixup) -> tuple[L.Trainer, UserClassifier]:
    trainer = fast_trainer(tmp_path, callbacks=[callback])
    module = UserClassifier(TinyMLP(num_classes=3), num_classes=3)
    callback.setup(trainer, module, "fit")
    return trainer, module


def test_only_tensors_of_n_rows_are_repeated_and_everything_else_is_left_as_it_is(tmp_path: Path) -> None:
    x, y = _data(6)
    lengths, mask, shared, scale = torch.arange(6), torch.ones(6, 4), torch.ones(4, 4), torch.tensor(2.0)
    names = [f"item {i}" for i in range(6)]
    callback = RegMixup(1.0)
    trainer, module = _hooked(tmp_path, callback)
    # the inputs and targets given by negative positions; every other entry a companion, or not one
    batch = [lengths, mask, x, y, names, shared, scale]
    callback.input_key, callback.target_key = -5, -4
    callback.on_train_batch_start(trainer, module, batch, 0)
    assert torch.equal(batch[0], lengths.repeat(2))
    assert torch.equal(batch[1], mask.repeat(2, 1))
    assert batch[2].shape == (12, 8)
    assert torch.equal(batch[2][:6], x)
    assert batch[3].shape == (12, 3)
    assert batch[4] is names
    assert batch[5] is shared  # (T, T) rows, not N rows: shared by the batch
    assert batch[6] is scale


def test_inputs_that_require_grad_are_doubled_into_a_new_tensor_that_carries_the_gradient(tmp_path: Path) -> None:
    x, y = _data(6)
    x.requires_grad_(True)
    callback = RegMixup(1.0)
    trainer, module = _hooked(tmp_path, callback)
    state = callback.generator.get_state()
    batch = [x, y]
    callback.on_train_batch_start(trainer, module, batch, 0)
    g = torch.Generator()
    g.set_state(state)
    params = sample_mixup(6, 1.0, generator=g)  # the draw the callback made
    expected, _ = LF.regmixup(x.detach(), F.one_hot(y, 3).float(), params.lam, params.index)
    torch.testing.assert_close(batch[0].detach(), expected)
    batch[0].sum().backward()
    # d/dx of sum(cat[x, lam x + (1 - lam) x[index]]): 1 + lam, plus (1 - lam) once per time a row is a partner
    counts = torch.bincount(params.index, minlength=6).float()[:, None]
    lam = float(params.lam)
    torch.testing.assert_close(x.grad, (1 + lam + (1 - lam) * counts).expand(6, 8))
