"""Data-parallel scaling: training samples per second for 1 and 2 processes on CPU (gloo), and 1..N GPUs.

Each configuration runs as a fresh `python benchmarks/scaling.py --worker ...` subprocess with
`strategy="ddp"` (Lightning's own launcher), so the numbers are what a user's script gets. The table
goes to benchmarks/results/scaling.md.

    python benchmarks/scaling.py                 # CPU 1 vs 2 processes, plus GPUs when present
    python benchmarks/scaling.py --steps 100
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

RESULTS = Path(__file__).parent / "results" / "scaling.md"


def worker(accelerator: str, devices: int, steps: int, batch_size: int, out: Path) -> None:
    import lightning as L

    import zoo
    from lightning_reg import BNRecalibration, LabelSmoothing, MixUp

    class Timer(L.Callback):
        warmup = 5

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == self.warmup:
                self.start = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            elapsed = time.perf_counter() - self.start
            measured = trainer.global_step - self.warmup
            if trainer.is_global_zero:
                samples = measured * batch_size * trainer.world_size
                out.write_text(json.dumps({"samples_per_s": samples / elapsed, "world_size": trainer.world_size}))

    L.seed_everything(0, verbose=False)
    dm = zoo.data.DigitsDataModule(batch_size=batch_size)
    model = zoo.create("cnn_small")
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=steps,
        max_epochs=-1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Timer(), MixUp(0.2), LabelSmoothing(0.1), BNRecalibration(num_batches=4)],
    )
    trainer.fit(model, datamodule=dm)


def run(accelerator: str, devices: int, steps: int, batch_size: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        }
        cmd = [sys.executable, __file__, "--worker", "--accelerator", accelerator, "--devices", str(devices)]
        cmd += ["--steps", str(steps), "--batch-size", str(batch_size), "--out", str(out)]
        subprocess.run(cmd, check=True, env=env, cwd=Path(__file__).parent.parent)
        return float(json.loads(out.read_text())["samples_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.worker:
        worker(args.accelerator, args.devices, args.steps, args.batch_size, args.out)
        return

    import torch

    configs = [("cpu", 1), ("cpu", 2)]
    configs += [("gpu", n) for n in range(1, torch.cuda.device_count() + 1)]
    rows = []
    for accelerator, devices in configs:
        rate = run(accelerator, devices, args.steps, args.batch_size)
        rows.append((accelerator, devices, rate))
        print(f"{accelerator} x{devices}: {rate:,.0f} samples/s", flush=True)
    base = {acc: rate for acc, devices, rate in rows if devices == 1}
    lines = [
        "# Data-parallel scaling (zoo CNN on digits, MixUp + LabelSmoothing + BNRecalibration)",
        "",
        f"{args.steps} steps, per-process batch {args.batch_size}, strategy ddp; "
        "speed-up against 1 process of the same kind.",
        f"Machine: {os.cpu_count()} CPU cores, {torch.cuda.device_count()} GPUs.",
        "",
        "| accelerator | processes | samples/s | speed-up |",
        "|---|---|---|---|",
    ]
    lines += [f"| {acc} | {devices} | {rate:,.0f} | {rate / base[acc]:.2f}x |" for acc, devices, rate in rows]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
