"""lightning-reg: the well-known regularizers of deep learning as one-line PyTorch Lightning callbacks."""

from lightning_reg import functional
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
from lightning_reg.plotting import plot_reliability
from lightning_reg.regularization_check import RegularizationWarning, regularization_summary
from lightning_reg.targets import hard_targets

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "functional",
    "hard_targets",
    "BNRecalibration",
    "BNStatsMonitor",
    "MCDropoutEvaluation",
    "plot_reliability",
    "MixUp",
    "CutMix",
    "MixUpCutMix",
    "LabelSmoothing",
    "TemperatureScaling",
    "RegMixup",
    "RegularizationCheck",
    "RegularizationWarning",
    "regularization_summary",
]
