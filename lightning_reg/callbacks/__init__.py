"""Lightning callbacks: thin, stateful wrappers around the functional core."""

__all__: list[str] = []
