"""One-shot GPU check: device and precision correctness of every piece, in sections with their own time bounds.

    python benchmarks/gpu_check.py                      # every section on cuda:0, about 10 minutes at most
    python benchmarks/gpu_check.py --sections parity,mc_dropout
    python benchmarks/gpu_check.py --device cpu --quick # the CPU-runnable form the tests run

Each section runs in a fresh subprocess under its own time limit (``BOUNDS``), so a crash, a hang or a failed
check in one section does not hide the others. A section is a list of named checks; a check that raises is
recorded as failed with its exception line and the section goes on. The results go to
``benchmarks/results/gpu_check.json`` (every check, its numbers, pass/fail) and a summary table to
``benchmarks/results/gpu_check.md``.

Sections (the device issue's list):

- ``parity``: CPU vs device with the same generator: MixUp (batch and per-sample lambda), CutMix (a box, a box per
  sample), one-hot with smoothing, locked dropout and weight drop; fp32, fp16, bf16 and uint8 inputs.
- ``recalibrate_bn``: :func:`~lightning_reg.functional.recalibrate_bn` against a float64 reference (hook-captured
  inputs of every BN layer, concatenated), in fp32, under autocast, in bf16-true and with channels_last.
- ``mc_dropout``: every dropout kind (encoder-layer fast path, cuDNN LSTM between-layer dropout, timm fused
  attention, ``WeightDrop``): spread > 0, BN statistics unchanged, global CPU and device RNG untouched, and the
  cached and batched paths equal to the naive loop for the same generator.
- ``trainer``: callback stacks x {cnn_small, lstm, transformer, timm resnet18 with frozen BN} x {32, 16-mixed,
  bf16-mixed, bf16-true} through fit, validate, test and predict with numeric checks.
- ``resume``: fit 2 epochs straight vs 1 epoch + resume from the checkpoint on the device, bit-identical.
- ``demo``: ``lightning-reg demo`` on the device.
- ``ddp_gloo``: two processes sharing the device over gloo: union BN statistics, MC metric reduction, per-rank draws.
- ``speed``: step time and host syncs per callback (``torch.cuda.set_sync_debug_mode``) at 256x3x224x224, bf16.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "gpu_check.md"
ROOT = Path(__file__).parent.parent
DDP_ENV_VARS = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "GROUP_RANK")
NO_GPU = "No CUDA GPU found: nothing to check. Run this on a machine with GPUs (`nvidia-smi` lists them)."
# Seconds per section on one GPU; their sum stays under 10 minutes.
BOUNDS = {
    "parity": 45,
    "recalibrate_bn": 45,
    "mc_dropout": 60,
    "trainer": 150,
    "resume": 45,
    "demo": 110,
    "ddp_gloo": 60,
    "speed": 80,
}
SECTIONS = tuple(BOUNDS)
# The CPU-runnable sections, and what `--quick` keeps of them (the tests run these).
CPU_SECTIONS = ("parity", "recalibrate_bn", "mc_dropout", "trainer", "resume", "ddp_gloo")
CALLBACKS = [
    "MixUp",
    "CutMix",
    "MixUpCutMix",
    "LabelSmoothing",
    "BNRecalibration",
    "BNStatsMonitor",
    "MCDropoutEvaluation",
]


class SectionSkippedError(Exception):
    """A section that cannot run on this device: reported as skipped, with the reason."""


# --- recording checks ------------------------------------------------------------------------------------
@dataclass
class Check:
    name: str
    ok: bool
    values: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Context:
    device: str
    quick: bool
    checks: list[Check] = field(default_factory=list)

    @contextlib.contextmanager
    def check(self, name: str) -> Iterator[dict[str, Any]]:
        """Record one named check: the body fills ``values`` and sets ``values["ok"]``; an exception fails it."""
        values: dict[str, Any] = {}
        try:
            yield values
        except Exception as error:  # a failed check is recorded, the section goes on
            self.checks.append(Check(name, False, _jsonable(values), error_line(traceback.format_exc()) or repr(error)))
            return
        ok = bool(values.pop("ok", True))
        self.checks.append(Check(name, ok, _jsonable(values)))


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if hasattr(value, "item") and getattr(value, "numel", lambda: 2)() == 1:
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)
        out[key] = value if isinstance(value, int | float | str | bool | type(None) | list) else repr(value)
    return out


def error_line(stderr: str) -> str:
    """The exception line of a traceback (``SomeError: message``), else the last line."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.split(":", 1)[0].split(".")[-1].endswith(("Error", "Exception"))]
    return (errors or lines or ["no output"])[-1].replace("|", "/")


