"""Weight averaging: EMA, SWA, ZSCL's weight ensemble, WiSE-FT interpolation.

Averages are method states in :class:`cljax.train.TrainState` ``methods``, created with
:func:`init_averages` and updated inside the jitted step by :func:`averaging_hook`
(``make_step(post_update=...)``). Between tasks, :func:`averaging_next_task` starts
the next task from an average (ZSCL's hand-over). WiSE-FT is :func:`interpolate`,
``(1 - alpha) * a + alpha * b`` (re-exported from :mod:`cljax.merging`).
"""

from cljax.averaging._base import (
    Averager,
    average_params,
    averaging_hook,
    averaging_next_task,
    init_averages,
)
from cljax.averaging._ema import EmaState, ema
from cljax.averaging._swa import SwaState, swa
from cljax.averaging._weight_ensemble import WeightEnsembleState, weight_ensemble
from cljax.merging import interpolate

__all__ = [
    "Averager",
    "EmaState",
    "SwaState",
    "WeightEnsembleState",
    "average_params",
    "averaging_hook",
    "ema",
    "init_averages",
    "interpolate",
    "averaging_next_task",
    "swa",
    "weight_ensemble",
]
