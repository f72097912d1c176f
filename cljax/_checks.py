"""Call-time validation of hyperparameters, shared by every area of cljax.

Hyperparameters are checked when a factory or function is called, before anything is traced
(STYLE rule 15): a real, finite scalar in range for continuous ones, a Python or numpy
integer in range for counts and periods. The message names the function, the argument and
its value (``f"{where}: {name}={value!r} must be ..."``).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def check_scalar(
    value: Any,
    *,
    name: str,
    where: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Validates a scalar hyperparameter at call time: a real, finite scalar in range.

    Python numbers, numpy scalars and 0-d concrete arrays are checked; a traced value (under
    jit) cannot be and passes. Booleans, strings and arrays of more than one element raise.

    Raises:
      ValueError: naming ``where`` and the value.
    """
    if isinstance(value, jax.core.Tracer):
        return
    bad = f"{where}: {name}={value!r}"
    if isinstance(value, bool | np.bool_) or not isinstance(
        value, int | float | np.number | np.ndarray | jax.Array
    ):
        raise ValueError(f"{bad} must be a real number")
    arr = np.asarray(value)
    if arr.ndim != 0:
        raise ValueError(f"{bad} must be a scalar; got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{bad} must be a real number; got dtype {arr.dtype}")
    v = float(arr)
    if not np.isfinite(v):
        raise ValueError(f"{bad} must be finite")
    lo_ok = low is None or (v > low if low_open else v >= low)
    hi_ok = high is None or (v < high if high_open else v <= high)
    if not (lo_ok and hi_ok):
        if high is None:
            need = f"{'>' if low_open else '>='} {low:g}"
        elif low is None:
            need = f"{'<' if high_open else '<='} {high:g}"
        else:
            lo = ("(" if low_open else "[") + f"{low:g}"
            need = f"in {lo}, {high:g}" + (")" if high_open else "]")
        raise ValueError(f"{bad} must be {need}")


def check_int(
    value: Any, *, name: str, where: str, low: int | None = None, high: int | None = None
) -> int:
    """Validates an integer setting (a count, a period, a size) and returns it as an ``int``.

    Python and numpy integers are accepted; booleans, floats (``2.5``, also ``2.0``),
    strings and arrays raise, as do values outside ``[low, high]``.

    Raises:
      ValueError: naming ``where`` and the value.
    """
    if low is None and high is None:
        need = "an integer"
    elif high is None:
        need = f"an integer >= {low}"
    elif low is None:
        need = f"an integer <= {high}"
    else:
        need = f"an integer in [{low}, {high}]"
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise ValueError(f"{where}: {name}={value!r} must be {need}")
    v = int(value)
    if (low is not None and v < low) or (high is not None and v > high):
        raise ValueError(f"{where}: {name}={v} must be {need}")
    return v
