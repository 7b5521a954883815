"""Regularization guard rails: an inventory of what regularizes a model, and checks for the known mistakes.

:func:`regularization_summary` lists every dropout-like layer, every normalization layer, the weight decay of
every optimizer parameter group as the optimizer applies it, and the regularization callbacks of a Trainer.
:func:`regularization_findings` runs the checks that need no forward pass; :class:`ForwardTrace` records one
training step (with forward hooks and a ``TorchFunctionMode`` that follows which tensors descend from which
dropout or convolution output) for the checks that depend on the order of the layers.
:class:`~lightning_reg.RegularizationCheck` is the callback that runs all of it at fit start.
Each finding has a stable code; docs/guard_rails.md explains every check, its reference and its fix.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "CODES",
    "Code",
    "DecayGroup",
    "DropoutLayer",
    "Finding",
    "ForwardTrace",
    "NormLayer",
    "RegularizationSummary",
    "RegularizationWarning",
    "regularization_findings",
    "regularization_summary",
]

Code = Literal[
    "dropout-before-bn",
    "elementwise-dropout-on-maps",
    "coupled-weight-decay",
    "decay-on-norm-or-bias",
    "small-bn-batch",
    "double-smoothing",
    "stacked-mixing",
    "mc-dropout-uncalibrated",
    "eval-mode-in-training",
    "mc-dropout-no-dropout",
]
CODES: tuple[str, ...] = get_args(Code)
#: Codes found by tracing the first training step (the rest need no forward pass).
TRACE_CODES: frozenset[str] = frozenset(
    {"dropout-before-bn", "elementwise-dropout-on-maps", "small-bn-batch", "eval-mode-in-training"}
)
#: Below this many samples per BatchNorm statistic, ``small-bn-batch`` is reported (Wu & He, ECCV 2018).
MIN_BN_BATCH = 16

# Layers matched by qualified class name over the MRO, so that neither timm nor torchvision is imported here.
_DROP_PATH = frozenset(
    {
        "timm.layers.drop.DropPath",
        "timm.layers.drop.DropBlock2d",
        "torchvision.ops.stochastic_depth.StochasticDepth",
    }
)
_WEIGHT_DROP = frozenset({"lightning_reg.nn.weight_drop.WeightDrop"})
_CHANNEL_DROPOUT = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.FeatureAlphaDropout)
_NORM_NAME = re.compile(r"Norm(\d+d)?$")
_CONV = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_LAYOUT_CHANGES = frozenset({"permute", "transpose", "transpose_", "movedim", "moveaxis", "swapaxes", "swapdims"})
_MAX_NAMES = 4  # module names quoted in one finding before "and N more"


# --- findings ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Finding:
    """One likely mistake: a stable code, the modules concerned, what was seen, why it matters, and the fix.

    Example:
        >>> f = Finding("stacked-mixing", ("MixUp", "CutMix"), "MixUp and CutMix both mix.", "Twice.", "ref", "Fix.")
        >>> str(f).split("]")[0]
        '[stacked-mixing'
    """

    code: Code
    modules: tuple[str, ...]
    message: str
    reason: str
    reference: str
    fix: str

    def __str__(self) -> str:
        return (
            f"[{self.code}] {self.message} Why: {self.reason} ({self.reference}) Fix: {self.fix} "
            f"(Silence it with `RegularizationCheck(ignore=['{self.code}'])`.)"
        )


class RegularizationWarning(UserWarning):
    """A likely regularization mistake found by :class:`~lightning_reg.RegularizationCheck`.

    ``findings`` holds the :class:`Finding` objects (one per warning; all of them when raised by ``strict=True``).

    Example:
        >>> w = RegularizationWarning(Finding("stacked-mixing", (), "Mixed twice.", "Why.", "ref", "Fix."))
        >>> w.findings[0].code
        'stacked-mixing'
    """

    def __init__(self, *findings: Finding | str) -> None:
        self.findings: tuple[Finding, ...] = tuple(f for f in findings if isinstance(f, Finding))
        super().__init__("\n".join(str(f) for f in findings))


def _names(names: Sequence[str]) -> str:
    quoted = ", ".join(f"`{n}`" for n in names[:_MAX_NAMES])
    return quoted + (f" and {len(names) - _MAX_NAMES} more" if len(names) > _MAX_NAMES else "")


# --- inventory ---------------------------------------------------------------------------------------------
DropoutFamily = Literal[
    "dropout", "channel dropout", "locked dropout", "drop path", "weight drop", "attention", "rnn", "functional"
]


@dataclass(frozen=True)
class DropoutLayer:
    """A dropout-like layer: where it is, its class, what it drops, its rate, and whether it is in training mode."""

    name: str
    kind: str
    family: DropoutFamily
    rate: float
    training: bool

    @property
    def sampled_by_mc_dropout(self) -> bool:
        """Whether ``MCDropoutEvaluation`` samples it without ``include_drop_path``."""
        return self.family != "drop path"


@dataclass(frozen=True)
class NormLayer:
    """A normalization layer with the settings that decide how it regularizes and whether it still learns."""

    name: str
    kind: str
    momentum: float | None
    eps: float | None
    track_running_stats: bool | None
    statistics: Literal["updated", "frozen", "per batch", "per sample"]
    affine: Literal["trained", "frozen", "none"]

    @property
    def state(self) -> str:
        """``"trained"``, ``"frozen"``, or which half of it is frozen."""
        learns_stats = self.statistics == "updated"
        if self.affine != "trained" and not learns_stats:
            return "frozen"
        if self.affine == "frozen" and learns_stats:
            return "statistics updated, affine frozen"
        if self.affine == "trained" and self.statistics == "frozen":
            return "statistics frozen (eval mode), affine trained"
        return "trained"


@dataclass(frozen=True)
class DecayGroup:
    """The weight decay of one optimizer parameter group, as that optimizer applies it."""

    optimizer: str
    group: int
    lr: float | None
    weight_decay: float
    applied: str
    params: int
    norm_or_bias: tuple[str, ...]  # names of the decayed norm-layer parameters and biases


@dataclass
class RegularizationSummary:
    """What regularizes a model: dropout-like layers, normalization layers, weight decay, callbacks.

    ``str(summary)`` is plain text; :meth:`to_rich` gives the same tables for a rich console.
    """

    dropouts: list[DropoutLayer] = field(default_factory=list)
    norms: list[NormLayer] = field(default_factory=list)
    decay: list[DecayGroup] | None = None  # None: no optimizer known yet
    callbacks: list[tuple[str, str]] = field(default_factory=list)

    def tables(self) -> list[tuple[str, list[str], list[list[str]]]]:
        """``(title, header, rows)`` of each table."""
        drop_rows = [
            [d.name, d.kind, d.family, f"{d.rate:g}", "train" if d.training else "eval"] for d in self.dropouts
        ]
        norm_rows = [
            [n.name, n.kind, _fmt(n.momentum), _fmt(n.eps), _fmt(n.track_running_stats), n.state] for n in self.norms
        ]
        tables = [
            ("Dropout-like layers", ["where", "kind", "drops", "rate", "mode"], _compact(drop_rows)),
            (
                "Normalization layers",
                ["where", "kind", "momentum", "eps", "track_running_stats", "state"],
                _compact(norm_rows),
            ),
        ]
        if self.decay is None:
            tables.append(("Weight decay", ["note"], [["no optimizer yet: configured at fit start"]]))
        else:
            decay_rows = [
                [
                    g.optimizer,
                    str(g.group),
                    _fmt(g.lr),
                    f"{g.weight_decay:g}",
                    g.applied,
                    str(g.params),
                    str(len(g.norm_or_bias)),
                ]
                for g in self.decay
            ]
            header = ["optimizer", "group", "lr", "weight_decay", "applied as", "params", "norm/bias decayed"]
            tables.append(("Weight decay per parameter group", header, decay_rows))
        tables.append(("Regularization callbacks", ["callback", "settings"], [list(c) for c in self.callbacks]))
        return tables

    def __str__(self) -> str:
        parts = []
        for title, header, rows in self.tables():
            parts.append(f"{title}:" + ("" if rows else " none"))
            if rows:
                widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
                for row in [header, *rows]:
                    parts.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        return "\n".join(parts)

    def to_rich(self) -> Any:
        """The tables as one rich renderable (``rich.console.Group`` of ``rich.table.Table``)."""
        from rich.console import Group
        from rich.table import Table

        tables = []
        for title, header, rows in self.tables():
            table = Table(title=title, title_justify="left", show_edge=False)
            for name in header:
                table.add_column(name)
            for row in rows or [["none"] + [""] * (len(header) - 1)]:
                table.add_row(*row)
            tables.append(table)
        return Group(*tables)


_INDEX = re.compile(r"(?<![^.])\d+(?![^.])")  # a numeric path component: `blocks.3.norm1` -> `blocks.*.norm1`


def _compact(rows: list[list[str]]) -> list[list[str]]:
    """Rows that differ only in the indices of their module path (repeated blocks) as one ``blocks.*.x (xN)`` row."""
    groups: dict[tuple[str, ...], list[list[str]]] = {}
    for row in rows:
        groups.setdefault((_INDEX.sub("*", row[0]), *row[1:]), []).append(row)
    return [
        [f"{key[0]} (x{len(members)})", *key[1:]] if len(members) > 1 else members[0] for key, members in groups.items()
    ]


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _qualnames(module: nn.Module) -> set[str]:
    return {f"{cls.__module__}.{cls.__qualname__}" for cls in type(module).__mro__}


def _class_names(obj: object) -> set[str]:
    return {cls.__name__ for cls in type(obj).__mro__}


def _number(module: nn.Module, *names: str) -> float:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return 0.0


def _dropout_layer(name: str, module: nn.Module) -> DropoutLayer | None:
    kind = type(module).__name__
    qualnames = _qualnames(module)
    opt_in = getattr(type(module), "mc_dropout_kind", None)  # a user's layer (see lightning_reg.functional)
    family: DropoutFamily
    if qualnames & _DROP_PATH or opt_in == "drop_path":
        family, rate = "drop path", _number(module, "drop_prob", "p")
    elif isinstance(module, _DropoutNd) or opt_in == "dropout":
        if "lightning_reg.nn.locked_dropout.LockedDropout" in qualnames:
            family = "locked dropout"
        elif isinstance(module, _CHANNEL_DROPOUT):
            family = "channel dropout"
        else:
            family = "dropout"
        rate = _number(module, "p", "drop_prob")
    elif qualnames & _WEIGHT_DROP:
        family, rate = "weight drop", _number(module, "p")
    elif isinstance(module, nn.MultiheadAttention) and module.dropout > 0:
        family, rate = "attention", float(module.dropout)
    elif isinstance(module, nn.RNNBase) and module.dropout > 0 and module.num_layers > 1:
        family, rate = "rnn", float(module.dropout)  # between stacked layers of one nn.LSTM/GRU/RNN
    elif type(module).__module__.startswith("timm.") and _number(module, "drop_rate", "attn_drop_p") > 0:
        # timm models that drop with `F.dropout(x, self.drop_rate, self.training)` in `forward_head` (ResNet,
        # EfficientNet, ...) or `dropout_p=self.attn_drop_p` in SDPA: MCDropoutEvaluation samples them too.
        family, rate = "functional", _number(module, "drop_rate", "attn_drop_p")
        kind = f"{kind}.drop_rate" if _number(module, "drop_rate") > 0 else f"{kind}.attn_drop_p"
    else:
        return None
    return DropoutLayer(name, kind, family, rate, module.training)


def dropout_layers(model: nn.Module) -> list[DropoutLayer]:
    """Every dropout-like layer of ``model``, in module order.

    Example:
        >>> [(d.name, d.family, d.rate) for d in dropout_layers(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.3)))]
        [('1', 'dropout', 0.3)]
    """
    found = (_dropout_layer(name, m) for name, m in model.named_modules())
    return [d for d in found if d is not None]


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, _BatchNorm | _InstanceNorm | nn.GroupNorm | nn.LayerNorm | nn.RMSNorm):
        return True
    return bool(_NORM_NAME.search(type(module).__name__)) and hasattr(module, "eps")


def norm_layers(model: nn.Module) -> list[NormLayer]:
    """Every normalization layer of ``model`` (torch's, and any class named ``...Norm``/``...Norm2d`` with ``eps``).

    Example:
        >>> [(n.kind, n.state) for n in norm_layers(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).eval())]
        [('BatchNorm2d', 'statistics frozen (eval mode), affine trained')]
    """
    layers = []
    for name, m in model.named_modules():
        if not _is_norm(m):
            continue
        track = getattr(m, "track_running_stats", None)
        has_stats = getattr(m, "running_mean", None) is not None
        statistics: Literal["updated", "frozen", "per batch", "per sample"]
        if has_stats and track is not False:
            statistics = "updated" if m.training and track else "frozen"
        elif isinstance(m, _BatchNorm):
            statistics = "per batch"
        elif has_stats:
            statistics = "frozen"  # buffers only (e.g. FrozenBatchNorm2d)
        else:
            statistics = "per sample"
        params = list(m.parameters(recurse=False))
        affine: Literal["trained", "frozen", "none"] = (
            "none" if not params else "trained" if any(p.requires_grad for p in params) else "frozen"
        )
        momentum = getattr(m, "momentum", None)
        eps = getattr(m, "eps", None)
        layers.append(
            NormLayer(
                name,
                type(m).__name__,
                float(momentum) if isinstance(momentum, int | float) else None,
                float(eps) if isinstance(eps, int | float) else None,
                bool(track) if track is not None else None,
                statistics,
                affine,
            )
        )
    return layers


# Coupled unless `decoupled_weight_decay=True` (torch >= 2.6 for Adam; AdamW always decouples, whatever its base).
_ADAPTIVE_DECOUPLABLE = ("Adam", "NAdam", "RAdam")
_ADAPTIVE_COUPLED = ("Adamax", "Adagrad", "RMSprop", "Adadelta", "SparseAdam")


def _applied(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> tuple[str, bool]:
    """How the group's weight decay is applied, and whether it is L2 coupled with an adaptive step."""
    wd = float(group.get("weight_decay", 0.0) or 0.0)
    if wd == 0:
        return "none", False
    classes = _class_names(optimizer)
    if "AdamW" in classes or (
        any(c in classes for c in _ADAPTIVE_DECOUPLABLE) and group.get("decoupled_weight_decay", False)
    ):
        return "decoupled: p *= 1 - lr * wd", False
    if any(c in classes for c in _ADAPTIVE_DECOUPLABLE):
        return "L2 in the gradient, rescaled by the adaptive step", True
    if any(c in classes for c in _ADAPTIVE_COUPLED):
        return "L2 in the gradient, rescaled by the adaptive step", True
    if "SGD" in classes:
        return "L2 in the gradient (weight decay for SGD)", False
    return f"as {type(optimizer).__name__} defines it", False


