"""Griffe extension for the API pages: read the project's ``Example:`` sections as Google ``Examples:`` sections.

The docstrings (style.md) say ``Example:``; griffe's Google parser knows only the plural as a section of
doctests, and renders the singular as an admonition of Markdown, where ``>>> net[0](x)`` becomes a link.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", flags=re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` to ``Examples:`` in every docstring before it is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Called by griffe for every object it loads."""
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
