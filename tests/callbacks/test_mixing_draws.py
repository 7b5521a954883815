"""What the mixing callbacks share: per-sample draws from their own generator, pairings, precisions and messages."""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor

from lightning_reg import CutMix, LabelSmoothing, MixUp, MixUpCutMix
from lightning_reg.mixins import SparseMixingMixin
from tests.helpers import TinyCNN, UserClassifier, coded_images, fast_trainer


def _hooked(
    callback: L.Callback, n: int, trainer: L.Trainer | None = None, module_type: type[UserClassifier] = UserClassifier
) -> tuple[L.Trainer, UserClassifier]:
    L.seed_everything(0, verbose=False)  # the callback's stream derives from Lightning's seed
    trainer = trainer or fast_trainer()
    module = module_type(net=TinyCNN(), num_classes=n)
    callback.setup(trainer, module, "fit")
    callback.on_train_epoch_start(trainer, module)
    return trainer, module


def _batches(
    callback: L.Callback,
    n: int,
    count: int = 3,
    dtype: torch.dtype = torch.float32,
    global_seed: int = 0,
    module_type: type[UserClassifier] = UserClassifier,
) -> list[list[Any]]:
    """``count`` batches of ``n`` coded images with unique labels through the callback; the global RNG is seeded
    with ``global_seed`` after setup and advanced differently before each batch."""
    trainer, module = _hooked(callback, n, module_type=module_type)
    torch.manual_seed(global_seed)
    out = []
    for i in range(count):
        torch.rand(i + 1)  # anything else that draws from the global RNG
        batch = [coded_images(n, dtype), torch.arange(n)]
        callback.on_train_batch_start(trainer, module, batch, i)
        out.append(batch)
    return out


