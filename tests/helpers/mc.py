"""MC dropout references: the naive loop by hand with the callback's generator, and the prefix-once check."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Categorical

from lightning_reg._random import base_seed, rank_generator
from lightning_reg.callbacks.mc_dropout import _STREAM as MC_STREAM
from lightning_reg.functional.mc_dropout import mc_dropout_predict


def callback_generator(stage: str = "validate", step: int = 0, rank: int = 0) -> torch.Generator:
    """The documented stream of the callback: a fixed function of (seed, rank, stage, global step)."""
    stream = (MC_STREAM * 4 + ("validate", "test", "predict").index(stage)) * (1 << 32) + step
    return rank_generator(base_seed(), rank, stream)


def naive_mc(model: torch.nn.Module, batches: Any, n_samples: int, generator: torch.Generator) -> tuple[Tensor, ...]:
    """The reference loop, by hand: per batch one seed drawn from ``generator`` seeds torch's (forked) RNG, then
    ``n_samples`` plain forward passes with only the ``nn.Dropout`` modules in train mode. Returns the mean
    probabilities, the mutual information and the targets of all batches."""
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts
    model.eval()
    means, infos, targets = [], [], []
    for batch in batches:
        x, y = (batch["input_ids"], batch["labels"]) if isinstance(batch, dict) else (batch[0], batch[1])
        args = (x, batch["attention_mask"]) if isinstance(batch, dict) else (x,)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            for m in dropouts:
                m.train()
            probs = torch.stack([model(*args).softmax(-1) for _ in range(n_samples)])  # (S, N, K)
            for m in dropouts:
                m.eval()
        mean = probs.mean(0)
        predictive = Categorical(probs=mean).entropy()
        expected = Categorical(probs=probs).entropy().mean(0)
        means.append(mean), infos.append(predictive - expected), targets.append(y)
    return torch.cat(means), torch.cat(infos), torch.cat(targets)


def assert_prefix_once_with_the_loops_draws(
    model: nn.Module, shape: tuple[int, ...], *, masks: str = "auto", chunk_size: int | None = None
) -> None:
    """Two batches of ``shape`` (nothing may be cached across them): the cached path runs the first layer once, for
    the samples and the deterministic pass (after a one-time check of ``forward_features``), and gives the naive
    loop's probabilities for the same generator."""
    calls: list[int] = []
    first = next(m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d))
    handle = first.register_forward_hook(lambda *_: calls.append(1))
    try:
        for seed in (0, 1):
            inputs = torch.randn(*shape)
            naive = mc_dropout_predict(
                model, inputs, 6, method="naive", generator=torch.Generator().manual_seed(seed), masks=masks
            )  # type: ignore[arg-type]
            calls.clear()
            ours = mc_dropout_predict(
                model,
                inputs,
                6,
                generator=torch.Generator().manual_seed(seed),
                masks=masks,  # type: ignore[arg-type]
                chunk_size=chunk_size,
                deterministic=True,
            )
            assert ours.method == "cached"
            # The first call on a model with `forward_features`/`forward_head` also checks, once, that `forward` is
            # their composition (one eval pass of each): 3 calls then; every later batch runs the layer once.
            assert len(calls) == 1 or (seed == 0 and len(calls) == 3 and hasattr(model, "forward_features"))
            torch.testing.assert_close(ours.probs, naive.probs, rtol=0, atol=1e-6)
            assert ours.probs.std(dim=0).max() > 1e-5
            assert ours.deterministic_probs is not None
            torch.testing.assert_close(ours.deterministic_probs, model(inputs).softmax(-1))
    finally:
        handle.remove()
