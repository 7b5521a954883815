"""Lightning callbacks: thin, stateful wrappers around the functional core."""

from lightning_reg.callbacks.bn_recalibration import BNRecalibration
from lightning_reg.callbacks.bn_stats_monitor import BNStatsMonitor
from lightning_reg.callbacks.cutmix import CutMix
from lightning_reg.callbacks.label_smoothing import LabelSmoothing
from lightning_reg.callbacks.mc_dropout import MCDropoutEvaluation
from lightning_reg.callbacks.mixup import MixUp
from lightning_reg.callbacks.mixup_cutmix import MixUpCutMix
from lightning_reg.callbacks.regmixup import RegMixup
from lightning_reg.callbacks.regularization_check import RegularizationCheck
from lightning_reg.callbacks.temperature_scaling import TemperatureScaling

__all__: list[str] = [
    "BNRecalibration",
    "BNStatsMonitor",
    "MixUp",
    "CutMix",
    "MixUpCutMix",
    "LabelSmoothing",
    "MCDropoutEvaluation",
    "TemperatureScaling",
    "RegMixup",
    "RegularizationCheck",
]
