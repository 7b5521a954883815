"""Report a metric to an Optuna trial at each validation and stop (prune) the fit when the pruner says so.

Our own thin callback rather than ``optuna_integration.PyTorchLightningPruningCallback`` (read in
optuna-integration 5.0), because that one
- reads the private ``trainer._accelerator_connector.is_distributed`` to detect DDP;
- under DDP accepts only ``RDBStorage`` (a journal file on a shared filesystem is refused) and needs a manual
  ``check_pruned()`` after ``fit`` that replays the intermediate values stored as system attributes;
- reports at ``step=current_epoch``, so a second validation in one epoch (``val_check_interval < 1``) reports
  the same step twice and Optuna drops it;
- in the non-DDP case raises ``TrialPruned`` from inside ``on_validation_end``, which leaves the fit as an
  exception instead of a normal stop.
Here only global rank 0 holds the trial (the other ranks get ``trial=None``), reports once per validation at
``step=trainer.global_step``, asks the pruner, and broadcasts the decision so that every rank sets
``trainer.should_stop``; the search then tells Optuna the trial was pruned. One code path for 1 or N ranks.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

__all__ = ["TrialPruning"]


class TrialPruning(Callback):
    """Report ``monitor`` to an Optuna trial after each validation; stop the fit when the trial should be pruned.

    Args:
        trial: the ``optuna.Trial`` on global rank 0; ``None`` on the other ranks of a DDP trial.
        monitor: the logged metric to report (``trainer.callback_metrics[monitor]``).
        prune: ask the study's pruner after each report (``False``: report only).

    Example:
        >>> import optuna
        >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
        >>> trial = optuna.create_study().ask()
        >>> callback = TrialPruning(trial, monitor="val_loss")
        >>> callback.reports, callback.pruned_at_step
        ([], None)
    """

    def __init__(self, trial: Any | None, monitor: str = "val_loss", prune: bool = True) -> None:
        super().__init__()
        self.trial = trial
        self.monitor = monitor
        self.prune = prune
        self.reports: list[tuple[int, float]] = []
        self.pruned_at_step: int | None = None

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        error: str | None = None
        should_prune = False
        if trainer.is_global_zero:
            if self.trial is None:
                error = "TrialPruning on global rank 0 needs the Optuna trial, but got trial=None."
            else:
                value = trainer.callback_metrics.get(self.monitor)
                if value is None:
                    error = (
                        f"The monitored metric {self.monitor!r} was not logged at validation; logged metrics are "
                        f"{sorted(trainer.callback_metrics)}. Pass `--monitor` with one of them."
                    )
                else:
                    step = trainer.global_step
                    self.reports.append((step, float(value)))
                    self.trial.report(float(value), step=step)
                    should_prune = self.prune and self.trial.should_prune()
        # Every rank takes rank 0's decision, so that all ranks stop at the same step (or all raise).
        error, should_prune = trainer.strategy.broadcast((error, should_prune), src=0)
        if error is not None:
            raise ValueError(error)
        if should_prune:
            self.pruned_at_step = trainer.global_step
            trainer.should_stop = True
