"""Functional train state and step builders."""

from cljax.train._state import TrainState
from cljax.train._step import NonFiniteError, make_step

__all__ = ["NonFiniteError", "TrainState", "make_step"]
