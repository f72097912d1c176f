"""Functional train state and step builders."""

from cljax.train._state import TrainState
from cljax.train._step import NonFiniteError, apply_step, make_step, raise_on_nonfinite

__all__ = ["NonFiniteError", "TrainState", "apply_step", "make_step", "raise_on_nonfinite"]
