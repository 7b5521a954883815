"""Speed of `recalibrate_bn` against a plain no-grad forward over the same N batches, in one run.

    .venv/bin/python benchmarks/bn_recalibration.py [--device cuda] [--out benchmarks/results/bn_recalibration.md]

For each model, the timings of (a) an eval-mode `torch.no_grad()` forward over N batches, (b) `recalibrate_bn` over the
same N batches and (c) `torch.optim.swa_utils.update_bn` are interleaved over several repetitions; the table gives
medians and the ratio b/a (goal <= 1.1x). The batches are pre-built tensors on the device, so data loading is out.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.optim.swa_utils import update_bn

import zoo
from lightning_reg import functional as LF


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device) -> float:
    # On CPU, process CPU time with one thread: these machines are shared, so wall time measures the neighbours.
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    _sync(device)
    start = clock()
    fn()
    _sync(device)
    return clock() - start


def bench(name: str, model: nn.Module, batches: list[torch.Tensor], reps: int) -> dict[str, float | str]:
    device = batches[0].device

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            for x in batches:
                model(x)

    def forward_train_bn() -> None:  # the same forward with BN computing batch statistics, as any recalibration must
        model.eval()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
        with torch.no_grad():
            for x in batches:
                model(x)

    def recal() -> None:
        model.train()
        LF.recalibrate_bn(model, batches)

    def swa() -> None:
        model.train()
        update_bn(batches, model)

    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    for fn in (forward, forward_train_bn, recal, swa):  # warm-up
        fn()
    times: dict[str, list[float]] = {"forward": [], "forward_train_bn": [], "recalibrate_bn": [], "update_bn": []}
    for _ in range(reps):
        times["forward"].append(_time(forward, device))
        times["forward_train_bn"].append(_time(forward_train_bn, device))
        times["recalibrate_bn"].append(_time(recal, device))
        times["update_bn"].append(_time(swa, device))
    model.load_state_dict(snapshot)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return {
        "model": name,
        "bn_layers": str(n_bn),
        "batches": f"{len(batches)} x {tuple(batches[0].shape)}",
        "forward_ms": med["forward"] * 1e3,
        "train_bn_ms": med["forward_train_bn"] * 1e3,
        "recal_ms": med["recalibrate_bn"] * 1e3,
        "update_bn_ms": med["update_bn"] * 1e3,
        "ratio": med["recalibrate_bn"] / med["forward"],
        "ratio_update_bn": med["update_bn"] / med["forward"],
        "ratio_train_bn": med["recalibrate_bn"] / med["forward_train_bn"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    torch.manual_seed(0)
    gpu = device.type == "cuda"
    configs = [
        ("zoo cnn (digits 8x8)", zoo.create("cnn", num_classes=10), (1, 8, 8), 256 if gpu else 128, 20),
        (
            "torchvision resnet18 (32x32)",
            torchvision.models.resnet18(num_classes=10),
            (3, 32, 32),
            256 if gpu else 32,
            20 if gpu else 10,
        ),
    ]
    if gpu:
        configs.append(("torchvision resnet50 (224x224)", torchvision.models.resnet50(), (3, 224, 224), 64, 20))
    rows = []
    for name, model, shape, batch, n in configs:
        model = model.to(device)
        batches = [torch.randn(batch, *shape, device=device) for _ in range(n)]
        row = bench(name, model, batches, args.reps)
        print(row, flush=True)
        rows.append(row)
    dev = (
        torch.cuda.get_device_name(device)
        if gpu
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    lines = [
        f"Device: {dev}; torch {torch.__version__}; median of {args.reps} interleaved repetitions "
        f"({'wall time' if gpu else 'process CPU time'}).",
        "",
        "| model | BN layers | batches | no-grad forward (ms) | recalibrate_bn (ms) | ratio "
        "| update_bn (ms) | update_bn ratio | forward, BN in train mode (ms) | recalibrate_bn / that |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['bn_layers']} | {r['batches']} | {r['forward_ms']:.1f} | {r['recal_ms']:.1f} | "
            f"{r['ratio']:.2f}x | {r['update_bn_ms']:.1f} | {r['ratio_update_bn']:.2f}x | {r['train_bn_ms']:.1f} | "
            f"{r['ratio_train_bn']:.2f}x |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
