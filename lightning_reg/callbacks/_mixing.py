"""The base class of the mixing and smoothing callbacks: generator, state, batch access, per-epoch statistics.

Every callback owns a CPU ``torch.Generator`` seeded from (Lightning's seed, global rank, a salt from its
``state_key``) and saved in ``state_dict()``; docs/mixing.md explains the streams, the checks at fit start, why no
batch makes a host sync, the reused output tensors and the logged statistics.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any, ClassVar, Literal, get_args

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_reg._batch import BatchKey, get_entry, set_entry, validate_key
from lightning_reg._random import base_seed, rank_generator
from lightning_reg.callbacks._buffer import ReusableOutput
from lightning_reg.callbacks._num_classes import check_num_classes_arg, resolve_num_classes
from lightning_reg.callbacks._smoothing import check_single_smoothing
from lightning_reg.callbacks._strategy import data_parallel_rank
from lightning_reg.functional._apply import kept_fraction, mix_elementwise
from lightning_reg.functional._checks import (
    Pairing,
    check_pairing,
    check_probability,
    check_range,
    check_rows,
    check_smoothing,
    check_targets,
)
from lightning_reg.functional._draws import beta, derangement, random_shift
from lightning_reg.functional._targets import mixed_one_hot
from lightning_reg.functional.cutmix import Box, sample_box
from lightning_reg.functional.label_smoothing import one_hot
from lightning_reg.functional.mixup import MixingParams
from lightning_reg.mixins import MixedTargets

__all__ = ["MixMode", "MixingCallback", "TargetMode", "check_mixing_company"]

#: How draws are shared: one lambda (or a per-sample lambda) and one apply/switch draw per batch, or timm's
#: ``"elem"`` (lambda, apply and switch per sample) and ``"pair"`` (the same per mutual pair of samples).
MixMode = Literal["batch", "elem", "pair"]
#: What a mixed sample's target is: the mix of both labels, or the label of the sample with the larger weight.
TargetMode = Literal["mixed", "dominant"]


def check_mixing_company(trainer: L.Trainer, pl_module: L.LightningModule, owner: MixingCallback) -> None:
    """At fit start: two callbacks that mix the inputs mix every batch twice (warn), and break sparse targets (raise).

    Only the first mixing callback in ``trainer.callbacks`` speaks, so the warning comes once.
    """
    mixing = [cb for cb in trainer.callbacks if isinstance(cb, MixingCallback) and cb.mixes_inputs]  # type: ignore[attr-defined]
    if len(mixing) < 2 or mixing[0] is not owner:
        return
    names = " and ".join(type(cb).__name__ for cb in mixing)
    if getattr(pl_module, "sparse_mixed_targets", False):
        raise ValueError(
            f"{names} would each mix every training batch, and {type(pl_module).__name__} uses SparseMixingMixin: "
            "the sparse targets hold one pair of labels and one lambda, so a second mix cannot be kept. Use one "
            "mixing callback (`MixUpCutMix(...)` switches between MixUp and CutMix per batch), or drop the mixin "
            "for dense (N, K) targets."
        )
    rank_zero_warn(
        f"{names} are all on this Trainer: each mixes every training batch, so every batch is mixed "
        f"{len(mixing)} times (a target blends up to {2 ** len(mixing)} samples). To switch between MixUp and "
        "CutMix per batch, as timm and DeiT do, use one `MixUpCutMix(mixup_alpha=..., cutmix_alpha=..., "
        "switch_prob=...)`."
    )


class MixingCallback(L.Callback):
    """Base of the batch-transforming callbacks: generator, state, keys, checks. Not for direct use.

    A subclass sets ``log_name`` and ``mixes_inputs``, calls :meth:`_setup` from ``setup`` and, per batch,
    :meth:`_begin` (which handles the batches it does not mix), then builds targets with :meth:`_mixed_targets`
    from draws moved with :meth:`_to_device`, writes with :meth:`_write` and counts with :meth:`_record`.
    """

    #: Prefix of the logged epoch statistics; empty for no logging.
    log_name: ClassVar[str] = ""
    #: Whether the callback mixes the inputs (checked at fit start: two such callbacks mix every batch twice).
    mixes_inputs: ClassVar[bool] = True

    def __init__(
        self,
        *,
        num_classes: int | None,
        prob: float,
        label_smoothing: float,
        input_key: BatchKey,
        target_key: BatchKey,
        last_epoch: int | None,
        pairing: Pairing = "shift",
        multi_label: bool = False,
        mode: MixMode = "batch",
        target_mode: TargetMode = "mixed",
    ) -> None:
        if target_mode not in get_args(TargetMode):
            raise ValueError(
                f"Expected `target_mode` to be one of {list(get_args(TargetMode))}, but got {target_mode!r}."
            )
        self.target_mode: TargetMode = target_mode
        check_num_classes_arg(num_classes)
        check_probability(prob, "prob")
        check_smoothing(label_smoothing, "label_smoothing")
        validate_key(input_key, "input_key")
        validate_key(target_key, "target_key")
        if last_epoch is not None and (
            isinstance(last_epoch, bool) or not isinstance(last_epoch, int) or last_epoch < 0
        ):
            raise ValueError(f"Expected `last_epoch` to be an int >= 0 or None, but got {last_epoch!r}.")
        self.num_classes = num_classes
        self.prob = float(prob)
        self.label_smoothing = float(label_smoothing)
        self.input_key = input_key
        self.target_key = target_key
        self.last_epoch = last_epoch
        self.pairing = check_pairing(pairing)
        if mode not in get_args(MixMode):
            raise ValueError(f"Expected `mode` to be one of {list(get_args(MixMode))}, but got {mode!r}.")
        self.mode: MixMode = mode
        self.multi_label = bool(multi_label)
        self._num_classes: int | None = num_classes
        self._generator: torch.Generator | None = None
        self._generator_rank: int | None = None
        self._validate_next = True
        self._pending_state: dict[str, Any] | None = None
        self._warned_small_batch = False
        self._output = ReusableOutput()  # mixed inputs
        self._target_output = ReusableOutput()  # dense mixed targets
        self._stats = {"batches": 0.0, "mixed": 0.0, "lambda": 0.0, "cutmix": 0.0}

    # --- identity and state ------------------------------------------------------------------------
    def _state_key_fields(self) -> dict[str, Any]:
        return {"input_key": self.input_key, "target_key": self.target_key}

    @property
    def state_key(self) -> str:
        """The class and the batch entries it changes: what tells two instances apart, not the hyperparameters.

        So a resumed run with another ``prob`` or ``alpha`` keeps the generator state (see docs/mixing.md).
        """
        return self._generate_state_key(**self._state_key_fields())

    def _smoothing_source(self) -> str | None:
        """How this callback smooths the labels, for the check that only one thing does; ``None`` if it does not."""
        if self.label_smoothing > 0:
            return f"{type(self).__name__}(label_smoothing={self.label_smoothing})"
        return None

    def state_dict(self) -> dict[str, Any]:
        """The generator state (a uint8 tensor) and the seed: loads with ``torch.load(weights_only=True)``."""
        if self._generator is None:
            return dict(self._pending_state) if self._pending_state is not None else {}
        return {"generator_state": self._generator.get_state(), "seed": self._seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the generator, now or at ``setup`` when it does not exist yet."""
        if "generator_state" not in state_dict:
            return
        if self._generator is None:
            self._pending_state = dict(state_dict)
        else:
            self._generator.set_state(state_dict["generator_state"])

    # --- setup -------------------------------------------------------------------------------------
    def _setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, *, needs_classes: bool) -> None:
        if stage != "fit":
            return
        if needs_classes:
            self._num_classes = resolve_num_classes(self.num_classes, pl_module, type(self).__name__)
        sources = [cb._smoothing_source() for cb in trainer.callbacks if isinstance(cb, MixingCallback)]  # type: ignore[attr-defined]
        check_single_smoothing([source for source in sources if source is not None], pl_module)
        if self.mixes_inputs:
            check_mixing_company(trainer, pl_module, self)
        self._validate_next = True
        rank = data_parallel_rank(trainer)
        if self._generator is None or self._generator_rank != rank:
            # The first fit (or a new rank): derive the stream. A later fit on this callback continues it.
            self._seed = base_seed()
            salt = zlib.crc32(self.state_key.encode())
            self._generator = rank_generator(self._seed, rank, stream=salt)
            self._generator_rank = rank
        if self._pending_state is not None:
            self._generator.set_state(self._pending_state["generator_state"])
            self._pending_state = None

    @property
    def generator(self) -> torch.Generator:
        """The callback's generator; exists from ``setup`` (fit) on."""
        if self._generator is None:
            raise RuntimeError(f"{type(self).__name__} is used before `setup`: let the Trainer run `fit`.")
        return self._generator

    # --- per batch ---------------------------------------------------------------------------------
    def _active(self, trainer: L.Trainer) -> bool:
        return self.last_epoch is None or trainer.current_epoch < self.last_epoch

    def _read_targets(self, batch: Any) -> Tensor:
        targets = check_targets(
            get_entry(batch, self.target_key, "target_key"), f"batch[{self.target_key!r}] (targets)"
        )
        if self._validate_next:  # once per epoch (a host sync), see the module notes
            self._validate_next = False
            self._validate_targets(targets)
        return targets

    def _validate_targets(self, targets: Tensor) -> None:
        assert self._num_classes is not None  # set in setup
        if targets.ndim == 1:
            if self.multi_label:
                one_hot(targets, self._num_classes, multi_label=True)  # raises: multi-label needs (N, K) rows
            check_range(targets, self._num_classes)
        else:
            one_hot(targets, self._num_classes)  # the column count
            check_rows(targets, multi_label=self.multi_label)

    def _read_any_targets(self, batch: Any) -> Tensor | MixedTargets:
        """Index or probability targets (checked), or the :class:`MixedTargets` of a callback before this one."""
        raw = get_entry(batch, self.target_key, "target_key")
        if isinstance(raw, MixedTargets):
            return raw
        return self._read_targets(batch)

    def _begin(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *, read_inputs: bool = True
    ) -> tuple[Tensor | None, Tensor | MixedTargets] | None:
        """Read a training batch; ``None`` when it is not mixed, after giving it the targets of the epoch.

        Outside ``last_epoch`` the batch is left as it is. A batch of one sample, or one that ``prob`` does not
        select (in ``mode="batch"``), gets its (smoothed) one-hot rows, so that one epoch sees one kind of target.
        """
        if not self._active(trainer):
            self._record()
            return None
        targets = self._read_any_targets(batch)
        n = len(targets.targets_a) if isinstance(targets, MixedTargets) else targets.shape[0]
        inputs = self._read_inputs(batch, n) if read_inputs else None
        if self._batch_too_small(n) or (self.mode == "batch" and not self._draw_apply()):
            self._write(batch, self.target_key, self._unmixed_targets(pl_module, targets), "target_key")
            self._record()
            return None
        return inputs, targets

    def _read_inputs(self, batch: Any, n: int) -> Tensor:
        inputs = get_entry(batch, self.input_key, "input_key")
        if not isinstance(inputs, Tensor) or inputs.ndim < 1:
            raise TypeError(
                f"Expected batch[{self.input_key!r}] (inputs) to be a tensor of shape (N, ...), but got "
                f"{type(inputs).__name__}. Point `input_key` at the input tensor of the batch."
            )
        if inputs.shape[0] != n:
            raise ValueError(
                f"Expected inputs and targets with the same batch size, but got {inputs.shape[0]} inputs "
                f"(batch[{self.input_key!r}]) and {n} targets (batch[{self.target_key!r}]). Check `input_key` "
                "and `target_key`."
            )
        return inputs

    def _check_blendable(self, inputs: Tensor) -> None:
        """Refuse integer inputs other than ``uint8`` images: blending token ids makes other (wrong) token ids.

        ``uint8`` inputs are images, blended in float32 and rounded back (timm's ``FastCollateMixup``).
        """
        if torch.is_floating_point(inputs) or inputs.dtype == torch.uint8:
            return
        owner = type(self).__name__
        raise TypeError(
            f"{owner} cannot blend batch[{self.input_key!r}] of dtype {inputs.dtype} (integer inputs, such as token "
            "ids): a blend of two ids is a third, unrelated id. Mix a floating representation instead: "
            f"`{owner}(layer='<name of the embedding>')` mixes that submodule's output (manifold mixing), e.g. "
            "`layer='embedding'`. uint8 images are blended as images."
        )

    def _batch_too_small(self, n: int) -> bool:
        if n >= 2:
            return False
        if not self._warned_small_batch:
            rank_zero_warn(f"{type(self).__name__} skips batches of size {n}: there is no partner to mix with.")
            self._warned_small_batch = True
        return True

    def _draw_apply(self) -> bool:
        """One draw per batch decides whether this batch is mixed (no draw when ``prob`` is 1)."""
        if self.prob >= 1.0:
            return True
        return bool(torch.rand((), generator=self.generator) < self.prob)

    def _sparse(self, pl_module: L.LightningModule, targets: Tensor | MixedTargets) -> bool:
        return isinstance(targets, Tensor) and targets.ndim == 1 and getattr(pl_module, "sparse_mixed_targets", False)

    def _unmixed_targets(self, pl_module: L.LightningModule, targets: Tensor | MixedTargets) -> Tensor | MixedTargets:
        """Targets of a batch that is not mixed: dense (smoothed) one-hot rows, or sparse with the mixin."""
        assert self._num_classes is not None  # set in setup
        if isinstance(targets, MixedTargets):
            return targets
        if self._sparse(pl_module, targets):
            return MixedTargets.unmixed(targets, self._num_classes, self.label_smoothing)
        return one_hot(targets, self._num_classes, self.label_smoothing, multi_label=self.multi_label, validate=False)

    def _mixed_targets(
        self,
        pl_module: L.LightningModule,
        targets: Tensor | MixedTargets,
        lam: float | Tensor,
        index: Tensor,
        shift: int | None = None,
    ) -> Tensor | MixedTargets:
        """``lam * t + (1 - lam) * t[index]``: built in one pass for index targets, sparse with the mixin.

        ``lam`` and ``index`` must be on the targets' device already (see :meth:`_to_device`).
        """
        assert self._num_classes is not None  # set in setup
        if self.target_mode == "dominant":  # MixupIO (Wang et al., 2023): the label of the larger weight, one-hot
            lam = (lam > 0.5).to(torch.float32) if isinstance(lam, Tensor) else float(lam > 0.5)
        if isinstance(targets, MixedTargets) or self._sparse(pl_module, targets):
            base = targets if isinstance(targets, MixedTargets) else self._unmixed_targets(pl_module, targets)
            assert isinstance(base, MixedTargets)
            if base.targets_b is not base.targets_a:
                raise ValueError(
                    f"{type(self).__name__} received sparse targets that are mixed already (MixedTargets from "
                    "another mixing callback): one pair of labels cannot hold a second mix. Use one mixing "
                    "callback with SparseMixingMixin (`MixUpCutMix` switches between MixUp and CutMix)."
                )
            lam_t = lam.to(base.lam) if isinstance(lam, Tensor) else torch.full_like(base.lam, lam)
            partners = base.targets_a.roll(-shift, 0) if shift is not None else base.targets_a[index]
            return base._replace(targets_b=partners, lam=lam_t)
        out = None
        if targets.ndim == 1:  # index targets are built into a reused (N, K) tensor (see the module notes)
            shape = (targets.shape[0], self._num_classes)
            out = self._target_output.take_empty(shape, torch.get_default_dtype(), targets.device)
        return mixed_one_hot(
            targets,
            self._num_classes,
            lam,
            index,
            self.label_smoothing,
            out=out,
            shift=shift,
            multi_label=self.multi_label,
            validate=False,
        )

    # --- draws -------------------------------------------------------------------------------------
    @staticmethod
    def _to_device(params: MixingParams, device: torch.device) -> MixingParams:
        """The draws (made on the CPU) on ``device``, copied without blocking the host."""
        return params.to(device)

    @staticmethod
    def _lam_dtype(trainer: L.Trainer, inputs: Tensor | None) -> torch.dtype | None:
        """The dtype a per-sample lambda takes when it weights the inputs: floating inputs' own, or the precision's.

        Rounding lambda to it once, before the targets are built, gives inputs and targets the same lambda
        (a bf16 lambda rounded only for the inputs is off by up to 2e-3 from the float32 one of the targets).
        """
        if inputs is not None and torch.is_floating_point(inputs):
            return inputs.dtype
        precision = str(getattr(trainer, "precision", ""))
        return {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(precision)

    @staticmethod
    def _round_lam(lam: float | Tensor, dtype: torch.dtype | None) -> float | Tensor:
        """A per-sample lambda rounded to ``dtype`` (when coarser than float32) and back to float32."""
        if not isinstance(lam, Tensor) or dtype is None or torch.finfo(dtype).eps <= torch.finfo(torch.float32).eps:
            return lam
        return lam.to(dtype).to(torch.float32)

    def _pair_index(self, n: int) -> tuple[Tensor, int | None]:
        """The pairing of a batch of ``n >= 2`` for ``mode="elem"``: a random shift, or a derangement."""
        if self.pairing == "permutation":
            return derangement(n, generator=self.generator), None
        return random_shift(n, self.generator)

    def _mutual_pairs(self, n: int) -> tuple[Tensor, Tensor]:
        """``(first, second)`` members ``(n // 2,)`` of mutual pairs for ``mode="pair"``.

        ``"shift"``: timm's flip, sample ``i`` with ``n - 1 - i`` (relies on shuffled batches, as the shift does);
        ``"permutation"``: a uniformly random perfect matching. With ``n`` odd one sample stays unmixed.
        """
        m = n // 2
        if self.pairing == "permutation":
            order = torch.randperm(n, generator=self.generator)
            return order[:m], order[m : 2 * m]
        first = torch.arange(m)
        return first, n - 1 - first

    def _elem_draws(
        self,
        n: int,
        *,
        mixup_alpha: float | None,
        cutmix_alpha: float | None,
        switch_prob: float,
        sizes: Sequence[int] | None,
        minmax: tuple[float, float] | None = None,
        correct_lam: bool = True,
        lam_dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, Box | None, Tensor, Tensor, int | None]:
        """Per-sample (``"elem"``) or per-pair (``"pair"``) draws, timm's ``_params_per_elem``, all on the CPU.

        Returns:
            ``(weight, box, kept, index, shift)``: the MixUp weight of each sample ``(N,)`` (1 for samples cut or
            not mixed), per-sample boxes (empty for samples not cut; ``None`` without CutMix), the weight of each
            sample's own target ``(N,)`` float32, the pairing ``(N,)`` and its shift (or ``None``).
        """
        g = self.generator
        pair = self.mode == "pair"
        if pair:
            first, second = self._mutual_pairs(n)
            count = first.shape[0]
        else:
            count = n
        apply = torch.rand(count, generator=g) < self.prob if self.prob < 1.0 else torch.ones(count, dtype=torch.bool)
        if mixup_alpha is not None and cutmix_alpha is not None:
            use_cut = torch.rand(count, generator=g) < switch_prob
            lam_cut = beta(cutmix_alpha, (count,), generator=g)
            lam = torch.where(use_cut, lam_cut, beta(mixup_alpha, (count,), generator=g))
        elif cutmix_alpha is not None:
            use_cut = torch.ones(count, dtype=torch.bool)
            lam = beta(cutmix_alpha, (count,), generator=g)
        else:
            assert mixup_alpha is not None
            use_cut = torch.zeros(count, dtype=torch.bool)
            lam = beta(mixup_alpha, (count,), generator=g)
        lam32 = self._round_lam(lam.to(torch.float32), lam_dtype)
        assert isinstance(lam32, Tensor)
        mixes = apply & ~use_cut
        weight = torch.where(mixes, lam32, torch.ones(()))
        kept = weight.clone()
        box = None
        if cutmix_alpha is not None:
            assert sizes is not None
            box = sample_box(lam, sizes, generator=g, minmax=minmax)
            cuts = apply & use_cut
            box = Box(box.lo, torch.where(cuts[:, None], box.hi, box.lo))  # an empty box where nothing is cut
            correct = correct_lam or minmax is not None
            cut_kept = kept_fraction(box.lo, box.hi, sizes).to(torch.float32) if correct else lam32
            kept = torch.where(cuts, cut_kept, kept)
        if not pair:
            index, shift = self._pair_index(n)
            return weight, box, kept, index, shift
        # Both members of a pair share its draws; each takes the other as its partner (an involution).
        index = torch.arange(n)
        index[first], index[second] = second, first
        full_weight, full_kept = torch.ones(n), torch.ones(n)
        for members in (first, second):
            full_weight[members], full_kept[members] = weight, kept
        full_box = None
        if box is not None:
            lo = torch.zeros((n, box.lo.shape[1]), dtype=torch.long)
            hi = torch.zeros_like(lo)
            for members in (first, second):
                lo[members], hi[members] = box.lo, box.hi
            full_box = Box(lo, hi)
        return full_weight, full_box, full_kept, index, None

    def _mix_elem_inputs(
        self, inputs: Tensor, weight: Tensor, box: Box, index: Tensor, shift: int | None, axes: Sequence[int]
    ) -> Tensor:
        """Apply per-sample draws (on the inputs' device) to the inputs: MixUp or CutMix chosen per sample."""
        return mix_elementwise(inputs, index, weight, box.lo, box.hi, axes, out=self._mix_out(inputs), shift=shift)

    def _write(self, batch: Any, key: BatchKey, value: Any, name: str) -> None:
        set_entry(batch, key, value, name)

    # --- statistics ------------------------------------------------------------------------------------
    def _record(self, lam: float | Tensor | None = None, *, cutmix: bool | float = False) -> None:
        """Count one training batch: mixed with ``lam`` (a float or a per-sample CPU tensor), or not when ``None``.

        Pass the CPU draw, not its device copy: reading a device tensor here would be a host sync per batch.
        """
        stats = self._stats
        stats["batches"] += 1.0
        if lam is None:
            stats["lambda"] += 1.0
            return
        stats["mixed"] += 1.0
        stats["cutmix"] += float(cutmix)
        stats["lambda"] += float(lam.mean()) if isinstance(lam, Tensor) else float(lam)

    def _epoch_metrics(self) -> dict[str, float]:
        stats = self._stats
        batches = stats["batches"]
        return {
            f"{self.log_name}/mixed_fraction": stats["mixed"] / batches,
            f"{self.log_name}/lambda": stats["lambda"] / batches,
        }

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stats = dict.fromkeys(self._stats, 0.0)
        self._validate_next = True

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.log_name or self._stats["batches"] == 0:
            return
        pl_module.log_dict(self._epoch_metrics(), on_step=False, on_epoch=True, sync_dist=True)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._output.release()
        self._target_output.release()

    def _mix_out(self, inputs: Tensor) -> Tensor | None:
        """Where to write the mixed inputs: the reusable output (see the module notes), or ``None`` to allocate."""
        return self._output.take(inputs)