def _max_abs(a: Any, b: Any) -> float:
    return float((a.double().cpu() - b.double().cpu()).abs().max()) if a.numel() else 0.0


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


# --- parity ----------------------------------------------------------------------------------------------
def section_parity(ctx: Context) -> None:
    import torch

    import lightning_reg.functional as LF

    dev = ctx.device
    tolerance = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.uint8: 0.0}
    n, k = 16, 10
    base = torch.Generator().manual_seed(0)
    labels = torch.randint(0, k, (n,), generator=base)
    for dtype, tol in tolerance.items():
        name = str(dtype).removeprefix("torch.")
        if dtype == torch.uint8:
            x = torch.randint(0, 256, (n, 3, 8, 8), generator=base, dtype=torch.uint8)
        else:
            x = torch.randn(n, 3, 8, 8, generator=base).to(dtype)
        targets = LF.one_hot(labels, k)
        for per_sample in (False, True):
            suffix = "per_sample" if per_sample else "batch"
            if dtype.is_floating_point:
                with ctx.check(f"mixup/{name}/{suffix}") as v:
                    params = LF.sample_mixup(n, 0.4, per_sample=per_sample, generator=torch.Generator().manual_seed(1))
                    cpu_x, cpu_y = LF.mixup(x, targets, params.lam, params.index)
                    lam = params.lam.to(dev) if isinstance(params.lam, torch.Tensor) else params.lam
                    dev_x, dev_y = LF.mixup(x.to(dev), targets.to(dev), lam, params.index.to(dev))
                    v["max_abs_inputs"] = _max_abs(cpu_x, dev_x)
                    v["max_abs_targets"] = _max_abs(cpu_y, dev_y)
                    v["ok"] = v["max_abs_inputs"] <= tol * 4 and v["max_abs_targets"] <= 1e-6
            with ctx.check(f"cutmix/{name}/{suffix}") as v:
                g = torch.Generator().manual_seed(2)
                params = LF.sample_mixup(n, 1.0, per_sample=per_sample, generator=g)
                box = LF.sample_box(params.lam, (8, 8), generator=g)
                cpu_x, cpu_y, _ = LF.cutmix(x, targets, box, params.index)
                dev_box = type(box)(*(t.to(dev) for t in box))
                dev_x, dev_y, _ = LF.cutmix(x.to(dev), targets.to(dev), dev_box, params.index.to(dev))
                v["max_abs_inputs"] = _max_abs(cpu_x, dev_x)
                v["max_abs_targets"] = _max_abs(cpu_y, dev_y)
                v["ok"] = v["max_abs_inputs"] == 0.0 and v["max_abs_targets"] <= 1e-6
    with ctx.check("one_hot/smoothing") as v:
        v["max_abs"] = _max_abs(LF.one_hot(labels, k, 0.1), LF.one_hot(labels.to(dev), k, 0.1))
        v["ok"] = v["max_abs"] == 0.0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        with ctx.check(f"locked_dropout/{name}") as v:
            x = torch.randn(4, 6, 8).to(dtype)
            cpu = LF.locked_dropout(x, 0.5, generator=torch.Generator().manual_seed(3))
            out = LF.locked_dropout(x.to(dev), 0.5, generator=torch.Generator().manual_seed(3))
            v["max_abs"] = _max_abs(cpu, out)
            v["ok"] = v["max_abs"] <= tolerance[dtype] * 4
        with ctx.check(f"weight_drop/{name}") as v:
            w = torch.randn(12, 8).to(dtype)
            cpu = LF.weight_drop(w, 0.3, generator=torch.Generator().manual_seed(4))
            out = LF.weight_drop(w.to(dev), 0.3, generator=torch.Generator().manual_seed(4))
            v["max_abs"] = _max_abs(cpu, out)
            v["ok"] = v["max_abs"] <= tolerance[dtype] * 4