def _norm_or_bias_ids(model: nn.Module) -> dict[int, str]:
    """Parameter id -> name, for the parameters of normalization layers and every bias."""
    norm_ids = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    return {
        id(p): name
        for name, p in model.named_parameters()
        if id(p) in norm_ids or name.rsplit(".", 1)[-1].startswith("bias")
    }


def decay_groups(model: nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> list[DecayGroup]:
    """The weight decay of every parameter group of ``optimizers``, with the norm/bias parameters it decays.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
        >>> groups = decay_groups(net, [torch.optim.AdamW(net.parameters())])
        >>> [(g.optimizer, g.weight_decay, len(g.norm_or_bias)) for g in groups]
        [('0: AdamW', 0.01, 3)]
    """
    special = _norm_or_bias_ids(model)
    groups = []
    for i, optimizer in enumerate(optimizers):
        for j, group in enumerate(optimizer.param_groups):
            wd = float(group.get("weight_decay", 0.0) or 0.0)
            applied, _ = _applied(optimizer, group)
            params = [p for p in group["params"] if p.requires_grad]
            decayed = tuple(special[id(p)] for p in params if id(p) in special) if wd > 0 else ()
            lr = group.get("lr")
            groups.append(
                DecayGroup(
                    f"{i}: {type(optimizer).__name__}",
                    j,
                    float(lr) if isinstance(lr, int | float) else None,
                    wd,
                    applied,
                    len(params),
                    decayed,
                )
            )
    return groups


def _describe_callback(callback: object) -> str:
    keys = (
        "alpha",
        "mixup_alpha",
        "cutmix_alpha",
        "switch_prob",
        "prob",
        "smoothing",
        "label_smoothing",
        "n_samples",
        "include_drop_path",
        "num_batches",
        "monitor",
        "patience",
    )
    values = {k: getattr(callback, k) for k in keys if getattr(callback, k, None) not in (None, 0.0)}
    return ", ".join(f"{k}={v}" for k, v in values.items())


def _regularization_callbacks(callbacks: Iterable[object]) -> list[object]:
    """Our callbacks (but the check itself) and Lightning's early stopping and weight averaging."""
    lightning_names = {"EarlyStopping", "StochasticWeightAveraging", "WeightAveraging"}
    return [
        cb
        for cb in callbacks
        if (type(cb).__module__.startswith("lightning_reg.") and "RegularizationCheck" not in _class_names(cb))
        or (type(cb).__module__.startswith("lightning.") and _class_names(cb) & lightning_names)
    ]


def _trainer_parts(
    trainer: Any, callbacks: Sequence[object] | None, optimizers: Sequence[torch.optim.Optimizer] | None
) -> tuple[list[object], list[torch.optim.Optimizer] | None]:
    if callbacks is None:
        callbacks = list(getattr(trainer, "callbacks", []) or [])
    if optimizers is None and trainer is not None:
        optimizers = list(getattr(trainer, "optimizers", []) or []) or None
    return list(callbacks), list(optimizers) if optimizers is not None else None


def regularization_summary(
    model: nn.Module,
    trainer: Any = None,
    *,
    callbacks: Sequence[object] | None = None,
    optimizers: Sequence[torch.optim.Optimizer] | None = None,
) -> RegularizationSummary:
    """The inventory of what regularizes ``model``: dropout-like layers, norm layers, weight decay, callbacks.

    Args:
        model: the model (a LightningModule or any ``nn.Module``).
        trainer: a Lightning Trainer: its callbacks, and its optimizers once ``fit`` has configured them.
        callbacks: the callbacks to list instead of the trainer's.
        optimizers: the optimizers to read the weight decay from instead of the trainer's.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Dropout(0.2), nn.Linear(4, 2))
        >>> summary = regularization_summary(net, optimizers=[torch.optim.SGD(net.parameters(), lr=0.1)])
        >>> [(d.kind, d.rate) for d in summary.dropouts], [n.kind for n in summary.norms]
        ([('Dropout', 0.2)], ['BatchNorm1d'])
        >>> print(str(summary).splitlines()[0])
        Dropout-like layers:
    """
    callbacks, optimizers = _trainer_parts(trainer, callbacks, optimizers)
    return RegularizationSummary(
        dropouts=dropout_layers(model),
        norms=norm_layers(model),
        decay=decay_groups(model, optimizers) if optimizers is not None else None,
        callbacks=[(type(cb).__name__, _describe_callback(cb)) for cb in _regularization_callbacks(callbacks)],
    )


# --- checks without a forward pass --------------------------------------------------------------------------
def _smoothing_sources(model: nn.Module, callbacks: Sequence[object]) -> list[str]:
    sources = []
    for cb in callbacks:
        names = _class_names(cb)
        if "LabelSmoothing" in names and float(getattr(cb, "smoothing", 0.0)) > 0:
            sources.append(f"{type(cb).__name__}({cb.smoothing})")  # type: ignore[attr-defined]
        elif "MixingCallback" in names and float(getattr(cb, "label_smoothing", 0.0) or 0.0) > 0:
            sources.append(f"{type(cb).__name__}(label_smoothing={cb.label_smoothing})")  # type: ignore[attr-defined]
    attribute = getattr(model, "label_smoothing", None)
    hparams: Any = getattr(model, "hparams", None)
    hparam = hparams.get("label_smoothing") if hasattr(hparams, "get") else None
    value = attribute if isinstance(attribute, int | float) and not isinstance(attribute, bool) else hparam
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        sources.append(f"{type(model).__name__}.label_smoothing={value}")
    for name, m in model.named_modules():
        if isinstance(m, nn.CrossEntropyLoss) and m.label_smoothing > 0:
            sources.append(f"`{name}` nn.CrossEntropyLoss(label_smoothing={m.label_smoothing})")
    return sources


def _mixers(callbacks: Sequence[object]) -> list[object]:
    return [cb for cb in callbacks if "MixingCallback" in _class_names(cb) and "LabelSmoothing" not in _class_names(cb)]


def _mc_callbacks(callbacks: Sequence[object]) -> list[object]:
    return [cb for cb in callbacks if "MCDropoutEvaluation" in _class_names(cb)]


def _check_smoothing_and_mixing(model: nn.Module, callbacks: Sequence[object]) -> list[Finding]:
    findings = []
    sources = _smoothing_sources(model, callbacks)
    if len(sources) > 1:
        findings.append(
            Finding(
                "double-smoothing",
                tuple(sources),
                f"Labels are smoothed by {len(sources)} sources: {', '.join(sources)}.",
                "each source spreads its mass again, so the targets are smoother than any one setting says "
                "(0.1 twice is about 0.19), and the model is pushed further into under-confidence",
                "Szegedy et al., CVPR 2016, label smoothing; Mueller et al., NeurIPS 2019",
                "keep exactly one source: a `LabelSmoothing` callback (it composes with mixing in either order), "
                "or the mixing callback's `label_smoothing=`, or the module's own.",
            )
        )
    mixers = _mixers(callbacks)
    if len(mixers) > 1:
        names = tuple(type(cb).__name__ for cb in mixers)
        findings.append(
            Finding(
                "stacked-mixing",
                names,
                f"{len(mixers)} mixing callbacks act on every training batch: {', '.join(names)}.",
                "each one mixes the already mixed batch, so a sample blends up to four images and its target "
                "four labels, which neither method was designed or tuned for; timm and DeiT pick one of the two "
                "per batch",
                "Zhang et al., ICLR 2018 (MixUp); Yun et al., ICCV 2019 (CutMix); Touvron et al., ICML 2021 (DeiT)",
                "use one `MixUpCutMix(mixup_alpha=..., cutmix_alpha=..., switch_prob=0.5)` instead.",
            )
        )
    return findings


def _check_mc_dropout(model: nn.Module, callbacks: Sequence[object], dropouts: list[DropoutLayer]) -> list[Finding]:
    findings: list[Finding] = []
    mcs = _mc_callbacks(callbacks)
    if not mcs:
        return findings
    softening = [type(cb).__name__ for cb in _mixers(callbacks)] + _smoothing_sources(model, callbacks)
    calibrated = any("TemperatureScaling" in _class_names(cb) for cb in callbacks)
    if softening and not calibrated:
        findings.append(
            Finding(
                "mc-dropout-uncalibrated",
                ("MCDropoutEvaluation", *softening),
                f"MCDropoutEvaluation averages predictions of a model trained with {', '.join(softening)}, and "
                "nothing rescales its confidence.",
                "mixing and label smoothing already make a model under-confident; averaging Monte-Carlo samples "
                "(an implicit ensemble) softens it again, so the two compound instead of adding up",
                "Wen et al., ICLR 2021, 'Combining Ensembles and Data Augmentation Can Harm Your Calibration'",
                "add `TemperatureScaling` (a temperature fitted on held-out data after training), or evaluate "
                "MC dropout on a model trained without label softening.",
            )
        )
    for cb in mcs:
        include_drop_path = bool(getattr(cb, "include_drop_path", False))
        sampled = [d for d in dropouts if d.rate > 0 and (d.sampled_by_mc_dropout or include_drop_path)]
        if sampled:
            continue
        drop_paths = [d.name for d in dropouts if d.family == "drop path" and d.rate > 0]
        zero = [d.name for d in dropouts if d.rate == 0]
        if drop_paths:
            message = (
                f"MCDropoutEvaluation finds no dropout with a rate above 0 to sample; the only stochastic layers are "
                f"drop path ({_names(drop_paths)}), which it skips without `include_drop_path=True`."
            )
            fix = "pass `MCDropoutEvaluation(include_drop_path=True)`, or give the model dropout with a rate > 0."
        else:
            where = f" (every rate is 0: {_names(zero)})" if zero else " (the model has no dropout layer)"
            message = f"MCDropoutEvaluation finds no dropout with a rate above 0 to sample{where}."
            fix = "give the model dropout with a rate > 0 (e.g. before the classifier), or remove MCDropoutEvaluation."
        findings.append(
            Finding(
                "mc-dropout-no-dropout",
                tuple(drop_paths or zero),
                message,
                "every Monte-Carlo sample is then the same prediction: mutual information 0 at full cost",
                "Gal & Ghahramani, ICML 2016",
                fix,
            )
        )
    return findings


def _check_weight_decay(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> list[Finding]:
    findings = []
    coupled = []
    for i, optimizer in enumerate(optimizers):
        for j, group in enumerate(optimizer.param_groups):
            _, is_coupled = _applied(optimizer, group)
            if is_coupled:
                coupled.append(f"{i}: {type(optimizer).__name__} group {j} (weight_decay={group['weight_decay']:g})")
    if coupled:
        findings.append(
            Finding(
                "coupled-weight-decay",
                tuple(coupled),
                f"Weight decay is added to the gradient of an adaptive optimizer: {'; '.join(coupled)}.",
                "the adaptive step divides that L2 term by the gradient's running scale like the loss gradient, so "
                "weights with large gradients are barely decayed: L2 is not weight decay for Adam-type optimizers",
                "Loshchilov & Hutter, ICLR 2019, 'Decoupled Weight Decay Regularization'",
                "use `torch.optim.AdamW(..., weight_decay=...)` (or `Adam(..., decoupled_weight_decay=True)`); "
                "decoupled decay usually needs a larger value (0.01 to 0.1) than an L2 coefficient.",
            )
        )
    decayed = [name for g in decay_groups(model, optimizers) for name in g.norm_or_bias]
    if decayed:
        findings.append(
            Finding(
                "decay-on-norm-or-bias",
                tuple(decayed),
                f"{len(decayed)} normalization parameters and biases get weight decay: {_names(decayed)}.",
                "a norm layer's gain and shift and a bias set scale and offset that normalization restores anyway; "
                "decaying them regularizes nothing and pulls them from their useful values",
                "Goyal et al., 2017 and He et al., CVPR 2019 ('no bias decay'); timm's param_groups_weight_decay",
                "put parameters with `ndim <= 1` in a group with `weight_decay=0` "
                "(`timm.optim.param_groups_weight_decay(model, weight_decay)`, as the zoo's "
                "`ClassifierModule.parameter_groups` does).",
            )
        )
    return findings


def regularization_findings(
    model: nn.Module,
    trainer: Any = None,
    *,
    callbacks: Sequence[object] | None = None,
    optimizers: Sequence[torch.optim.Optimizer] | None = None,
    trace: ForwardTrace | None = None,
    world_size: int | None = None,
    min_bn_batch: int = MIN_BN_BATCH,
) -> list[Finding]:
    """The likely regularization mistakes of ``model`` with these callbacks and optimizers.

    Without ``trace`` only the checks that need no forward pass run (weight decay, smoothing, mixing, MC
    dropout); with a :class:`ForwardTrace` of one training step, the order-dependent ones too.

    Args:
        model: the model.
        trainer: a Lightning Trainer: its callbacks, optimizers and world size.
        callbacks: callbacks instead of the trainer's.
        optimizers: optimizers instead of the trainer's.
        trace: a finished :class:`ForwardTrace` of one training step.
        world_size: processes that share a ``SyncBatchNorm`` statistic (default: the trainer's world size, or 1).
        min_bn_batch: the smallest number of samples per BatchNorm statistic that is not reported.

    Example:
        >>> net = nn.Linear(3, 2)
        >>> adam = torch.optim.Adam(net.parameters(), weight_decay=1e-4)
        >>> [f.code for f in regularization_findings(net, optimizers=[adam])]
        ['coupled-weight-decay', 'decay-on-norm-or-bias']
    """
    callbacks, optimizers = _trainer_parts(trainer, callbacks, optimizers)
    findings = _check_weight_decay(model, optimizers or [])
    findings += _check_smoothing_and_mixing(model, callbacks)
    findings += _check_mc_dropout(model, callbacks, dropout_layers(model))
    if trace is not None:
        if world_size is None:
            world_size = int(getattr(trainer, "world_size", 1) or 1)
        findings += trace.findings(model, world_size=world_size, min_bn_batch=min_bn_batch)
    return findings


# --- the trace of one training step -------------------------------------------------------------------------
@dataclass(frozen=True)
class _Tag:
    dropouts: frozenset[str] = frozenset()  # active dropout layers upstream of the tensor
    conv_ndim: int = 0  # 4 or 5 when the tensor is a convolution feature map (or shape-preserving op of one)


@dataclass
class _Call:
    training: bool
    batch: int
    conv_map: bool = False  # the input was a 4-D/5-D convolution feature map with more than one position


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


class ForwardTrace(TorchFunctionMode):
    """Records one training step: which dropout feeds which BatchNorm, what shapes dropout sees, layer modes.

    Forward hooks on the dropout, normalization and convolution layers of ``model`` mark their outputs, and a
    ``TorchFunctionMode`` carries the marks through every torch operation (``F.relu``, ``x + y``, ``view``), so
    "feeds" follows the data, not the order of the calls. :meth:`start` installs it, :meth:`stop` removes
    every hook; use it as a context manager around one forward pass, or start and stop it from callback hooks.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 8), nn.BatchNorm1d(8))
        >>> with ForwardTrace(net) as trace:
        ...     _ = net(torch.randn(16, 4))
        >>> trace.feeds
        {'1': ['3']}
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.feeds: dict[str, list[str]] = {}  # dropout name -> BatchNorm names it feeds (training BN with stats)
        self.calls: dict[str, _Call] = {}  # first call of every dropout-like and norm layer
        self._tags: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._handles: list[Any] = []
        self._active = False

    # context manager and explicit start/stop
    def start(self) -> ForwardTrace:
        """Install the hooks and the mode."""
        if self._active:
            return self
        for name, module in self.model.named_modules():
            layer = _dropout_layer(name, module)
            if layer is not None:
                self._handles.append(module.register_forward_pre_hook(self._dropout_pre_hook(name, layer)))
                self._handles.append(module.register_forward_hook(self._dropout_hook(name, layer)))
            elif _is_norm(module):
                self._handles.append(module.register_forward_pre_hook(self._norm_pre_hook(name)))
            elif isinstance(module, _CONV):
                self._handles.append(module.register_forward_hook(self._conv_hook))
        super().__enter__()
        self._active = True
        return self

    def stop(self) -> None:
        """Remove the mode and every hook (safe to call twice)."""
        if not self._active:
            return
        self._active = False
        super().__exit__(None, None, None)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._tags = WeakIdKeyDictionary()

    @property
    def active(self) -> bool:
        """Whether the trace is installed."""
        return self._active

    def __enter__(self) -> ForwardTrace:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # propagation through every torch operation
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        dropouts: set[str] = set()
        conv_ndims = set()
        for t in _tensors((args, kwargs)):
            tag = self._tags.get(t)
            if tag is not None:
                dropouts |= tag.dropouts
                if tag.conv_ndim:
                    conv_ndims.add(tag.conv_ndim)
        if conv_ndims and getattr(func, "__name__", "") in _LAYOUT_CHANGES:
            conv_ndims = set()  # channels no longer on dim 1 (ConvNeXt's channels-last MLP): not an NCHW map
        if dropouts or conv_ndims:
            for t in _tensors(out):
                self._mark(t, dropouts, t.ndim if t.ndim in conv_ndims else 0)
        return out

    def _mark(self, t: Tensor, dropouts: Iterable[str] = (), conv_ndim: int = 0) -> None:
        old = self._tags.get(t, _Tag())
        self._tags[t] = _Tag(old.dropouts | frozenset(dropouts), conv_ndim or old.conv_ndim)

    # hooks
    def _record(self, name: str, module: nn.Module, args: tuple[Any, ...]) -> Tensor | None:
        x = next(_tensors(args), None)
        if name not in self.calls and x is not None:
            self.calls[name] = _Call(module.training, int(x.shape[0]) if x.ndim > 0 else 0)
        return x

    def _dropout_pre_hook(self, name: str, layer: DropoutLayer) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = self._record(name, module, args)
            if x is None or layer.family != "dropout" or layer.rate == 0:
                return
            tag = self._tags.get(x)
            if tag is not None and tag.conv_ndim and x.ndim == tag.conv_ndim and x.shape[2:].numel() > 1:
                self.calls[name].conv_map = True

        return hook

    def _dropout_hook(self, name: str, layer: DropoutLayer) -> Any:
        family = layer.family

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            # Variance shift is about dropout proper: drop path, DropBlock and DropConnect are left out.
            if module.training and family in ("dropout", "channel dropout", "locked dropout") and layer.rate > 0:
                for t in _tensors(output):
                    self._mark(t, (name,))

        return hook

    def _norm_pre_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = self._record(name, module, args)
            if x is None or not isinstance(module, _BatchNorm) or not module.training:
                return
            if not module.track_running_stats:
                return  # normalizes by the batch in eval mode too: no train/eval variance shift
            tag = self._tags.get(x)
            for dropout in sorted(tag.dropouts) if tag is not None else ():
                bns = self.feeds.setdefault(dropout, [])
                if name not in bns:
                    bns.append(name)

        return hook

    def _conv_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, Tensor) and output.ndim in (4, 5):
            self._mark(output, (), output.ndim)

    # findings
    def findings(self, model: nn.Module, *, world_size: int = 1, min_bn_batch: int = MIN_BN_BATCH) -> list[Finding]:
        """The order-dependent findings of the traced step."""
        modules = dict(model.named_modules())
        findings = []
        if self.feeds:
            pairs = [
                f"`{d}` -> `{bns[0]}`" + (f" (+{len(bns) - 1})" if len(bns) > 1 else "")
                for d, bns in self.feeds.items()
            ]
            involved = tuple(dict.fromkeys([*self.feeds, *(b for bns in self.feeds.values() for b in bns)]))
            findings.append(
                Finding(
                    "dropout-before-bn",
                    involved,
                    f"Dropout feeds BatchNorm in the forward order: {', '.join(pairs)}.",
                    "in training the BatchNorm's running variance is estimated on dropped-out activations; in eval "
                    "dropout is off and the variance differs (variance shift), so the BatchNorm normalizes with the "
                    "wrong statistics",
                    "Li et al., CVPR 2019, 'Understanding the Disharmony between Dropout and Batch Normalization by "
                    "Variance Shift'",
                    "move dropout after the last BatchNorm (e.g. only before the classifier), or remove it; "
                    "`BNRecalibration` re-estimates the statistics without dropout at the end of training.",
                )
            )
        maps = [name for name, call in self.calls.items() if call.conv_map and call.training]
        if maps:
            findings.append(
                Finding(
                    "elementwise-dropout-on-maps",
                    tuple(maps),
                    f"Element-wise dropout on 4-D/5-D convolution feature maps: {_names(maps)}.",
                    "neighbouring positions of a feature map are strongly correlated, so dropping single positions "
                    "removes little information and regularizes weakly; dropping whole channels does not have "
                    "that problem",
                    "Tompson et al., CVPR 2015, 'Efficient Object Localization Using Convolutional Networks' "
                    "(SpatialDropout)",
                    "use `nn.Dropout2d` (4-D maps) or `nn.Dropout3d` (5-D), or timm's `DropBlock2d`.",
                )
            )
        small = []
        for name, call in self.calls.items():
            module = modules.get(name)
            if not isinstance(module, _BatchNorm) or not call.training:
                continue
            samples = call.batch * (world_size if isinstance(module, nn.SyncBatchNorm) else 1)
            if 0 < samples < min_bn_batch:
                small.append((name, samples))
        if small:
            sizes = sorted({s for _, s in small})
            synced = any(isinstance(modules.get(n), nn.SyncBatchNorm) for n, _ in small)
            hint = (
                "`Trainer(sync_batchnorm=True)` computes the statistics over all processes"
                if world_size > 1 and not synced
                else "a larger batch, `GroupNorm`/`LayerNorm` (independent of the batch), or frozen BatchNorm"
            )
            findings.append(
                Finding(
                    "small-bn-batch",
                    tuple(n for n, _ in small),
                    f"BatchNorm trains on {', '.join(map(str, sizes))} samples per statistic (fewer than "
                    f"{min_bn_batch}): {_names([n for n, _ in small])}.",
                    "the batch mean and variance of so few samples are noisy estimates, and the running statistics "
                    "used in eval inherit the noise; the ImageNet error of a BN ResNet-50 grows by about 1 point at "
                    "8 images per GPU and by over 10 at 2",
                    "Wu & He, ECCV 2018, 'Group Normalization'",
                    f"use {hint}.",
                )
            )
        findings += self._eval_mode_findings(modules)
        return findings

    def _eval_mode_findings(self, modules: dict[str, nn.Module]) -> list[Finding]:
        # Everything traced ran inside a training step: a layer in eval mode there is left over or frozen.
        relevant = []
        for name, call in self.calls.items():
            module = modules.get(name)
            if module is None or call.training:
                continue
            layer = _dropout_layer(name, module)
            tracks = isinstance(module, _BatchNorm | _InstanceNorm) and module.track_running_stats
            if (layer is not None and layer.rate > 0) or tracks:
                relevant.append(name)
        unintended = []
        for name in relevant:
            root = self._eval_root(name, modules)
            params = list(modules[root].parameters())
            # Frozen parts (all parameters frozen: a fixed backbone, frozen BN) keep eval mode on purpose.
            if not (params and not any(p.requires_grad for p in params)):
                unintended.append((name, root))
        if not unintended:
            return []
        names = [n for n, _ in unintended]
        roots = list(dict.fromkeys(r for _, r in unintended))
        return [
            Finding(
                "eval-mode-in-training",
                tuple(names),
                f"Layers with dropout or running statistics run in eval mode while the model trains: {_names(names)} "
                f"(in eval mode from {_names([r or '<model>' for r in roots])}); their parameters still train, so "
                "this does not look like a frozen part.",
                "in eval mode dropout does nothing and BatchNorm normalizes with fixed running statistics, so they "
                "neither regularize nor adapt; this usually comes from a `.eval()` call (a pretrained backbone, an "
                "evaluation in the training code) that was never undone",
                "PyTorch `nn.Module.train`/`eval`; Lightning warns about modules in eval mode at the start of training",
                "call `.train()` on them (e.g. in `on_train_epoch_start`); if frozen statistics are intended "
                "(fine-tuning), also freeze their parameters (`requires_grad_(False)`).",
            )
        ]

    def _eval_root(self, name: str, modules: dict[str, nn.Module]) -> str:
        """The outermost module in eval mode that contains ``name``."""
        parts = name.split(".")
        for i in range(len(parts) + 1):
            candidate = ".".join(parts[:i])
            module = modules.get(candidate)
            if module is not None and not module.training:
                return candidate
        return name
