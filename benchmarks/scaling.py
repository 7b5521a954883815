"""Data-parallel scaling: training samples per second for 1 and 2 processes on CPU (gloo), and 1..N GPUs.

Each configuration runs as a fresh `python benchmarks/scaling.py --worker ...` subprocess with `strategy="ddp"`
(Lightning's own launcher), so the numbers are what a user's script gets. The configurations are run interleaved,
``--repeats`` times each, and the table gives the median, so that a shared machine's load hits all of them alike;
the speed-up is the ratio of medians measured in this one run. The table goes to benchmarks/results/scaling.md.

Weak scaling: the batch per process is fixed, so N processes train on N times the samples per step. CPU workers
use ``--threads`` intra-op threads each (1 by default: 2 processes on 2 cores then use what 1 process with 2
threads would); the row "1 process, all cores" shows what one process gets from the same cores by threading.

    python benchmarks/scaling.py                 # CPU 1 vs 2 processes, plus GPUs when present
    python benchmarks/scaling.py --steps 300 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "scaling.md"
DDP_ENV_VARS = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "GROUP_RANK")
WARMUP = 10  # optimizer steps before the clock starts


def worker(accelerator: str, devices: int, threads: int, steps: int, batch_size: int, out: Path) -> None:
    import lightning as L
    import torch

    import zoo
    from lightning_reg import BNRecalibration, LabelSmoothing, MixUp

    torch.set_num_threads(threads)

    class Timer(L.Callback):
        """Times the training steps after the warmup, up to the last optimizer step (not the end-of-fit work)."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == WARMUP:
                self.start = time.perf_counter()
                self.samples = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step <= WARMUP:
                return
            # The samples this rank actually trained on: an epoch's last batch is partial. Every rank gets the
            # same number (the DistributedSampler pads), so the world's count is this one times the world size.
            self.samples += len(batch[0])
            if trainer.global_step == steps and trainer.is_global_zero:
                elapsed = time.perf_counter() - self.start
                samples = self.samples * trainer.world_size
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
        # Timer first: its `on_train_batch_end` stops the clock before BNRecalibration's end-of-fit pass.
        callbacks=[Timer(), MixUp(0.2), LabelSmoothing(0.1), BNRecalibration(num_batches=4)],
    )
    trainer.fit(model, datamodule=dm)
    # Left to interpreter shutdown, gloo's threads can abort the worker after training (exit -6).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run(accelerator: str, devices: int, threads: int, steps: int, batch_size: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {k: v for k, v in os.environ.items() if k not in DDP_ENV_VARS}
        env["OMP_NUM_THREADS"] = str(threads)
        cmd = [sys.executable, __file__, "--worker", "--accelerator", accelerator, "--devices", str(devices)]
        cmd += ["--threads", str(threads), "--steps", str(steps), "--batch-size", str(batch_size), "--out", str(out)]
        subprocess.run(cmd, check=True, env=env, cwd=Path(__file__).parent.parent, capture_output=True)
        return float(json.loads(out.read_text())["samples_per_s"])


def machine_facts() -> list[str]:
    import lightning
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    facts = [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores; GPUs: {', '.join(gpus) if gpus else 'none'}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}, "
        f"{platform.system()} {platform.release()}",
    ]
    return facts


def load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per CPU process")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.accelerator, args.devices, args.threads, args.steps, args.batch_size, args.out)
        return
    if args.steps <= WARMUP:
        parser.error(f"--steps must be more than the {WARMUP} warmup steps, but got {args.steps}.")

    import torch

    cores = os.cpu_count() or 1
    # (label, accelerator, processes, threads per process)
    configs = [("cpu", "cpu", 1, args.threads), ("cpu", "cpu", 2, args.threads)]
    if cores > args.threads:
        configs.append(("cpu, 1 process, all cores", "cpu", 1, cores))
    configs += [("gpu", "gpu", n, args.threads) for n in range(1, torch.cuda.device_count() + 1)]
    load_before = load()
    rates: dict[tuple[str, str, int, int], list[float]] = {c: [] for c in configs}
    for repeat in range(args.repeats):
        for config in configs:
            label, accelerator, devices, threads = config
            rate = run(accelerator, devices, threads, args.steps, args.batch_size)
            rates[config].append(rate)
            print(
                f"[{repeat + 1}/{args.repeats}] {label} x{devices} ({threads} thr): {rate:,.0f} samples/s", flush=True
            )
    load_after = load()

    median = {c: statistics.median(r) for c, r in rates.items()}
    base = {"cpu": median[configs[0]]}
    if torch.cuda.device_count():
        base["gpu"] = median[next(c for c in configs if c[1] == "gpu")]
    lines = [
        "# Data-parallel scaling (zoo cnn_small on digits, MixUp + LabelSmoothing + BNRecalibration)",
        "",
        f"`python benchmarks/scaling.py --steps {args.steps} --batch-size {args.batch_size} "
        f"--repeats {args.repeats}`: strategy `ddp` (gloo on CPU), "
        f"per-process batch {args.batch_size}, {args.steps} optimizer steps of which the first {WARMUP} are not timed; "
        f"median of {args.repeats} interleaved runs; speed-up against 1 process of the same kind with "
        f"{args.threads} thread(s).",
        "",
        "| accelerator | processes | threads / process | samples/s (median) | runs | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for config in configs:
        label, accelerator, devices, threads = config
        runs = ", ".join(f"{r:,.0f}" for r in rates[config])
        ratio = median[config] / base[accelerator]
        lines.append(f"| {label} | {devices} | {threads} | {median[config]:,.0f} | {runs} | {ratio:.2f}x |")
    lines += [
        "",
        "Machine:",
        *machine_facts(),
        f"- load average (1, 5, 15 min): {load_before} before, {load_after} after",
    ]
    two = median[configs[1]] / median[configs[0]]
    summary = f"CPU, 2 processes vs 1 (measured side by side in this run): {two:.2f}x"
    lines += ["", summary]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
