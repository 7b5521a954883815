"""Every zoo family on every regime of the demo over three seeds: writes ``benchmarks/results/regimes.md``.

    python benchmarks/regimes.py                            # the full benchmark (lightning-reg demo --full)
    python benchmarks/regimes.py --models cnn_small lstm    # a subset (same seeds)
    python benchmarks/regimes.py --seeds 0 1 --epochs 10    # a reduced run: say so when quoting it

The measurements are :func:`lightning_reg.demo.demo`'s (clean, 40 % noisy labels, digits-C with and without AdaBN,
temperature scaling, MC dropout against the deterministic model for errors and held-out digits); this script adds
the machine, the load and the wall time, and keeps the CSV and the figures beside the table.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import lightning
import torch

from lightning_reg.demo import FULL_MODELS, FULL_SEEDS, DemoResult, Measurement, _markdown_report, demo, shift_figure

RESULTS = Path(__file__).parent / "results"
# what `regularizers` gives each model (the CSV does not keep it)
_RECIPE_TEXT = {
    "cnn_small": "MixUpCutMix + LabelSmoothing + BNRecalibration",
    "cnn": "MixUpCutMix + LabelSmoothing + BNRecalibration",
    "resnet18": "MixUpCutMix + LabelSmoothing + BNRecalibration",
    "mlp": "MixUpCutMix + LabelSmoothing + BNRecalibration",
    "lstm": "MixUp + LabelSmoothing",
    "gru": "MixUp + LabelSmoothing",
    "transformer": "MixUp + LabelSmoothing",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(FULL_MODELS), choices=list(FULL_MODELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(FULL_SEEDS))
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every model (default: each model's)")
    parser.add_argument("--out", type=Path, default=RESULTS / "regimes", help="folder of the CSV and the figures")
    parser.add_argument("--table", type=Path, default=RESULTS / "regimes.md")
    parser.add_argument(
        "--from-csv",
        nargs="+",
        type=Path,
        help="train nothing: rebuild the table and the figures from these runs' demo.csv files (runs split over "
        "processes), with --wall-minutes and --load as measured",
    )
    parser.add_argument("--wall-minutes", type=float, default=None, help="with --from-csv: the runs' wall time")
    parser.add_argument("--load", nargs=2, type=float, default=None, help="with --from-csv: load average at start, end")
    parser.add_argument("--note", default="", help="with --from-csv: how the runs differ (epochs, commits, loads)")
    args = parser.parse_args()

    from lightning_reg.plotting import save_figure

    if args.from_csv:
        measurements = [m for path in args.from_csv for m in _read_csv(path)]
        combined = DemoResult(measurements, {}, tuple(args.seeds), args.out.resolve())
        combined.recipes = {name: _RECIPE_TEXT[name] for name in combined.models()}
        combined.seconds = 60 * (args.wall_minutes or 0.0)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "demo.csv").write_text(combined.to_csv())
        save_figure(shift_figure(combined), args.out / "shift.png")
        save_figure(shift_figure(combined, per_corruption=True), args.out / "shift_per_corruption.png")
        load = tuple(args.load) if args.load else (math.nan, math.nan)
        _write_table(args, combined, combined.models(), (load[0],), end_load=load[1])
        return

    load_before = os.getloadavg()
    start = time.perf_counter()
    combined = DemoResult([], {}, tuple(args.seeds), args.out.resolve())
    done: list[str] = []
    # One model at a time, the table rewritten after each: a run stopped early keeps what it finished.
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            result = demo([name], epochs=args.epochs, out=tmp, seed=args.seeds, full=True, verbose=True)
        combined.measurements += result.measurements
        combined.recipes.update(result.recipes)
        done.append(name)
        combined.seconds = time.perf_counter() - start
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "demo.csv").write_text(combined.to_csv())
        save_figure(shift_figure(combined), args.out / "shift.png")
        save_figure(shift_figure(combined, per_corruption=True), args.out / "shift_per_corruption.png")
        _write_table(args, combined, done, load_before)
        print(f"{name} done; {len(done)}/{len(args.models)} models in {combined.seconds / 60:.1f} min", flush=True)


def _read_csv(path: Path) -> list[Measurement]:
    with open(path, newline="") as f:
        return [
            Measurement(r["model"], r["recipe"], int(r["seed"]), r["metric"], float(r["value"]))
            for r in csv.DictReader(f)
        ]


def _write_table(
    args: argparse.Namespace, result: DemoResult, done: list[str], load_before: tuple, end_load: float | None = None
) -> None:
    load_now = os.getloadavg() if end_load is None else (end_load,)
    epochs = (
        "each model's default (30 for images, 15 for resnet18, 40 for sequences)"
        if args.epochs is None
        else str(args.epochs)
    )
    reduced = set(done) != set(FULL_MODELS) or args.seeds != list(FULL_SEEDS) or args.epochs is not None
    report = _markdown_report(result).replace("# lightning-reg demo", "# Regimes benchmark", 1)
    title, _, body = report.partition("\n\n")
    header = (
        f"`python benchmarks/regimes.py`{' (**reduced run**)' if reduced else ''}: models {', '.join(done)}; "
        f"seeds {', '.join(map(str, args.seeds))}; epochs: {epochs}.\n\n"
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs (1-minute load average "
        f"{load_before[0]:.1f} at the start, {load_now[0]:.1f} at the last update), torch {torch.__version__}, "
        f"lightning {lightning.__version__}, one torch thread. **Wall time: {result.seconds / 60:.1f} minutes** "
        f"for the models above.{' ' + args.note if args.note else ''}\n\n"
        f"Figures: [`shift.png`]({args.out.name}/shift.png) (mean over the corruptions), "
        f"[`shift_per_corruption.png`]({args.out.name}/shift_per_corruption.png); every measurement: "
        f"[`demo.csv`]({args.out.name}/demo.csv).\n\n"
    )
    args.table.write_text(f"{title}\n\n{header}{body}")


if __name__ == "__main__":
    main()