MAKERS = {
    "MixUp elem": lambda n: MixUp(1.0, num_classes=n, mode="elem", prob=0.7),
    "MixUp pair": lambda n: MixUp(1.0, num_classes=n, mode="pair", pairing="permutation"),
    "CutMix elem": lambda n: CutMix(1.0, num_classes=n, mode="elem", prob=0.7, pairing="permutation"),
    "MixUpCutMix elem": lambda n: MixUpCutMix(1.0, 1.0, num_classes=n, mode="elem", prob=0.7),
    "MixUpCutMix pair": lambda n: MixUpCutMix(1.0, 1.0, num_classes=n, mode="pair"),
    "MixUp batch prob": lambda n: MixUp(1.0, num_classes=n, prob=0.5, per_sample=True),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_every_draw_comes_from_the_callbacks_own_generator(name: str) -> None:
    first = _batches(MAKERS[name](9), 9, count=6)
    second = _batches(
        MAKERS[name](9), 9, count=6, global_seed=123
    )  # another global stream: the batches must not change
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        assert torch.equal(x1, x2)
        assert torch.equal(y1, y2)
    assert any(not torch.equal(x, coded_images(9)) for x, _ in first)  # something was mixed
    if "batch" not in name:  # one weight per sample (per pair), not one for the batch
        own, _ = _partners(first[0][1])
        assert len(set(own[own < 1].tolist())) > 1


def _partners(targets: Tensor) -> tuple[Tensor, Tensor]:
    """With unique labels: each row's own weight and its partner (the other label with weight, or itself)."""
    n = targets.shape[0]
    own = targets[torch.arange(n), torch.arange(n)]
    others = targets.clone()
    others[torch.arange(n), torch.arange(n)] = 0
    partner = torch.where(others.max(1).values > 0, others.argmax(1), torch.arange(n))
    return own, partner


@pytest.mark.parametrize("mode", ["elem", "pair"])
@pytest.mark.parametrize("n", [8, 7])
def test_mixup_per_sample_modes_blend_each_row_with_its_partner_by_its_own_weight(mode: str, n: int) -> None:
    for x, targets in _batches(MixUp(1.0, num_classes=n, mode=mode, prob=0.8), n):
        own, partner = _partners(targets)
        expected = (
            own[:, None, None, None] * coded_images(n) + (1 - own[:, None, None, None]) * coded_images(n)[partner]
        )
        torch.testing.assert_close(x, expected)
        if mode == "pair":  # mutual pairs with one weight; with n odd one sample stays alone
            mixed = own < 1
            assert torch.equal(partner[partner][mixed], torch.arange(n)[mixed])
            torch.testing.assert_close(own[partner], own)
            assert int((partner == torch.arange(n)).sum()) >= n % 2


def test_shift_pairing_pairs_every_sample_with_the_same_offset_and_permutation_with_none_of_itself() -> None:
    n = 10
    for _, targets in _batches(MixUp(1.0, num_classes=n, mode="elem", pairing="shift"), n, count=4):
        _, partner = _partners(targets)
        offsets = (partner - torch.arange(n)) % n
        assert len(set(offsets.tolist())) == 1
        assert int(offsets[0]) != 0
    offsets_seen = set()
    for _, targets in _batches(MixUp(1.0, num_classes=n, mode="elem", pairing="permutation"), n, count=4):
        _, partner = _partners(targets)
        assert bool((partner != torch.arange(n)).all())
        offsets_seen.add(len(set(((partner - torch.arange(n)) % n).tolist())))
    assert max(offsets_seen) > 1  # not a shift


@pytest.mark.parametrize(("precision", "dtype"), [("bf16-true", torch.bfloat16), ("16-true", torch.float16)])
@pytest.mark.parametrize("mode", ["batch", "elem"])
@pytest.mark.parametrize("name", ["MixUp", "MixUpCutMix"])
def test_uint8_images_under_a_half_precision_take_weights_rounded_to_it(
    precision: str, dtype: torch.dtype, mode: str, name: str
) -> None:
    n = 32
    callback: L.Callback = (
        MixUp(1.0, num_classes=n, mode=mode, per_sample=True)  # type: ignore[arg-type]
        if name == "MixUp"
        else MixUpCutMix(1.0, 1.0, num_classes=n, mode=mode, per_sample=True, switch_prob=0.0)  # type: ignore[arg-type]
    )
    trainer, module = _hooked(callback, n, fast_trainer(precision=precision))
    batch = [coded_images(n, torch.uint8), torch.arange(n)]
    callback.on_train_batch_start(trainer, module, batch, 0)
    own, _ = _partners(batch[1])
    blended = (own > 0) & (own < 1)
    assert int(blended.sum()) > 10
    assert torch.equal(own[blended].to(dtype).float(), own[blended])  # the weight the images were blended with
    if dtype == torch.float16:  # (every bfloat16 weight in (0, 1) above 2**-14 is a float16 too, not conversely)
        assert not torch.equal(own[blended].to(torch.bfloat16).float(), own[blended])


def test_correct_lam_false_without_minmax_weighs_cut_targets_by_the_drawn_lambda_in_elem_mode() -> None:
    n = 32
    for x, targets in _batches(CutMix(1.0, num_classes=n, mode="elem", correct_lam=False), n):
        own, _ = _partners(targets)
        kept = (x == coded_images(n)).float().flatten(1).mean(1)
        cut = kept < 1
        assert not torch.allclose(own[cut], kept[cut])  # some boxes were clipped at the border


def test_two_and_three_mixing_callbacks_warn_once_with_the_number_of_mixes() -> None:
    for count, blends in ((2, 4), (3, 8)):
        callbacks = [MixUp(1.0, num_classes=3), CutMix(1.0, num_classes=3), MixUpCutMix(num_classes=3)][:count]
        trainer = fast_trainer(callbacks=callbacks)
        names = " and ".join(type(callback).__name__ for callback in callbacks)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for callback in callbacks:
                callback.setup(trainer, UserClassifier(), "fit")
        messages = [str(w.message) for w in caught if "are all on this Trainer" in str(w.message)]
        assert messages == [
            f"{names} are all on this Trainer: each mixes every training batch, so every batch is mixed {count} times "
            f"(a target blends up to {blends} samples). To switch between MixUp and CutMix per batch, as timm and "
            "DeiT do, use one `MixUpCutMix(mixup_alpha=..., cutmix_alpha=..., switch_prob=...)`."
        ]


class _Sparse(SparseMixingMixin, UserClassifier):
    pass


@pytest.mark.parametrize("switch_prob", [0.0, 1.0])
def test_mixup_cutmix_per_sample_modes_draw_a_lambda_per_sample_of_either_kind(switch_prob: float) -> None:
    # all MixUp (0.0) or all CutMix (1.0); `correct_lam=False`: a cut sample's own weight is its drawn lambda
    n = 9
    callback = MixUpCutMix(1.0, 1.0, num_classes=n, mode="elem", switch_prob=switch_prob, correct_lam=False)
    for _, targets in _batches(callback, n):
        own, _ = _partners(targets)
        assert len(set(own.tolist())) == n


def test_pair_mode_pairs_by_flip_with_shift_pairing_and_at_random_with_permutation() -> None:
    n = 10
    flip = torch.arange(n - 1, -1, -1)
    for _, targets in _batches(MixUp(1.0, num_classes=n, mode="pair", pairing="shift"), n):
        assert torch.equal(_partners(targets)[1], flip)
    partners = [_partners(t)[1] for _, t in _batches(MixUp(1.0, num_classes=n, mode="pair", pairing="permutation"), n)]
    assert not any(torch.equal(p, flip) for p in partners)
    assert all(torch.equal(p[p], torch.arange(n)) for p in partners)  # mutual pairs


@pytest.mark.parametrize("mode", ["elem", "pair"])
def test_mixup_cutmix_keeps_sparse_targets_sparse_in_per_sample_modes(mode: str) -> None:
    n = 8
    callback = MixUpCutMix(1.0, 1.0, num_classes=n, mode=mode, switch_prob=0.0)  # all blends: weights from pixels
    for x, targets in _batches(callback, n, module_type=_Sparse):
        dense = targets.to_dense()
        own, partner = dense[torch.arange(n), torch.arange(n)], targets.targets_b
        expected = own.view(n, 1, 1, 1) * coded_images(n) + (1 - own.view(n, 1, 1, 1)) * coded_images(n)[partner]
        torch.testing.assert_close(x, expected)


@pytest.mark.parametrize("pairing", ["shift", "permutation"])
def test_sparse_targets_pair_each_label_with_the_partner_whose_image_was_blended_in(pairing: str) -> None:
    n = 8
    batches = _batches(MixUp(1.0, num_classes=n, pairing=pairing, label_smoothing=0.1), n, module_type=_Sparse)
    for x, targets in batches:
        lam = float(targets.lam[0])
        partner_image = (x[:, 0, 0, 0] - lam * torch.arange(1, n + 1)) / (1 - lam)  # x = lam x_i + (1 - lam) x_j
        assert torch.equal(targets.targets_a, torch.arange(n))
        torch.testing.assert_close(
            targets.targets_b.float() + 1, partner_image, atol=1e-2, rtol=0
        )  # labels differ by 1
        assert (targets.num_classes, targets.smoothing) == (n, 0.1)


def test_unmixed_sparse_targets_keep_the_number_of_classes_and_the_smoothing() -> None:
    n = 6
    for _, targets in _batches(MixUp(1.0, num_classes=n, last_epoch=0, label_smoothing=0.2), n, module_type=_Sparse):
        assert torch.equal(targets, torch.arange(n))  # outside last_epoch: the batch as it came
    (_, targets), *_ = _batches(MixUp(1.0, num_classes=n, prob=0.0, label_smoothing=0.2), n, module_type=_Sparse)
    expected = torch.full((n, n), 0.2 / n) + 0.8 * torch.eye(n)
    torch.testing.assert_close(targets.to_dense(), expected)
    assert torch.equal(targets.lam, torch.ones(n))


def test_sparse_targets_mixed_already_are_refused_whole() -> None:
    from lightning_reg.mixins import MixedTargets

    callback = MixUp(1.0, num_classes=3)
    trainer, module = _hooked(callback, 3, module_type=_Sparse)
    mixed = MixedTargets(torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([0.6, 0.6]), 0.0, 3)
    with pytest.raises(ValueError, match="mixed already") as raised:
        callback.on_train_batch_start(trainer, module, [coded_images(2), mixed], 0)
    assert str(raised.value) == (
        "MixUp received sparse targets that are mixed already (MixedTargets from another mixing callback): one pair "
        "of labels cannot hold a second mix. Use one mixing callback with SparseMixingMixin (`MixUpCutMix` switches "
        "between MixUp and CutMix)."
    )


def test_two_mixing_callbacks_with_sparse_targets_are_refused_whole() -> None:
    callbacks = [MixUp(1.0, num_classes=3), CutMix(1.0, num_classes=3)]
    with pytest.raises(ValueError, match="would each mix") as raised:
        callbacks[0].setup(fast_trainer(callbacks=callbacks), _Sparse(), "fit")
    assert str(raised.value) == (
        "MixUp and CutMix would each mix every training batch, and _Sparse uses SparseMixingMixin: the sparse targets "
        "hold one pair of labels and one lambda, so a second mix cannot be kept. Use one mixing callback "
        "(`MixUpCutMix(...)` switches between MixUp and CutMix per batch), or drop the mixin for dense (N, K) targets."
    )
    callbacks[1].setup(fast_trainer(callbacks=callbacks), _Sparse(), "fit")  # only the first one speaks


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "row"}, "Expected `mode` to be one of ['batch', 'elem', 'pair'], but got 'row'."),
        ({"target_mode": "soft"}, "Expected `target_mode` to be one of ['mixed', 'dominant'], but got 'soft'."),
        ({"last_epoch": -1}, "Expected `last_epoch` to be an int >= 0 or None, but got -1."),
        ({"last_epoch": 1.5}, "Expected `last_epoch` to be an int >= 0 or None, but got 1.5."),
        ({"last_epoch": True}, "Expected `last_epoch` to be an int >= 0 or None, but got True."),
    ],
)
def test_bad_modes_and_last_epochs_are_named_whole(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="Expected") as raised:
        MixUp(**kwargs)
    assert str(raised.value) == message


