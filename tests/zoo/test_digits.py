import pytest
import torch

from zoo.data import DigitsDataModule


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
