"""Time per batch of MixUp and CutMix: ours (as the callbacks run them) vs timm, torchvision and the floor.

Run: `python benchmarks/mixing.py` (CPU). Writes benchmarks/results/mixing.md.
The floor is one blend of two tensors, `torch.lerp` into a preallocated buffer: what any MixUp must at least do.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import timm.data
import torch
from torchvision.transforms import v2

from lightning_reg import CutMix, MixUp

NUM_CLASSES = 1000
SHAPES = [(256, 3, 32, 32), (64, 3, 224, 224)]


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
    x_timm = x.clone()  # timm mixes in place: give it its own tensor
    fns = {
        "floor (lerp into a buffer)": lambda: torch.lerp(x, other, 0.3, out=buf),
        "ours MixUp": _callback_runner(MixUp(0.2), x, y),
        "ours MixUp inplace=True": _callback_runner(MixUp(0.2, inplace=True), x.clone(), y),
        "ours MixUp per_sample": _callback_runner(MixUp(0.2, per_sample=True), x, y),
        "timm Mixup (batch, mixup)": lambda: timm_mixup(x_timm, y),
        "torchvision MixUp": lambda: tv_mixup(x, y),
        "ours CutMix": _callback_runner(CutMix(1.0), x, y),
        "ours CutMix inplace=True": _callback_runner(CutMix(1.0, inplace=True), x.clone(), y),
        "ours CutMix per_sample": _callback_runner(CutMix(1.0, per_sample=True), x, y),
        "timm Mixup (batch, cutmix)": lambda: timm_cutmix(x_timm, y),
        "torchvision CutMix": lambda: tv_cutmix(x, y),
    }
    return _time_round_robin(fns, repeats)


def main() -> None:
    torch.manual_seed(0)
    lines = [
        "# MixUp / CutMix time per batch (CPU)",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
        f"{NUM_CLASSES} classes; best of interleaved repeated calls. The machine's 2 cores were shared with "
        "other jobs, so absolute times are noisy; compare rows of one table.",
        "",
    ]
    for shape, repeats in zip(SHAPES, (60, 15), strict=True):
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
        goals = [
            ("MixUp / faster peer (goal <= 1.0)", t["ours MixUp"] / mix_peer),
            ("MixUp / floor (goal <= 1.5)", t["ours MixUp"] / floor),
            ("MixUp inplace / floor", t["ours MixUp inplace=True"] / floor),
            ("CutMix / faster peer (goal <= 1.0)", t["ours CutMix"] / cut_peer),
            ("CutMix per_sample / faster peer (per-batch box)", t["ours CutMix per_sample"] / cut_peer),
        ]
        lines += ["", "Goals: " + "; ".join(f"{name}: {ratio:.2f}x" for name, ratio in goals), ""]
        print("\n".join(lines[-len(t) - 4 :]))
    out = Path(__file__).parent / "results" / "mixing.md"
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
