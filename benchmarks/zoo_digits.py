"""Train the zoo's CNN, RNN and Transformer on the bundled digits (CPU) and record test accuracy and time.

    python benchmarks/zoo_digits.py                 # all three, writes benchmarks/results/zoo_digits.md
    python benchmarks/zoo_digits.py --models lstm   # one of them (prints only)

Each model is built with ``zoo.create(name)`` and its defaults; the recipe below only sets the epochs and the
batch size. Goals (issue 6): CNN >= 97 %, RNN (rows as time steps) >= 95 %, Transformer >= 95 %, each in
under 3 minutes on CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

import zoo


@dataclass(frozen=True)
class Recipe:
    model: str
    as_sequence: bool
    max_epochs: int
    batch_size: int
    goal: float


RECIPES: dict[str, Recipe] = {
    "cnn_small": Recipe("cnn_small", as_sequence=False, max_epochs=30, batch_size=64, goal=0.97),
    "lstm": Recipe("lstm", as_sequence=True, max_epochs=40, batch_size=64, goal=0.95),
    "transformer": Recipe("transformer", as_sequence=True, max_epochs=40, batch_size=64, goal=0.95),
}


@dataclass(frozen=True)
class Result:
    name: str
    test_acc: float
    seconds: float
    epochs: int
    goal: float


def train_on_digits(name: str, *, seed: int = 0, max_epochs: int | None = None) -> Result:
    """Fit ``RECIPES[name]`` on the digits' train split and return its test accuracy and wall time."""
    recipe = RECIPES[name]
    epochs = max_epochs if max_epochs is not None else recipe.max_epochs
    L.seed_everything(seed, verbose=False)
    start = time.perf_counter()
    data = zoo.data.DigitsDataModule(batch_size=recipe.batch_size, as_sequence=recipe.as_sequence)
    model = zoo.create(recipe.model, num_classes=10)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=max(epochs, 1),
    )
    trainer.fit(model, datamodule=data)
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    return Result(name, float(metrics["test_acc"]), time.perf_counter() - start, epochs, recipe.goal)


def to_markdown(results: list[Result]) -> str:
    lines = [
        "# Zoo models on the bundled digits (CPU)",
        "",
        f"`python benchmarks/zoo_digits.py` on {platform.machine()} with {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, {os.cpu_count()} CPU cores (1-minute load average {os.getloadavg()[0]:.1f} at the "
        "end: other jobs may share the cores). Test split: 359 images; seed 0; wall time includes data setup and "
        "testing.",
        "",
        "| model | input | epochs | test accuracy | goal | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        kind = "rows as 8 time steps" if RECIPES[r.name].as_sequence else "8x8 images"
        status = "met" if r.test_acc >= r.goal else "MISSED"
        lines.append(
            f"| `{r.name}` | {kind} | {r.epochs} | {100 * r.test_acc:.1f} % | >= {100 * r.goal:.0f} % ({status}) | "
            f"{r.seconds:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 1 is as fast for these tiny models and immune to oversubscription on a shared machine",
    )
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "zoo_digits.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for name in args.models:
        result = train_on_digits(name, seed=args.seed)
        print(f"{name}: test accuracy {100 * result.test_acc:.2f} % in {result.seconds:.1f} s", flush=True)
        results.append(result)
    if sorted(args.models) == sorted(RECIPES):
        args.output.write_text(to_markdown(results))
        print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
