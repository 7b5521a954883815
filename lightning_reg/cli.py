"""The ``lightning-reg`` command: a ``LightningCLI`` over the zoo and our callbacks, plus ``lightning-reg demo``.

``lightning-reg fit|validate|test|predict`` take any LightningModule (``--model``) and DataModule (``--data``) by
import path (``--model my_pkg.MyModule``), zoo classes and our callbacks (``--trainer.callbacks+=...``) also by
their short class name, or everything in a YAML config
(``lightning-reg fit --config examples/configs/cnn_digits.yaml``); ``--print_config`` prints the full
configuration. Progress shows with Lightning's ``RichProgressBar`` unless the command names another progress
bar or ``--trainer.enable_progress_bar false``. ``lightning-reg demo`` is the main job on the bundled digits
(see :mod:`lightning_reg.demo`); ``lightning-reg search`` is a hyperparameter search over a config (see
:mod:`lightning_reg.search`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI

from lightning_reg.callbacks.regularization_check import RegularizationCheck

__all__ = ["LightningRegCLI", "cli", "main"]


class LightningRegCLI(LightningCLI):
    """``LightningCLI`` whose Trainer shows Lightning's ``RichProgressBar`` by default.

    The bar is added when the instantiated ``trainer.callbacks`` hold no progress bar and
    ``trainer.enable_progress_bar`` is not ``false``, so a user's ``--trainer.callbacks+=TQDMProgressBar`` (or
    any ``ProgressBar``) replaces it and ``--trainer.enable_progress_bar false`` turns it off. (Lightning >= 2.6
    picks ``RichProgressBar`` itself when ``rich`` is installed; this makes it independent of that version.)
    A :class:`~lightning_reg.RegularizationCheck` is added the same way unless the command configures one.

    Example:
        >>> import zoo
        >>> result = LightningRegCLI(
        ...     zoo.ClassifierModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        ...     args=["--model=CNNClassifier", "--data=zoo.data.DigitsDataModule", "--trainer.logger=false"], run=False)
        >>> type(result.trainer.progress_bar_callback).__name__
        'RichProgressBar'
    """

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """Instantiate the Trainer, with a ``RichProgressBar`` appended where no progress bar was chosen."""
        config = self.config_init[self.subcommand] if self.subcommand is not None else self.config_init
        trainer_config = {**config.get("trainer", {}), **kwargs}
        callbacks = trainer_config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]
        # `None` (the Trainer's default) means enabled.
        enabled = trainer_config.get("enable_progress_bar") is not False
        if enabled and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks = [*callbacks, RichProgressBar()]
            kwargs["callbacks"] = callbacks
        # The guard rails (inventory and checks at fit start), unless the command configures its own.
        if not any(isinstance(c, RegularizationCheck) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, RegularizationCheck()]
        return super().instantiate_trainer(**kwargs)


def cli(
    args: Sequence[str] | None = None,
    *,
    run: bool = True,
    cli_class: type[LightningRegCLI] = LightningRegCLI,
    trainer_defaults: dict[str, Any] | None = None,
    parser_kwargs: dict[str, Any] | None = None,
) -> LightningCLI:
    """Build (and by default run) the ``LightningCLI`` over any ``LightningModule`` and ``LightningDataModule``.

    Models, DataModules and callbacks are found by import path (``my_pkg.MyModule``, ``zoo.CNNClassifier``,
    ``lightning_reg.MixUp``); the zoo's classes and our callbacks also by their bare class name
    (``CNNClassifier``, ``MixUp``), because their modules are imported here first.

    Args:
        args: command-line arguments; ``sys.argv[1:]`` when None.
        run: run the subcommand (``fit``, ``test``, ...); with ``run=False`` the arguments are parsed
            into ``cli.model``/``cli.datamodule``/``cli.trainer`` without a subcommand.
        cli_class: the ``LightningRegCLI`` (sub)class to build (``lightning-reg search`` uses one that adds its
            reporting callback).
        trainer_defaults: ``LightningCLI``'s ``trainer_defaults`` (callbacks listed there are always added).
        parser_kwargs: extra keyword arguments of every parser (``{"exit_on_error": False}`` raises instead of
            exiting).

    Returns:
        The ``LightningCLI`` instance, whose ``trainer`` holds the logged metrics.

    Example:
        >>> result = cli(["--model=CNNClassifier", "--data=DigitsDataModule", "--trainer.logger=false"], run=False)
        >>> type(result.model).__name__, type(result.datamodule).__name__
        ('CNNClassifier', 'DigitsDataModule')
    """
    import lightning_reg.callbacks  # noqa: F401  (makes our callbacks resolvable by short name)
    import zoo  # noqa: F401  (makes the zoo resolvable by short name)

    # Base classes are Lightning's own, so that any user module resolves by import path; zoo.ClassifierModule
    # here rejected `--model my_pkg.MyModule` ("does not correspond to a subclass of ClassifierModule").
    return cli_class(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=list(args) if args is not None else None,
        run=run,
        trainer_defaults=trainer_defaults,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "description": "lightning-reg: train zoo models with one-line regularizers.",
            **(parser_kwargs or {}),
        },
    )


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-reg`` console script.

    After a command that succeeded, the ``torch.distributed`` process group a DDP strategy started is destroyed:
    left to interpreter shutdown, gloo's worker threads can abort the process (``terminate called without an
    active exception``, exit code -6) after training has finished. After an exception it is left alone, because
    a rank that destroys the group while the others are still inside a collective can hang them.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["demo"]:
        from lightning_reg.demo import demo_cli

        demo_cli(argv[1:])
    elif argv[:1] == ["search"]:
        from lightning_reg.search import search_cli

        search_cli(argv[1:])
    else:
        # None lets LightningCLI read sys.argv itself: passing sys.argv[1:] again as `args` makes it warn that
        # both were given.
        cli(args)
    _destroy_process_group()


def _destroy_process_group() -> None:
    """Destroy the default ``torch.distributed`` process group, if one is initialized."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
