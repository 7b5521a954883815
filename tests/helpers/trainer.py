"""One quiet, fast, deterministic Trainer for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L


def fast_trainer(tmp_path: Path | str | None = None, **overrides: Any) -> L.Trainer:
    """A CPU Trainer with no logger, progress bar, model summary or checkpointing (unless overridden)."""
    kwargs: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "deterministic": True,
        "num_sanity_val_steps": 0,
    }
    if tmp_path is not None:
        kwargs["default_root_dir"] = str(tmp_path)
    kwargs.update(overrides)
    return L.Trainer(**kwargs)
