"""Shared test helpers: tiny models, tiny data, a quiet fast Trainer, and 2-process DDP on CPU."""

from tests.helpers.data import DictDataset, coded_images, make_classification, make_images, make_loader
from tests.helpers.ddp import ddp_fork_trainer, run_in_2_processes, scrubbed_ddp_env
from tests.helpers.models import ReseedEachEpoch, ThreeClassEvaluator, TinyCNN, TinyMLP, UserClassifier
from tests.helpers.trainer import fast_trainer

__all__ = [
    "DictDataset",
    "ReseedEachEpoch",
    "ThreeClassEvaluator",
    "TinyCNN",
    "TinyMLP",
    "UserClassifier",
    "coded_images",
    "ddp_fork_trainer",
    "fast_trainer",
    "make_classification",
    "make_images",
    "make_loader",
    "run_in_2_processes",
    "scrubbed_ddp_env",
]
