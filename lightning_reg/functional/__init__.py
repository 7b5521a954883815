"""Pure tensor functions: the numerical core of every regularizer. No Lightning import, no global state."""

from lightning_reg.functional.bn_recalibration import BNRecalibrationReport, recalibrate_bn
from lightning_reg.functional.locked_dropout import locked_dropout
from lightning_reg.functional.mc_dropout import MCDropoutPrediction, mc_dropout_predict, mc_dropout_sampling
from lightning_reg.functional.weight_drop import weight_drop

__all__: list[str] = [
    "recalibrate_bn",
    "BNRecalibrationReport",
    "locked_dropout",
    "weight_drop",
    "mc_dropout_predict",
    "mc_dropout_sampling",
    "MCDropoutPrediction",
]
