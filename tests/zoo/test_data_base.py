"""The DataModule base shared by the zoo's DataModules: validation, the four loaders, the error before setup."""

import pytest
from torch.utils.data import RandomSampler, SequentialSampler

from zoo.data import DigitsDataModule, ImageFolderDataModule, SplitDataModule, TorchvisionDataModule

MODULES = {
    "digits": lambda **kw: DigitsDataModule(**kw),
    "torchvision": lambda **kw: TorchvisionDataModule("mnist", **kw),
    "image_folder": lambda **kw: ImageFolderDataModule("images", **kw),
}


@pytest.mark.parametrize("name", MODULES)
def test_every_zoo_datamodule_shares_the_base_and_its_checks(name):
    dm = MODULES[name](batch_size=8, num_workers=0)
    assert isinstance(dm, SplitDataModule)
    assert (dm.batch_size, dm.num_workers) == (8, 0)
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader", "predict_dataloader"):
        with pytest.raises(RuntimeError, match=r"Call `setup\(\)` before asking for a dataloader"):
            getattr(dm, loader)()
    with pytest.raises(ValueError, match="Expected `batch_size` >= 1, but got 0"):
        MODULES[name](batch_size=0)
    with pytest.raises(ValueError, match="Expected `num_workers` >= 0, but got -1"):
        MODULES[name](num_workers=-1)


def test_only_training_batches_are_shuffled_and_predict_reads_the_test_split():
    dm = DigitsDataModule(batch_size=32)
    dm.setup()
    assert isinstance(dm.train_dataloader().sampler, RandomSampler)
    for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        assert isinstance(loader.sampler, SequentialSampler)
        assert loader.batch_size == 32
    assert dm.predict_dataloader().dataset is dm.test_set
