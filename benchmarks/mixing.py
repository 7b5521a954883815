"""Time per batch of MixUp and CutMix: ours (as the callbacks run them) vs timm, torchvision and the floor.

Run: `python benchmarks/mixing.py` (CPU, one torch thread). Writes benchmarks/results/mixing.md.
The floor is one blend of two tensors, `torch.lerp` into a preallocated buffer: what any MixUp must at least do.
"Ours" is the callback's `on_train_batch_start` on a fresh `[inputs, targets]` list, as in training: it draws the
parameters, mixes the inputs and builds (N, K) soft targets; the peers build their soft targets too.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import timm.data
import torch
from torchvision.transforms import v2

from lightning_reg import CutMix, MixUp, MixUpCutMix

NUM_CLASSES = 1000
SHAPES = [(256, 3, 32, 32), (64, 3, 224, 224)]
NOTES = """## What the rows measure

- *ours* rows are the callback's `on_train_batch_start` on a fresh `[inputs, targets]` list, as in training: it
  draws lambda and the pairing, builds dense (N, 1000) soft targets and mixes the inputs. The floor only blends
  two tensors; timm and torchvision build their soft targets too.
- Default pairing `"shift"`: sample i is paired with sample (i + k) % N for a random k in 1..N-1, applied as one
  `torch.lerp` pass over two contiguous runs of the batch (no gather). Like timm's flip and torchvision's roll(1)
  it relies on shuffled batches; `pairing="permutation"` (a uniformly random permutation, one gather more) is
  measured alongside. Both give bit-identical results for the same pairing.
