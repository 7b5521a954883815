"""Lightning callbacks: thin, stateful wrappers around the functional core."""

from lightning_reg.callbacks.bn_recalibration import BNRecalibration
from lightning_reg.callbacks.bn_stats_monitor import BNStatsMonitor
from lightning_reg.callbacks.mc_dropout import MCDropoutEvaluation

__all__: list[str] = ["BNRecalibration", "BNStatsMonitor", "MCDropoutEvaluation"]
