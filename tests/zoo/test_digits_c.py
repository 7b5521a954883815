"""Digits-C: corruptions are deterministic given the seed, in range, of the right shape, and grow with severity."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage

from zoo.data import CORRUPTIONS, SEVERITIES, DigitsDataModule, corrupt_digits
from zoo.data.digits_c import SEVERITY_PARAMS, apply_affine


@pytest.fixture(scope="module")
def raw() -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.as_tensor(load_digits().images[:200], dtype=torch.float32)  # (200, 8, 8), 0..16


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_every_corruption_keeps_shape_dtype_and_pixel_range_and_repeats_exactly(
    raw: torch.Tensor, corruption: str
) -> None:
    for severity in SEVERITIES:
        out = corrupt_digits(raw, corruption, severity, seed=5)  # type: ignore[arg-type]
        assert out.shape == raw.shape
        assert out.dtype == torch.float32
        assert float(out.min()) >= 0.0
        assert float(out.max()) <= 16.0
        assert torch.isfinite(out).all()
        assert torch.equal(out, corrupt_digits(raw, corruption, severity, seed=5))  # type: ignore[arg-type]
        assert not torch.equal(out, raw)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corruptions_move_the_images_further_at_each_severity(raw: torch.Tensor, corruption: str) -> None:
    distance = [float((corrupt_digits(raw, corruption, s) - raw).abs().mean()) for s in SEVERITIES]  # type: ignore[arg-type]
    assert all(a < b for a, b in itertools.pairwise(distance)), distance


def test_random_corruptions_follow_the_seed_and_leave_the_global_rng_alone(raw: torch.Tensor) -> None:
    state = torch.get_rng_state()
    for corruption in ("gaussian_noise", "affine"):
        a = corrupt_digits(raw, corruption, 3, seed=0)
        assert not torch.equal(a, corrupt_digits(raw, corruption, 3, seed=1))
        assert torch.equal(torch.get_rng_state(), state)
    for corruption in ("gaussian_blur", "contrast"):  # no randomness: the seed changes nothing
        assert torch.equal(corrupt_digits(raw, corruption, 3, seed=0), corrupt_digits(raw, corruption, 3, seed=1))


def test_gaussian_noise_has_the_severitys_standard_deviation() -> None:
    grey = torch.full((500, 8, 8), 8.0)  # mid-grey: clipping at 0 and 16 is more than 4 sigma away at severity 1
    noise = corrupt_digits(grey, "gaussian_noise", 1) - grey
    sigma = SEVERITY_PARAMS["gaussian_noise"][0]
    assert abs(float(noise.mean())) < 0.02
    assert abs(float(noise.std()) / sigma - 1) < 0.02


def test_blur_matches_scipys_gaussian_filter(raw: torch.Tensor) -> None:
    for severity in SEVERITIES:
        sigma = SEVERITY_PARAMS["gaussian_blur"][severity - 1]
        radius = min(3, int(np.ceil(3 * sigma)))  # type: ignore[operator]
        # zero padding, truncated at `radius` pixels: scipy's `constant` mode with truncate = radius / sigma
        expected = ndimage.gaussian_filter(
            raw.numpy(), sigma=(0, sigma, sigma), mode="constant", truncate=radius / sigma
        )
        got = corrupt_digits(raw, "gaussian_blur", severity)
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


def test_contrast_is_the_closed_form(raw: torch.Tensor) -> None:
    c = SEVERITY_PARAMS["contrast"][2]
    mean = raw.mean(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(corrupt_digits(raw, "contrast", 3), mean + c * (raw - mean))  # type: ignore[operator]


def test_apply_affine_identity_and_whole_pixel_shifts(raw: torch.Tensor) -> None:
    n = len(raw)
    torch.testing.assert_close(apply_affine(raw, torch.zeros(n), torch.zeros(n, 2)), raw)
    # one pixel right and two down: torch.roll with what wraps around set to background
    expected = torch.roll(raw, shifts=(2, 1), dims=(1, 2))
    expected[:, :2, :] = 0
    expected[:, :, :1] = 0
    torch.testing.assert_close(apply_affine(raw, torch.zeros(n), torch.tensor([[1.0, 2.0]]).expand(n, 2)), expected)
    # a quarter turn of a centred square image is torch.rot90 (the sign convention does not matter here: both ways)
    turned = apply_affine(raw, torch.full((n,), 90.0), torch.zeros(n, 2))
    assert any(torch.allclose(turned, torch.rot90(raw, k, dims=(1, 2)), atol=1e-4) for k in (1, 3))


def test_affine_moves_every_image_by_at_least_half_the_severitys_amount(raw: torch.Tensor) -> None:
    moved = corrupt_digits(raw, "affine", 5)
    assert ((moved - raw).abs().amax(dim=(1, 2)) > 1.0).all()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (
            ("blur", 1),
            r"Expected `corruption` to be one of \('gaussian_noise', 'gaussian_blur', 'contrast', 'affine'\)",
        ),
        (("contrast", 0), r"Expected `severity` to be an int in \(1, 2, 3, 4, 5\), but got 0"),
        (("contrast", 6), "but got 6"),
        (("contrast", True), "but got True"),
    ],
)
def test_corrupt_digits_rejects_bad_arguments(raw: torch.Tensor, args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        corrupt_digits(raw, *args)


def test_corrupt_digits_refuses_standardized_or_badly_shaped_images(raw: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"raw pixel values in \[0, 16\] \(before standardization\)"):
        corrupt_digits((raw - raw.mean()) / raw.std(), "contrast", 1)
    with pytest.raises(ValueError, match=r"a \(N, H, W\) tensor of raw pixels, but got shape \(200, 1, 8, 8\)"):
        corrupt_digits(raw.unsqueeze(1), "contrast", 1)


def test_datamodule_corrupted_test_set_is_the_test_split_corrupted_then_standardized() -> None:
    dm = DigitsDataModule()
    dm.setup()
    clean_x, clean_y = dm.test_set.tensors
    x, y = dm.corrupted_test_set("affine", 2, seed=1).tensors
    assert torch.equal(y, clean_y)
    assert x.shape == clean_x.shape
    raw_test = clean_x * dm._std + dm._mean
    torch.testing.assert_close(raw_test.round(), raw_test, atol=1e-4, rtol=0)  # whole pixel values 0..16
    expected = (corrupt_digits(raw_test.squeeze(1).round(), "affine", 2, seed=1) - dm._mean) / dm._std
    torch.testing.assert_close(x.squeeze(1), expected, atol=1e-5, rtol=0)
    loader = dm.corrupted_test_dataloader("affine", 2, seed=1)
    assert torch.equal(torch.cat([b[0] for b in loader]), x)


def test_datamodule_corrupted_sequences_are_the_corrupted_images_row_by_row() -> None:
    images, seqs = DigitsDataModule(), DigitsDataModule(as_sequence=True)
    images.setup(), seqs.setup()
    xi = images.corrupted_test_set("gaussian_noise", 4).tensors[0]
    xs = seqs.corrupted_test_set("gaussian_noise", 4).tensors[0]
    assert xs.shape == (359, 8, 8)
    assert torch.equal(xi.squeeze(1), xs)


def test_corrupted_test_set_before_setup_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="Call `setup\\(\\)` before asking for a corrupted test set"):
        DigitsDataModule().corrupted_test_set("contrast", 1)