# --- recalibrate_bn --------------------------------------------------------------------------------------
def _bn_net() -> Any:
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 8),
        nn.BatchNorm1d(8),
    )


def _reference_stats(model: Any, batches: list[Any]) -> list[tuple[Any, Any]]:
    """Per BN layer, the float64 mean and unbiased variance of its inputs over all batches (train-mode BN)."""
    import torch
    from torch import nn

    ref = copy.deepcopy(model).double().cpu().train()
    layers = [m for m in ref.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    captured: list[list[Any]] = [[] for _ in layers]
    handles = [
        layer.register_forward_pre_hook(lambda mod, args, i=i: captured[i].append(args[0].detach()))
        for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        for batch in batches:
            ref(batch.double().cpu())
    for handle in handles:
        handle.remove()
    return [_channel_stats(values) for values in captured]


def _channel_stats(inputs: list[Any]) -> tuple[Any, Any]:
    """Per channel, the mean and unbiased variance of a BN layer's inputs over every batch ``(N, C, ...)``."""
    import torch

    x = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in inputs], dim=1)  # (C, N * spatial)
    return x.mean(1), x.var(1, unbiased=True)


def _rel(got: Any, ref: Any, scale: Any) -> float:
    """Largest ``|got - ref|`` relative to ``|ref|``, floored at 1 % of ``scale`` (a mean near 0 has no scale)."""
    import torch

    return float(((got - ref).abs() / torch.maximum(ref.abs(), 0.01 * scale).clamp(min=1e-12)).max())


def section_recalibrate_bn(ctx: Context) -> None:
    import torch
    from torch import nn

    from lightning_reg.functional import recalibrate_bn

    dev = ctx.device
    torch.manual_seed(0)
    model = _bn_net()
    batches = [torch.randn(b, 3, 16, 16) * 2 + 1 for b in (32, 32, 7)]
    reference = _reference_stats(model, batches)
    device_type = torch.device(dev).type
    autocast_dtype = torch.bfloat16 if device_type == "cpu" else torch.float16
    variants: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any], Any, float]] = {
        "fp32": (lambda m: m, lambda x: x, contextlib.nullcontext, 1e-5),
        "autocast": (
            lambda m: m,
            lambda x: x,
            lambda: torch.autocast(device_type, dtype=autocast_dtype),
            1e-5,
        ),
        # running statistics stored in bf16: 8 mantissa bits, relative rounding 2**-8
        "bf16_true": (lambda m: m.bfloat16(), lambda x: x.bfloat16(), contextlib.nullcontext, 1e-2),
        "channels_last": (
            lambda m: m.to(memory_format=torch.channels_last),
            lambda x: x.contiguous(memory_format=torch.channels_last),
            contextlib.nullcontext,
            1e-5,
        ),
    }
    for name, (prepare, convert, context, tol) in variants.items():
        with ctx.check(f"recalibrate_bn/{name}") as v:
            m = prepare(copy.deepcopy(model).to(dev)).train()
            layers = [x for x in m.modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)]
            # What each layer really saw in this precision, captured beside the pass: the exactness reference.
            seen: list[list[Any]] = [[] for _ in layers]
            handles = [
                layer.register_forward_pre_hook(lambda _, args, i=i, seen=seen: seen[i].append(args[0].double().cpu()))
                for i, layer in enumerate(layers)
            ]
            with context():
                recalibrate_bn(m, [convert(b.to(dev)) for b in batches])
            for handle in handles:
                handle.remove()
            exact, drift = [], []
            for layer, inputs, (mean64, var64) in zip(layers, seen, reference, strict=True):
                mean, var = _channel_stats(inputs)
                got_mean, got_var = layer.running_mean.double().cpu(), layer.running_var.double().cpu()
                exact += [_rel(got_mean, mean, var.sqrt()), _rel(got_var, var, var)]
                drift += [_rel(got_mean, mean64, var64.sqrt()), _rel(got_var, var64, var64)]
            # exact: against the float64 statistics of the inputs the layers saw (accumulation, counting, storage);
            # drift: against the float64 model, which also holds the upstream rounding of the precision.
            v["max_rel_error_vs_seen_inputs"] = max(exact)
            v["max_rel_drift_vs_float64_model"] = max(drift)
            v["tolerance"] = tol
            v["ok"] = v["max_rel_error_vs_seen_inputs"] <= tol and v["max_rel_drift_vs_float64_model"] <= 0.15


