"""The search space: config paths mapped to distributions, checked against a complete ``lightning-reg`` config.

A space file is YAML. Each key is a path into the config (``model.dropout`` is short for
``model.init_args.dropout``; a callback is named by its position or class name:
``trainer.callbacks.MixUp.alpha``); each value is a distribution:

```yaml
model.dropout: [0.1, 0.3, 0.5]                                  # a grid list (categorical for tpe/random)
model.weight_decay: {type: float, low: 1.0e-4, high: 0.1, log: true}
model.depth: {type: int, low: 1, high: 3}
trainer.callbacks.MixUp.alpha: {type: float, low: 0.1, high: 1.0, step: 0.1}
trainer.callbacks.LabelSmoothing: {type: categorical, choices: [true, false]}  # the callback on or off
```

This module has no Optuna import at module level: it only needs a ``trial`` with Optuna's ``suggest_*`` methods.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = ["Distribution", "SearchSpace", "SearchSpaceError"]

Kind = Literal["float", "int", "categorical", "grid", "presence"]
_KEYS: dict[str, set[str]] = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}
_SCALAR = (bool, int, float, str, type(None))


class SearchSpaceError(ValueError):
    """A search space that does not fit its config (raised before any trial runs)."""


def _encode(value: Any) -> Any:
    """Optuna stores scalar choices only: lists and mappings travel as their one-line YAML."""
    return value if isinstance(value, _SCALAR) else yaml.safe_dump(value, default_flow_style=True).strip()


def _decode(value: Any, choices: Sequence[Any]) -> Any:
    for choice in choices:
        if _encode(choice) == value:
            return copy.deepcopy(choice)
    raise ValueError(f"{value!r} is none of the choices {list(choices)!r}.")


@dataclass(frozen=True)
class Distribution:
    """One searched parameter: its path as written, its canonical path in the config, and its distribution.

    Example:
        >>> d = Distribution("model.dropout", ("model", "init_args", "dropout"), "float", low=0.1, high=0.5)
        >>> d.candidates()
        [0.1, 0.5]
    """

    name: str
    path: tuple[str | int, ...]
    kind: Kind
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """The value Optuna's ``trial`` suggests for this parameter (decoded to the config's type)."""
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            step = 1 if self.step is None else int(self.step)
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=step)  # type: ignore[arg-type]
        encoded = [_encode(c) for c in self.choices]
        return _decode(trial.suggest_categorical(self.name, encoded), self.choices)

    def decode(self, stored: Any) -> Any:
        """A value as Optuna stored it (``trial.params[name]``), in the config's type."""
        return _decode(stored, self.choices) if self.kind in ("categorical", "grid", "presence") else stored

    def grid_values(self) -> list[Any] | None:
        """Every value of a finite distribution in Optuna's stored form (``None`` for a continuous range)."""
        if self.kind in ("categorical", "grid", "presence"):
            return [_encode(c) for c in self.choices]
        if self.kind == "int":
            step = 1 if self.step is None else int(self.step)
            return list(range(int(self.low), int(self.high) + 1, step))  # type: ignore[arg-type]
        if self.step is not None:
            low, high = float(self.low or 0.0), float(self.high or 0.0)
            n = math.floor((high - low) / self.step + 1e-9)
            return [round(low + i * self.step, 12) for i in range(n + 1)]
        return None

    def candidates(self) -> list[Any]:
        """The extreme values (ranges) or every choice, used to type-check the space against the config."""
        if self.kind in ("float", "int"):
            return [self.low, self.high]
        return list(self.choices)


