"""Fit zoo models with our callbacks under a 2-process CPU strategy; every rank writes what it checked to JSON.

    python tests/distributed/scripts/train_matrix.py --strategy ddp --cases cnn_small+mixup,gru+all --out DIR

Several fits run in one launch: under ``ddp`` Lightning's launcher starts the other rank by re-running this script,
which then runs the same fits in the same order; under ``ddp_spawn`` every fit spawns its own 2 workers. Each
rank writes ``DIR/<case>/rank<r>.json``: steps, training losses, a digest of the first training batch before and
after the batch-changing callbacks, BatchNorm statistics at the end of the last training batch, the callbacks'
checks, and the MC-dropout metrics. ``tests/distributed/test_strategies.py`` asserts on those files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))  # `zoo` and `lightning_reg` from this checkout when run as a plain script

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

import zoo  # noqa: E402
from lightning_reg import (  # noqa: E402
    BNRecalibration,
    BNStatsMonitor,
    CutMix,
    LabelSmoothing,
    MCDropoutEvaluation,
    MixUp,
    MixUpCutMix,
)

STEPS = 3  # training batches per rank and fit
BATCH = 16

# Tiny sizes where the model allows; 8x8 one-channel digits (rows as time steps for sequence models).
MODELS: dict[str, tuple[dict[str, Any], bool]] = {  # name -> (zoo.create kwargs, as_sequence)
    "cnn_small": ({"widths": (8, 16)}, False),
    "cnn": ({"widths": (8, 16, 16)}, False),
    "resnet18": ({"in_channels": 1, "drop_rate": 0.2}, False),  # drop_rate: MC dropout needs a dropout
    "lstm": ({"hidden_size": 16}, True),
    "gru": ({"hidden_size": 16}, True),
    "transformer": ({"dim": 16, "depth": 1, "num_heads": 2}, True),
    "vit_tiny": ({"image_size": 8, "patch_size": 4, "in_channels": 1, "dim": 16, "depth": 1, "num_heads": 2}, False),
}
# The mixing callback of each model's "all" case, so that every mixer runs on images and on sequences.
MIXER = {
    "cnn_small": "mixup_cutmix",
    "cnn": "cutmix",
    "resnet18": "mixup",
    "lstm": "cutmix",
    "gru": "mixup",
    "transformer": "mixup_cutmix",
    "vit_tiny": "cutmix",
}
CALLBACKS = {
    "mixup": lambda: MixUp(0.4),
    "cutmix": lambda: CutMix(1.0),
    "mixup_cutmix": lambda: MixUpCutMix(mixup_alpha=0.4, cutmix_alpha=1.0),
    "label_smoothing": lambda: LabelSmoothing(0.1),
    "bn_recalibration": lambda: BNRecalibration(num_batches=2),
    "bn_stats_monitor": lambda: BNStatsMonitor(log_every_n_steps=1),
    "mc_dropout": lambda: MCDropoutEvaluation(n_samples=4, plot=False),
}
MIXING = ("mixup", "cutmix", "mixup_cutmix", "label_smoothing")


def case_names(suite: str) -> list[str]:
    """``callbacks``: each callback alone on cnn_small; ``models``: every model with all callbacks."""
    if suite == "callbacks":
        return [f"cnn_small+{name}" for name in CALLBACKS]
    if suite == "models":
        return [f"{model}+all" for model in MODELS]
    raise ValueError(f"Expected a suite in ('callbacks', 'models'), but got {suite!r}.")


def _digest(batch: Any) -> list[float]:
    x, y = batch[0].double(), batch[1].double()
    return [float(x.sum()), float((x * x).sum()), float(y.sum()), float((y * y).sum())]


class Probe(L.Callback):
    """Records a digest of the first training batch when its hook runs (place one before and one after mixers)."""

    def __init__(self) -> None:
        self.digest: list[float] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.digest = _digest(batch)


class Recorder(L.Callback):
    """Collects the losses and writes this rank's record at the end of fit."""

    def __init__(self, out_dir: Path, before: Probe, after: Probe) -> None:
        self.out_dir, self.before, self.after = out_dir, before, after
        self.losses: list[float] = []
        self.bn: dict[str, list[list[float]]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        # Listed after BNRecalibration, so the last batch's record holds the recalibrated statistics. (Later, a
        # validation forward through DDP broadcasts rank 0's buffers: at `on_fit_end` they are equal anyway.)
        self.bn = {
            name: [m.running_mean.tolist(), m.running_var.tolist()]
            for name, m in pl_module.named_modules()
            if isinstance(m, _BatchNorm) and m.running_mean is not None
        }

    def on_fit_end(self, trainer, pl_module):
        # On `ddp_spawn` the callbacks are copies: find the probes in this rank's trainer.
        probes = [cb for cb in trainer.callbacks if isinstance(cb, Probe)]
        record: dict[str, Any] = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "launcher": type(trainer.strategy.launcher).__name__,  # how the ranks were started: script or spawn
            "steps": trainer.global_step,
            "losses": self.losses,
            "finite": bool(torch.isfinite(torch.tensor(self.losses)).all()),
            "before": probes[0].digest,
            "after": probes[-1].digest,
            "bn": self.bn,
            "mc": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("mc/")},
        }
        for cb in trainer.callbacks:
            if isinstance(cb, BNRecalibration):
                record["recalibrations"] = cb.num_recalibrations
            if isinstance(cb, BNStatsMonitor):
                record["bn_stats"] = cb.last_stats
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def fit_case(case: str, strategy: str, out: Path) -> None:
    model_name, _, what = case.partition("+")
    kwargs, as_sequence = MODELS[model_name]
    names = [MIXER[model_name], "label_smoothing", "bn_recalibration", "bn_stats_monitor", "mc_dropout"]
    names = names if what == "all" else [what]
    # A mixing-only case feeds both ranks the same batches (no distributed sampler, same seed), so the digests
    # after mixing show whether the ranks drew differently; the other cases shard the data as usual.
    same_data = what in MIXING
    L.seed_everything(0, verbose=False)
    model = zoo.create(model_name, num_classes=10, **kwargs)
    before, after = Probe(), Probe()
    callbacks = [before, *(CALLBACKS[name]() for name in names), after]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=1,
        limit_train_batches=STEPS,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        use_distributed_sampler=not same_data,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, Recorder(out / case, before, after)],
    )
    trainer.fit(model, datamodule=zoo.data.DigitsDataModule(batch_size=BATCH, as_sequence=as_sequence))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--strategy", choices=("ddp", "ddp_spawn"), required=True)
    parser.add_argument("--cases", default="", help="comma-separated MODEL+CALLBACK or MODEL+all")
    parser.add_argument("--suite", action="append", default=[], choices=("callbacks", "models"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|found no normalization layer).*")
    cases = [c for c in args.cases.split(",") if c] + [c for s in args.suite for c in case_names(s)]
    timings = {}
    for case in cases:
        start = time.perf_counter()
        fit_case(case, args.strategy, args.out)
        timings[case] = round(time.perf_counter() - start, 2)
    if os.environ.get("LOCAL_RANK", "0") == "0":  # the launching process (ddp) or the parent (ddp_spawn)
        (args.out / "timings.json").write_text(json.dumps(timings))
    # Left to interpreter shutdown, gloo's threads can abort a rank after its last fit (exit -6).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