# --- mc_dropout ------------------------------------------------------------------------------------------
def _mc_models() -> dict[str, Any]:
    import timm.models.vision_transformer
    import torch
    from torch import nn

    from lightning_reg.nn import WeightDrop

    torch.manual_seed(0)  # the same weights whatever ran before

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.2, batch_first=True)
            self.norm = nn.BatchNorm1d(16)
            self.fc = nn.Linear(16, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.norm(self.layer(x).mean(1)))

    class LSTMNet(nn.Module):
        def __init__(self, weight_drop: bool) -> None:
            super().__init__()
            lstm = nn.LSTM(16, 24, num_layers=2, dropout=0.0 if weight_drop else 0.3, batch_first=True)
            self.rnn = WeightDrop(lstm, p=0.3) if weight_drop else lstm
            self.fc = nn.Linear(24, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.rnn(x)[0][:, -1])

    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=5, attn_drop_rate=0.2
    )
    return {
        "encoder_fast_path": (Encoder(), (8, 6, 16)),
        "cudnn_lstm": (LSTMNet(weight_drop=False), (8, 6, 16)),
        "weight_drop_lstm": (LSTMNet(weight_drop=True), (8, 6, 16)),
        "timm_fused_attention": (vit, (4, 3, 16, 16)),
    }


def _rng_states(device: str) -> list[Any]:
    import torch

    states = [torch.get_rng_state()]
    if device.startswith("cuda"):
        states.append(torch.cuda.get_rng_state(device))
    return states


def section_mc_dropout(ctx: Context) -> None:
    import torch
    from torch import nn

    from lightning_reg.functional import mc_dropout_predict

    dev = ctx.device
    n_samples = 32
    for name, (model, shape) in _mc_models().items():
        model = model.to(dev).eval()
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dev)
        with ctx.check(f"mc_dropout/{name}") as v:
            norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
            stats = [(m.running_mean.clone(), m.running_var.clone()) for m in norms if m.running_mean is not None]
            rng = _rng_states(dev)
            preds = {}
            for method in ("naive", "batched", "auto"):
                g = torch.Generator(device=dev if dev.startswith("cuda") else "cpu").manual_seed(5)
                preds[method] = mc_dropout_predict(model, x, n_samples, generator=g, method=method)
            spread = float(preds["naive"].probs.std(dim=0).max())
            v["spread"] = spread
            v["batched_vs_naive"] = _max_abs(preds["batched"].mean_probs, preds["naive"].mean_probs)
            v["auto_vs_naive"] = _max_abs(preds["auto"].mean_probs, preds["naive"].mean_probs)
            v["rng_untouched"] = all(bool(torch.equal(a, b)) for a, b in zip(rng, _rng_states(dev), strict=True))
            after = [(m.running_mean, m.running_var) for m in norms if m.running_mean is not None]
            v["bn_unchanged"] = all(
                bool(torch.equal(a, c) and torch.equal(b, d)) for (a, b), (c, d) in zip(stats, after, strict=True)
            )
            # The paths need not consume the draws in the same order; what must hold is the distribution: two
            # independent means of n samples differ by sqrt(2) * std / sqrt(n) (std <= spread), 5 sigma here.
            mc_error = 5 * math.sqrt(2) * spread / math.sqrt(n_samples) + 1e-5
            v["ok"] = (
                spread > 0
                and v["rng_untouched"]
                and v["bn_unchanged"]
                and v["batched_vs_naive"] <= mc_error
                and v["auto_vs_naive"] <= mc_error
            )


# --- trainer ---------------------------------------------------------------------------------------------
def _stacks() -> dict[str, Callable[[], list[Any]]]:
    import lightning_reg as LR

    stacks: dict[str, Callable[[], list[Any]]] = {
        "mixup+smoothing+bn+mc": lambda: [
            LR.MixUp(alpha=0.2),
            LR.LabelSmoothing(0.1),
            LR.BNRecalibration(num_batches=4),
            LR.BNStatsMonitor(log_every_n_steps=2),
            LR.MCDropoutEvaluation(n_samples=4, plot=False),
        ],
        "cutmix": lambda: [LR.CutMix(alpha=1.0)],
        "mixup_cutmix": lambda: [LR.MixUpCutMix()],
    }
    if hasattr(LR, "TemperatureScaling"):
        stacks["mixup+smoothing+bn+mc"] = lambda base=stacks["mixup+smoothing+bn+mc"]: [
            *base(),
            LR.TemperatureScaling(),
        ]
    if hasattr(LR, "RegMixup"):
        stacks["regmixup"] = lambda: [LR.RegMixup()]
    return stacks