@dataclass
class SearchSpace:
    """Config paths mapped to distributions, resolved against a complete config.

    Args:
        spec: the space as read from its YAML file (path -> distribution).

    Example:
        >>> config = {"model": {"class_path": "zoo.CNNClassifier", "init_args": {"dropout": 0.3}}}
        >>> space = SearchSpace({"model.dropout": [0.1, 0.5]}).resolve(config)
        >>> space.apply(config, {"model.dropout": 0.1})["model"]["init_args"]["dropout"]
        0.1
    """

    spec: dict[str, Any]
    distributions: list[Distribution] = field(default_factory=list)

    @classmethod
    def from_file(cls, path: str | Path) -> SearchSpace:
        """Read a space file (YAML mapping of config paths to distributions)."""
        path = Path(path)
        if not path.is_file():
            raise SearchSpaceError(f"Expected `space` to be a YAML file, but {str(path)!r} does not exist.")
        spec = yaml.safe_load(path.read_text())
        if not isinstance(spec, dict):
            raise SearchSpaceError(
                f"Expected the space file {str(path)!r} to be a mapping of config paths to distributions, "
                f"but got {type(spec).__name__}."
            )
        return cls(spec)

    @property
    def names(self) -> list[str]:
        """The parameter names (the paths as written in the space file)."""
        return [d.name for d in self.distributions]

    def resolve(self, config: Mapping[str, Any]) -> SearchSpace:
        """Check every path and distribution against ``config`` (a complete config); returns ``self``.

        Raises:
            SearchSpaceError: an unknown path (naming the nearest valid ones), ``low > high``, an empty choice,
                a malformed distribution, or two entries for one config value.
        """
        if not self.spec:
            raise SearchSpaceError("Expected a search space with at least one parameter, but it is empty.")
        distributions: list[Distribution] = []
        seen: dict[tuple[str | int, ...], str] = {}
        for name, value in self.spec.items():
            if not isinstance(name, str):
                raise SearchSpaceError(f"Expected each key of the space to be a config path, but got {name!r}.")
            path, target = _resolve_path(config, name)
            dist = _parse_distribution(name, path, value, target)
            if path in seen:
                raise SearchSpaceError(f"{name!r} and {seen[path]!r} name the same config value; keep one.")
            seen[path] = name
            distributions.append(dist)
        self.distributions = distributions
        return self

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Sample every parameter from ``trial``: ``{name: value}`` in the config's types."""
        return {d.name: d.suggest(trial) for d in self.distributions}

    def decode(self, stored: Mapping[str, Any]) -> dict[str, Any]:
        """Optuna's stored ``trial.params`` in the config's types."""
        return {d.name: d.decode(stored[d.name]) for d in self.distributions if d.name in stored}

    def apply(self, config: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
        """A deep copy of ``config`` with ``values`` (``{name: value}``) set; a presence ``False`` drops the entry."""
        out = copy.deepcopy(dict(config))
        removals: list[tuple[list[Any], int]] = []
        for dist in self.distributions:
            if dist.name not in values:
                continue
            parent = _walk(out, dist.path[:-1])
            if dist.kind == "presence":
                if not values[dist.name]:
                    removals.append((parent, int(dist.path[-1])))
                continue
            parent[dist.path[-1]] = copy.deepcopy(values[dist.name])
        # Drop list entries last and from the end, so that earlier indices stay valid.
        for parent, index in sorted(removals, key=lambda r: r[1], reverse=True):
            del parent[index]
        return out

    def grid(self) -> dict[str, list[Any]]:
        """Every parameter's values for a grid search.

        Raises:
            SearchSpaceError: a continuous range (a float without ``step``) has no grid.
        """
        grid: dict[str, list[Any]] = {}
        for dist in self.distributions:
            values = dist.grid_values()
            if values is None:
                raise SearchSpaceError(
                    f"The grid sampler needs finite values, but {dist.name!r} is a continuous float range: give a "
                    f"list of values, or a `step`, or use `--sampler tpe` / `--sampler random`."
                )
            grid[dist.name] = values
        return grid

    def corners(self) -> Iterator[dict[str, Any]]:
        """Value sets that together hold every parameter's extremes and choices (to type-check the space)."""
        candidates = [d.candidates() for d in self.distributions]
        for i in range(max(len(c) for c in candidates)):
            yield {d.name: c[min(i, len(c) - 1)] for d, c in zip(self.distributions, candidates, strict=True)}

    def size(self) -> int:
        """The number of grid points."""
        return math.prod(len(v) for v in self.grid().values())


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[tuple[Any, ...]]:
    """Every combination of the grid's values, in file order (the first parameter varies slowest)."""
    return list(itertools.product(*grid.values()))


# --- paths ------------------------------------------------------------------------------------------------


def _class_name(node: Any) -> str | None:
    if isinstance(node, dict) and isinstance(node.get("class_path"), str):
        return str(node["class_path"]).rsplit(".", 1)[-1]
    return None


def _resolve_path(config: Mapping[str, Any], name: str) -> tuple[tuple[str | int, ...], Any]:
    """The canonical path of ``name`` (``init_args`` inserted, callbacks by index) and the value it names."""
    node: Any = config
    path: list[str | int] = []
    for segment in name.split("."):
        if isinstance(node, list):
            index = _list_index(node, segment)
            if index is None:
                raise _unknown(config, name, path, node)
            path.append(index)
            node = node[index]
        elif isinstance(node, dict):
            if segment in node:
                path.append(segment)
                node = node[segment]
            elif isinstance(node.get("init_args"), dict) and segment in node["init_args"]:
                path += ["init_args", segment]
                node = node["init_args"][segment]
            else:
                raise _unknown(config, name, path, node)
        else:
            raise _unknown(config, name, path, node)
    return tuple(path), node


def _list_index(items: list[Any], segment: str) -> int | None:
    if segment.isdigit():
        index = int(segment)
        return index if index < len(items) else None
    matches = [i for i, item in enumerate(items) if _class_name(item) == segment]
    if len(matches) > 1:
        raise SearchSpaceError(
            f"{segment!r} names {len(matches)} entries of the list; name one by its position instead "
            f"(for example `{segment}` -> `{matches[0]}`)."
        )
    return matches[0] if matches else None


def _all_paths(node: Any, prefix: str = "") -> Iterator[str]:
    """Every path of a config, in canonical and short (``init_args``-less, class-name) spellings."""
    if isinstance(node, dict):
        for key, value in node.items():
            full = f"{prefix}{key}"
            yield full
            yield from _all_paths(value, full + ".")
            if key == "init_args":
                yield from _all_paths(value, prefix)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            for spelling in (str(i), _class_name(item)):
                if spelling is not None:
                    yield f"{prefix}{spelling}"
                    yield from _all_paths(item, f"{prefix}{spelling}.")


def _unknown(config: Mapping[str, Any], name: str, path: list[str | int], node: Any) -> SearchSpaceError:
    valid = sorted(set(_all_paths(config)))
    nearest = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    where = ".".join(str(p) for p in path) or "the config's top level"
    if isinstance(node, dict):
        keys = list(node.get("init_args") or {}) if isinstance(node.get("init_args"), dict) else list(node)
        here = f"; {where} has: {', '.join(map(str, keys))}"
    elif isinstance(node, list):
        here = f"; {where} holds {len(node)} entries: " + ", ".join(
            f"{i} ({_class_name(item) or type(item).__name__})" for i, item in enumerate(node)
        )
    else:
        here = f"; {where} is a value ({node!r}), not a section"
    hint = f" Did you mean {' or '.join(repr(n) for n in nearest)}?" if nearest else ""
    return SearchSpaceError(f"The space's path {name!r} is not in the config{here}.{hint}")


def _walk(config: Any, path: Sequence[str | int]) -> Any:
    node = config
    for key in path:
        if isinstance(node, dict) and node.get(key) is None and key == "init_args":
            node[key] = {}
        node = node[key]
    return node


# --- distributions ----------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _parse_distribution(name: str, path: tuple[str | int, ...], value: Any, target: Any) -> Distribution:
    presence_target = bool(path) and isinstance(path[-1], int) and _class_name(target) is not None
    if isinstance(value, list):
        if not value:
            raise SearchSpaceError(f"Expected {name!r} to list at least one value, but the list is empty.")
        return _checked_choices(name, path, "grid", value, presence_target)
    if not isinstance(value, dict):
        raise SearchSpaceError(
            f"Expected {name!r} to be a list of values or a mapping like `{{type: float, low: 0.1, high: 0.5}}`, "
            f"but got {value!r}."
        )
    kind = value.get("type")
    if kind not in _KEYS:
        raise SearchSpaceError(f"Expected `type` of {name!r} to be one of {sorted(_KEYS)}, but got {kind!r}.")
    unknown = set(value) - _KEYS[kind]
    if unknown:
        raise SearchSpaceError(
            f"Unknown key(s) {sorted(unknown)} in {name!r}; a {kind} distribution takes {sorted(_KEYS[kind])}."
        )
    if kind == "categorical":
        choices = value.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SearchSpaceError(f"Expected `choices` of {name!r} to be a non-empty list, but got {choices!r}.")
        return _checked_choices(name, path, "categorical", choices, presence_target)
    if presence_target:
        raise SearchSpaceError(
            f"{name!r} names a whole callback; search one of its arguments ({name}.<argument>) or switch it on and "
            f"off with `{{type: categorical, choices: [true, false]}}`."
        )
    low, high, log, step = value.get("low"), value.get("high"), bool(value.get("log", False)), value.get("step")
    for key, number in (("low", low), ("high", high)):
        if not _is_number(number) or (kind == "int" and not isinstance(number, int)):
            raise SearchSpaceError(
                f"Expected `{key}` of {name!r} to be a{'n int' if kind == 'int' else ' number'}, but got {number!r}."
            )
    if low > high:  # type: ignore[operator]
        raise SearchSpaceError(f"Expected `low` <= `high` in {name!r}, but got low={low!r} > high={high!r}.")
    if log and low <= 0:  # type: ignore[operator]
        raise SearchSpaceError(f"A log-uniform {name!r} needs `low` > 0, but got low={low!r}.")
    if step is not None:
        if not _is_number(step) or step <= 0:
            raise SearchSpaceError(f"Expected `step` of {name!r} to be a positive number, but got {step!r}.")
        if log:
            raise SearchSpaceError(f"{name!r} sets both `log` and `step`; Optuna takes one or the other.")
    return Distribution(name, path, kind, low=low, high=high, log=log, step=step)


def _checked_choices(
    name: str, path: tuple[str | int, ...], kind: Kind, choices: list[Any], presence_target: bool
) -> Distribution:
    if presence_target:
        if not all(isinstance(c, bool) for c in choices):
            raise SearchSpaceError(
                f"{name!r} names a whole callback: its choices switch it on and off and must be true/false, but got "
                f"{choices!r}."
            )
        kind = "presence"
    encoded = [_encode(c) for c in choices]
    if len(set(map(repr, encoded))) != len(encoded):
        raise SearchSpaceError(f"{name!r} lists a value twice: {choices!r}.")
    return Distribution(name, path, kind, choices=tuple(choices))
