import pytest
import torch
from PIL import Image

import zoo
from tests.helpers import fast_trainer
from zoo.data import ImageFolderDataModule


def write_folder(root, classes=("ant", "bee", "cat"), per_class=6, size=(24, 20)):
    for k, label in enumerate(classes):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            color = (80 * k, 10 * i, 255 - 80 * k)
            Image.new("RGB", size, color=color).save(root / label / f"{i}.png")


def test_image_folder_splits_and_resizes(tmp_path):
    write_folder(tmp_path)
    dm = ImageFolderDataModule(tmp_path, image_size=16, batch_size=4, val_fraction=0.2, test_fraction=0.2)
    dm.setup()
    assert dm.classes == ["ant", "bee", "cat"]
    assert dm.num_classes == 3
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (10, 4, 4)
    images, targets = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 3, 16, 16)
    assert targets.dtype == torch.int64
    all_indices = set(dm.train_set.indices) | set(dm.val_set.indices) | set(dm.test_set.indices)
    assert len(all_indices) == 18


def test_grayscale_and_the_validation_split_as_test(tmp_path):
    write_folder(tmp_path)
    dm = ImageFolderDataModule(tmp_path, image_size=8, channels=1)
    dm.setup()
    assert dm.test_set is dm.val_set
    assert next(iter(dm.test_dataloader()))[0].shape[1:] == (1, 8, 8)


def test_a_zoo_model_trains_on_an_image_folder(tmp_path):
    write_folder(tmp_path / "images")
    dm = ImageFolderDataModule(tmp_path / "images", image_size=16, batch_size=6)
    model = zoo.create("cnn_small", num_classes=3, in_channels=3, widths=(4, 8))
    fast_trainer(tmp_path, max_epochs=1).fit(model, datamodule=dm)
    assert model.trainer.global_step > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 0}, "image_size"),
        ({"channels": 2}, r"`channels` to be 1 \(grayscale\) or 3"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "sum below 1"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_image_folder_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageFolderDataModule(tmp_path, **kwargs)


def test_image_folder_errors_before_setup_and_for_a_missing_root(tmp_path):
    dm = ImageFolderDataModule(tmp_path / "nowhere")
    with pytest.raises(RuntimeError, match="call it before asking for `num_classes`"):
        _ = dm.num_classes
    with pytest.raises(RuntimeError, match=r"Call `setup\(\)`"):
        dm.train_dataloader()
    with pytest.raises(FileNotFoundError, match="folder of class folders"):
        dm.setup()
