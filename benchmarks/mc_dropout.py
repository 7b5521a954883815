"""Speed of `mc_dropout_predict` against the naive loop of n forward passes and one eval pass, in one run.

    .venv/bin/python benchmarks/mc_dropout.py [--device cpu] [--n-samples 30] [--batch 256] \
        [--out benchmarks/results/mc_dropout.md]

Models: the zoo CNN (`cnn_small`, dropout in the head only: the trunk runs once, the head is sampled) and the zoo
Transformer (`transformer`, dropout in every block: the inputs are repeated along the batch). For each, under
`torch.inference_mode()` (what Lightning's evaluation loops use), the timings of (a) one eval-mode forward pass,
(b) our path (`method="auto"`) and (c) the naive loop of n forward passes with dropout sampled are interleaved over
several repetitions; the table gives medians and the ratios. Goals: CNN (b)/(a) <= 1.2; Transformer (b)/(c) <= 1.0.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import zoo
from lightning_reg import functional as LF


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _bench(model: nn.Module, inputs: torch.Tensor, n_samples: int, repeats: int) -> dict[str, float]:
    device = inputs.device
    runs: dict[str, Callable[[], object]] = {
        "eval": lambda: model(inputs),
        "ours": lambda: LF.mc_dropout_predict(model, inputs, n_samples),
        "naive": lambda: LF.mc_dropout_predict(model, inputs, n_samples, method="naive"),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(repeats):
            for name, fn in runs.items():  # interleaved, so that load on the machine hits all three alike
                times[name].append(_time(fn, device))
    result = {name: statistics.median(values) for name, values in times.items()}
    result["path"] = LF.mc_dropout_predict(model, inputs[:2], 2).method  # type: ignore[assignment]
    return result


def _resnet18_head_dropout() -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(num_classes=10)
    model.fc = nn.Sequential(nn.Dropout(0.5), model.fc)  # no forward_features: the traced prefix runs once
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-samples", type=int, default=30)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results/mc_dropout.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    cases = {
        "zoo CNN `cnn_small` (head dropout)": (zoo.create("cnn_small", num_classes=10), (1, 8, 8)),
        "zoo Transformer `transformer` (dropout in every block)": (zoo.create("transformer", num_classes=10), (8, 8)),
        "torchvision `resnet18` + `Dropout(0.5)` before `fc`": (_resnet18_head_dropout(), (3, 32, 32)),
    }
    rows = []
    for label, (model, shape) in cases.items():
        model = model.to(device).eval()
        inputs = torch.randn(args.batch, *shape, device=device)
        r = _bench(model, inputs, args.n_samples, args.repeats)
        rows.append(
            f"| {label} | {r['path']} | {1e3 * r['eval']:.1f} | {1e3 * r['ours']:.1f} | {1e3 * r['naive']:.1f} "
            f"| {r['ours'] / r['eval']:.2f}x | {r['naive'] / r['eval']:.1f}x | {r['ours'] / r['naive']:.2f}x |"
        )
        print(rows[-1], flush=True)
    threads = torch.get_num_threads()
    text = "\n".join(
        [
            "# Monte-Carlo dropout: speed",
            "",
            f"`benchmarks/mc_dropout.py`, one run: device {device} ({platform.processor() or platform.machine()}, "
            f"{threads} torch threads), torch {torch.__version__}, n_samples={args.n_samples}, batch {args.batch}, "
            f"median of {args.repeats} interleaved repetitions, under `torch.inference_mode()`.",
            "",
            "| model | our path | one eval pass (ms) | ours (ms) | naive loop (ms) | ours / eval | naive / eval "
            "| ours / naive |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "Goals: head-dropout CNN <= 1.2x one eval pass (the naive loop is about n_samples x); Transformer <= 1.0x "
            "the naive loop; resnet18 <= 1.5x one eval pass. `cached`: the trunk (`forward_features`, the split of an "
            "`nn.Sequential`, or the deterministic prefix of the `torch.fx` graph) runs once, the rest is sampled; "
            "`batched`: the inputs are repeated along the batch, `max(N, 256)` rows per forward pass by default "
            "(one sample per pass from batch 256 on).",
            "",
        ]
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
