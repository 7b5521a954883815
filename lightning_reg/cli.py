"""The ``lightning-reg`` command: a ``LightningCLI`` over the zoo and our callbacks, plus ``lightning-reg demo``.

``lightning-reg fit|validate|test|predict`` take any zoo model (``--model``), DataModule (``--data``) and
callbacks (``--trainer.callbacks+=...``) by class name or in a YAML config
(``lightning-reg fit --config examples/configs/cnn_digits.yaml``); ``--print_config`` prints the full
configuration. ``lightning-reg demo`` is the main job on the bundled digits (see
:mod:`lightning_reg.demo`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import lightning as L
from lightning.pytorch.cli import LightningCLI

__all__ = ["cli", "main"]


def cli(args: Sequence[str] | None = None, *, run: bool = True) -> LightningCLI:
    """Build (and by default run) the ``LightningCLI`` over ``zoo.ClassifierModule`` subclasses.

    Args:
        args: command-line arguments; ``sys.argv[1:]`` when None.
        run: run the subcommand (``fit``, ``test``, ...); with ``run=False`` the arguments are parsed
            into ``cli.model``/``cli.datamodule``/``cli.trainer`` without a subcommand.

    Returns:
        The ``LightningCLI`` instance, whose ``trainer`` holds the logged metrics.
    """
    import lightning_reg.callbacks  # noqa: F401  (makes our callbacks resolvable by short name)
    import zoo

    return LightningCLI(
        zoo.ClassifierModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=list(args) if args is not None else None,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": "lightning-reg: train zoo models with one-line regularizers."},
    )


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-reg`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["demo"]:
        from lightning_reg.demo import demo_cli

        demo_cli(argv[1:])
        return
    cli(argv)


if __name__ == "__main__":
    main()