def test_last_epoch_zero_never_mixes() -> None:
    batches = _batches(MixUp(1.0, num_classes=4, last_epoch=0), 4, count=1)
    assert torch.equal(batches[0][0], coded_images(4))
    assert torch.equal(batches[0][1], torch.arange(4))  # left as they come


def test_the_first_batchs_targets_are_checked_against_the_number_of_classes() -> None:
    callback = MixUp(1.0, num_classes=3)
    trainer, module = _hooked(callback, 3)
    with pytest.raises(ValueError, match=r"Expected class indices in \[0, 3\), but got values in \[0, 3\]\."):
        callback.on_train_batch_start(trainer, module, [coded_images(4), torch.tensor([0, 1, 2, 3])], 0)


def test_multi_label_with_index_targets_is_refused() -> None:
    callback = MixUp(1.0, num_classes=4, multi_label=True)
    trainer, module = _hooked(callback, 4)
    with pytest.raises(ValueError, match="multi"):
        callback.on_train_batch_start(trainer, module, [coded_images(4), torch.arange(4)], 0)


def test_inputs_of_one_value_per_sample_are_mixed() -> None:
    callback = MixUp(1.0, num_classes=6, per_sample=True)
    trainer, module = _hooked(callback, 6)
    x = torch.arange(1.0, 7.0)
    batch = [x.clone(), torch.arange(6)]
    callback.on_train_batch_start(trainer, module, batch, 0)
    own, partner = _partners(batch[1])
    torch.testing.assert_close(batch[0], own * x + (1 - own) * x[partner])