def _zoo_setups(quick: bool) -> dict[str, Callable[[], tuple[Any, Any]]]:
    import zoo
    from zoo.data import DigitsDataModule

    setups: dict[str, Callable[[], tuple[Any, Any]]] = {
        "cnn_small": lambda: (zoo.create("cnn_small", num_classes=10), DigitsDataModule(batch_size=64)),
        "lstm": lambda: (
            zoo.create("lstm", num_classes=10, hidden_size=32),
            DigitsDataModule(batch_size=64, as_sequence=True),
        ),
        "transformer": lambda: (
            zoo.create("transformer", num_classes=10),
            DigitsDataModule(batch_size=64, as_sequence=True),
        ),
        "resnet18_frozen_bn": lambda: (
            zoo.create("resnet18", num_classes=10, in_chans=1, freeze_bn=True),
            DigitsDataModule(batch_size=64),
        ),
    }
    return {"cnn_small": setups["cnn_small"]} if quick else setups


def _fit_validate_test_predict(ctx: Context, make: Callable[[], tuple[Any, Any]], callbacks: list[Any], precision: str):
    import lightning as L
    import torch

    L.seed_everything(0, verbose=False)
    model, data = make()
    accelerator = "gpu" if ctx.device.startswith("cuda") else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=1,
            precision=precision,
            max_epochs=1,
            limit_train_batches=4,
            limit_val_batches=2,
            limit_test_batches=2,
            limit_predict_batches=2,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp,
            callbacks=callbacks,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, datamodule=data)
            fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
            val = trainer.validate(model, datamodule=data, verbose=False)[0]
            test = trainer.test(model, datamodule=data, verbose=False)[0]
            predictions = trainer.predict(model, datamodule=data)
    probs = torch.cat([p.float().cpu() for p in predictions])
    return fit_metrics, val, test, probs


def section_trainer(ctx: Context) -> None:
    precisions = ["32"] if ctx.quick else ["32", "16-mixed", "bf16-mixed", "bf16-true"]
    if not ctx.device.startswith("cuda"):
        precisions = [p for p in precisions if p != "16-mixed"]  # CPU has no fp16 autocast for every op
    stacks = _stacks()
    if ctx.quick:
        stacks = {name: stacks[name] for name in list(stacks)[:1]}
    for model_name, make in _zoo_setups(ctx.quick).items():
        for precision in precisions:
            for stack_name, stack in stacks.items():
                with ctx.check(f"trainer/{model_name}/{precision}/{stack_name}") as v:
                    fit_metrics, val, test, probs = _fit_validate_test_predict(ctx, make, stack(), precision)
                    values = {**fit_metrics, **val, **test}
                    v["metrics"] = len(values)
                    v["val_loss"] = val.get("val_loss")
                    v["test_acc"] = test.get("test_acc")
                    finite = all(math.isfinite(x) for x in values.values())
                    rows_sum_to_one = bool(((probs.sum(-1) - 1).abs() < 1e-2).all())
                    v["ok"] = finite and rows_sum_to_one and 0.0 <= test.get("test_acc", -1.0) <= 1.0
                    if "mc" in stack_name:
                        v["mc_test_acc"] = test.get("mc/test/acc")
                        v["ok"] = v["ok"] and "mc/test/acc" in test and "mc/test/det_nll" in test


# --- resume ----------------------------------------------------------------------------------------------
def _resume_module() -> Any:
    import lightning as L
    import torch
    import torch.nn.functional as F
    from torch import nn

    class DigitsMLP(L.LightningModule):
        """Linear, BatchNorm1d and dropout on flattened digits: ops with deterministic CUDA kernels."""

        def __init__(self) -> None:
            super().__init__()
            self.num_classes = 10
            self.net = nn.Sequential(
                nn.Flatten(), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 10)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    return DigitsMLP


