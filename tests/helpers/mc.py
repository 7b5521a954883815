"""The check that MC dropout ran a model's deterministic prefix once, with the naive loop's draws."""

from __future__ import annotations

import torch
from torch import nn

from lightning_reg.functional.mc_dropout import mc_dropout_predict


def assert_prefix_once_with_the_loops_draws(
    model: nn.Module, shape: tuple[int, ...], *, masks: str = "auto", chunk_size: int | None = None
) -> None:
    """Two batches of ``shape`` (nothing may be cached across them): the cached path runs the first layer once, for
    the samples and the deterministic pass, and gives the naive loop's probabilities for the same generator."""
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
            assert len(calls) == 1
            torch.testing.assert_close(ours.probs, naive.probs, rtol=0, atol=1e-6)
            assert ours.probs.std(dim=0).max() > 1e-5
            assert ours.deterministic_probs is not None
            torch.testing.assert_close(ours.deterministic_probs, model(inputs).softmax(-1))
    finally:
        handle.remove()
