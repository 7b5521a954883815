"""Regularization layers that torch lacks, each a function + module pair."""

__all__: list[str] = []
