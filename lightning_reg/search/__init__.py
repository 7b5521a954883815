"""Hyperparameter search of a ``lightning-reg fit`` config on Optuna (``lightning-reg search``; docs/search.md).

Optuna is an optional extra (``pip install "lightning-reg[search]"``): this package imports it only when a
search runs, so that the command can say what to install.
"""

from lightning_reg.search.pruning import TrialPruning
from lightning_reg.search.space import SearchSpace, SearchSpaceError
from lightning_reg.search.study import ConfigError, complete_config, search, search_cli

__all__ = ["ConfigError", "SearchSpace", "SearchSpaceError", "TrialPruning", "complete_config", "search", "search_cli"]