def section_resume(ctx: Context) -> None:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset, default_collate

    import lightning_reg as LR

    module_cls = _resume_module()
    accelerator = "gpu" if ctx.device.startswith("cuda") else "cpu"
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(128, 1, 8, 8, generator=g), torch.randint(0, 10, (128,), generator=g))

    class ReseedEachEpoch(L.Callback):
        """The model's own dropout draws from the global RNG, which Lightning does not checkpoint: make it a
        function of the epoch, so that the check isolates what our callbacks restore (see shared/testing.md)."""

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == 0:
                torch.manual_seed(trainer.current_epoch)

    def fit(max_epochs: int, root: str, ckpt: str | None) -> dict[str, Any]:
        L.seed_everything(0, verbose=False)
        model = module_cls()
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=1,
            max_epochs=max_epochs,
            limit_val_batches=0,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
            deterministic=True,
            callbacks=[
                ReseedEachEpoch(),
                LR.MixUp(alpha=0.4),
                LR.LabelSmoothing(0.1),
                LR.BNRecalibration(num_batches=2, every_n_epochs=1),
            ],
        )
        # an unshuffled loader: a shuffled one draws its order from the global RNG, which is not checkpointed
        loader = DataLoader(data, batch_size=32, collate_fn=lambda s: list(default_collate(s)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, train_dataloaders=loader, ckpt_path=ckpt)
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    with ctx.check("resume/bit_identical") as v, tempfile.TemporaryDirectory() as tmp:
        straight = fit(2, f"{tmp}/a", None)
        fit(1, f"{tmp}/b", None)
        ckpt = next(Path(f"{tmp}/b").rglob("*.ckpt"))
        resumed = fit(2, f"{tmp}/c", str(ckpt))
        diffs = {k: _max_abs(straight[k], resumed[k]) for k in straight if straight[k].is_floating_point()}
        v["max_abs_diff"] = max(diffs.values())
        v["ok"] = all(torch.equal(straight[k], resumed[k]) for k in straight)


# --- demo ------------------------------------------------------------------------------------------------
def section_demo(ctx: Context) -> None:
    accelerator = "gpu" if ctx.device.startswith("cuda") else "cpu"
    with ctx.check("demo/runs") as v, tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "lightning_reg.cli", "demo", "--accelerator", accelerator, "--out", tmp]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_scrubbed_env(), check=False)
        v["seconds"] = round(time.perf_counter() - start, 1)
        v["returncode"] = proc.returncode
        v["outputs"] = sorted(p.name for p in Path(tmp).iterdir())
        if proc.returncode != 0:
            v["error"] = error_line(proc.stderr)
        v["ok"] = proc.returncode == 0 and any(name.endswith(".md") for name in v["outputs"])


# --- ddp_gloo --------------------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, device: str, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from lightning_reg._random import rank_generator
    from lightning_reg.functional import recalibrate_bn
    from lightning_reg.metrics import UncertaintyMetrics

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = _bn_net().to(device).train()
        batches = [b.to(device) for b in _ddp_batches()[rank::world]]
        recalibrate_bn(model, batches)
        stats = [m.running_mean.cpu().tolist() for m in model.modules() if hasattr(m, "running_mean")]
        probs, labels = _ddp_predictions()
        metrics = UncertaintyMetrics(num_classes=4).to(device)
        metrics.update(probs[rank::world].to(device), labels[rank::world].to(device))
        values = {k: float(v) for k, v in metrics.compute().items()}
        draw = float(torch.rand((), generator=rank_generator(0, rank, 1)))
        Path(out, f"rank{rank}.json").write_text(json.dumps({"stats": stats, "metrics": values, "draw": draw}))
    finally:
        dist.destroy_process_group()


def _ddp_batches() -> list[Any]:
    import torch

    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 3, 16, 16, generator=g) * 2 + 1 for _ in range(4)]


def _ddp_predictions() -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(64, 4, generator=g) * 2, dim=-1)
    return probs, torch.randint(0, 4, (64,), generator=g)


