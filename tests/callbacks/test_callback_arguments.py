"""Each argument of the mixing and smoothing callbacks reaches the attribute it names; the defaults are documented."""

from __future__ import annotations

from typing import Any

import pytest

from lightning_reg import CutMix, LabelSmoothing, MixUp, MixUpCutMix, RegMixup

# Values unlike every default, so that an argument that is dropped or replaced on its way shows.
_COMMON: dict[str, Any] = {
    "num_classes": 7,
    "prob": 0.25,
    "label_smoothing": 0.15,
    "input_key": "x",
    "target_key": "y",
    "last_epoch": 3,
    "pairing": "permutation",
    "multi_label": True,
}
_PER_SAMPLE = {"per_sample": True}
_CUT: dict[str, Any] = {
    "dims": (2, 3),
    "inplace": True,
    "cutmix_minmax": (0.2, 0.8),
    "correct_lam": False,
    "carry": {"mask": "cut"},
}
_MODES: dict[str, Any] = {"mode": "elem", "target_mode": "dominant"}

CASES: dict[str, tuple[type, tuple[Any, ...], dict[str, Any], dict[str, Any]]] = {
    # class, positional arguments, keyword arguments, the attributes they must set
    "MixUp": (MixUp, (0.7,), {**_COMMON, **_PER_SAMPLE, **_MODES, "layer": "net", "inplace": True}, {"alpha": 0.7}),
    "CutMix": (CutMix, (0.7,), {**_COMMON, **_PER_SAMPLE, **_MODES, **_CUT}, {"alpha": 0.7}),
    "MixUpCutMix": (
        MixUpCutMix,
        (0.3, 0.7, 0.9),
        {**_COMMON, **_PER_SAMPLE, **_MODES, **_CUT},
        {"mixup_alpha": 0.3, "cutmix_alpha": 0.7, "switch_prob": 0.9},
    ),
    "RegMixup": (RegMixup, (7.0,), {**_COMMON, **_PER_SAMPLE}, {"alpha": 7.0}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_argument_reaches_its_attribute(name: str) -> None:
    cls, args, kwargs, positional = CASES[name]
    callback = cls(*args, **kwargs)
    got = {key: getattr(callback, key) for key in [*kwargs, *positional]}
    assert got == {**kwargs, **positional}


DEFAULTS: dict[str, tuple[type, dict[str, Any]]] = {
    "MixUp": (MixUp, {"alpha": 0.2, "per_sample": False, "layer": None, "inplace": False}),
    "CutMix": (
        CutMix,
        {"alpha": 1.0, "per_sample": False, "dims": None, "inplace": False, "cutmix_minmax": None, "correct_lam": True},
    ),
    "MixUpCutMix": (
        MixUpCutMix,
        {"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "switch_prob": 0.5, "per_sample": False, "inplace": False},
    ),
    "RegMixup": (RegMixup, {"alpha": 20.0, "per_sample": False}),  # the paper's default
}
_COMMON_DEFAULTS: dict[str, Any] = {
    "num_classes": None,
    "prob": 1.0,
    "label_smoothing": 0.0,
    "input_key": 0,
    "target_key": 1,
    "last_epoch": None,
    "pairing": "shift",
    "multi_label": False,
    "mode": "batch",
    "target_mode": "mixed",
}


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_the_defaults_are_the_documented_ones(name: str) -> None:
    cls, own = DEFAULTS[name]
    callback = cls()
    expected = {**_COMMON_DEFAULTS, **own}
    assert {key: getattr(callback, key) for key in expected} == expected
    if isinstance(callback, CutMix):
        assert callback.carry == {}


def test_label_smoothing_keeps_its_arguments_and_defaults() -> None:
    fields = ("smoothing", "num_classes", "target_key", "multi_label")
    callback = LabelSmoothing(0.2, num_classes=5, target_key="labels", multi_label=True)
    assert tuple(getattr(callback, key) for key in fields) == (0.2, 5, "labels", True)
    assert tuple(getattr(LabelSmoothing(), key) for key in fields) == (0.1, None, 1, False)


def test_state_keys_name_the_batch_entries_each_callback_changes() -> None:
    assert LabelSmoothing(target_key="y").state_key == "LabelSmoothing{'target_key': 'y'}"
    assert CutMix(input_key="x", target_key="y").state_key == "CutMix{'input_key': 'x', 'target_key': 'y'}"
    assert RegMixup().state_key == "RegMixup{'input_key': 0, 'target_key': 1}"
