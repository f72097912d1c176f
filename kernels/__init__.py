"""Pallas kernels for the hot loops of weight space, imported as ``cljax.kernels``."""

__all__: list[str] = []