@pytest.mark.parametrize(
    ("batch", "error", "message"),
    [
        (
            ["text", torch.arange(4)],
            TypeError,
            "Expected batch[0] (inputs) to be a tensor of shape (N, ...), but got str. Point `input_key` at the input "
            "tensor of the batch.",
        ),
        (
            [torch.tensor(1.0), torch.arange(4)],
            TypeError,
            "Expected batch[0] (inputs) to be a tensor of shape (N, ...), but got Tensor. Point `input_key` at the "
            "input tensor of the batch.",
        ),
        (
            [coded_images(3), torch.arange(4)],
            ValueError,
            "Expected inputs and targets with the same batch size, but got 3 inputs (batch[0]) and 4 targets "
            "(batch[1]). Check `input_key` and `target_key`.",
        ),
        (
            [coded_images(4).long(), torch.arange(4)],
            TypeError,
            "MixUp cannot blend batch[0] of dtype torch.int64 (integer inputs, such as token ids): a blend of two ids "
            "is a third, unrelated id. Mix a floating representation instead: `MixUp(layer='<name of the embedding>')` "
            "mixes that submodule's output (manifold mixing), e.g. `layer='embedding'`. uint8 images are blended as "
            "images.",
        ),
    ],
    ids=["not a tensor", "a scalar", "other batch size", "token ids"],
)
def test_bad_inputs_are_named_whole(batch: list[Any], error: type[Exception], message: str) -> None:
    callback = MixUp(1.0, num_classes=4)
    trainer, module = _hooked(callback, 4)
    with pytest.raises(error, match="") as raised:
        callback.on_train_batch_start(trainer, module, batch, 0)
    assert str(raised.value) == message


_TARGETS = "Expected `batch['label'] (targets)`"


