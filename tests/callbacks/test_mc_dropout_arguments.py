"""MCDropoutEvaluation's arguments: each reaches its attribute, the defaults are the documented ones, bad ones are
named whole."""

from __future__ import annotations

from typing import Any

import pytest

from lightning_reg import MCDropoutEvaluation


def test_every_argument_reaches_its_attribute() -> None:
    kwargs: dict[str, Any] = {
        "n_samples": 7,
        "plot": False,
        "include_drop_path": True,
        "chunk_size": 64,
        "n_bins": 4,
        "input_key": "x",
        "target_key": "y",
        "uncertainty_score": "mutual_information",
        "ood_dataloader_idx": 1,
        "masks": "torch",
    }
    callback = MCDropoutEvaluation(stages=("test",), **kwargs)
    assert {key: getattr(callback, key) for key in kwargs} == kwargs
    assert callback.stages == ("test",)
    assert callback.predictions == []


def test_the_defaults_are_the_documented_ones() -> None:
    callback = MCDropoutEvaluation()
    expected = {
        "n_samples": 30,
        "stages": ("validate", "test"),
        "plot": True,
        "include_drop_path": False,
        "chunk_size": None,
        "n_bins": 15,
        "input_key": 0,
        "target_key": 1,
        "forward_fn": None,
        "uncertainty_score": "entropy",
        "ood_dataloader_idx": None,
        "masks": "auto",
    }
    assert {key: getattr(callback, key) for key in expected} == expected


def test_one_stage_may_be_given_as_a_string_and_repeats_are_dropped() -> None:
    assert MCDropoutEvaluation(stages="test").stages == ("test",)
    assert MCDropoutEvaluation(stages=["test", "validate", "test"]).stages == ("test", "validate")


def test_the_smallest_values_are_allowed() -> None:
    callback = MCDropoutEvaluation(n_samples=1, chunk_size=1, n_bins=1)
    assert (callback.n_samples, callback.chunk_size, callback.n_bins) == (1, 1, 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_samples": 0}, "Expected `n_samples` to be an int >= 1, but got 0."),
        ({"n_samples": 2.0}, "Expected `n_samples` to be an int >= 1, but got 2.0."),
        ({"n_samples": True}, "Expected `n_samples` to be an int >= 1, but got True."),
        ({"chunk_size": 0}, "Expected `chunk_size` to be None or an int >= 1, but got 0."),
        ({"chunk_size": 8.0}, "Expected `chunk_size` to be None or an int >= 1, but got 8.0."),
        ({"chunk_size": True}, "Expected `chunk_size` to be None or an int >= 1, but got True."),
        ({"n_bins": 0}, "Expected `n_bins` to be a positive int, but got 0."),
        ({"n_bins": 4.0}, "Expected `n_bins` to be a positive int, but got 4.0."),
        ({"n_bins": True}, "Expected `n_bins` to be a positive int, but got True."),
        ({"ood_dataloader_idx": True}, "Expected `ood_dataloader_idx` to be None or an int >= 0, but got True."),
        ({"ood_dataloader_idx": 1.5}, "Expected `ood_dataloader_idx` to be None or an int >= 0, but got 1.5."),
        (
            {"stages": ("validate", "predict")},
            "Expected `stages` to contain only ('validate', 'test'), but got ['predict']. Predict is always sampled; "
            "it needs no entry.",
        ),
    ],
)
def test_bad_arguments_are_named_whole(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="Expected") as raised:
        MCDropoutEvaluation(**kwargs)
    assert str(raised.value) == message


def test_a_bad_target_key_is_named_whole() -> None:
    with pytest.raises(TypeError, match="target_key") as raised:
        MCDropoutEvaluation(target_key=1.5)  # type: ignore[arg-type]
    assert str(raised.value) == (
        "Expected `target_key` to be an int (position in a list batch) or a str (key of a dict batch), but got 1.5 of "
        "type float."
    )
