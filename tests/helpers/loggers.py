"""An in-memory Lightning logger: tests read what callbacks logged."""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from lightning.pytorch.loggers import Logger


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)`` in ``self.logged``."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        pass

    def values(self, key: str) -> list[tuple[int | None, float]]:
        """``(step, value)`` of every logged ``key``."""
        return [(step, m[key]) for step, m in self.logged if key in m]
