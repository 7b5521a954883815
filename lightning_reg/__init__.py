"""lightning-reg: the well-known regularizers of deep learning as one-line PyTorch Lightning callbacks."""

from lightning_reg import functional
from lightning_reg.targets import hard_targets

__version__ = "0.1.0"

__all__ = ["__version__", "functional", "hard_targets"]