_BAD_DICT_BATCHES = {
    "no input entry": (
        {"pixels": coded_images(4), "label": torch.arange(4)},
        KeyError,
        "The batch is a dict with keys ['label', 'pixels'], but `input_key='image'` is not one of them. Pass "
        "`input_key` naming the right entry.",
    ),
    "no target entry": (
        {"image": coded_images(4), "target": torch.arange(4)},
        KeyError,
        "The batch is a dict with keys ['image', 'target'], but `target_key='label'` is not one of them. Pass "
        "`target_key` naming the right entry.",
    ),
    "float indices": (
        {"image": coded_images(4), "label": torch.arange(4.0)},
        ValueError,
        f"{_TARGETS} as class indices of shape (N,) with an integer dtype or probabilities of shape (N, K) with a "
        "float dtype, but got shape (4,) and dtype torch.float32. Squeeze (N, 1) targets to (N,), cast float "
        "indices with `.long()`, or pass one-hot rows as float.",
    ),
    "a list": (
        {"image": coded_images(4), "label": [0, 1, 2, 3]},
        TypeError,
        f"{_TARGETS} to be a tensor of class indices (N,) or probabilities (N, K), but got list. Make the dataset "
        "return tensor targets.",
    ),
}


@pytest.mark.parametrize(
    ("name", "case"),
    [
        (name, case)
        for name in ("MixUp", "LabelSmoothing")
        for case in _BAD_DICT_BATCHES
        if not (name == "LabelSmoothing" and case == "no input entry")  # it reads no inputs
    ],
)
def test_bad_dict_batches_are_named_by_their_keys_whole(name: str, case: str) -> None:
    batch, error, message = _BAD_DICT_BATCHES[case]
    callback: L.Callback = (
        LabelSmoothing(0.1, num_classes=4, target_key="label")
        if name == "LabelSmoothing"
        else MixUp(1.0, num_classes=4, input_key="image", target_key="label")
    )
    trainer, module = _hooked(callback, 4)
    with pytest.raises(error, match="") as raised:
        callback.on_train_batch_start(trainer, module, batch, 0)
    assert raised.value.args[0] == message


def test_a_bad_target_key_is_named_whole() -> None:
    with pytest.raises(TypeError, match="target_key") as raised:
        MixUp(target_key=1.5)  # type: ignore[arg-type]
    assert str(raised.value) == (
        "Expected `target_key` to be an int (position in a list batch) or a str (key of a dict batch), but got 1.5 of "
        "type float."
    )


def test_a_batch_of_one_is_skipped_with_a_warning_naming_the_callback() -> None:
    callback = CutMix(1.0, num_classes=4)
    trainer, module = _hooked(callback, 4)
    with pytest.warns(UserWarning, match="skips batches") as caught:
        callback.on_train_batch_start(trainer, module, [coded_images(1), torch.tensor([2])], 0)
    assert [str(w.message) for w in caught] == ["CutMix skips batches of size 1: there is no partner to mix with."]


def test_state_dict_before_setup_is_empty() -> None:
    assert MixUp().state_dict() == {}
    assert CutMix().state_dict() == {}


def test_a_state_loaded_before_setup_is_applied_once_and_later_fits_continue_its_stream() -> None:
    source = MixUp(1.0, num_classes=4, per_sample=True)
    _batches(source, 4, count=2)
    resumed = MixUp(1.0, num_classes=4, per_sample=True)
    resumed.load_state_dict(source.state_dict())  # before setup: applied at setup
    for _ in range(2):  # the resumed fit, then a second fit on the same callbacks: each continues the stream
        (expected, _), *_ = _batches(source, 4, count=1)
        (got, _), *_ = _batches(resumed, 4, count=1)
        assert torch.equal(got, expected)


def test_a_fit_on_another_rank_derives_that_ranks_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_reg.callbacks._mixing as mixing

    callback = MixUp(1.0, num_classes=4, per_sample=True)
    _batches(callback, 4, count=1)  # a first fit on rank 0
    monkeypatch.setattr(mixing, "data_parallel_rank", lambda trainer: 1)  # the same callback, now on rank 1
    (got, _), *_ = _batches(callback, 4, count=1)
    (fresh, _), *_ = _batches(MixUp(1.0, num_classes=4, per_sample=True), 4, count=1)  # a new one on rank 1
    assert torch.equal(got, fresh)
    monkeypatch.undo()
    (rank0, _), *_ = _batches(MixUp(1.0, num_classes=4, per_sample=True), 4, count=1)
    assert not torch.equal(fresh, rank0)  # ranks draw their own streams
