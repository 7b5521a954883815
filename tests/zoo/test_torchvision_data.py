"""TorchvisionDataModule on tiny files written in each dataset's real on-disk format (no download)."""

import hashlib
import pickle
import struct

import numpy as np
import pytest
import torch
from torchvision import datasets

from zoo.data import TorchvisionDataModule


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar10(root, monkeypatch, per_batch=4, n_test=6):
    """cifar-10-batches-py/: pickled dicts with uint8 rows of 3072 (R, G, B planes), md5-checked by torchvision."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)]
    for name, n in [(name, per_batch) for name in names] + [("test_batch", n_test)]:
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [i % 10 for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))
    # torchvision checks each file's md5 against the real dataset's: point the check at these files' sums.
    monkeypatch.setattr(datasets.CIFAR10, "train_list", [[n, _md5(folder / n)] for n in names])
    monkeypatch.setattr(datasets.CIFAR10, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    meta = {**datasets.CIFAR10.meta, "md5": _md5(folder / "batches.meta")}
    monkeypatch.setattr(datasets.CIFAR10, "meta", meta)


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
    write_cifar10(tmp_path, monkeypatch)
    dm = TorchvisionDataModule("cifar10", root=tmp_path, batch_size=4, val_fraction=0.2)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (16, 4, 6)
    images, targets = next(iter(dm.test_dataloader()))
    assert images.shape == (4, 3, 32, 32)
    assert images.dtype == torch.float32
    assert targets.tolist() == [0, 1, 2, 3]
    assert dm.input_shape == (3, 32, 32)


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
