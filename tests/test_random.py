import pytest
import torch

from lightning_reg._random import base_seed, global_rng_forked, rank_generator


def test_rank_generator_is_reproducible():
    a = torch.rand(5, generator=rank_generator(7, 1, stream=3))
    b = torch.rand(5, generator=rank_generator(7, 1, stream=3))
    assert torch.equal(a, b)


def test_rank_generator_streams_differ_by_rank_seed_and_stream():
    draws = {key: torch.rand(4, generator=rank_generator(*key)) for key in [(0, 0, 0), (0, 1, 0), (1, 0, 0), (0, 0, 1)]}
    values = list(draws.values())
    for i in range(len(values)):
        for j in range(i + 1, len(values)):
            assert not torch.equal(values[i], values[j])


def test_base_seed_follows_seed_everything(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "123")
    assert base_seed() == 123


def test_base_seed_without_lightning_seed_uses_torch_initial_seed(monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    torch.manual_seed(42)
    assert base_seed() == 42


def test_global_rng_forked_on_mps_saves_and_restores_the_mps_rng(monkeypatch: pytest.MonkeyPatch) -> None:
    # No MPS here: record what it asks of torch.mps (which has no `device` or `current_device`).
    calls: list[tuple[str, object]] = []
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: calls.append(("get", None)) or torch.tensor([7]))
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda state: calls.append(("set", int(state))))
    cpu_state = torch.get_rng_state()
    with global_rng_forked(torch.device("mps")):
        torch.rand(3)
    assert calls == [("get", None), ("set", 7)]
    assert torch.equal(torch.get_rng_state(), cpu_state)
