"""Reading and replacing entries of a batch in place: the batch contract of shared/design.md.

A callback's ``on_train_batch_start`` cannot return a new batch (Lightning issue 1733, closed as
won't-fix), so callbacks change a batch in place: list items or dict keys. Tuples are immutable and
get an error that says how to fix it.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, MutableSequence
from typing import Any

BatchKey = int | str

__all__ = ["BatchKey", "get_entry", "set_entry", "validate_key"]


def validate_key(key: object, name: str) -> None:
    """Raise ``TypeError`` unless ``key`` is an ``int`` (list batch) or ``str`` (dict batch)."""
    if isinstance(key, bool) or not isinstance(key, int | str):
        raise TypeError(
            f"Expected `{name}` to be an int (position in a list batch) or a str (key of a dict batch), "
            f"but got {key!r} of type {type(key).__name__}."
        )


def get_entry(batch: Any, key: BatchKey, name: str = "key") -> Any:
    """Return ``batch[key]`` with an error naming what was expected when the entry is missing.

    Args:
        batch: a list/tuple batch or a dict batch.
        key: position (list/tuple) or name (dict).
        name: the argument name shown in errors, e.g. ``"input_key"``.

    Example:
        >>> get_entry([10, 20], 1)
        20
    """
    if isinstance(batch, Mapping):
        if key not in batch:
            raise KeyError(
                f"The batch is a dict with keys {sorted(map(str, batch))}, but `{name}={key!r}` is not one of them. "
                f"Pass `{name}` naming the right entry."
            )
        return batch[key]
    if isinstance(batch, list | tuple):
        if not isinstance(key, int) or not -len(batch) <= key < len(batch):
            raise KeyError(
                f"The batch is a sequence of length {len(batch)}, but `{name}={key!r}` is not a valid position in it. "
                f"Pass an int `{name}` below {len(batch)}."
            )
        return batch[key]
    raise TypeError(
        f"Expected the batch to be a list `[inputs, targets, ...]` or a dict, but got {type(batch).__name__}. "
        "Return a list or dict from your dataset's collate function."
    )


def set_entry(batch: Any, key: BatchKey, value: Any, name: str = "key") -> None:
    """Replace ``batch[key]`` by ``value`` in place.

    Raises:
        TypeError: for a tuple batch (immutable), with the fix: collate to a list, or use the module's
            ``on_before_batch_transfer`` hook, which may return a new batch.

    Example:
        >>> batch = [1, 2]
        >>> set_entry(batch, 0, 5)
        >>> batch
        [5, 2]
    """
    get_entry(batch, key, name)  # same errors for a missing entry
    if isinstance(batch, MutableMapping):
        batch[key] = value
        return
    if isinstance(batch, MutableSequence) and isinstance(key, int):
        batch[key] = value
        return
    raise TypeError(
        f"Cannot change a {type(batch).__name__} batch in place: Lightning ignores a new batch returned from a "
        "callback's `on_train_batch_start`. Return a list instead of a tuple from your dataset or collate_fn "
        "(`default_collate` already gives a list for tuple samples), or use a dict batch."
    )