- The callbacks write mixed inputs and targets into tensors they own and reuse only when nothing else holds the
  previous ones (torch's storage use count), so the steady state allocates nothing, without in-place changes
  to the user's batch. `inplace=True` (opt-in) now saves memory, not time.
- `CutMix per_sample` draws a box per sample; the peers draw one box per batch, so that row is context only.
- `MixUpCutMix mode=elem` chooses MixUp or CutMix, lambda and the box per sample (timm's `mode="elem"`, a Python
  loop over the samples there; one blend and one masked paste over the batch here).
- All draws are made on the CPU generator; per-sample draws reach a CUDA device through pinned memory with
  `non_blocking=True`, and no batch reads a device value back (tested on the meta device).
- The machine is shared: each run varies by several percent; a ratio within about 0.05 of its goal can land on
  either side of it in another run.
"""


class _Module(L.LightningModule):
    num_classes = NUM_CLASSES


def _time_round_robin(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best (min) time in ms of each function, calls interleaved so that load from other jobs hits all alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * min(ts) for name, ts in times.items()}


def _callback_runner(cb: L.Callback, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    module = _Module()
    cb.setup(trainer, module, "fit")

    def run() -> object:
        batch = [x, y]
        cb.on_train_batch_start(trainer, module, batch, 0)
        return batch

    return run


def bench(shape: tuple[int, ...], repeats: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    y = torch.randint(0, NUM_CLASSES, (shape[0],), generator=g)
    other, buf = torch.randn(shape, generator=g), torch.empty(shape)
    tv_mixup, tv_cutmix = v2.MixUp(alpha=0.2, num_classes=NUM_CLASSES), v2.CutMix(alpha=1.0, num_classes=NUM_CLASSES)
    timm_mixup = timm.data.Mixup(mixup_alpha=0.2, cutmix_alpha=0.0, mode="batch", num_classes=NUM_CLASSES)
    timm_cutmix = timm.data.Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, mode="batch", num_classes=NUM_CLASSES)
    timm_elem = timm.data.Mixup(mixup_alpha=0.2, cutmix_alpha=1.0, mode="elem", num_classes=NUM_CLASSES)
    x_timm = x.clone()  # timm mixes in place: give it its own tensor
    fns = {
        "floor (lerp into a buffer)": lambda: torch.lerp(x, other, 0.3, out=buf),
        "ours MixUp": _callback_runner(MixUp(0.2), x, y),
        "ours MixUp pairing=permutation": _callback_runner(MixUp(0.2, pairing="permutation"), x, y),
        "ours MixUp inplace=True": _callback_runner(MixUp(0.2, inplace=True), x.clone(), y),
        "ours MixUp per_sample": _callback_runner(MixUp(0.2, per_sample=True), x, y),
        "timm Mixup (batch, mixup)": lambda: timm_mixup(x_timm, y),
        "torchvision MixUp": lambda: tv_mixup(x, y),
        "ours CutMix": _callback_runner(CutMix(1.0), x, y),
        "ours CutMix pairing=permutation": _callback_runner(CutMix(1.0, pairing="permutation"), x, y),
        "ours CutMix inplace=True": _callback_runner(CutMix(1.0, inplace=True), x.clone(), y),
        "ours CutMix per_sample": _callback_runner(CutMix(1.0, per_sample=True), x, y),
        "timm Mixup (batch, cutmix)": lambda: timm_cutmix(x_timm, y),
        "torchvision CutMix": lambda: tv_cutmix(x, y),
        "ours MixUpCutMix mode=elem": _callback_runner(MixUpCutMix(0.2, 1.0, mode="elem"), x, y),
        "timm Mixup (elem, mixup+cutmix)": lambda: timm_elem(x_timm, y),
    }
    return _time_round_robin(fns, repeats)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# MixUp / CutMix time per batch (CPU)",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} thread, {platform.processor() or platform.machine()}; "
        f"{NUM_CLASSES} classes; best of interleaved repeated calls; load average {load:.2f} at the start on "
        f"{os.cpu_count()} cores shared with other jobs, so absolute times are noisy: compare rows of one table.",
        "",
    ]
    for shape, repeats in zip(SHAPES, (400, 40), strict=True):
        t = bench(shape, repeats)
        floor = t["floor (lerp into a buffer)"]
        mix_peer = min(t["timm Mixup (batch, mixup)"], t["torchvision MixUp"])
        cut_peer = min(t["timm Mixup (batch, cutmix)"], t["torchvision CutMix"])
        lines += [
            f"## batch {'x'.join(map(str, shape))} float32",
            "",
            "| method | ms / batch | vs floor | vs faster peer |",
        ]
        lines.append("|---|---:|---:|---:|")
        for name, ms in t.items():
            peer = cut_peer if "ut" in name.split()[1] or "cutmix" in name else mix_peer
            lines.append(f"| {name} | {ms:.2f} | {ms / floor:.2f}x | {ms / peer:.2f}x |")
        goals = [  # (what, ratio, goal or None for context)
            ("ours MixUp / faster peer", t["ours MixUp"] / mix_peer, 1.0),
            ("ours MixUp / floor", t["ours MixUp"] / floor, 1.5),
            ("ours CutMix / faster peer", t["ours CutMix"] / cut_peer, 1.0),
            ("ours MixUp pairing=permutation / faster peer", t["ours MixUp pairing=permutation"] / mix_peer, None),
            ("ours MixUp pairing=permutation / floor", t["ours MixUp pairing=permutation"] / floor, None),
            ("ours CutMix pairing=permutation / faster peer", t["ours CutMix pairing=permutation"] / cut_peer, None),
            ("ours CutMix per_sample / faster peer (one box per batch)", t["ours CutMix per_sample"] / cut_peer, None),
            (
                "ours MixUpCutMix mode=elem / timm elem",
                t["ours MixUpCutMix mode=elem"] / t["timm Mixup (elem, mixup+cutmix)"],
                None,
            ),
        ]
        lines += ["", "| ratio | measured | goal | met |", "|---|---:|---:|---|"]
        for name, ratio, goal in goals:
            verdict = "-" if goal is None else ("yes" if ratio <= goal else "**no**")
            lines.append(f"| {name} | {ratio:.2f}x | {'-' if goal is None else f'<= {goal}x'} | {verdict} |")
        lines.append("")
        print("\n".join(lines[-len(t) - len(goals) - 8 :]))
    out = Path(__file__).parent / "results" / "mixing.md"
    # Keep the hand-written history (sections from the first "## Before and after" on) below the fresh tables.
    old = out.read_text() if out.exists() else ""
    history = old[old.index("## Before and after") :] if "## Before and after" in old else ""
    out.write_text("\n".join([*lines, NOTES]) + ("\n" + history if history else ""))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
