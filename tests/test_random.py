import torch

from lightning_reg._random import base_seed, rank_generator


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
