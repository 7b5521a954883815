"""The RegularizationCheck callback: the regularization inventory and the guard-rail checks at fit start."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal, get_args

import lightning as L
from lightning.pytorch.callbacks import Callback, RichModelSummary, RichProgressBar
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_reg.regularization_check import (
    CODES,
    MIN_BN_BATCH,
    TRACE_CODES,
    Code,
    Finding,
    ForwardTrace,
    RegularizationSummary,
    RegularizationWarning,
    regularization_findings,
    regularization_summary,
)

__all__ = ["RegularizationCheck"]

SummaryMode = Literal["auto", "rich", "plain", "off"]
_SUMMARY_MODES: tuple[str, ...] = get_args(SummaryMode)


class RegularizationCheck(Callback):
    """Guard rails: what regularizes the model, and the known regularization mistakes, at fit start.

    Args:
        ignore: codes to silence (see ``lightning_reg.regularization_check.CODES``).
        strict: raise the findings as one ``RegularizationWarning`` instead of warning (on every rank), before
            any optimizer step.
        summary: ``"auto"`` (rich when the Trainer shows rich output, plain text in the log otherwise), ``"rich"``,
            ``"plain"`` or ``"off"``.
        trace: trace the first training step for the order-dependent checks.
        min_bn_batch: fewer samples per BatchNorm statistic than this is reported.

    Attributes:
        findings: the findings of the last fit (after ``ignore``).
        summary: the inventory of the last fit.

    Example:
        >>> check = RegularizationCheck(ignore=["small-bn-batch"])
        >>> trainer = L.Trainer(callbacks=[check], logger=False, enable_progress_bar=False)
        >>> check.ignore
        ('small-bn-batch',)

    Notes:
        At fit start (rank zero) it prints :func:`~lightning_reg.regularization_summary` and reports the findings
        that need no forward pass; the first training step is traced with forward hooks (removed before the
        backward pass) for the order-dependent ones. Each finding is a :class:`~lightning_reg.RegularizationWarning`
        with a stable code; docs/guard_rails.md lists them.
    """

    def __init__(
        self,
        ignore: Sequence[Code] = (),
        *,
        strict: bool = False,
        summary: SummaryMode = "auto",
        trace: bool = True,
        min_bn_batch: int = MIN_BN_BATCH,
    ) -> None:
        if isinstance(ignore, str):
            ignore = (ignore,)  # type: ignore[assignment]
        unknown = [code for code in ignore if code not in CODES]
        if unknown:
            raise ValueError(f"Expected `ignore` to contain codes among {CODES}, but got {unknown!r}.")
        if summary not in _SUMMARY_MODES:
            raise ValueError(f"Expected `summary` to be one of {_SUMMARY_MODES}, but got {summary!r}.")
        if isinstance(min_bn_batch, bool) or not isinstance(min_bn_batch, int) or min_bn_batch < 1:
            raise ValueError(f"Expected `min_bn_batch` to be a positive int, but got {min_bn_batch!r}.")
        self.ignore: tuple[Code, ...] = tuple(dict.fromkeys(ignore))
        self.strict = bool(strict)
        self.summary_mode: SummaryMode = summary
        self.trace = bool(trace)
        self.min_bn_batch = min_bn_batch
        self.findings: list[Finding] = []
        self.summary: RegularizationSummary | None = None
        self._trace: ForwardTrace | None = None
        self._pending_trace = False

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Print the inventory (rank zero), report the checks that need no forward pass, arm the trace."""
        self.summary = regularization_summary(pl_module, trainer)
        if trainer.is_global_zero:
            self._print_summary(trainer, self.summary)
        self.findings = []
        self._report(trainer, regularization_findings(pl_module, trainer))
        wanted = set(TRACE_CODES) - set(self.ignore)
        self._pending_trace = self.trace and bool(wanted)

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """On the first training batch of the fit: install the trace around its training step."""
        if self._pending_trace and self._trace is None:
            self._pending_trace = False
            self._trace = ForwardTrace(pl_module).start()

    @override
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        """The forward pass of the first step is done: remove the trace and report (before any optimizer step)."""
        self._finish(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """A training step without a backward pass (``training_step`` returned None): finish the trace here."""
        self._finish(trainer, pl_module)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Remove the trace if the step failed."""
        self._discard()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Never leave the trace installed."""
        self._discard()
        self._pending_trace = False

    def state_dict(self) -> dict[str, Any]:
        """Nothing to save: the checks run again at every fit."""
        return {}

    # --- helpers -----------------------------------------------------------------------------------------
    def _discard(self) -> None:
        if self._trace is not None:
            self._trace.stop()
            self._trace = None

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trace = self._trace
        if trace is None:
            return
        trace.stop()
        self._trace = None
        world_size = int(trainer.world_size)
        self._report(trainer, trace.findings(pl_module, world_size=world_size, min_bn_batch=self.min_bn_batch))

    def _report(self, trainer: L.Trainer, findings: list[Finding]) -> None:
        findings = [f for f in findings if f.code not in self.ignore]
        self.findings += findings
        if not findings:
            return
        if self.strict:
            # Every rank finds the same (the checks read the model, the optimizers and the callbacks), so every
            # rank raises: no rank waits in a collective for one that stopped.
            raise RegularizationWarning(*findings)
        if trainer.is_global_zero:
            for finding in findings:
                warnings.warn(RegularizationWarning(finding), stacklevel=2)

    def _print_summary(self, trainer: L.Trainer, summary: RegularizationSummary) -> None:
        mode = self.summary_mode
        if mode == "off":
            return
        if mode == "auto":
            rich = any(isinstance(cb, RichProgressBar | RichModelSummary) for cb in trainer.callbacks)  # type: ignore[attr-defined]
            mode = "rich" if rich else "plain"
        if mode == "rich":
            from rich import get_console

            get_console().print(summary.to_rich())
        else:
            # Lightning's own logger, as ModelSummary: shown at INFO, silenced with the "lightning.pytorch" level.
            rank_zero_info(f"Regularization summary\n{summary}")
