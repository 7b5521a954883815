"""GPU check: every callback under `ddp` and `fsdp` on the GPUs present; works/error and samples per second.

    python benchmarks/gpu_check.py            # all GPUs, both strategies
    python benchmarks/gpu_check.py --steps 50

Each (callback, strategy) pair runs in a fresh subprocess (Lightning's own launcher), training the zoo
cnn_small (BatchNorm and dropout: every callback has something to act on) on the bundled digits, with one
validation at the last step so that MC dropout evaluates. Throughput counts the training steps after a
warmup, up to the last optimizer step. BNRecalibration and MCDropoutEvaluation refuse FSDP at setup by design
(they forward the module outside a step, and FSDP shards the parameters): the table shows "refused" there.
Without a CUDA GPU it says so and exits 0. The table goes to benchmarks/results/gpu_check.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "gpu_check.md"
DDP_ENV_VARS = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "GROUP_RANK")
WARMUP = 5
NO_GPU = "No CUDA GPU found: nothing to check. Run this on a machine with GPUs (`nvidia-smi` lists them)."
CALLBACKS = [
    "MixUp",
    "CutMix",
    "MixUpCutMix",
    "LabelSmoothing",
    "BNRecalibration",
    "BNStatsMonitor",
    "MCDropoutEvaluation",
]
STRATEGIES = ["ddp", "fsdp"]


def make_callback(name: str):
    import lightning_reg

    kwargs = {
        "MixUp": {"alpha": 0.2},
        "CutMix": {"alpha": 1.0},
        "MixUpCutMix": {},
        "LabelSmoothing": {"smoothing": 0.1},
        "BNRecalibration": {"num_batches": 8},
        "BNStatsMonitor": {"log_every_n_steps": 10},
        "MCDropoutEvaluation": {"n_samples": 10, "plot": False},
    }[name]
    return getattr(lightning_reg, name)(**kwargs)


def worker(callback: str, strategy: str, devices: int, steps: int, batch_size: int, out: Path) -> None:
    import lightning as L

    import zoo

    class Timer(L.Callback):
        """Times the training steps after the warmup up to the last one; the result is written at the end of fit."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == WARMUP:
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == steps:
                self.rate = (steps - WARMUP) * batch_size * trainer.world_size / (time.perf_counter() - self.start)

        def on_fit_end(self, trainer, pl_module):
            if trainer.is_global_zero:  # after validation: the whole fit worked
                out.write_text(json.dumps({"samples_per_s": self.rate}))

    L.seed_everything(0, verbose=False)
    model = zoo.create("cnn_small")
    trainer = L.Trainer(
        accelerator="gpu",
        devices=devices,
        strategy=strategy,
        max_steps=steps,
        max_epochs=-1,
        limit_val_batches=2,
        val_check_interval=steps,
        check_val_every_n_epoch=None,  # validate after `steps` steps, across epochs (digits: ~10 batches an epoch)
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Timer(), make_callback(callback)],
    )
    trainer.fit(model, datamodule=zoo.data.DigitsDataModule(batch_size=batch_size))


def run(callback: str, strategy: str, devices: int, steps: int, batch_size: int) -> tuple[str, float | None]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {k: v for k, v in os.environ.items() if k not in DDP_ENV_VARS}
        cmd = [sys.executable, __file__, "--worker", "--callback", callback, "--strategy", strategy]
        cmd += ["--devices", str(devices), "--steps", str(steps), "--batch-size", str(batch_size), "--out", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
        if proc.returncode != 0 or not out.exists():
            message = error_line(proc.stderr)
            status = "refused" if "does not support" in message else "error"
            return f"{status}: {message[:160]}", None
        return "works", float(json.loads(out.read_text())["samples_per_s"])


def error_line(stderr: str) -> str:
    """The exception line of a traceback (``SomeError: message``), else the last line."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.split(":", 1)[0].split(".")[-1].endswith(("Error", "Exception"))]
    return (errors or lines or ["no output"])[-1].replace("|", "/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--callback", default="MixUp")
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--devices", type=int, default=0, help="GPUs to use (default: all)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.callback, args.strategy, args.devices, args.steps, args.batch_size, args.out)
        return 0
    if args.steps <= WARMUP:
        parser.error(f"--steps must be more than the {WARMUP} warmup steps, but got {args.steps}.")

    import torch

    if not torch.cuda.is_available():
        print(NO_GPU)
        return 0
    devices = args.devices or torch.cuda.device_count()
    lines = [
        f"# GPU check: {devices} x {torch.cuda.get_device_name(0)}",
        "",
        f"Zoo CNN on digits, {args.steps} steps, per-GPU batch {args.batch_size}.",
        "",
        "| callback | strategy | result | samples/s |",
        "|---|---|---|---|",
    ]
    for callback in CALLBACKS:
        for strategy in STRATEGIES:
            status, rate = run(callback, strategy, devices, args.steps, args.batch_size)
            lines.append(f"| {callback} | {strategy} | {status} | {'' if rate is None else f'{rate:,.0f}'} |")
            print(lines[-1], flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
