"""Regularization layers that torch lacks, each a function + module pair.

The functions live in :mod:`lightning_reg.functional` (``locked_dropout``, ``weight_drop``) and
:mod:`lightning_reg.functional.recurrent_dropout`; drop path is timm's ``timm.layers.DropPath``.
"""

from lightning_reg.nn.locked_dropout import LockedDropout
from lightning_reg.nn.recurrent_dropout import VariationalGRU, VariationalLSTM
from lightning_reg.nn.temperature_scaling import TemperatureScaled
from lightning_reg.nn.weight_drop import WeightDrop

__all__ = ["LockedDropout", "TemperatureScaled", "VariationalGRU", "VariationalLSTM", "WeightDrop"]
