"""Speed of Monte-Carlo dropout, every method side by side in one run: ours, the naive loop, one eval pass, peers.

    python benchmarks/mc_dropout.py [--n-samples 30] [--batch 256] [--repeats 3] [--peers-path /work/peers] \
        [--out benchmarks/results/mc_dropout.md]

Rows: torchvision `resnet18` with `Dropout(0.5)` before `fc` (no `forward_features`: the torch.fx prefix), zoo
`cnn_small` (head dropout: `forward_features` once), zoo `transformer` (dropout in every block: nothing to run
once). Columns, all on deep copies of the same weights, one torch thread, under `torch.inference_mode()`:

- one eval pass (`model(x)`);
- the naive loop: `mc_dropout_predict(method="naive", masks="torch")`, n forward passes with torch's dropout;
- ours: `mc_dropout_predict` with its defaults (`method="auto"`, `masks="auto"`: threshold masks on the CPU), and
  ours with torch's masks (`masks="torch"`), to show what the masks alone change;
- peers, when importable (installed, or found under `--peers-path`; else the column says so):
  torch-uncertainty's `mc_dropout(model, num_estimators, on_batch=False)` (its loop), and baal's
  `MCCachingModule(MCDropoutModule(model))` sampled by `ModelWrapper.predict_on_batch` (its loop, with the outputs
  of `Linear`/`Conv2d` layers whose input did not change cached between samples).

Each timing is the median of `--repeats` interleaved repetitions (so that load on the machine hits all alike),
after one warm-up. The table gives milliseconds and the ratio to one eval pass.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

import zoo
from lightning_reg import functional as LF

Run = Callable[[int, Tensor], Tensor]  # (n_samples, batch) -> output


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _resnet18_head_dropout() -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(num_classes=10)
    model.fc = nn.Sequential(nn.Dropout(0.5), model.fc)  # no forward_features: the traced prefix runs once
    return model


def _torch_uncertainty(model: nn.Module) -> Run | str:
    try:
        from torch_uncertainty.methods.mc_dropout import mc_dropout
    except ImportError as error:
        return f"not importable ({error.name})"
    copied = copy.deepcopy(model)

    def run(n: int, inputs: Tensor) -> Tensor:
        wrapped = mc_dropout(copied, num_estimators=n, on_batch=False).eval()  # a wrapper: nothing is copied
        return wrapped(inputs).view(n, inputs.shape[0], -1).softmax(-1)

    return run


def _baal(model: nn.Module) -> Run | str:
    try:
        from baal.bayesian.caching_utils import MCCachingModule
        from baal.bayesian.dropout import MCDropoutModule
        from baal.modelwrapper import ModelWrapper, TrainingArgs
    except ImportError as error:
        return f"not importable ({error.name})"
    wrapped = MCCachingModule(MCDropoutModule(copy.deepcopy(model))).eval()
    args = TrainingArgs(criterion=nn.CrossEntropyLoss(), replicate_in_memory=False, use_cuda=False)
    wrapper = ModelWrapper(wrapped, args)
    # predict_on_batch gives (N, K, n): the probabilities of each sample, as the other columns compute them
    return lambda n, inputs: wrapper.predict_on_batch(inputs, iterations=n).softmax(1)


def _bench(model: nn.Module, batches: list[Tensor], n: int) -> tuple[dict[str, float | str], str, list[float]]:
    """Median times over ``batches[1:]`` (a new batch each repetition: baal's cache compares inputs by value).

    Also returns ours / one eval pass of each repetition (the two measured back to back on the same batch).
    """
    runs: dict[str, Run | str] = {
        "eval": lambda _, x: model(x),
        "naive": lambda k, x: LF.mc_dropout_predict(model, x, k, method="naive", masks="torch").probs,
        "ours": lambda k, x: LF.mc_dropout_predict(model, x, k).probs,
        "ours_torch_masks": lambda k, x: LF.mc_dropout_predict(model, x, k, masks="torch").probs,
        "torch-uncertainty": _torch_uncertainty(model),
        "baal": _baal(model),
    }
    times: dict[str, list[float]] = {name: [] for name, run in runs.items() if not isinstance(run, str)}
    result: dict[str, float | str] = {name: run for name, run in runs.items() if isinstance(run, str)}
    with torch.inference_mode():
        for name in list(times):  # warm-up with 2 samples; a peer that fails on this model says why in its cell
            try:
                runs[name](2, batches[0])  # type: ignore[operator]
            except Exception as error:
                result[name] = f"fails: {type(error).__name__}: {str(error).splitlines()[0][:80]}"
                del times[name]
        for inputs in batches[1:]:
            for name in times:
                start = time.perf_counter()
                runs[name](n, inputs)  # type: ignore[operator]
                times[name].append(time.perf_counter() - start)
        path = LF.mc_dropout_predict(model, batches[0], 2).method
    result.update({name: statistics.median(values) for name, values in times.items()})
    paired = [ours / eval_ for ours, eval_ in zip(times["ours"], times["eval"], strict=True)]
    return result, path, paired


_COLUMNS = ("naive", "ours", "ours_torch_masks", "torch-uncertainty", "baal")


def _cell(value: float | str, eval_time: float) -> str:
    if isinstance(value, str):
        return value
    return f"{1e3 * value:.0f} ms, **{value / eval_time:.2f}x**"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=30)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peers-path", default=None, help="a folder with torch-uncertainty and baal (pip --target)")
    parser.add_argument("--out", default="benchmarks/results/mc_dropout.md")
    parser.add_argument("--note", default="", help="what else ran on the machine, e.g. ', one core busy'")
    parser.add_argument(
        "--models", nargs="+", default=None, help="only the rows whose label contains one of these, e.g. cnn_small"
    )
    args = parser.parse_args()
    if args.peers_path is not None:
        sys.path.append(args.peers_path)  # appended: the peers never shadow our torch or lightning
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    torch.manual_seed(0)
    cases = {
        "torchvision `resnet18` + `Dropout(0.5)` before `fc`": (_resnet18_head_dropout(), (3, 32, 32)),
        "zoo `cnn_small` (head dropout)": (zoo.create("cnn_small", num_classes=10), (1, 8, 8)),
        "zoo `transformer` (dropout in every block)": (zoo.create("transformer", num_classes=10), (8, 8)),
    }
    if args.models is not None:
        cases = {label: case for label, case in cases.items() if any(name in label for name in args.models)}
        if not cases:
            raise SystemExit(f"No row matches --models {args.models}; the rows are resnet18, cnn_small, transformer.")
    rows, checks = [], []
    for label, (model, shape) in cases.items():
        model = model.eval()
        batches = [torch.randn(args.batch, *shape) for _ in range(args.repeats + 1)]  # warm-up, then one per repeat
        r, path, paired = _bench(model, batches, args.n_samples)
        eval_time = r["eval"]
        assert isinstance(eval_time, float)
        cells = " | ".join(_cell(r[name], eval_time) for name in _COLUMNS)
        rows.append(f"| {label} | {path} | {1e3 * eval_time:.1f} ms | {cells} |")
        print(rows[-1], flush=True)
        ours, naive = r["ours"], r["naive"]
        peers = [v for k, v in r.items() if k in ("torch-uncertainty", "baal") and isinstance(v, float)]
        if isinstance(ours, float) and isinstance(naive, float):
            best = f"{ours / min(peers):.2f}x the best peer" if peers else "no peer measured"
            spread = f"{min(paired):.2f}-{max(paired):.2f}x"
            checks.append(f"- {label}: ours {ours / eval_time:.2f}x one eval pass (each repetition: {spread}), "
                          f"{ours / naive:.2f}x the naive loop, {best}.")  # fmt: skip
    load_after = os.getloadavg()
    versions = []
    for name in ("torch-uncertainty", "baal"):
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} not installed")
    text = "\n".join(
        [
            "# Monte-Carlo dropout: speed",
            "",
            f"`benchmarks/mc_dropout.py`, one run: {_cpu_name()}, {torch.get_num_threads()} torch thread, torch "
            f"{torch.__version__}, {', '.join(versions)}; n_samples={args.n_samples}, batch {args.batch}, median of "
            f"{args.repeats} interleaved repetitions under `torch.inference_mode()`, same weights in every column. "
            f"Load average (1, 5, 15 min) {tuple(round(v, 1) for v in load_before)} before, "
            f"{tuple(round(v, 1) for v in load_after)} after, on a {os.cpu_count()}-core machine{args.note}: read the "
            "ratios (each column measured interleaved with the others), not the milliseconds.",
            "",
            "| model | our path | one eval pass | naive loop | ours | ours, torch's masks | torch-uncertainty "
            "(loop) | baal + `MCCachingModule` |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "Ratios are to one eval pass. Ours: `mc_dropout_predict` defaults (`masks='auto'`: threshold masks on the "
            "CPU); `cached`: the deterministic prefix runs once and the rest is sampled, at least N rows and up to "
            "2^17 feature elements per pass; `batched`: nothing to run once, one sample per pass from batch 256 on.",
            "",
            "Goals (issue 19): resnet18 and cnn_small <= 1.5x one eval pass, transformer <= 0.8x the naive loop, never "
            "slower than the best peer.",
            "",
            *checks,
            "",
        ]
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
