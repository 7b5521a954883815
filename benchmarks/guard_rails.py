"""Cost of the guard rails (`RegularizationCheck`) at fit start against one training step.

    .venv/bin/python benchmarks/guard_rails.py [--batch 64] [--repeats 9] [--out benchmarks/results/guard_rails.md]

What `RegularizationCheck` adds to a fit, measured on the zoo models on digits-shaped inputs (8x8 images, or 8
steps of 8 features), batch 64, AdamW over the zoo's parameter groups, one torch thread:

- `fit start`: the inventory (`regularization_summary`, rendered as text) and the checks that need no forward pass
  (`regularization_findings`), once per fit;
- `trace`: the extra time of the first training step (forward, cross-entropy, backward, AdamW step) with the
  `ForwardTrace` installed around its forward pass, against the same step without it.

The ratio is (fit start + trace) / one plain training step: the whole cost of the guard rails in units of the
step they run beside. Timings are medians of interleaved repetitions (plain step, traced step, fit start).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import zoo
from lightning_reg import MCDropoutEvaluation, MixUpCutMix, regularization_summary
from lightning_reg.regularization_check import ForwardTrace, regularization_findings

MODELS: dict[str, dict[str, Any]] = {
    "cnn_small": {"in_channels": 1},
    "resnet18": {"in_channels": 1},
    "lstm": {},
    "transformer": {},
    "vit_tiny": {"in_channels": 1, "image_size": 8, "patch_size": 2},
}
SEQUENCE = {"lstm", "transformer"}


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def _traced_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    with ForwardTrace(model) as trace:
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    trace.findings(model)


def _fit_start(model: torch.nn.Module, optimizer: torch.optim.Optimizer, callbacks: list[Any]) -> None:
    str(regularization_summary(model, callbacks=callbacks, optimizers=[optimizer]))
    regularization_findings(model, callbacks=callbacks, optimizers=[optimizer])


def _time(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(name: str, batch: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = zoo.create(name, num_classes=10, **MODELS[name]).train()
    optimizer = torch.optim.AdamW([g for g in model.parameter_groups() if g["params"]], lr=1e-4)
    x = torch.randn(batch, 8, 8) if name in SEQUENCE else torch.randn(batch, 1, 8, 8)
    y = torch.randint(10, (batch,))
    callbacks: list[Any] = [MixUpCutMix(num_classes=10), MCDropoutEvaluation()]
    for _ in range(2):  # warm-up: allocator, AdamW state
        _step(model, optimizer, x, y)
        _traced_step(model, optimizer, x, y)
    times: dict[str, list[float]] = {"step": [], "traced": [], "fit_start": []}
    for _ in range(repeats):
        times["step"].append(_time(lambda: _step(model, optimizer, x, y)))
        times["traced"].append(_time(lambda: _traced_step(model, optimizer, x, y)))
        times["fit_start"].append(_time(lambda: _fit_start(model, optimizer, callbacks)))
    medians = {k: statistics.median(v) for k, v in times.items()}
    medians["trace"] = max(medians["traced"] - medians["step"], 0.0)
    medians["ratio"] = (medians["fit_start"] + medians["trace"]) / medians["step"]
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    for name in MODELS:
        m = bench(name, args.batch, args.repeats)
        rows.append(
            f"| `{name}` | {1e3 * m['step']:.1f} | {1e3 * m['traced']:.1f} | {1e3 * m['trace']:.1f} | "
            f"{1e3 * m['fit_start']:.1f} | {m['ratio']:.2f}x |"
        )
        print(rows[-1], flush=True)
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    table = "\n".join(
        [
            "| model | plain step (ms) | traced step (ms) | trace extra (ms) | fit start (ms) "
            "| (fit start + trace) / step |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    header = (
        f"`benchmarks/guard_rails.py`: {platform.machine()}, 1 torch thread, torch {torch.__version__}, batch "
        f"{args.batch}, median of {args.repeats} interleaved repetitions; load average {load:.1f} at the start, "
        f"{load_end:.1f} at the end."
    )
    print(header)
    if args.out is not None:
        args.out.write_text(f"# Guard rails: cost at fit start\n\n{header}\n\n{table}\n")


if __name__ == "__main__":
    main()
