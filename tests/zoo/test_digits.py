import pytest
import torch

from zoo.data import DigitsCDataModule, DigitsDataModule


def test_digits_split_is_fixed_and_disjoint():
    a, b = DigitsDataModule(), DigitsDataModule()
    a.setup(), b.setup()
    assert torch.equal(a.test_set.tensors[0], b.test_set.tensors[0])
    sizes = [len(a.train_set), len(a.val_set), len(a.test_set)]
    assert sum(sizes) == 1797
    assert sizes == [1258, 180, 359]


def test_digits_train_split_is_standardized():
    dm = DigitsDataModule()
    dm.setup()
    x = dm.train_set.tensors[0]
    assert x.mean().abs() < 1e-5
    assert (x.std() - 1).abs() < 1e-4


def test_digits_as_images_and_as_sequences():
    images, seqs = DigitsDataModule(batch_size=8), DigitsDataModule(batch_size=8, as_sequence=True)
    images.setup(), seqs.setup()
    xi, yi = next(iter(images.val_dataloader()))
    xs, ys = next(iter(seqs.val_dataloader()))
    assert xi.shape == (8, 1, 8, 8)
    assert xs.shape == (8, 8, 8)
    assert torch.equal(xi.squeeze(1), xs)
    assert torch.equal(yi, ys)
    assert images.input_shape == (1, 8, 8)
    assert seqs.input_shape == (8, 8)


def test_digits_batches_are_lists():
    dm = DigitsDataModule(batch_size=4)
    dm.setup()
    assert isinstance(next(iter(dm.train_dataloader())), list)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"val_fraction": 0.5, "test_fraction": 0.6}, "sum below 1"),
    ],
)
def test_digits_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


def test_digits_loader_before_setup_is_a_clear_error():
    with pytest.raises(RuntimeError, match="Call `setup\\(\\)`"):
        DigitsDataModule().train_dataloader()


# --- regimes: label noise, held-out classes, digits-C ---------------------------------------------------------
def test_label_noise_flips_the_asked_fraction_of_training_labels_only():
    clean, noisy = DigitsDataModule(), DigitsDataModule(label_noise=0.4, label_noise_seed=1)
    clean.setup(), noisy.setup()
    y_clean, y_noisy = clean.train_set.tensors[1], noisy.train_set.tensors[1]
    assert torch.equal(noisy.train_clean_targets, y_clean)
    assert int((y_noisy != y_clean).sum()) == round(0.4 * len(y_clean))
    assert torch.equal(noisy.train_set.tensors[0], clean.train_set.tensors[0])  # same images, same order
    for split in ("val_set", "test_set"):  # evaluation labels stay clean
        assert torch.equal(getattr(noisy, split).tensors[1], getattr(clean, split).tensors[1])
        assert torch.equal(getattr(noisy, split).tensors[0], getattr(clean, split).tensors[0])


def test_label_noise_is_seeded_apart_from_the_split():
    a, b, c = (DigitsDataModule(label_noise=0.2, label_noise_seed=s) for s in (0, 0, 1))
    a.setup(), b.setup(), c.setup()
    assert torch.equal(a.train_set.tensors[1], b.train_set.tensors[1])
    assert not torch.equal(a.train_set.tensors[1], c.train_set.tensors[1])
    assert torch.equal(a.test_set.tensors[0], c.test_set.tensors[0])


def test_class_dependent_noise_on_kept_digits_drops_pairs_with_a_held_out_digit():
    dm = DigitsDataModule(label_noise=0.5, label_noise_kind="class_dependent", classes=range(8))
    dm.setup()
    y, noisy = dm.train_clean_targets, dm.train_set.tensors[1]
    for digit in range(8):
        changed = noisy[y == digit] != digit
        if digit in (2, 5, 6, 7):  # 2->7, 5<->6, 7->1 kept; 3->8 dropped (8 is held out)
            assert int(changed.sum()) == round(0.5 * int((y == digit).sum()))
        else:
            assert not changed.any(), digit
    assert torch.equal(noisy[(y == 2) & (noisy != 2)].unique(), torch.tensor([7]))


