"""A grid sampler whose points never run twice, also with several workers on one storage.

Optuna's ``GridSampler`` documents that "different workers will occasionally suggest the same parameter
configuration" and shuffles the grid. Here trial number ``k`` (assigned atomically by the storage, in every
worker) takes grid point ``k``: the first pass over the grid cannot repeat a point. A trial numbered past the
grid retries a point that has no complete, pruned or running trial (one whose trial failed or was interrupted);
when no point is left, the trial gets none and the search stops.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import optuna
import torch
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from lightning_reg.search.space import grid_points

__all__ = ["OrderedGridSampler"]

_TAKEN = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


class OrderedGridSampler(BaseSampler):
    """Grid search in file order: trial ``k`` takes point ``k``; later trials retry points that failed.

    Args:
        grid: parameter name -> values (Optuna's stored form), in the order of the space file.
        size: how many points of the grid to run (the first ``size``); all when None.
        seed: seed of the random choice among points to retry.

    Example:
        >>> import optuna
        >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
        >>> study = optuna.create_study(sampler=OrderedGridSampler({"x": [1, 2, 3]}))
        >>> study.optimize(lambda t: t.suggest_categorical("x", [1, 2, 3]), n_trials=3)
        >>> [t.params["x"] for t in study.trials]
        [1, 2, 3]
    """

    def __init__(self, grid: Mapping[str, Sequence[Any]], size: int | None = None, seed: int | None = None) -> None:
        self.names = list(grid)
        points = grid_points(grid)
        self.points = points[:size] if size is not None else points
        self._index = {p: i for i, p in enumerate(self.points)}
        self._chosen: dict[int, int | None] = {}
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()  # this generator only; the global torch RNG is left alone
        else:
            self._generator.manual_seed(seed)

    def point_of(self, trial: FrozenTrial) -> int | None:
        """The grid point of a trial from its stored parameters (``None`` when it has none of this grid)."""
        try:
            return self._index.get(tuple(trial.params[n] for n in self.names))
        except KeyError:
            return None

    def missing(self, study: optuna.Study) -> list[int]:
        """Grid points without a complete, pruned or running trial."""
        # Trial k < len(points) holds point k from the moment it exists, before its parameters are stored.
        taken = {
            t.number if t.number < len(self.points) else self.point_of(t)
            for t in study.get_trials(deepcopy=False, states=_TAKEN)
        }
        return [i for i in range(len(self.points)) if i not in taken]

    def chosen(self, trial_number: int) -> int | None:
        """The point this sampler gave the trial (``None``: the grid was already complete or running)."""
        return self._chosen.get(trial_number)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Choose the trial's grid point."""
        if trial.number < len(self.points):
            self._chosen[trial.number] = trial.number
            return
        missing = self.missing(study)
        # A random missing point, so that two workers retrying at once rarely pick the same one.
        pick = int(torch.randint(len(missing), (1,), generator=self._generator)) if missing else None
        self._chosen[trial.number] = missing[pick] if pick is not None else None

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        """No relative sampling: every value comes from :meth:`sample_independent`."""
        return {}

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        """No relative sampling."""
        return {}

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        """The value of ``param_name`` at the trial's grid point."""
        point = self._chosen.get(trial.number)
        if point is None:
            raise RuntimeError(f"Trial {trial.number} has no grid point left to run; it should not sample.")
        if param_name not in self.names:
            raise ValueError(f"{param_name!r} is not a parameter of the grid {self.names}.")
        return self.points[point][self.names.index(param_name)]
