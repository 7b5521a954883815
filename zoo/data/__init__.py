"""DataModules of the zoo: bundled digits (no download), torchvision's datasets, and a user's image folders."""

from zoo.data.digits import DigitsDataModule
from zoo.data.image_folder import ImageFolderDataModule
from zoo.data.torchvision_data import TorchvisionDataModule

__all__ = ["DigitsDataModule", "ImageFolderDataModule", "TorchvisionDataModule"]
