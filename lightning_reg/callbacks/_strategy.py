"""What the callbacks need to know about the trainer's strategy: does it shard parameters, which data rank."""

from __future__ import annotations

import lightning as L

__all__ = ["data_parallel_rank", "refuse_sharding_strategy", "sharding_strategy"]


def sharding_strategy(trainer: L.Trainer) -> str | None:
    """The name of the trainer's strategy if it shards the parameters across ranks, else ``None``.

    FSDP, ``ModelParallelStrategy`` and DeepSpeed ZeRO stage 3 keep only a shard of each parameter on a rank
    between the steps they wrap, so a callback cannot call the LightningModule itself there.

    Example:
        >>> import lightning as L
        >>> sharding_strategy(L.Trainer(accelerator="cpu", logger=False)) is None
        True
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy | ModelParallelStrategy):
        return type(strategy).__name__
    if isinstance(strategy, DeepSpeedStrategy) and isinstance(strategy.config, dict) and strategy.zero_stage_3:
        return f"{type(strategy).__name__} (ZeRO stage 3)"
    return None


def refuse_sharding_strategy(trainer: L.Trainer, owner: str, why: str, fix: str) -> None:
    """Raise ``ValueError`` at setup when the strategy shards the parameters that ``owner`` needs whole.

    The message reads: ``owner`` does not support the strategy: ``why``, which needs whole parameters on every rank,
    and this strategy shards them. ``fix``.

    Example:
        >>> import lightning as L
        >>> refuse_sharding_strategy(L.Trainer(accelerator="cpu", logger=False), "X", "it forwards", "Use ddp.")
    """
    name = sharding_strategy(trainer)
    if name is not None:
        raise ValueError(
            f"`{owner}` does not support `{name}`: {why}, which needs whole parameters on every rank, and this "
            f"strategy shards them. {fix}"
        )


def data_parallel_rank(trainer: L.Trainer) -> int:
    """The rank of this process among the replicas that see different data.

    The global rank under DDP, FSDP and DeepSpeed; under tensor/model parallelism the ranks of one model-parallel
    group see the same batch and must draw the same random numbers, so they share the data-parallel rank the
    strategy hands to the ``DistributedSampler``.

    Example:
        >>> import lightning as L
        >>> data_parallel_rank(L.Trainer(accelerator="cpu", logger=False))
        0
    """
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    return int(kwargs.get("rank", trainer.global_rank))
