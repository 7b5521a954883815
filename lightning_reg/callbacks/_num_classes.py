"""Where a callback finds the number of classes: its argument, else the module's attribute or hyperparameter."""

from __future__ import annotations

import lightning as L


def check_num_classes_arg(num_classes: int | None) -> int | None:
    """``num_classes`` if it is ``None`` or an int >= 2, else raise."""
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
    ):
        raise ValueError(f"Expected `num_classes` to be an int >= 2 or None, but got {num_classes!r}.")
    return num_classes


def resolve_num_classes(num_classes: int | None, pl_module: L.LightningModule, owner: str) -> int:
    """``num_classes`` if given, else the module's ``num_classes`` attribute or hyperparameter."""
    if num_classes is None:
        num_classes = getattr(pl_module, "num_classes", None)
    if num_classes is None:
        num_classes = getattr(pl_module, "hparams", {}).get("num_classes")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(
            f"{owner} needs the number of classes to one-hot encode the targets, but got {num_classes!r} "
            f"(from the argument, then `{type(pl_module).__name__}.num_classes`, then its hparams). "
            f"Pass `{owner}(num_classes=K)` or set `self.num_classes = K` in your LightningModule."
        )
    return num_classes
