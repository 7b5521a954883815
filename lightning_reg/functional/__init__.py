"""Pure tensor functions: the numerical core of every regularizer. No Lightning import, no global state."""

from lightning_reg.functional.bn_recalibration import BNRecalibrationReport, recalibrate_bn
from lightning_reg.functional.calibration import fit_temperature, scale_logits, temperature_nll
from lightning_reg.functional.cutmix import Box, cutmix, sample_box
from lightning_reg.functional.label_smoothing import one_hot, smooth
from lightning_reg.functional.locked_dropout import locked_dropout
from lightning_reg.functional.mc_dropout import (
    MCDropoutPrediction,
    find_mc_dropout_sites,
    mc_dropout_predict,
    mc_dropout_sampling,
)
from lightning_reg.functional.mixup import MixingParams, mixup, sample_mixup
from lightning_reg.functional.regmixup import regmixup
from lightning_reg.functional.weight_drop import weight_drop

__all__: list[str] = [
    "recalibrate_bn",
    "BNRecalibrationReport",
    "one_hot",
    "smooth",
    "mixup",
    "sample_mixup",
    "MixingParams",
    "cutmix",
    "sample_box",
    "Box",
    "locked_dropout",
    "weight_drop",
    "mc_dropout_predict",
    "mc_dropout_sampling",
    "find_mc_dropout_sites",
    "MCDropoutPrediction",
    "fit_temperature",
    "scale_logits",
    "temperature_nll",
    "regmixup",
]
