"""DataModules of the zoo: bundled digits (no download), torchvision's datasets, and a user's image folders.

The digits also give the regimes of the demo: label noise, digits-C (covariate shift) and held-out classes (OOD).
"""

from zoo.data.base import SplitDataModule
from zoo.data.digits import DigitsCDataModule, DigitsDataModule
from zoo.data.digits_c import CORRUPTIONS, SEVERITIES, corrupt_digits
from zoo.data.image_folder import ImageFolderDataModule
from zoo.data.label_noise import DIGIT_FLIPS, flip_labels
from zoo.data.torchvision_data import TorchvisionDataModule

__all__ = [
    "CORRUPTIONS",
    "DIGIT_FLIPS",
    "SEVERITIES",
    "SplitDataModule",
    "DigitsCDataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "TorchvisionDataModule",
    "corrupt_digits",
    "flip_labels",
]