def section_ddp_gloo(ctx: Context) -> None:
    import torch
    import torch.multiprocessing as mp

    from lightning_reg.functional import recalibrate_bn
    from lightning_reg.metrics import UncertaintyMetrics

    with ctx.check("ddp_gloo/two_processes_one_device") as v, tempfile.TemporaryDirectory() as tmp:
        port = 29500 + os.getpid() % 1000
        mp.spawn(_ddp_worker, args=(2, ctx.device, port, tmp), nprocs=2, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(2)]
        torch.manual_seed(0)
        model = _bn_net().train()
        recalibrate_bn(model, _ddp_batches())
        union = [m.running_mean.tolist() for m in model.modules() if hasattr(m, "running_mean")]
        probs, labels = _ddp_predictions()
        metrics = UncertaintyMetrics(num_classes=4)
        metrics.update(probs, labels)
        union_metrics = {k: float(x) for k, x in metrics.compute().items()}
        stats_error = max(
            abs(a - b)
            for r in ranks
            for layer_r, layer_u in zip(r["stats"], union, strict=True)
            for a, b in zip(layer_r, layer_u, strict=True)
        )
        metric_error = max(abs(r["metrics"][k] - union_metrics[k]) for r in ranks for k in union_metrics)
        v["bn_stats_max_abs_vs_union"] = stats_error
        v["metrics_max_abs_vs_union"] = metric_error
        v["draws_differ"] = ranks[0]["draw"] != ranks[1]["draw"]
        v["ok"] = stats_error < 1e-4 and metric_error < 1e-5 and v["draws_differ"]


