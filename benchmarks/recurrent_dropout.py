"""Speed of VariationalLSTM/GRU (Keras's dropout + recurrent_dropout) against fused nn.LSTM/nn.GRU, in one run.

    .venv/bin/python benchmarks/recurrent_dropout.py [--batch 64] [--steps 64] [--hidden 128] [--threads 1] \
        [--out benchmarks/results/recurrent_dropout.md]

For the LSTM and the GRU (input size = hidden size, batch first, training mode) the timings of (a) torch's fused
kernel without dropout, (b) ours with ``dropout=0.2, recurrent_dropout=0.2`` (masks drawn, the input projection
fused over all steps, the step loop in eager Python) and (c) the naive floor a user writes first, an
``nn.LSTMCell``/``nn.GRUCell`` called step by step with the two masks, are interleaved over several
repetitions: forward only (under ``no_grad``) and forward + backward. The table gives medians and the ratios
(goal: (b) / (a) <= 3x). ``--compile`` also times ``torch.compile`` of our module (compile time reported).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_reg.nn import VariationalGRU, VariationalLSTM

RATE = 0.2


class NaiveCellLoop(nn.Module):
    """The eager floor: a cell called at every step, one mask per sequence on the inputs and on the state."""

    def __init__(self, cell: str, size: int, hidden: int) -> None:
        super().__init__()
        self.kind = cell
        self.cell = nn.LSTMCell(size, hidden) if cell == "lstm" else nn.GRUCell(size, hidden)
        self.hidden = hidden

    def forward(self, x: Tensor) -> Tensor:
        n, steps, size = x.shape
        keep = 1.0 - RATE
        m_x = torch.empty(n, size).bernoulli_(keep) / keep
        m_h = torch.empty(n, self.hidden).bernoulli_(keep) / keep
        h = x.new_zeros(n, self.hidden)
        c = x.new_zeros(n, self.hidden)
        outs = []
        for t in range(steps):
            if self.kind == "lstm":
                h, c = self.cell(x[:, t] * m_x, (h * m_h, c))
            else:  # (the masked state also enters GRUCell's update: a floor for speed, not Keras's exact math)
                h = self.cell(x[:, t] * m_x, h * m_h)
            outs.append(h)
        return torch.stack(outs, dim=1)


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _runs(modules: dict[str, nn.Module], x: Tensor) -> dict[str, dict[str, Callable[[], object]]]:
    def forward(module: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return module(x)

        return run

    def train_step(module: nn.Module) -> Callable[[], object]:
        def run() -> object:
            out = module(x)
            out = out[0] if isinstance(out, tuple) else out
            out.square().mean().backward()
            return None

        return run

    return {
        "forward": {name: forward(m) for name, m in modules.items()},
        "forward + backward": {name: train_step(m) for name, m in modules.items()},
    }


def _bench(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():  # warm-up
        fn()
        fn()
    for _ in range(repeats):
        for name, fn in runs.items():  # interleaved, so that load on the machine hits all alike
            times[name].append(_time(fn))
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of our module")
    parser.add_argument("--out", default="benchmarks/results/recurrent_dropout.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size = args.hidden
    x = torch.randn(args.batch, args.steps, size)
    rows = []
    compile_notes = []
    for cell, fused_class, ours_class in (("lstm", nn.LSTM, VariationalLSTM), ("gru", nn.GRU, VariationalGRU)):
        fused = fused_class(size, args.hidden, batch_first=True)
        ours = ours_class(size, args.hidden, batch_first=True, dropout=RATE, recurrent_dropout=RATE)
        ours.load_state_dict(fused.state_dict())
        modules: dict[str, nn.Module] = {"fused": fused, "ours": ours, "naive": NaiveCellLoop(cell, size, args.hidden)}
        if args.compile:
            compiled = torch.compile(ours)
            start = time.perf_counter()
            compiled(x)[0].sum().backward()
            compile_notes.append(
                f"{cell}: first call of `torch.compile(ours)` (forward + backward) took "
                f"{time.perf_counter() - start:.0f} s"
            )
            modules["compiled"] = compiled
        for mode, runs in _runs(modules, x).items():
            r = _bench(runs, args.repeats)
            rows.append((cell, mode, r))
            print(cell, mode, {k: f"{v:.1f} ms" for k, v in r.items()}, f"ours/fused {r['ours'] / r['fused']:.2f}x")

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = ["model", "pass", "fused, no dropout (ms)", "ours (ms)", "naive cell loop (ms)"]
    header += ["compiled (ms)"] if args.compile else []
    header += ["ours / fused", "naive / fused"]
    lines = [
        "# Recurrent dropout: speed",
        "",
        f"`benchmarks/recurrent_dropout.py`, one run: cpu ({platform.machine()}, {torch.get_num_threads()} torch "
        f"threads), torch {torch.__version__}, batch {args.batch}, {args.steps} steps, input and hidden "
        f"{args.hidden}, training mode, dropout = recurrent_dropout = {RATE}, median of {args.repeats} interleaved "
        f"repetitions; load average {load:.1f} at the end of the run.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for cell, mode, r in rows:
        cells = [f"`{cell}`", mode, f"{r['fused']:.1f}", f"{r['ours']:.1f}", f"{r['naive']:.1f}"]
        cells += [f"{r['compiled']:.1f}"] if args.compile else []
        cells += [f"{r['ours'] / r['fused']:.2f}x", f"{r['naive'] / r['fused']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Goal: ours <= 3x the fused kernel."] + [f"- {note}" for note in compile_notes]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        previous = out.read_text() if out.exists() else ""
        reading = previous[previous.index("\n## Reading") :] if "\n## Reading" in previous else ""
        out.write_text(text + reading)


if __name__ == "__main__":
    main()
