"""DataModules of the zoo: bundled digits (no download), and more as they land."""

from zoo.data.digits import DigitsDataModule

__all__ = ["DigitsDataModule"]
