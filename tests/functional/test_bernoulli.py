"""Bernoulli keep-masks from a generator on any device: torch's own draw, on the asked device, whatever the default."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lightning_reg.functional import _bernoulli
from lightning_reg.functional._bernoulli import keep_mask


def _torch_draw(shape: tuple[int, ...], keep_prob: float, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The reference: torch's ``bernoulli_`` on the CPU with a generator of that seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.empty(shape, dtype=dtype, device="cpu").bernoulli_(keep_prob, generator=generator)


# `cpu:0` is a device whose index the CPU generator (index None) does not share: the mask is drawn on the generator's
# device and copied, the other branch of `keep_mask`.
@pytest.mark.parametrize("device", [torch.device("cpu"), torch.device("cpu", 0)], ids=["cpu", "cpu:0"])
def test_keep_mask_is_torchs_bernoulli_draw_on_the_asked_device_whatever_the_default_device(
    device: torch.device,
) -> None:
    shape, keep_prob, dtype = (6, 7), 0.8, torch.float64
    with torch.device("meta"):  # the default device of factory functions: the mask must not land there
        keep = keep_mask(shape, keep_prob, dtype=dtype, device=device, generator=torch.Generator().manual_seed(3))
    assert keep.device.type == "cpu"
    assert keep.dtype == dtype
    torch.testing.assert_close(keep, _torch_draw(shape, keep_prob, dtype, seed=3), rtol=0, atol=0)


def test_keep_mask_without_a_generator_is_made_on_the_asked_device_from_the_global_rng() -> None:
    torch.manual_seed(5)
    with torch.device("meta"):
        keep = keep_mask((4, 5), 0.3, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert keep.device.type == "cpu"
    assert keep.dtype == torch.bfloat16
    torch.manual_seed(5)
    torch.testing.assert_close(keep, torch.empty(4, 5, dtype=torch.bfloat16).bernoulli_(0.3), rtol=0, atol=0)


def test_keep_mask_for_a_meta_tensor_keeps_the_dtype_and_advances_the_generator_as_on_the_cpu() -> None:
    generator = torch.Generator().manual_seed(1)
    keep = keep_mask((3, 4), 0.5, dtype=torch.float64, device=torch.device("meta"), generator=generator)
    assert keep.device.type == "meta"
    assert keep.dtype == torch.float64
    reference = torch.Generator().manual_seed(1)
    torch.empty(3, 4, dtype=torch.float64).bernoulli_(0.5, generator=reference)
    assert torch.equal(generator.get_state(), reference.get_state())


# (generator's device, tensor's device, the current device of the accelerator, same device?). An index left out
# means the current device.
_CASES = [
    ("cpu", "cpu", 0, True),
    ("cpu", "cuda:0", 0, False),
    ("cuda:0", "cpu", 0, False),
    ("cuda:1", "cuda:1", 0, True),
    ("cuda:1", "cuda:0", 1, False),
    ("cuda", "cuda:1", 1, True),
    ("cuda", "cuda:0", 0, True),
    ("cuda", "cuda:0", 1, False),
    ("cuda:1", "cuda", 1, True),
    ("cuda:0", "cuda", 1, False),
    ("cuda", "cuda", 1, True),
]


@pytest.mark.parametrize(("own", "device", "current", "same"), _CASES)
def test_same_device_reads_a_missing_index_as_the_current_device(
    monkeypatch: pytest.MonkeyPatch, own: str, device: str, current: int, same: bool
) -> None:
    # No accelerator here: a stand-in generator (only its `.device` is read) and a CUDA device module that reports
    # `current` as its current device.
    real = torch.get_device_module

    def device_module(kind: object = None) -> object:
        if kind == "cuda":
            return SimpleNamespace(current_device=lambda: current)
        if kind == "cpu":
            return real(kind)
        raise AssertionError(f"Expected the device module of the generator's device type, but got {kind!r}.")

    monkeypatch.setattr(torch, "get_device_module", device_module)
    generator = SimpleNamespace(device=torch.device(own))
    assert _bernoulli._same_device(generator, torch.device(device)) is same  # type: ignore[arg-type]