def test_held_out_classes_are_renumbered_and_form_the_ood_set():
    full, kept = DigitsDataModule(), DigitsDataModule(classes=(3, 5))
    full.setup(), kept.setup()
    assert kept.num_classes == 2
    assert full.num_classes == 10
    x_full, y_full = full.test_set.tensors
    x, y = kept.test_set.tensors
    assert set(y.tolist()) == {0, 1}
    # the split is the full split's: the test images of digits 3 and 5, in order, standardized with the kept
    # digits' training statistics (so compare after undoing each standardization)
    mask = (y_full == 3) | (y_full == 5)
    torch.testing.assert_close(x * kept._std + kept._mean, x_full[mask] * full._std + full._mean)
    assert torch.equal(y, (y_full[mask] == 5).long())
    ood_x, ood_digits = kept.ood_set.tensors
    all_digits = torch.cat([full.train_set.tensors[1], full.val_set.tensors[1], full.test_set.tensors[1]])
    assert len(ood_x) == int(((all_digits != 3) & (all_digits != 5)).sum())
    assert not torch.isin(ood_digits, torch.tensor([3, 5])).any()
    batch = next(iter(kept.ood_dataloader()))
    assert batch[0].shape[1:] == (1, 8, 8)


def test_digits_zero_to_seven_hold_out_eights_and_nines():
    dm = DigitsDataModule(classes=range(8))
    dm.setup()
    from sklearn.datasets import load_digits

    target = torch.as_tensor(load_digits().target)
    assert len(dm.ood_set) == int(((target == 8) | (target == 9)).sum()) == 354
    assert set(dm.ood_set.tensors[1].tolist()) == {8, 9}
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 1797 - 354
    assert int(dm.train_set.tensors[1].max()) == 7


def test_ood_loader_without_held_out_classes_is_a_clear_error():
    dm = DigitsDataModule()
    dm.setup()
    with pytest.raises(RuntimeError, match="no out-of-distribution set: pass `classes=`"):
        dm.ood_dataloader()


def test_digits_c_datamodule_tests_on_the_corrupted_copy_and_trains_on_clean_data():
    clean, shifted = DigitsDataModule(), DigitsCDataModule("gaussian_blur", 4, as_sequence=False)
    clean.setup(), shifted.setup()
    assert torch.equal(shifted.train_set.tensors[0], clean.train_set.tensors[0])
    assert torch.equal(shifted.val_set.tensors[0], clean.val_set.tensors[0])
    assert torch.equal(shifted.test_set.tensors[0], clean.corrupted_test_set("gaussian_blur", 4).tensors[0])
    x, _ = next(iter(shifted.predict_dataloader()))
    assert torch.equal(x, shifted.test_set.tensors[0][: len(x)])
    with pytest.raises(ValueError, match="Expected `severity`"):
        DigitsCDataModule("contrast", 9)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"label_noise": 1.0}, r"Expected `label_noise` to be a fraction in \[0, 1\)"),
        ({"label_noise_kind": "pairs"}, "Expected `label_noise_kind` to be one of"),
        ({"label_noise_flips": {1: 7}}, "used by `label_noise_kind='class_dependent'` only"),
        ({"label_noise_kind": "class_dependent", "label_noise_flips": {1: 1}}, "map digits 0-9 to other digits"),
        ({"classes": [1]}, "at least two distinct digits"),
        ({"classes": [1, 1, 2]}, "at least two distinct digits"),
        ({"classes": [0, 10]}, "at least two distinct digits"),
    ],
)
def test_digits_rejects_bad_regime_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


def test_class_dependent_noise_that_changes_nothing_is_a_clear_error():
    dm = DigitsDataModule(
        label_noise=0.3, label_noise_kind="class_dependent", label_noise_flips={3: 8}, classes=range(8)
    )
    with pytest.raises(ValueError, match="would change nothing"):
        dm.setup()
