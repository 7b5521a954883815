"""TorchvisionDataModule on tiny files written in each dataset's real on-disk format (no download)."""

import struct

import numpy as np
import pytest
import torch
from torchvision import datasets

from tests.helpers.data import write_fake_cifar10
from zoo.data import TorchvisionDataModule
from zoo.data.torchvision_data import rows_as_steps


def write_idx(folder, n_train=20, n_test=6):
    """MNIST's raw idx-ubyte files: big-endian magic (2051 images, 2049 labels) and sizes, then uint8 values."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


def test_cifar10_reads_the_python_batches(tmp_path, monkeypatch):
    write_fake_cifar10(tmp_path, monkeypatch)
    dm = TorchvisionDataModule("cifar10", root=tmp_path, batch_size=4, val_fraction=0.2)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (16, 4, 6)
    images, targets = next(iter(dm.test_dataloader()))
    assert images.shape == (4, 3, 32, 32)
    assert images.dtype == torch.float32
    assert targets.tolist() == [0, 1, 2, 3]
    assert dm.input_shape == (3, 32, 32)


def test_cifar10_as_sequence_gives_rows_as_time_steps(tmp_path, monkeypatch):
    write_fake_cifar10(tmp_path, monkeypatch)
    images = TorchvisionDataModule("cifar10", root=tmp_path, batch_size=4, augment=False)
    rows = TorchvisionDataModule("cifar10", root=tmp_path, batch_size=4, augment=False, as_sequence=True)
    images.setup()
    rows.setup()
    x_img, y_img = next(iter(images.test_dataloader()))
    x_seq, y_seq = next(iter(rows.test_dataloader()))
    assert rows.input_shape == (32, 96)
    assert x_seq.shape == (4, 32, 96)
    assert type(x_seq) is torch.Tensor  # a plain tensor, not a tv_tensors.Image
    assert torch.equal(y_seq, y_img)
    # step h is row h of the R, G and B planes, side by side
    torch.testing.assert_close(x_seq[:, 5, 32:64], x_img[:, 1, 5, :])
    torch.testing.assert_close(x_seq, x_img.permute(0, 2, 1, 3).reshape(4, 32, 96))


def test_as_sequence_keeps_the_training_augmentation(tmp_path, monkeypatch):
    write_fake_cifar10(tmp_path, monkeypatch)
    dm = TorchvisionDataModule("cifar10", root=tmp_path, as_sequence=True)
    dm.setup()
    index = dm.train_set.indices[0]
    torch.manual_seed(0)
    samples = torch.stack([dm.train_set.dataset[index][0] for _ in range(8)])
    assert samples.shape == (8, 32, 96)
    assert not all(torch.equal(samples[0], s) for s in samples)  # random crops/flips differ


def test_rows_as_steps_inverts_to_the_image():
    image = torch.randn(3, 4, 5)
    rows = rows_as_steps(image)
    assert rows.shape == (4, 15)
    torch.testing.assert_close(rows.reshape(4, 3, 5).permute(1, 0, 2), image)


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_and_fashion_mnist_read_the_raw_idx_files(tmp_path, name, folder):
    write_idx(tmp_path / folder / "raw")
    dm = TorchvisionDataModule(name, root=tmp_path, batch_size=5, val_fraction=0.25)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (15, 5, 6)
    images, _ = next(iter(dm.train_dataloader()))
    assert images.shape == (5, 1, 28, 28)
    assert isinstance(next(iter(dm.val_dataloader())), list)
    assert dm.input_shape == (1, 28, 28)


def test_augmentation_only_in_training(tmp_path):
    write_idx(tmp_path / "MNIST" / "raw")
    dm = TorchvisionDataModule("mnist", root=tmp_path)
    dm.setup()
    train_full = dm.train_set.dataset
    index = dm.train_set.indices[0]
    torch.manual_seed(0)
    crops = torch.stack([train_full[index][0] for _ in range(8)])
    assert not all(torch.equal(crops[0], c) for c in crops)  # random crops differ
    val_image = dm.val_set.dataset[index][0]
    torch.testing.assert_close(val_image, dm.val_set.dataset[index][0])  # evaluation is deterministic
    raw = torch.as_tensor(np.asarray(datasets.MNIST(str(tmp_path), train=True).data[index]), dtype=torch.float32)
    torch.testing.assert_close(val_image[0], (raw / 255 - 0.1307) / 0.3081)


def test_missing_files_say_how_to_get_them(tmp_path):
    dm = TorchvisionDataModule("mnist", root=tmp_path)
    with pytest.raises(RuntimeError, match=r"Could not read mnist under .*pass `download=True`"):
        dm.setup()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "cifar100"}, r"one of \('cifar10', 'mnist', 'fashion_mnist'\)"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"val_fraction": 0.0}, r"val_fraction` in \(0, 1\)"),
    ],
)
def test_torchvision_datamodule_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TorchvisionDataModule(**kwargs)


def test_loader_before_setup_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"Call `setup\(\)`"):
        TorchvisionDataModule("mnist").train_dataloader()