# --- speed -----------------------------------------------------------------------------------------------
def section_speed(ctx: Context) -> None:
    import lightning as L
    import torch
    import torch.nn.functional as F
    import torchvision

    import lightning_reg as LR

    if not ctx.device.startswith("cuda"):
        raise SectionSkippedError("host-sync counting needs a CUDA device")
    batch_size, steps, warmup = 256, 12, 4

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.num_classes = 1000
            self.net = torchvision.models.resnet18(num_classes=1000).to(memory_format=torch.channels_last)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class Probe(L.Callback):
        """First in the list: starts the sync count and the step timer; `ProbeEnd`, last, stops the count."""

        def __init__(self) -> None:
            self.syncs: list[int] = []
            self.times: list[float] = []
            self._caught: Any = None

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            torch.cuda.synchronize()
            self._start = time.perf_counter()
            self._catcher = warnings.catch_warnings(record=True)
            self._caught = self._catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

        def stop_count(self) -> None:
            torch.cuda.set_sync_debug_mode("default")
            self.syncs.append(sum("synchroniz" in str(w.message) for w in self._caught))
            self._catcher.__exit__(None, None, None)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._start)

    class ProbeEnd(L.Callback):
        def __init__(self, probe: Probe) -> None:
            self.probe = probe

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self.probe.stop_count()

    candidates: dict[str, Callable[[], list[Any]]] = {
        "none": list,
        "MixUp": lambda: [LR.MixUp()],
        "MixUp(per_sample)": lambda: [LR.MixUp(per_sample=True)],
        "CutMix": lambda: [LR.CutMix()],
        "CutMix(per_sample)": lambda: [LR.CutMix(per_sample=True)],
        "MixUpCutMix": lambda: [LR.MixUpCutMix()],
        "LabelSmoothing": lambda: [LR.LabelSmoothing(0.1)],
        "BNStatsMonitor": lambda: [LR.BNStatsMonitor(log_every_n_steps=1)],
    }
    x = torch.randn(batch_size * 2, 3, 224, 224).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch_size * 2,))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=batch_size,
        collate_fn=lambda s: list(torch.utils.data.default_collate(s)),
    )
    baseline = None
    for name, make in candidates.items():
        with ctx.check(f"speed/{name}") as v:
            probe = Probe()
            trainer = L.Trainer(
                accelerator="gpu",
                devices=1,
                precision="bf16-mixed",
                max_steps=steps,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=[probe, *make(), ProbeEnd(probe)],
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer.fit(Net(), train_dataloaders=loader)
            times = sorted(probe.times[warmup:])
            v["step_ms"] = round(1000 * times[len(times) // 2], 2)
            v["host_syncs_in_batch_start"] = max(probe.syncs[warmup:])
            baseline = v["step_ms"] if name == "none" else baseline
            v["vs_none"] = round(v["step_ms"] / baseline, 3) if baseline else None
            v["ok"] = v["host_syncs_in_batch_start"] == 0


# --- running ---------------------------------------------------------------------------------------------
SECTION_FUNCTIONS: dict[str, Callable[[Context], None]] = {
    "parity": section_parity,
    "recalibrate_bn": section_recalibrate_bn,
    "mc_dropout": section_mc_dropout,
    "trainer": section_trainer,
    "resume": section_resume,
    "demo": section_demo,
    "ddp_gloo": section_ddp_gloo,
    "speed": section_speed,
}


def run_section_here(name: str, device: str, quick: bool) -> dict[str, Any]:
    """Run one section in this process; the checks as a JSON-ready dict."""
    ctx = Context(device=device, quick=quick)
    start = time.perf_counter()
    status = "done"
    try:
        SECTION_FUNCTIONS[name](ctx)
    except SectionSkippedError as reason:
        status = f"skipped: {reason}"
    except Exception:  # a broken section is reported, the others still run
        status = "error: " + error_line(traceback.format_exc())
    return {
        "section": name,
        "status": status,
        "seconds": round(time.perf_counter() - start, 1),
        "passed": sum(c.ok for c in ctx.checks),
        "failed": sum(not c.ok for c in ctx.checks),
        "checks": [asdict(c) for c in ctx.checks],
    }


def _scrubbed_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DDP_ENV_VARS}
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for the resume section
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_section(name: str, device: str, quick: bool, bound: float) -> dict[str, Any]:
    """Run one section in a fresh subprocess under its time bound."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "section.json"
        cmd = [sys.executable, __file__, "--worker", name, "--device", device, "--out", str(out)]
        cmd += ["--quick"] if quick else []
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_scrubbed_env(), timeout=bound)
        except subprocess.TimeoutExpired:
            return {"section": name, "status": f"timeout after {bound:.0f} s", "seconds": bound, "checks": []}
        if proc.returncode != 0 or not out.exists():
            return {
                "section": name,
                "status": f"crashed: {error_line(proc.stderr)[:200]}",
                "seconds": round(time.perf_counter() - start, 1),
                "checks": [],
            }
        return json.loads(out.read_text())


def summary(device_name: str, results: list[dict[str, Any]]) -> str:
    lines = [
        f"# GPU check on {device_name}",
        "",
        "| section | status | checks passed | failed | seconds |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        passed = sum(c["ok"] for c in r["checks"])
        failed = len(r["checks"]) - passed
        lines.append(f"| {r['section']} | {r['status']} | {passed} | {failed} | {r['seconds']} |")
    failures = [(r["section"], c) for r in results for c in r["checks"] if not c["ok"]]
    if failures:
        lines += ["", "Failed checks:", ""]
        lines += [f"- `{c['name']}`: {c['error'] or json.dumps(c['values'])}" for _, c in failures]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=SECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, from: " + ", ".join(SECTIONS))
    parser.add_argument("--device", default="cuda:0", help="cuda:N (default cuda:0), or cpu for the CPU-runnable form")
    parser.add_argument("--quick", action="store_true", help="the smallest form of each section (tests)")
    parser.add_argument(
        "--bound-scale", type=float, default=1.0, help="multiply every section's time bound (slow or loaded machines)"
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the markdown summary goes (json beside)")
    args = parser.parse_args(argv)
    if args.worker:
        args.out.write_text(json.dumps(run_section_here(args.worker, args.device, args.quick)))
        return 0
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(NO_GPU)
        return 0
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    results = []
    for name in sections:
        result = run_section(name, args.device, args.quick, BOUNDS[name] * args.bound_scale)
        results.append(result)
        print(
            f"{name}: {result['status']}, {sum(c['ok'] for c in result['checks'])}/{len(result['checks'])} checks "
            f"passed, {result['seconds']} s",
            flush=True,
        )
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.with_suffix(".json").write_text(json.dumps({"device": device_name, "sections": results}, indent=1))
    args.results.write_text(summary(device_name, results))
    print(summary(device_name, results))
    failed = any(not c["ok"] for r in results for c in r["checks"])
    failed = failed or any(r["status"] != "done" and not r["status"].startswith("skipped") for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
