"""Pure tensor functions: the numerical core of every regularizer. No Lightning import, no global state."""

__all__: list[str] = []
