"""Label noise: the flipped fraction is exactly what was asked, seeded; class-dependent flips follow the map."""

from __future__ import annotations

import pytest
import torch

from zoo.data import DIGIT_FLIPS, flip_labels


def labels_of(n_per_class: int = 50, num_classes: int = 10) -> torch.Tensor:
    return torch.arange(num_classes).repeat(n_per_class)[torch.randperm(n_per_class * num_classes)]


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.4, 0.8])
def test_symmetric_noise_flips_exactly_the_fraction_asked_to_other_classes(rate: float) -> None:
    labels = labels_of()
    noisy = flip_labels(labels, rate, 10, generator=torch.Generator().manual_seed(1))
    assert noisy.dtype == labels.dtype
    assert noisy.shape == labels.shape
    assert int((noisy != labels).sum()) == round(rate * len(labels))
    assert int(noisy.min()) >= 0
    assert int(noisy.max()) < 10


def test_symmetric_noise_draws_the_new_class_uniformly_among_the_others() -> None:
    labels = torch.zeros(20_000, dtype=torch.long)
    noisy = flip_labels(labels, 0.5, 5, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(noisy, minlength=5)
    assert counts[0] == 10_000
    # each of the 4 other classes gets 1/4 of the 10,000 flips: binomial std is about 43
    assert torch.all((counts[1:] - 2500).abs() < 200), counts


def test_label_noise_is_a_function_of_the_seed_and_leaves_the_input_alone() -> None:
    labels = labels_of()
    before = labels.clone()
    a = flip_labels(labels, 0.4, 10, generator=torch.Generator().manual_seed(3))
    b = flip_labels(labels, 0.4, 10, generator=torch.Generator().manual_seed(3))
    c = flip_labels(labels, 0.4, 10, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(labels, before)


@pytest.mark.parametrize("rate", [0.2, 0.45])
def test_class_dependent_noise_flips_the_fraction_of_each_source_class_to_its_look_alike(rate: float) -> None:
    labels = labels_of(n_per_class=37)
    noisy = flip_labels(labels, rate, 10, kind="class_dependent", generator=torch.Generator().manual_seed(0))
    for digit in range(10):
        members = labels == digit
        changed = noisy[members] != digit
        if digit in DIGIT_FLIPS:
            assert int(changed.sum()) == round(rate * 37)
            assert torch.all(noisy[members][changed] == DIGIT_FLIPS[digit])
        else:
            assert not changed.any()


def test_class_dependent_noise_takes_a_custom_map() -> None:
    labels = labels_of(n_per_class=10, num_classes=3)
    noisy = flip_labels(labels, 0.5, 3, kind="class_dependent", flips={0: 2}, generator=torch.Generator())
    assert torch.equal(noisy[labels != 0], labels[labels != 0])
    assert int((noisy[labels == 0] == 2).sum()) == 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rate": 1.0}, r"Expected `rate` to be a float in \[0, 1\)"),
        ({"rate": -0.1}, r"Expected `rate` to be a float in \[0, 1\)"),
        ({"kind": "pairs"}, r"Expected `kind` to be one of \('symmetric', 'class_dependent'\)"),
        ({"num_classes": 1}, "Expected `num_classes` to be an int >= 2"),
        ({"labels": torch.tensor([0, 10])}, r"Expected `labels` in \[0, 10\), but got values from 0 to 10"),
        ({"labels": torch.zeros(2, 2, dtype=torch.long)}, "1-d tensor of class indices"),
        ({"kind": "class_dependent", "flips": {1: 1}}, "to another such class, but got 1 -> 1"),
        ({"kind": "class_dependent", "flips": {1: 12}}, "to another such class, but got 1 -> 12"),
    ],
)
def test_flip_labels_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"labels": torch.arange(10), "rate": 0.2, "num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        flip_labels(args.pop("labels"), args.pop("rate"), args.pop("num_classes"), **args)
